"""Write ``services/<domain>/bentofile.yaml`` for every registered domain (``python -m infra.bentofiles``).

Each one builds a Bento of the domain's service that carries its model: ``tessera bento DOMAIN [--version N]``
imports a registered version into BentoML's model store as ``tessera-<domain>`` and runs ``bentoml build -f
services/<domain>/bentofile.yaml`` from the repository root; ``bentoml containerize`` then makes its image. The
Python packages are the platform's and the domain's extra, pinned as ``constraints.txt`` pins them (a test
checks the files are up to date).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from infra.requirements import requirements  # noqa: E402
from shared import registry  # noqa: E402
from shared.serving import BENTO_MODEL_ENV, bento_model_name  # noqa: E402


def pins() -> dict[str, str]:
    out = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.\-]+)==(\S+)", line.strip())
        if match:
            out[match.group(1).lower().replace("_", "-")] = match.group(2)
    return out


def packages(domain: str) -> list[str]:
    """The platform's requirements and the domain's extra, pinned where constraints.txt pins them."""
    pinned = pins()
    out = []
    for requirement in requirements(ROOT / "pyproject.toml", [domain]):
        name = re.split(r"[<>=!~\[ ;]", requirement, maxsplit=1)[0]
        extras = re.search(r"\[[^\]]+\]", requirement)
        version = pinned.get(name.lower().replace("_", "-"))
        out.append(f"{name}{extras.group(0) if extras else ''}=={version}" if version else requirement)
    return out


def bentofile(domain: str) -> str:
    described = registry.get(domain)
    model = f"{bento_model_name(domain)}:latest"
    lines = [
        "# Written by `python -m infra.bentofiles`; do not edit. Build from the repository root:",
        f"#   tessera bento {domain} [--version N]    (imports the version as {bento_model_name(domain)}, then",
        f"#   bentoml build -f services/{domain}/bentofile.yaml)   and   bentoml containerize "
        f"{domain.replace('_', '-')}:<tag>",
        f'service: "{described.service}"',
        f"name: {domain.replace('_', '-')}",
        "labels:",
        "  project: tessera",
        f"  domain: {domain}",
        "include:",
        '  - "shared/**/*.py"',
        '  - "services/__init__.py"',
        f'  - "services/{domain}/**/*.py"',
        "exclude:",
        '  - "**/__pycache__"',
        "models:",
        f'  - "{model}"',
        "envs:",
        f"  - name: {BENTO_MODEL_ENV}",
        f'    value: "{model}"',
        "python:",
        "  lock_packages: false",
        "  extra_index_url:",
        '    - "https://download.pytorch.org/whl/cpu"',
        "  packages:",
        *(f'    - "{p}"' for p in packages(domain)),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    import argparse

    argparse.ArgumentParser(prog="python -m infra.bentofiles",
                            description=(__doc__ or "").splitlines()[0]).parse_args(argv)
    for name in registry.names():
        path = ROOT / "services" / name / "bentofile.yaml"
        path.write_text(bentofile(name))
        print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
