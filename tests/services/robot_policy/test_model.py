"""EBT-Policy: energy descent, training through the unrolled optimization, candidates, early stop, warm start;
and the diffusion baseline."""

from __future__ import annotations

import math

import pytest
import torch

from services.robot_policy.config import RobotPolicyConfig
from services.robot_policy.data import RobotPolicyState
from services.robot_policy.model import DiffusionPolicy, EBTPolicy, Plan, cosine_betas, shift_chunk
from services.robot_policy.training import ebt_loss
from shared.saved import tensor

# the whole workspace as the normalization range
STATE = RobotPolicyState(data="test", fingerprint="test", episodes={"train": (0,), "val": (1,), "test": (2,)},
                         obs_min=tensor([0.0] * 4 + [-1.0, -1.0]), obs_max=tensor([512.0] * 4 + [1.0, 1.0]),
                         action_min=tensor([0.0, 0.0]), action_max=tensor([512.0, 512.0]))


def _cfg(**kw: object) -> RobotPolicyConfig:
    base = {"d_model": 32, "d_ff": 64, "n_layers": 2, "n_heads": 2, "diffusion_steps": 10}
    return RobotPolicyConfig(**{**base, **kw})  # type: ignore[arg-type]


def _obs(batch: int = 3) -> torch.Tensor:
    torch.manual_seed(1)
    obs = torch.rand(batch, 2, 5) * 400 + 50
    obs[..., 4] = torch.rand(batch, 2) * 6
    return obs


def test_a_descent_step_with_a_small_step_size_lowers_the_energy() -> None:
    torch.manual_seed(0)
    policy = EBTPolicy(_cfg(step_size=1e-3), STATE)
    obs = policy.normalizer.obs(_obs())
    init = torch.randn(3, 16, 2)
    _, energies = policy(obs, init, steps=3, create_graph=False)
    assert all((later < earlier).all() for earlier, later in zip(energies, energies[1:], strict=False))


def test_training_backpropagates_through_the_unrolled_descent() -> None:
    """The loss on refined actions reaches the energy network through dE/da (a second-order gradient)."""
    torch.manual_seed(0)
    cfg = _cfg(train_steps=2, energy_weight=0.0, warm_start_prob=0.0, langevin_noise=0.0)
    policy = EBTPolicy(cfg, STATE)
    obs = policy.normalizer.obs(_obs())
    target = torch.rand(3, 16, 2) * 2 - 1
    loss = ebt_loss(policy, obs, target, target)
    loss.backward()
    # the head only influences the iterates through the gradient of the energy: non-zero => second order
    assert policy.head[0].weight.grad is not None and policy.head[0].weight.grad.abs().sum() > 0
    assert policy.log_alpha.grad is not None and policy.log_alpha.grad != 0
    assert policy.trunk.encoder.layers[0].attn.qkv.weight.grad.abs().sum() > 0  # type: ignore[union-attr]


