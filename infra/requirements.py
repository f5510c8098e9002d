"""Print the requirements of the project and of the given extras, one per line (the images' dependency layer).

    python infra/requirements.py postgres weather      # the platform, the MLflow backend, one domain
    python infra/requirements.py postgres all          # every domain

Reads ``pyproject.toml`` only (standard library, so it runs in a bare Python image before the project is
copied) and expands the extras that name the project itself (``all = ["tessera[forecasting,...]"]``).
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path


def requirements(pyproject: Path, extras: list[str]) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    optional: dict[str, list[str]] = project.get("optional-dependencies", {})
    out, seen = list(project["dependencies"]), set()
    todo = list(extras)
    while todo:
        extra = todo.pop(0)
        if extra in seen:
            continue
        if extra not in optional:
            raise SystemExit(f"unknown extra {extra!r}; known: {', '.join(sorted(optional))}")
        seen.add(extra)
        for requirement in optional[extra]:
            own = re.fullmatch(rf"{re.escape(project['name'])}\[([^\]]+)\]", requirement.strip())
            if own:
                todo.extend(e.strip() for e in own.group(1).split(","))
            elif requirement not in out:
                out.append(requirement)
    return out


if __name__ == "__main__":
    names = [e for arg in sys.argv[1:] for e in arg.split(",") if e]
    print("\n".join(requirements(Path(__file__).resolve().parent.parent / "pyproject.toml", names)))
