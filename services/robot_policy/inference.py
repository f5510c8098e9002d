"""The robot policy's batch function for the service, and the policy as an MLflow pyfunc model.

The service (``run_items``): the checked requests that waited together are planned as one batch, each as it
would be alone (its own noise, steps, candidates and early stop).

The pyfunc model: one observation history per row in, the planned chunk out. Rows are independent
(``spark_udf`` can map them): the history's observations flattened as ``obs{t}_{name}`` (oldest first) in, the
chunk as ``action{k}_x`` / ``action{k}_y`` and its final ``energy`` out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from .config import STATE_LAYOUT, WORKSPACE
from .model import EBTPolicy, PolicyBase


@dataclass(frozen=True)
class Planning:
    """One checked /act request: the raw history (To, 5) float32, the previous raw chunk (Ta, 2) or None, the
    step budget and candidates (None: the model's) and the seed of its noise (None: unseeded)."""

    obs: np.ndarray
    previous: np.ndarray | None = None
    steps: int | None = None
    candidates: int | None = None
    seed: int | None = None


@dataclass(frozen=True)
class Planned:
    """A request's chunk (Ta, 2) in raw units, its final energy (NaN without one), descent steps and passes."""

    actions: np.ndarray
    energy: float
    steps: int
    passes: int


def run_items(loaded: Any, items: list[Planning]) -> list[Planned]:
    """The service's batch: the histories of many requests planned at once by the energy-based policy, each as
    it would be alone; the diffusion baseline plans them one by one (its sampler draws one noise stream)."""
    policy: PolicyBase = loaded.model
    cfg = loaded.cfg
    generators = [torch.Generator().manual_seed(i.seed) if i.seed is not None else None for i in items]
    with torch.inference_mode():
        if not isinstance(policy, EBTPolicy):
            alone = [policy.plan(torch.from_numpy(i.obs)[None], generator=g)
                     for i, g in zip(items, generators, strict=True)]
            return [Planned(p.actions[0].numpy(), float(p.energy[0]), p.steps, p.passes) for p in alone]
        plans = policy.plan_each(
            torch.from_numpy(np.stack([i.obs for i in items])),
            [torch.from_numpy(i.previous) if i.previous is not None else None for i in items],
            [cfg.infer_steps if i.steps is None else i.steps for i in items],
            [cfg.candidates if i.candidates is None else i.candidates for i in items], generators)
    return [Planned(plans.actions[k].numpy(), float(plans.energy[k]), int(plans.steps[k]), int(plans.passes[k]))
            for k in range(len(items))]


def observation_columns(obs_horizon: int) -> list[str]:
    return [f"obs{t}_{name}" for t in range(obs_horizon) for name in STATE_LAYOUT]


def pyfunc_example(loaded: Any) -> tuple[pd.DataFrame, dict[str, Any]]:
    """One history: agent and block at the workspace's centre, held still; seed 0 as the default param."""
    centre = (WORKSPACE[0] + WORKSPACE[1]) / 2
    row = [centre, centre, centre, centre, 0.0] * loaded.cfg.obs_horizon
    return pd.DataFrame([row], columns=observation_columns(loaded.cfg.obs_horizon)), {"seed": 0}


def pyfunc_predict(loaded: Any, model_input: Any, params: dict[str, Any]) -> pd.DataFrame:
    """The chunk planned for each row's history (from noise seeded by the ``seed`` param)."""
    if not isinstance(model_input, pd.DataFrame):
        raise ValueError(f"the policy takes a DataFrame of histories, not {type(model_input).__name__}")
    cfg = loaded.cfg
    columns = observation_columns(cfg.obs_horizon)
    missing = [c for c in columns if c not in model_input.columns]
    if missing:
        raise ValueError(f"missing columns {missing[:5]}; a row is the history {columns[:5]}...")
    values = model_input[columns].to_numpy(dtype=np.float32).reshape(len(model_input), cfg.obs_horizon, -1).copy()
    positions = values[..., :4]
    if not np.isfinite(values).all() or (positions < WORKSPACE[0]).any() or (positions > WORKSPACE[1]).any():
        raise ValueError(f"observations must be finite with positions inside the workspace {list(WORKSPACE)}")
    values[..., 4] = np.mod(values[..., 4], 2 * math.pi)
    policy: PolicyBase = loaded.model
    generator = torch.Generator().manual_seed(int(params.get("seed", 0)))
    with torch.inference_mode():
        plan = policy.plan(torch.from_numpy(values), None, generator=generator)
    actions = plan.actions.reshape(len(model_input), -1).numpy()
    names = [f"action{k}_{axis}" for k in range(cfg.action_horizon) for axis in ("x", "y")]
    out = pd.DataFrame(actions, columns=names)
    out["energy"] = plan.energy.numpy()
    return out
