"""Client side of the robot_policy service: an observation history in, a planned action chunk out."""

from __future__ import annotations

from typing import Any

# The initial Push-T state of evaluation seed 100000 in gym-pusht 0.1.8 (agent x, y, block x, y, angle), held
# for the two observations of the history.
EXAMPLE_STATE = [113.0, 100.0, 219.7, 330.0, 3.126]


def example_request() -> dict[str, Any]:
    """A ``POST /act`` body: the first evaluation episode's start, seeded noise (a reproducible answer)."""
    return {"observations": [EXAMPLE_STATE, EXAMPLE_STATE], "seed": 0}
