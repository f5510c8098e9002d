"""Client side of the robot_policy service: an observation history in, a planned action chunk out."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.table import Table

from shared.client import post_json
from shared.registry import Prediction

# The initial Push-T state of evaluation seed 100000 in gym-pusht 0.1.8 (agent x, y, block x, y, angle), held
# for the two observations of the history.
EXAMPLE_STATE = [113.0, 100.0, 219.7, 330.0, 3.126]


def example_request() -> dict[str, Any]:
    """A ``POST /act`` body: the first evaluation episode's start, seeded noise (a reproducible answer)."""
    return {"observations": [EXAMPLE_STATE, EXAMPLE_STATE], "seed": 0}


def predict_json(url: str, path: Path, *, output: Path | None = None, timeout: float = 120.0) -> Prediction:
    """Send a ``POST /act`` body from a JSON file; the planned chunk as a table (and the answer as JSON)."""
    body = json.loads(path.read_text())
    answer = post_json(url, body, timeout=timeout)
    text = json.dumps(answer, indent=1)
    if output is not None:
        output.write_text(text)
    model = answer["model"]
    energy = "no energy" if answer.get("energy") is None else f"energy {answer['energy']:.3f}"
    table = Table(title=f"POST {url} -> {model.get('architecture')} v{model['version']}: {energy} after "
                        f"{answer['descent_steps']} step(s), {answer['latency_ms']:.0f} ms; first 4 of "
                        f"{len(answer['actions'])} actions (execute {answer['execute']})")
    table.add_column("state [agent x, y, block x, y, angle]")
    table.add_column("action x", justify="right")
    table.add_column("action y", justify="right")
    latest = body["observations"][-1]
    for i, (x, y) in enumerate(answer["actions"][:4]):
        table.add_row(", ".join(f"{v:.1f}" for v in latest) if i == 0 else "", f"{x:.1f}", f"{y:.1f}")
    return Prediction(version=str(model["version"]), summary=table, output=output, text=None if output else text)