def test_training_lowers_the_loss_on_a_fixed_batch() -> None:
    torch.manual_seed(0)
    cfg = _cfg(train_steps=2, langevin_noise=0.0, ranking_weight=0.0)
    policy = EBTPolicy(cfg, STATE)
    obs = policy.normalizer.obs(_obs(8))
    target = torch.rand(8, 16, 2) * 2 - 1
    optimizer = torch.optim.Adam(policy.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = ebt_loss(policy, obs, target, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0], losses[::10]


def test_ranking_loss_teaches_the_energy_to_rank_the_demonstration_first() -> None:
    """The InfoNCE term starts near log(1 + K) (energies that do not rank) and falls well below it; then the
    demonstration's energy is below its noised copies' and below a far chunk's."""
    from services.robot_policy.training import ranking_loss

    torch.manual_seed(0)
    cfg = _cfg(ranking_negatives=3, ranking_noise=0.5)
    policy = EBTPolicy(cfg, STATE)
    obs = policy.normalizer.obs(_obs(8))
    target = torch.rand(8, 16, 2) * 2 - 1
    optimizer = torch.optim.Adam(policy.parameters(), lr=1e-3)
    losses = []
    for _ in range(80):
        descended = torch.randn_like(target) * 0.5
        loss = ranking_loss(policy, obs, target, descended)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert abs(losses[0] - math.log(4)) < 0.3 and sum(losses[-10:]) / 10 < 0.4 * losses[0], losses[::10]
    with torch.no_grad():
        demo = policy.energy(obs, target)
        noised = policy.energy(obs, target + 0.3 * torch.randn_like(target))
        far = policy.energy(obs, -target)
    assert (demo < noised).float().mean() >= 0.75 and (demo < far).all()


def test_descent_starts_mix_noise_warm_and_noised_demonstrations() -> None:
    from services.robot_policy.training import descent_starts

    torch.manual_seed(0)
    target = torch.zeros(4000, 16, 2)
    previous = torch.full((4000, 16, 2), 5.0)  # warm starts sit near 5, noised demonstrations near 0
    init = descent_starts(_cfg(warm_start_prob=0.3, denoise_start_prob=0.2, init_noise=1.0), previous, target)
    warm = (init - 5.0).abs().amax(dim=(1, 2)) < 0.5
    spread = init.std(dim=(1, 2))
    assert warm.float().mean() == pytest.approx(0.3, abs=0.03)
    # noise starts have std 1; noised demonstrations std U(0, 1): about 0.2 + 0.5 * 0.2 of all below 0.5
    assert (~warm & (spread < 0.5)).float().mean() == pytest.approx(0.2 * 0.5, abs=0.03)
    with pytest.raises(ValueError, match="must not exceed 1"):
        _cfg(warm_start_prob=0.6, denoise_start_prob=0.5)


def test_the_step_size_has_its_own_optimizer_group() -> None:
    from pipelines.trainer import param_groups

    policy = EBTPolicy(_cfg(alpha_lr_scale=10.0), STATE)
    groups = param_groups(policy, 1e-4, decay_1d=True)
    (own,) = [g for g in groups if g.get("lr_scale")]
    assert own["params"] == [policy.log_alpha] and own["lr_scale"] == 10.0 and own["weight_decay"] == 0.0
    assert sum(len(g["params"]) for g in groups) == len(list(policy.parameters()))


def test_plan_keeps_the_lowest_energy_candidate_and_reports_steps() -> None:
    torch.manual_seed(0)
    policy = EBTPolicy(_cfg(step_size=1e-2), STATE).eval()
    obs = _obs(2)
    plan = policy.plan(obs, steps=3, candidates=5, early_stop_tol=0.0, generator=torch.Generator().manual_seed(0))
    assert plan.actions.shape == (2, 16, 2) and plan.steps == 3 and plan.passes == 7
    assert (plan.actions >= 0).all() and (plan.actions <= 512).all()
    assert len(plan.energy_trace) == 3
    # the same candidates one by one: the kept energy is the minimum over them
    gen = torch.Generator().manual_seed(0)
    single = [policy.plan(obs.repeat_interleave(5, 0), steps=3, candidates=1, early_stop_tol=0.0, generator=gen)]
    energies = single[0].energy.view(2, 5)
    torch.testing.assert_close(plan.energy, energies.min(dim=1).values, rtol=1e-4, atol=1e-5)


def test_plan_stops_early_when_the_energy_stops_falling() -> None:
    policy = EBTPolicy(_cfg(step_size=1e-6), STATE).eval()  # tiny steps: the energy barely moves
    plan = policy.plan(_obs(1), steps=4, early_stop_tol=1.0)
    assert plan.steps == 1 and plan.passes == 3


def test_warm_start_is_the_previous_chunk_shifted() -> None:
    policy = EBTPolicy(_cfg(), STATE).eval()
    previous = torch.rand(1, 16, 2) * 400 + 50
    plan = policy.plan(_obs(1), previous, steps=0, candidates=1)
    expected = shift_chunk(previous, 8)
    torch.testing.assert_close(plan.actions, expected, rtol=1e-4, atol=1e-3)
    assert torch.equal(expected[0, -8:], previous[0, -1:].expand(8, 2))


def test_plan_works_under_inference_mode_as_in_serving() -> None:
    policy = EBTPolicy(_cfg(), STATE).eval()
    with torch.inference_mode():
        plan = policy.plan(_obs(2), steps=2, early_stop_tol=0.0)
    assert plan.steps == 2 and torch.isfinite(plan.energy).all()


def test_energy_triggered_extra_compute_only_where_the_energy_stays_high() -> None:
    """Rows above the threshold are planned again with more steps and candidates and keep the lower energy;
    rows below it keep the first round's chunk; an unreachable threshold changes nothing."""
    torch.manual_seed(0)
    policy = EBTPolicy(_cfg(step_size=1e-2), STATE).eval()
    obs = _obs(6)

    def plan(**kw: object) -> Plan:
        with torch.inference_mode():  # as the service runs it
            return policy.plan(obs, steps=2, candidates=2, early_stop_tol=0.0,
                               generator=torch.Generator().manual_seed(0), **kw)  # type: ignore[arg-type]

    base = plan()
    unchanged = plan(escalate_above=float("inf"))
    assert torch.equal(unchanged.actions, base.actions) and unchanged.steps == 2 and unchanged.passes == base.passes
    threshold = float(base.energy.median())
    more = plan(escalate_above=threshold, escalate_steps=3, escalate_candidates=4)
    high = base.energy > threshold
    assert high.any() and (~high).any()
    assert more.steps == 2 + 3 and more.passes == base.passes + 7
    assert torch.equal(more.actions[~high], base.actions[~high]) and torch.equal(more.energy[~high], base.energy[~high])
    assert (more.energy[high] <= base.energy[high]).all()
    everywhere = plan(escalate_above=float("-inf"), escalate_steps=3, escalate_candidates=4)
    assert (everywhere.energy <= base.energy).all() and (everywhere.energy < base.energy).any()


def test_diffusion_baseline_trains_and_samples_in_the_action_range() -> None:
    torch.manual_seed(0)
    policy = DiffusionPolicy(_cfg(), STATE)
    obs = policy.normalizer.obs(_obs(4))
    target = torch.rand(4, 16, 2) * 2 - 1
    loss = policy.loss(obs, target)
    loss.backward()
    assert torch.isfinite(loss) and policy.head.weight.grad is not None
    plan = policy.eval().plan(_obs(4))
    assert plan.actions.shape == (4, 16, 2) and plan.steps == plan.passes == 10
    assert (plan.actions >= 0).all() and (plan.actions <= 512).all() and torch.isnan(plan.energy).all()


def test_cosine_schedule_is_increasing_and_capped() -> None:
    betas = cosine_betas(100)
    assert betas.shape == (100,) and (betas[1:] >= betas[:-1]).all() and betas.max() <= 0.999


def test_config_rejects_inconsistent_chunking() -> None:
    with pytest.raises(ValueError, match="action_patch"):
        _cfg(action_patch=5)
    with pytest.raises(ValueError, match="action_exec"):
        _cfg(action_exec=20)
