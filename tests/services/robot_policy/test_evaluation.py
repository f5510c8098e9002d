"""Closed-loop evaluation pieces: rollouts, the AUROC, the OOD perturbation, the evaluation settings."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch

from pipelines.evaluate import UsageError, _flat_metrics, settings_for
from services.robot_policy.config import RobotPolicyConfig, RobotPolicyEvalConfig
from services.robot_policy.evaluation import auroc, evaluate_policy, perturb, rollout
from services.robot_policy.model import build
from shared import registry
from tests.services.robot_policy.test_model import STATE


def test_auroc_matches_pairwise_counting() -> None:
    rng = np.random.default_rng(0)
    neg, pos = rng.normal(0, 1, 40), rng.normal(1, 1, 30)
    pairs = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    assert auroc(neg, pos) == pytest.approx(pairs)
    assert auroc(np.zeros(5), np.ones(5)) == 1.0 and auroc(np.ones(5), np.ones(5)) == 0.5


def test_perturbation_moves_positions_only_and_stays_in_the_workspace() -> None:
    obs = torch.full((4, 2, 5), 256.0)
    noisy = perturb(obs, torch.Generator().manual_seed(0), scale=1000.0)
    assert (noisy[..., :4] >= 10).all() and (noisy[..., :4] <= 502).all()
    assert torch.equal(noisy[..., 4], obs[..., 4]) and not torch.equal(noisy, obs)


def test_rollout_is_seeded_and_records_frames() -> None:
    torch.manual_seed(0)
    policy = build(RobotPolicyConfig(d_model=16, d_ff=32, n_layers=1, n_heads=2), STATE).eval()
    first = rollout(policy, 100000, max_steps=20, record=True)
    again = rollout(policy, 100000, max_steps=20)
    assert first["steps"] == 20 and len(first["latency_ms"]) == 3  # chunks of 8 actions: 8 + 8 + 4 steps
    assert first["max_coverage"] == again["max_coverage"] and 0.0 <= first["max_coverage"] <= 1.0
    assert len(first["frames"]) == 21 and first["frames"][0].shape == (192, 192, 3)
    assert again["frames"] == []


def test_evaluation_reports_the_issue_metrics() -> None:
    torch.manual_seed(0)
    domain = registry.get("robot_policy")
    cfg = RobotPolicyConfig(d_model=16, d_ff=32, n_layers=1, n_heads=2, synthetic_episodes=3)
    data = domain.load_data(cfg)
    policy = domain.build_model(cfg, data.state).eval()
    settings = RobotPolicyEvalConfig(episodes=2, max_steps=16, gif_episodes=1, ood_samples=16, workers=1)
    result = evaluate_policy(policy, cfg, data.state, None, settings)
    for key in ("success_rate", "mean_max_reward", "mean_max_reward_se", "mean_max_coverage", "descent_steps",
                "latency_ms_per_chunk", "energy_ood_auroc"):
        assert key in result.metrics
    assert result.metrics["episodes"] == 2 and len(result.metrics["per_episode_max_coverage"]) == 2
    # both initial-state protocols at 2, 1 and 4 descent steps; the headline is legacy states at 2 steps
    table = result.metrics["by_initial_states"]
    assert set(table) == {"legacy", "gym"} and set(table["gym"]) == {"steps_2", "steps_1", "steps_4"}
    assert result.metrics["initial_states"] == "legacy" and result.metrics["max_descent_steps"] == 2
    assert table["legacy"]["steps_2"]["mean_max_reward"] == result.metrics["mean_max_reward"]
    assert 1 <= table["gym"]["steps_4"]["descent_steps"] <= 4 and table["gym"]["steps_1"]["descent_steps"] == 1
    escalation = result.metrics["escalation"]  # the headline protocol again, extra compute above the threshold
    assert 0.0 <= escalation["escalated_fraction"] <= 1.0 and 0.0 <= escalation["mean_max_reward"] <= 1.0
    assert 2 <= escalation["descent_steps"] <= 2 + 4 and np.isfinite(escalation["threshold"])
    rewards = result.metrics["per_episode_max_reward"]
    assert result.metrics["mean_max_reward"] == pytest.approx(np.mean(rewards), abs=1e-4)
    assert set(result.figures) == {"energy_vs_step.png", "energy_ood.png"}
    assert result.files["rollouts.gif"][:6] == b"GIF89a"
    flat = _flat_metrics(result.metrics)
    assert "per_episode_max_coverage_1" in flat and "model" not in flat
    assert "energy_ood_auroc_by_jitter_px.120" in flat and "by_initial_states.gym.steps_1.mean_max_reward" in flat


def test_evaluation_settings_from_flags_and_set_and_unknown_keys_refused() -> None:
    domain = registry.get("robot_policy")
    args = argparse.Namespace(overrides=["max_steps=50", "candidates=2", "descent_steps=1,2", "resets=gym"],
                              eval_episodes="7")
    settings = settings_for(domain, args)
    assert (settings.episodes, settings.max_steps, settings.candidates) == (7, 50, 2)
    assert settings.descent_steps == (1, 2) and settings.resets == ("gym",)
    with pytest.raises(UsageError, match="expected one of"):
        settings_for(domain, argparse.Namespace(overrides=["resets=dp"]))
    with pytest.raises(UsageError, match="unknown setting 'episode'"):
        settings_for(domain, argparse.Namespace(overrides=["episode=3"]))
    with pytest.raises(UsageError, match="episodes=0: must be >= 1"):
        settings_for(domain, argparse.Namespace(overrides=["episodes=0"]))
    with pytest.raises(UsageError, match="expected an integer"):
        settings_for(domain, argparse.Namespace(overrides=["workers=many"]))


def test_settings_are_parsed_to_their_declared_types_and_checked() -> None:
    """Evaluation settings go through the training settings' parser (no ``type(default)(value)`` casts, which
    made "false" True): a choice outside its Literal is refused with the choices."""
    domain = registry.get("weather")
    settings = settings_for(domain, argparse.Namespace(overrides=["split=val", "lead_steps=2"]))
    assert settings.split == "val" and settings.lead_steps == 2
    with pytest.raises(UsageError, match="split='train': expected one of"):
        settings_for(domain, argparse.Namespace(overrides=["split=train"]))


def test_legacy_initial_states_are_diffusion_policys() -> None:
    """Seed 100000 under Diffusion Policy's reset (np.random.RandomState): agent (235, 124), block set to (335,
    128) and then turned about its centre of mass (the legacy order, as in DP: the observed block position
    moves); gym-pusht 0.1.8's own reset puts the agent at (113, 100) for the same seed."""
    from services.robot_policy.data import make_env
    from services.robot_policy.evaluation import legacy_initial_state, reset_env

    state = legacy_initial_state(100_000)
    assert state[:4].tolist() == [235, 124, 335, 128] and state[4] == pytest.approx(-0.905, abs=1e-3)
    env = make_env()
    try:
        legacy, _ = reset_env(env, 100_000, "legacy")
        gym, _ = reset_env(env, 100_000, "gym")
        with pytest.raises(ValueError, match="reset='dp'"):
            reset_env(env, 100_000, "dp")
    finally:
        env.close()
    assert legacy[:2].tolist() == [235, 124] and gym[:2].tolist() == [113, 100]
    assert legacy[4] == pytest.approx(state[4] % (2 * np.pi), abs=1e-6)
    assert legacy[2:4].tolist() == pytest.approx([299.613, 145.202], abs=1e-3)


