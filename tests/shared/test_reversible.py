"""Reversible blocks: the same values and gradients as the plain network, inputs recomputed, activations not kept."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from shared.reversible import ReversibleBlock, ReversibleSequence, SavedBytes


def _branch(channels: int, dropout: float) -> nn.Module:
    return nn.Sequential(nn.Conv3d(channels, channels, 3, padding=1), nn.GroupNorm(2, channels), nn.GELU(),
                         nn.Dropout3d(dropout), nn.Conv3d(channels, channels, 1))


def _net(mode: str, blocks: int = 4, channels: int = 8, dropout: float = 0.2, seed: int = 0) -> ReversibleSequence:
    torch.manual_seed(seed)
    half = channels // 2
    return ReversibleSequence([ReversibleBlock(_branch(half, dropout), _branch(half, dropout))
                               for _ in range(blocks)], mode=mode)  # type: ignore[arg-type]


def _run(net: nn.Module, x: torch.Tensor, seed: int = 7) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    x = x.clone().requires_grad_(True)
    net.zero_grad()
    torch.manual_seed(seed)  # the dropout masks
    y = net(x)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    assert x.grad is not None
    return y.detach(), x.grad, [p.grad.clone() for p in net.parameters()]


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


@pytest.mark.parametrize("mode", ["reversible", "checkpoint"])
def test_gradients_equal_those_of_the_plain_network_with_dropout_replayed(mode: str) -> None:
    x = torch.randn(2, 8, 6, 5, 7)
    y_ref, dx_ref, grads_ref = _run(_net("plain").train(), x)
    y, dx, grads = _run(_net(mode).train(), x)
    assert torch.allclose(y, y_ref, atol=1e-6, rtol=1e-6)
    assert torch.allclose(dx, dx_ref, atol=1e-5, rtol=1e-5)
    assert len(grads) == len(grads_ref) == 4 * 2 * 6
    for g, g_ref in zip(grads, grads_ref, strict=True):  # fp32 rounding of the recomputed inputs only
        assert _relative_error(g, g_ref) < 2e-6, _relative_error(g, g_ref)


def test_without_the_replayed_random_state_the_gradients_would_differ() -> None:
    # the check above can fail: two different dropout draws give different gradients
    x = torch.randn(2, 8, 6, 5, 7)
    _, dx_a, _ = _run(_net("plain").train(), x, seed=7)
    _, dx_b, _ = _run(_net("plain").train(), x, seed=8)
    assert not torch.allclose(dx_a, dx_b, atol=1e-3)


def test_the_callers_random_state_is_left_as_a_plain_run_leaves_it() -> None:
    x = torch.randn(1, 8, 4, 4, 4)
    _run(_net("plain").train(), x)
    after_plain = torch.rand(3)
    _run(_net("reversible").train(), x)
    assert torch.equal(torch.rand(3), after_plain)


def test_inverse_recovers_the_input() -> None:
    net = _net("reversible", dropout=0.0).eval()
    x = torch.randn(2, 8, 5, 5, 5)
    with torch.no_grad():
        assert torch.allclose(net.inverse(net(x)), x, atol=1e-5)


def _saved_bytes(net: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the tensors autograd keeps from the forward ``net(x)`` for the backward pass."""
    with SavedBytes() as saved:
        y = net(x.requires_grad_(True))
    y.sum().backward()  # (the backward's recomputation keeps one block's tensors at a time, freed as it goes)
    return saved.total


def test_reversible_keeps_the_last_outputs_only_whatever_the_depth() -> None:
    x = torch.randn(1, 8, 8, 8, 8)
    plain = {n: _saved_bytes(_net("plain", blocks=n).train(), x.clone()) for n in (2, 6)}
    reversible = {n: _saved_bytes(_net("reversible", blocks=n).train(), x.clone()) for n in (2, 6)}
    checkpointed = _saved_bytes(_net("checkpoint", blocks=6).train(), x.clone())
    output = x.numel() * x.element_size()
    assert reversible[2] == reversible[6] == output  # the two output halves, nothing per block
    assert plain[6] > 2.5 * plain[2] and plain[6] > 20 * output
    assert reversible[6] < checkpointed < plain[6]


def test_no_graph_in_inference_and_frozen_parameters_get_no_gradient() -> None:
    net = _net("reversible", dropout=0.0)
    for p in net.blocks[0].parameters():
        p.requires_grad_(False)
    x = torch.randn(1, 8, 4, 4, 4)
    with torch.no_grad():
        assert not net(x).requires_grad
    net(x.requires_grad_(True)).square().sum().backward()
    assert all(p.grad is None for p in net.blocks[0].parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.blocks[1].parameters())


def test_token_halves_and_bad_settings() -> None:
    torch.manual_seed(0)
    blocks = [ReversibleBlock(nn.Sequential(nn.LayerNorm(6), nn.Linear(6, 6)),
                              nn.Sequential(nn.LayerNorm(6), nn.Linear(6, 6))) for _ in range(3)]
    rev = ReversibleSequence(blocks, mode="reversible", dim=-1)
    plain = ReversibleSequence(blocks, mode="plain", dim=-1)
    x = torch.randn(2, 10, 12)
    a, da, ga = _run(rev, x)
    b, db, gb = _run(plain, x)
    assert torch.allclose(a, b, atol=1e-6) and _relative_error(da, db) < 2e-6
    assert all(_relative_error(p, q) < 2e-6 for p, q in zip(ga, gb, strict=True))
    with pytest.raises(ValueError, match="odd size"):
        rev(torch.randn(2, 10, 11))
    with pytest.raises(ValueError, match="mode="):
        ReversibleSequence(blocks, mode="fast")  # type: ignore[arg-type]


def test_the_reversible_transformer_matches_its_plain_run_with_attention_dropout() -> None:
    from shared.reversible import ReversibleEncoder

    torch.manual_seed(0)
    rev = ReversibleEncoder(16, 4, 32, n_layers=3, dropout=0.1, mode="reversible").train()
    plain = ReversibleEncoder(16, 4, 32, n_layers=3, dropout=0.1, mode="plain").train()
    plain.load_state_dict(rev.state_dict())
    x = torch.randn(2, 20, 16)
    a, da, ga = _run(rev, x)
    b, db, gb = _run(plain, x)
    assert torch.allclose(a, b, atol=1e-5) and _relative_error(da, db) < 1e-5
    assert len(ga) == len(gb) > 0 and all(_relative_error(p, q) < 1e-5 for p, q in zip(ga, gb, strict=True))
