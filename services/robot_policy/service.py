"""BentoML service of the robot_policy domain: ``POST /act`` on port 3005.

Takes the observation history (oldest first) and optionally the previous action chunk (a warm start), and
returns the planned action chunk, how many of its actions to execute, the final energy (an uncertainty
signal: higher means less familiar) and the descent steps used.
"""

from __future__ import annotations

import math
import time
from typing import Any

import bentoml
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from services.robot_policy.client import example_request
from services.robot_policy.config import ACTION_DIM, STATE_DIM, WORKSPACE
from services.robot_policy.inference import Planning
from shared.serving import BENTO_MAX_CONCURRENCY, BatchingService, ModelRef, RequestError, answers_errors, guard

MAX_DESCENT_STEPS = 16
MAX_CANDIDATES = 64


class ActRequest(BaseModel):
    """Observation history in the Push-T state layout, oldest first (as many rows as the model's obs_horizon)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, json_schema_extra={"example": example_request()})
    observations: list[list[float]] = Field(
        min_length=1, max_length=64,
        description="rows of [agent_x, agent_y, block_x, block_y, block_angle] (pixels in [0, 512], radians)")
    previous_actions: list[list[float]] | None = Field(
        default=None, max_length=256,
        description="the chunk returned by the previous call (warm start); its executed part is skipped")
    descent_steps: int | None = Field(default=None, ge=1, le=MAX_DESCENT_STEPS,
                                      description="energy descent steps at most (default: the model's)")
    candidates: int | None = Field(default=None, ge=1, le=MAX_CANDIDATES,
                                   description="chunks refined in parallel; the lowest energy is returned")
    seed: int | None = Field(default=None, ge=0, description="seed of the initial noise (reproducible answers)")


class ActResponse(BaseModel):
    actions: list[list[float]]
    execute: int
    energy: float | None
    descent_steps: int
    passes: int
    latency_ms: float = Field(description="time in the service, the wait for a batch included")
    model: ModelRef


def check_rows(rows: list[list[float]], n_rows: int, width: int, what: str,
               angle_column: int | None = None) -> np.ndarray:
    """(n_rows, width) array of ``rows`` inside the workspace, or a RequestError saying what is wrong."""
    if len(rows) != n_rows:
        raise RequestError(f"{what}: expected {n_rows} rows, got {len(rows)}")
    for i, row in enumerate(rows):
        if len(row) != width:
            raise RequestError(f"{what}[{i}]: expected {width} values, got {len(row)}")
    values = np.asarray(rows, dtype=np.float64)
    low, high = WORKSPACE
    positions = np.delete(values, angle_column, axis=1) if angle_column is not None else values
    outside = np.argwhere((positions < low) | (positions > high))
    if len(outside):
        i, j = outside[0]
        raise RequestError(f"{what}[{i}][{j}] = {positions[i, j]:g} is outside the workspace [{low:g}, {high:g}] px")
    if angle_column is not None:
        values[:, angle_column] = np.mod(values[:, angle_column], 2 * math.pi)
    return values.astype(np.float32)


def planning(cfg: Any, request: ActRequest) -> Planning:
    """The request checked against the served model's settings, or a RequestError saying what is wrong."""
    obs = check_rows(request.observations, cfg.obs_horizon, STATE_DIM, "observations", angle_column=4)
    previous = None
    if request.previous_actions is not None:
        previous = check_rows(request.previous_actions, cfg.action_horizon, ACTION_DIM, "previous_actions")
    if cfg.model != "ebt" and (request.descent_steps or request.candidates):
        raise RequestError(f"descent_steps/candidates apply to the energy-based model; the served model is "
                           f"{cfg.model!r}")
    return Planning(obs, previous, request.descent_steps, request.candidates, request.seed)


@bentoml.service(name="robot_policy", workers=1, resources={"cpu": "2"},
                 traffic={"timeout": 30, "max_concurrency": BENTO_MAX_CONCURRENCY})
class RobotPolicy(BatchingService):
    """Push-T action chunks from EBT-Policy: send the observation history (oldest first) to `/act` and get the
    planned chunk, how many of its actions to execute, and its final energy (higher: less familiar).
    (The histories of requests that arrive together are planned as one batch, each as it would be alone.)"""

    domain = "robot_policy"
    batch_function = "services.robot_policy.inference:run_items"
    max_batch_items = 32  # histories (each with its candidates): past ~16 a batch gains little on a CPU core

    @bentoml.api(route="/act")
    @answers_errors
    async def act(self, request: ActRequest, /) -> ActResponse:
        """Plan the next action chunk from the observation history."""
        started = time.perf_counter()
        loaded = self.holder.get()
        (plan,) = await self.batcher.submit(loaded, [planning(loaded.cfg, request)])
        return ActResponse(actions=plan.actions.tolist(), execute=loaded.cfg.action_exec,
                           energy=plan.energy if math.isfinite(plan.energy) else None, descent_steps=plan.steps,
                           passes=plan.passes, latency_ms=(time.perf_counter() - started) * 1000,
                           model=ModelRef(**loaded.describe()))


guard(RobotPolicy, "robot_policy")
