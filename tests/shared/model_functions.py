"""Module-level functions for ``tests/shared/test_model_process.py`` to run in a model process (the child
imports them by name)."""

from __future__ import annotations

import os
from typing import Any


def scaled(model: dict[str, Any], items: list[float]) -> list[tuple[float, int]]:
    """Each item times the model's factor, with the process that computed it."""
    return [(model["factor"] * item, os.getpid()) for item in items]


def fails(model: dict[str, Any], items: list[float]) -> list[float]:
    raise ValueError(f"model {model['factor']} refuses {len(items)} items")


def dies(model: dict[str, Any], items: list[float]) -> list[float]:
    os._exit(3)