def test_rollout_reward_is_coverage_over_095_clipped() -> None:
    """The episode's max reward is DP's and LeRobot's clip(coverage / 0.95, 0, 1) of its max coverage."""
    torch.manual_seed(0)
    policy = build(RobotPolicyConfig(d_model=16, d_ff=32, n_layers=1, n_heads=2), STATE).eval()
    for reset in ("legacy", "gym"):
        run = rollout(policy, 100_003, max_steps=24, reset=reset)
        assert run["reset"] == reset
        assert run["max_reward"] == pytest.approx(min(1.0, run["max_coverage"] / 0.95))


def test_score_means_and_standard_errors() -> None:
    from services.robot_policy.evaluation import _score

    runs = [{"max_reward": r, "max_coverage": c, "success": s}
            for r, c, s in [(1.0, 0.96, True), (0.5, 0.475, False), (0.0, 0.0, False)]]
    score = _score(runs)
    assert score["mean_max_reward"] == pytest.approx(0.5) and score["success_rate"] == pytest.approx(1 / 3)
    assert score["mean_max_reward_se"] == pytest.approx(np.std([1.0, 0.5, 0.0], ddof=1) / np.sqrt(3))
    assert score["mean_max_coverage"] == pytest.approx((0.96 + 0.475) / 3)


@pytest.mark.parametrize(("changes", "reason"), [
    ({"resets": ()}, "at least one value"),
    ({"descent_steps": (2, -1)}, "must be >= 0"),
    ({"escalate_quantile": 1.0}, "must be in \\[0, 1\\)"),
    ({"escalate_candidates": 0}, "escalate_candidates=0"),
])
def test_evaluation_settings_are_checked(changes: dict, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        RobotPolicyEvalConfig(**changes)
