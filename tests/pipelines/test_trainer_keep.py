"""Which epoch's weights the trainer keeps (``cfg.keep``)."""

import math

import pytest
import torch

from pipelines.trainer import kept_epoch
from services.forecasting.config import ForecastingConfig
from services.robot_policy.config import RobotPolicyConfig
from shared.config import apply_overrides


def _state(vals: list[float]) -> dict:
    history = [{"epoch": i + 1, "val_mse": v} for i, v in enumerate(vals)]
    best = min(range(len(vals)), key=vals.__getitem__)
    return {"history": history, "best_val": vals[best], "best_model": {"w": torch.full((2,), float(best + 1))}}


def test_best_keeps_the_best_validation_epoch_weights() -> None:
    weights, epoch, val = kept_epoch(_state([0.5, 0.3, 0.4]), "best", "mse")
    assert epoch == 2 and val == 0.3
    assert weights is not None and torch.equal(weights["w"], torch.full((2,), 2.0))


def test_last_keeps_the_model_as_it_stands_with_its_own_validation_score() -> None:
    weights, epoch, val = kept_epoch(_state([0.5, 0.3, 0.4]), "last", "mse")
    assert weights is None  # the caller keeps the current weights
    assert epoch == 3 and val == 0.4


def test_best_epoch_is_the_first_epoch_with_the_best_validation_score() -> None:
    assert kept_epoch(_state([0.5, 0.3, 0.4]), "best", "mse")[1] == 2
    assert kept_epoch(_state([0.5, 0.3, 0.3]), "best", "mse")[1] == 2  # a tie does not replace the best


def test_no_epoch_and_unknown_choices() -> None:
    weights, epoch, val = kept_epoch({"history": [], "best_model": None, "best_val": math.inf}, "best", "mse")
    assert weights is None and epoch == 0 and math.isnan(val)
    with pytest.raises(ValueError, match="keep='first'"):
        kept_epoch(_state([0.1]), "first", "mse")


def test_defaults_and_overrides() -> None:
    assert ForecastingConfig().keep == "best"
    assert RobotPolicyConfig().keep == "last"
    assert apply_overrides(ForecastingConfig(), ["keep=last"]).keep == "last"
    with pytest.raises(ValueError, match="keep"):
        apply_overrides(ForecastingConfig(), ["keep=first"])
