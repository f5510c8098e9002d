"""Promotion rules: on the validation metric (training) and on an evaluation score (``evaluate --promote``)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST

from pipelines.evaluate import parse_args, score_signature
from shared.tracking import promote_if_better


class _Registry:
    """A stand-in MLflow client holding versions with tags and one alias (the real registry is exercised by the
    stack tests)."""

    def __init__(self, **tags: dict[str, str]) -> None:
        self.versions = {v: SimpleNamespace(version=v, tags=t) for v, t in tags.items()}
        self.alias: str | None = None

    def get_model_version_by_alias(self, name: str, alias: str) -> Any:
        if self.alias is None:
            raise MlflowException(f"Registered model alias {alias} not found.", error_code=RESOURCE_DOES_NOT_EXIST)
        return self.versions[self.alias]

    def set_registered_model_alias(self, name: str, alias: str, version: str) -> None:
        self.alias = version


def _promote(registry: _Registry, version: str, value: float, signature: str = "s", **kw: Any) -> tuple[bool, str]:
    return promote_if_better(registry, "m", registry.versions[version], "x", value, signature, **kw)  # type: ignore[arg-type]


def test_validation_metric_lower_is_better() -> None:
    reg = _Registry(**{"1": {"val_x": "0.5", "eval_signature": "s"}, "2": {}, "3": {}})
    assert _promote(reg, "1", 0.5) == (True, "first model: no production version yet")
    promoted, reason = _promote(reg, "2", 0.6)
    assert not promoted and reg.alias == "1" and "val_x 0.6000 does not beat production v1 (0.5000)" in reason
    promoted, reason = _promote(reg, "3", 0.4)
    assert promoted and reg.alias == "3" and "beats production v1" in reason


def test_a_holder_scored_on_other_data_is_replaced_and_the_reason_says_so() -> None:
    reg = _Registry(**{"1": {"val_x": "0.1", "eval_signature": "other"}, "2": {}})
    reg.alias = "1"
    promoted, reason = _promote(reg, "2", 0.9)
    assert promoted and reg.alias == "2" and "other data or settings (other)" in reason


def test_evaluation_score_higher_is_better_and_the_holder_is_not_promoted_over_itself() -> None:
    score = {"prefix": "score_", "signature_tag": "score_signature", "higher_is_better": True}
    reg = _Registry(**{"1": {"score_x": "0.70", "score_signature": "s"}, "2": {}, "3": {}})
    reg.alias = "1"
    promoted, reason = _promote(reg, "2", 0.65, **score)
    assert not promoted and reg.alias == "1" and "score_x 0.6500 does not beat production v1 (0.7000)" in reason
    promoted, _ = _promote(reg, "3", 0.81, **score)
    assert promoted and reg.alias == "3"
    reg.versions["3"].tags.update(score_x="0.81", score_signature="s")
    assert _promote(reg, "3", 0.81, **score) == (False, "v3 already holds @production")


def test_evaluate_promote_needs_a_version_and_a_domain_with_an_evaluation_score(capsys: pytest.CaptureFixture) -> None:
    args, domain = parse_args(["robot_policy", "--version", "4", "--promote"])
    assert args.promote and domain.eval_score == ("mean_max_coverage", True)
    with pytest.raises(SystemExit):
        parse_args(["robot_policy", "--promote"])
    assert "--promote needs --version" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["forecasting", "--version", "2", "--promote"])
    assert "forecasting has no evaluation pipeline" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["weather", "--version", "2", "--promote"])  # an evaluation, but no score to rank on
    assert "weather has no evaluation score" in capsys.readouterr().err


def test_score_signature_depends_on_every_setting_and_the_data() -> None:
    from services.robot_policy.config import RobotPolicyEvalConfig

    base = score_signature(RobotPolicyEvalConfig(), None)
    assert base == score_signature(RobotPolicyEvalConfig(episodes=50), None)
    assert base != score_signature(RobotPolicyEvalConfig(episodes=10), None)
    assert base != score_signature(RobotPolicyEvalConfig(), "other.zarr")
    # the same string as the settings dicts of before gave: scores tagged then stay comparable
    assert base == ('{"candidates": 0, "data": "", "descent_steps": 0, "episodes": 50, "gif_episodes": 3, '
                    '"max_steps": 300, "ood_samples": 512, "seed_start": 100000, "workers": 0}')
