"""Promotion rules: on the validation metric (training) and on an evaluation score (``evaluate --promote``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient

from pipelines.evaluate import parse_args, score_signature
from shared.tracking import list_versions, move_alias, production_version, promote_if_better, rollback


class _Registry:
    """A real MLflow registry on SQLite with versions of a model ``m`` carrying the given tags."""

    def __init__(self, client: MlflowClient) -> None:
        self.client = client
        client.create_registered_model("m")

    def add(self, **tags: str) -> Any:
        return self.client.create_model_version("m", source="/nowhere/model", tags=tags)

    @property
    def alias(self) -> str | None:
        held = production_version(self.client, "m")
        return None if held is None else str(held.version)


@pytest.fixture()
def reg(tmp_path: Path) -> Iterator[_Registry]:
    yield _Registry(MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}"))


def _promote(reg: _Registry, version: Any, value: float, signature: str = "s", **kw: Any) -> tuple[bool, str]:
    return promote_if_better(reg.client, "m", version, "x", value, signature, **kw)


def test_validation_metric_lower_is_better(reg: _Registry) -> None:
    v1, v2, v3 = reg.add(val_x="0.5", eval_signature="s"), reg.add(), reg.add()
    assert _promote(reg, v1, 0.5) == (True, "first model: no production version yet")
    promoted, reason = _promote(reg, v2, 0.6)
    assert not promoted and reg.alias == "1" and "val_x 0.6000 does not beat production v1 (0.5000)" in reason
    promoted, reason = _promote(reg, v3, 0.4)
    assert promoted and reg.alias == "3" and "beats production v1" in reason


def test_a_model_scored_on_other_data_does_not_take_over_and_says_how_to_promote_it(reg: _Registry) -> None:
    reg.add(val_x="0.1", eval_signature="other")
    v2 = reg.add()
    move_alias(reg.client, "m", "1")
    promoted, reason = _promote(reg, v2, 0.05)
    assert not promoted and reg.alias == "1"
    assert "other data or settings (other, this one: s)" in reason and "`tessera promote m 2`" in reason


def test_evaluation_score_higher_is_better_and_the_holder_is_not_promoted_over_itself(reg: _Registry) -> None:
    score = {"prefix": "score_", "signature_tag": "score_signature", "higher_is_better": True}
    reg.add(score_x="0.70", score_signature="s")
    v2, v3 = reg.add(), reg.add()
    move_alias(reg.client, "m", "1")
    promoted, reason = _promote(reg, v2, 0.65, **score)
    assert not promoted and reg.alias == "1" and "score_x 0.6500 does not beat production v1 (0.7000)" in reason
    promoted, _ = _promote(reg, v3, 0.81, **score)
    assert promoted and reg.alias == "3"
    assert _promote(reg, v3, 0.81, **score) == (False, "v3 already holds @production")


def test_promotions_by_hand_and_rollback_walk_the_history(reg: _Registry) -> None:
    for _ in range(3):
        reg.add()
    with pytest.raises(ValueError, match="nothing to roll back"):
        rollback(reg.client, "m")
    assert move_alias(reg.client, "m", "1") is None
    assert move_alias(reg.client, "m", "3") == "1"
    assert move_alias(reg.client, "m", "2") == "3"
    assert rollback(reg.client, "m") == ("2", "3") and reg.alias == "3"
    assert rollback(reg.client, "m") == ("3", "1") and reg.alias == "1"
    with pytest.raises(ValueError, match="v1 is the first version"):
        rollback(reg.client, "m")
    listed = list_versions(reg.client, "m")
    assert [v["version"] for v in listed] == [3, 2, 1] and listed[2]["aliases"] == ["production"]


def test_evaluate_promote_needs_a_version_and_a_domain_with_an_evaluation_score(capsys: pytest.CaptureFixture) -> None:
    args, domain = parse_args(["robot_policy", "--version", "4", "--promote"])
    assert args.promote and domain.eval_score == ("mean_max_reward", True)
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
    # every setting, sorted: the initial-state protocols and descent budgets are part of it (scores tagged before
    # them were coverage on gym-pusht's reset: another signature, so production is scored again)
    assert base == ('{"candidates": 0, "data": "", "descent_steps": [2, 1, 4], "episodes": 50, '
                    '"escalate_candidates": 8, "escalate_quantile": 0.75, "escalate_steps": 4, "gif_episodes": 3, '
                    '"max_steps": 300, "ood_samples": 512, "resets": ["legacy", "gym"], "seed_start": 100000, '
                    '"workers": 0}')
