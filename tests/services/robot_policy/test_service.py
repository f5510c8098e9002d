"""/act request validation and answers, on the service class without a server (HTTP: the integration test)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from pydantic import ValidationError

from services.robot_policy.config import RobotPolicyConfig
from services.robot_policy.model import build
from services.robot_policy.service import ActRequest, RobotPolicy, check_rows
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


def _service(model: str = "ebt") -> Any:
    torch.manual_seed(0)
    cfg = RobotPolicyConfig(model=model, d_model=16, d_ff=32, n_layers=1, n_heads=2, diffusion_steps=5)
    loaded = LoadedModel(model=build(cfg, STATE).eval(), cfg=cfg, state=STATE, domain="robot_policy",
                         name="robot_policy", version="3", run_id="r")
    service = object.__new__(RobotPolicy.inner)
    service.holder = _Holder(loaded)
    return service


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
    service = _service()
    service.holder = _Holder(None)
    status, reason = error_of(service.act(ActRequest(observations=HISTORY)))
    assert status == 503 and "tessera train robot_policy" in reason
    assert error_of(service.model())[0] == 503  # /model too, through the same skeleton


def test_angles_are_wrapped_and_rows_checked() -> None:
    values = check_rows(HISTORY, 2, 5, "observations", angle_column=4)
    assert values[1, 4] == pytest.approx(7.0 - 2 * math.pi, abs=1e-5)
