"""A model loaded for serving or evaluation, apart from MLflow (a service's model process unpickles it without
importing the tracking client); :mod:`shared.tracking` loads and registers these."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class LoadedModel:
    model: torch.nn.Module
    cfg: Any
    state: Any  # the domain's SavedState
    domain: str
    name: str | None = None  # registered model name
    version: str | None = None
    run_id: str | None = None

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "run_id": self.run_id,
                "architecture": getattr(self.cfg, "model", None)}
