"""/act request validation and answers, on the service class without a server (HTTP: the integration test),
and the batch function: requests planned together get the plans they would get alone."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from services.robot_policy.config import RobotPolicyConfig
from services.robot_policy.inference import Planning, run_items
from services.robot_policy.model import build
from services.robot_policy.service import ActRequest, RobotPolicy, check_rows
from shared.batching import Batcher
from shared.serving import ModelUnavailable
from shared.tracking import LoadedModel
from tests.conftest import error_of
from tests.services.robot_policy.test_model import STATE

HISTORY = [[200.0, 300.0, 250.0, 260.0, 0.5], [205.0, 298.0, 250.0, 260.0, 7.0]]


class _Holder:
    def __init__(self, loaded: LoadedModel | None) -> None:
        self.loaded = loaded

    def get(self) -> LoadedModel:
        if self.loaded is None:
            raise ModelUnavailable("no 'robot_policy' model yet; train one with `tessera train robot_policy`")
        return self.loaded


def _loaded(model: str = "ebt", **changes: Any) -> LoadedModel:
    torch.manual_seed(0)
    cfg = RobotPolicyConfig(model=model, d_model=16, d_ff=32, n_layers=1, n_heads=2, diffusion_steps=5, **changes)
    return LoadedModel(model=build(cfg, STATE).eval(), cfg=cfg, state=STATE, domain="robot_policy",
                       name="robot_policy", version="3", run_id="r")


class _Service:
    """The endpoint's class without BentoML's server: its holder, and its batcher on a thread (no model
    process); ``act`` runs the coroutine to its answer."""

    def __init__(self, loaded: LoadedModel | None) -> None:
        self.inner = object.__new__(RobotPolicy.inner)
        self.inner.holder = _Holder(loaded)

    def act(self, request: ActRequest) -> Any:
        async def run() -> Any:
            self.inner.batcher = Batcher(run_items, max_items=32)
            try:
                return await self.inner.act(request)
            finally:
                self.inner.batcher.close()

        return asyncio.run(run())

    def model(self) -> Any:
        return self.inner.model()


def _service(model: str = "ebt") -> Any:
    return _Service(_loaded(model))


def test_act_answers_a_chunk_in_the_workspace_with_energy_and_steps() -> None:
    answer = _service().act(ActRequest(observations=HISTORY, seed=1))
    assert len(answer.actions) == 16 and answer.execute == 8
    assert all(0 <= v <= 512 for row in answer.actions for v in row)
    assert answer.energy is not None and math.isfinite(answer.energy)
    assert 1 <= answer.descent_steps <= 4 and answer.passes == 1 + 2 * answer.descent_steps
    assert answer.model.version == "3" and answer.model.architecture == "ebt"


def test_a_diffusion_model_answers_without_energy_and_refuses_descent_settings() -> None:
    service = _service("diffusion")
    answer = service.act(ActRequest(observations=HISTORY))
    assert answer.energy is None and answer.descent_steps == 5
    status, reason = error_of(service.act(ActRequest(observations=HISTORY, descent_steps=2)))
    assert status == 422 and "energy-based" in reason


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"observations": HISTORY[:1]}, "expected 2 rows"),
        ({"observations": [[1.0, 2.0], [1.0, 2.0]]}, "expected 5 values"),
        ({"observations": [[-3.0, 300.0, 250.0, 260.0, 0.5], HISTORY[1]]}, "outside the workspace"),
        ({"previous_actions": [[100.0, 100.0]] * 15}, "expected 16 rows"),
        ({"previous_actions": [[100.0, 600.0]] * 16}, "previous_actions[0][1] = 600"),
    ],
)
def test_wrong_sizes_and_positions_are_refused_with_the_reason(changes: dict, reason: str) -> None:
    status, message = error_of(_service().act(ActRequest(**{"observations": HISTORY, **changes})))
    assert status == 422 and reason in message


def test_schema_refuses_non_finite_values_extra_fields_and_bad_settings() -> None:
    for body in ({"observations": [[math.nan] * 5] * 2}, {"observations": HISTORY, "extra": 1},
                 {"observations": HISTORY, "descent_steps": 0}, {"observations": HISTORY, "candidates": 1000},
                 {"observations": "x"}):
        with pytest.raises(ValidationError):
            ActRequest(**body)  # type: ignore[arg-type]


def test_no_model_yet_is_a_503_saying_how_to_train() -> None:
    service = _Service(None)
    status, reason = error_of(service.act(ActRequest(observations=HISTORY)))
    assert status == 503 and "tessera train robot_policy" in reason
    assert error_of(service.model())[0] == 503  # /model too, through the same skeleton


def test_angles_are_wrapped_and_rows_checked() -> None:
    values = check_rows(HISTORY, 2, 5, "observations", angle_column=4)
    assert values[1, 4] == pytest.approx(7.0 - 2 * math.pi, abs=1e-5)


def _requests(count: int) -> list[Planning]:
    rng = np.random.default_rng(0)
    return [Planning(obs=(50 + 400 * rng.random((2, 5))).astype(np.float32),
                     previous=(50 + 400 * rng.random((16, 2))).astype(np.float32) if k % 3 == 0 else None,
                     steps=(None, 1, 2, 3)[k % 4], candidates=(None, 1, 3, 6)[k % 4], seed=k)
            for k in range(count)]


def test_requests_planned_together_get_the_plans_they_get_alone() -> None:
    """Each request's own noise (seed), warm start, steps and candidates; and what the policy's plan() gives."""
    loaded = _loaded(infer_steps=4)
    items = _requests(8)
    together = run_items(loaded, items)
    for item, batched in zip(items, together, strict=True):
        (alone,) = run_items(loaded, [item])
        generator = torch.Generator().manual_seed(item.seed)
        with torch.inference_mode():
            direct = loaded.model.plan(torch.from_numpy(item.obs)[None],
                                       None if item.previous is None else torch.from_numpy(item.previous)[None],
                                       steps=item.steps, candidates=item.candidates, generator=generator)
        assert np.array_equal(alone.actions, direct.actions[0].numpy()) and alone.steps == direct.steps
        assert alone.energy == pytest.approx(float(direct.energy[0]), abs=1e-6) and alone.passes == direct.passes
        np.testing.assert_allclose(batched.actions, alone.actions, atol=1e-3)  # px: float rounding only
        assert batched.steps == alone.steps and batched.passes == 1 + 2 * batched.steps
        assert batched.energy == pytest.approx(alone.energy, abs=1e-4)


def test_a_request_that_stops_early_stops_alone() -> None:
    """With a tolerance no step can meet, every request stops after one step, whatever its budget; with none,
    each takes its own budget."""
    items = [Planning(i.obs, i.previous, 3, i.candidates, i.seed) for i in _requests(4)]
    stopping = run_items(_loaded(early_stop_tol=1e9), items)
    assert [p.steps for p in stopping] == [1, 1, 1, 1]
    budgets = [Planning(i.obs, None, steps, 2, i.seed) for i, steps in zip(items, (1, 4, 2, 3), strict=True)]
    assert [p.steps for p in run_items(_loaded(early_stop_tol=0.0), budgets)] == [1, 4, 2, 3]


def test_the_diffusion_baseline_plans_each_request_from_its_own_seed() -> None:
    loaded = _loaded("diffusion")
    items = [Planning(i.obs, None, None, None, 5) for i in _requests(2)]
    first, second = run_items(loaded, items)
    (alone,) = run_items(loaded, items[1:])
    assert np.array_equal(second.actions, alone.actions) and math.isnan(first.energy) and first.steps == 5
