"""The inference strategies shared by validation, evaluation and serving."""

from __future__ import annotations

import pytest
import torch

from shared.inferers import (
    EnergyDescentInferer,
    IndependentDescentInferer,
    RolloutInferer,
    SimpleInferer,
    SlidingWindowInferer,
)


def test_simple_inferer_is_one_forward_pass() -> None:
    net = torch.nn.Linear(3, 2)
    x = torch.randn(4, 3)
    assert torch.equal(SimpleInferer()(net, x), net(x))


def test_sliding_window_stitches_windows_back_into_the_volume() -> None:
    pytest.importorskip("monai", reason="MONAI provides the sliding window (the dev extra installs it)")
    volume = torch.randn(1, 2, 20, 24, 18)
    double = SlidingWindowInferer(roi_size=(8, 8, 8), sw_batch_size=3, overlap=0.5)(lambda x: 2 * x, volume)
    torch.testing.assert_close(double, 2 * volume)  # a pointwise network: blending the windows changes nothing
    conv = torch.nn.Conv3d(2, 1, 3, padding=1)
    with torch.no_grad():
        whole, windows = conv(volume), SlidingWindowInferer(roi_size=(12, 12, 12), overlap=0.5)(conv, volume)
    assert windows.shape == whole.shape == (1, 1, 20, 24, 18)
    inner = (slice(None), slice(None), slice(4, 16), slice(4, 20), slice(4, 14))  # away from the window edges
    assert torch.allclose(windows[inner], whole[inner], atol=0.2)
    with pytest.raises(ValueError, match="overlap"):
        SlidingWindowInferer(roi_size=(8, 8, 8), overlap=1.0)


def test_rollout_feeds_each_state_back_as_the_newest_input() -> None:
    history = torch.arange(6, dtype=torch.float32).view(1, 3, 2)  # (B, h, C): states (0, 1), (2, 3), (4, 5)
    seen = []

    def step(states: torch.Tensor, k: int) -> torch.Tensor:
        seen.append(states[0, :, 0].tolist())
        return states[:, -1] + 10 * (k + 1)  # (B, C)

    states = RolloutInferer(3)(step, history)
    assert [s[0].tolist() for s in states] == [[14.0, 15.0], [34.0, 35.0], [64.0, 65.0]]
    assert seen == [[0.0, 2.0, 4.0], [2.0, 4.0, 14.0], [4.0, 14.0, 34.0]]
    assert RolloutInferer(0)(step, history) == []


def test_energy_descent_moves_every_candidate_downhill_and_keeps_the_lowest() -> None:
    target = torch.tensor([[1.0, -2.0], [3.0, 0.5]])  # 2 problems

    def energy(x: torch.Tensor) -> torch.Tensor:  # (B * K, 2) -> (B * K,): a bowl around each problem's target
        return ((x - target.repeat_interleave(3, dim=0)) ** 2).sum(dim=1)

    starts = torch.randn(6, 2, generator=torch.Generator().manual_seed(0)) * 3
    starts[4] = target[1] + 0.01  # problem 1's second candidate starts next to the minimum
    with torch.inference_mode():  # as in serving: the descent turns gradients on for itself
        descent = EnergyDescentInferer(steps=5, candidates=3)(energy, starts, step_size=0.25)
    assert descent.steps == 5 and descent.passes == 11 and len(descent.trace) == 5
    assert all(a > b for a, b in zip(descent.trace, descent.trace[1:], strict=False))
    assert descent.best.shape == (2, 2) and torch.allclose(descent.best, target, atol=0.2)
    assert torch.allclose(descent.best[1], target[1], atol=1e-3)  # the candidate that started there
    early = EnergyDescentInferer(steps=50, candidates=3, early_stop_tol=1e-3)(energy, starts, step_size=0.25)
    assert early.steps < 50 and torch.allclose(early.best, target, atol=0.05)


def test_independent_descents_stop_each_on_its_own_and_match_descents_alone() -> None:
    """Problem 0 starts at its minimum (it stops after one step), problem 1 far from it (it runs its budget),
    problem 2 has no steps; each answer equals that problem's descent alone, and computed rows are only those
    of problems still going."""
    target = torch.tensor([[1.0, -2.0], [3.0, 0.5], [0.0, 0.0]])
    counts, budgets = [2, 3, 1], [40, 6, 0]
    owner = torch.repeat_interleave(torch.arange(3), torch.tensor(counts))
    seen: list[int] = []

    def energy(x: torch.Tensor, rows: torch.Tensor, owner: torch.Tensor = owner,
               target: torch.Tensor = target) -> torch.Tensor:
        seen.append(len(rows))
        return ((x - target[owner[rows]]) ** 2).sum(dim=1)

    starts = torch.cat([target[:1].expand(2, 2), torch.randn(3, 2, generator=torch.Generator().manual_seed(1)) * 4,
                        torch.ones(1, 2)])
    with torch.inference_mode():
        together = IndependentDescentInferer(early_stop_tol=1e-3)(energy, starts, candidates=counts, steps=budgets,
                                                                   step_size=0.1)
    assert together.steps.tolist() == [1, 6, 0] and together.passes.tolist() == [3, 13, 1]
    assert seen == [6, 5] + [3] * 5  # all rows; then problem 2 is done; then problem 0 has stopped too
    assert torch.equal(together.best[0], target[0]) and torch.equal(together.best[2], torch.ones(2))
    offsets = [0, 2, 5, 6]
    for b in range(3):
        alone_owner = torch.full((counts[b],), b)
        alone = IndependentDescentInferer(early_stop_tol=1e-3)(
            lambda x, rows, o=alone_owner: energy(x, rows, o), starts[offsets[b]:offsets[b + 1]],
            candidates=[counts[b]], steps=[budgets[b]], step_size=0.1)
        assert alone.steps.tolist() == [together.steps[b]]
        assert torch.allclose(alone.best[0], together.best[b]) and torch.allclose(alone.energy[0], together.energy[b])
    with pytest.raises(ValueError, match="one count"):
        IndependentDescentInferer()(energy, starts, candidates=[2, 3], steps=[1, 1])
