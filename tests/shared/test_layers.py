"""shared.layers: feed-forward (plain and gated), encoder layers (pre/post-norm), encoder, positions, RMSNorm."""

from __future__ import annotations

import math

import pytest
import torch

from shared.layers import Encoder, EncoderLayer, FeedForward, RMSNorm, SinusoidalPositionalEncoding


@pytest.mark.parametrize("activation", ["gelu", "relu", "silu"])
@pytest.mark.parametrize("glu", [False, True])
def test_feed_forward_shapes_and_gating(activation: str, glu: bool) -> None:
    ff = FeedForward(16, 40, activation=activation, glu=glu)
    x = torch.randn(2, 5, 16)
    assert ff(x).shape == (2, 5, 16)
    assert ff.w_in.out_features == (80 if glu else 40) and ff.w_out.in_features == 40
    if glu:  # value * act(gate) with the fused projection split in two halves
        value, gate = ff.w_in(x).chunk(2, dim=-1)
        act = {"gelu": torch.nn.functional.gelu, "relu": torch.relu, "silu": torch.nn.functional.silu}[activation]
        torch.testing.assert_close(ff(x), ff.w_out(value * act(gate)))


def test_unknown_activation_is_rejected() -> None:
    with pytest.raises(ValueError, match="activation='tanh'"):
        FeedForward(8, 8, activation="tanh")


@pytest.mark.parametrize("norm_first", [True, False])
@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_encoder_layer_shapes(norm_first: bool, norm: str) -> None:
    layer = EncoderLayer(32, 4, 64, dropout=0.1, norm_first=norm_first, norm=norm)  # type: ignore[arg-type]
    x = torch.randn(3, 7, 32)
    assert layer(x).shape == (3, 7, 32)
    assert layer(x, causal=True).shape == (3, 7, 32)


def test_post_norm_output_is_normalized_and_pre_norm_keeps_the_residual() -> None:
    torch.manual_seed(0)
    x = 5.0 + 3.0 * torch.randn(2, 6, 32)
    post = EncoderLayer(32, 4, 64, norm_first=False).eval()
    out = post(x)
    torch.testing.assert_close(out.mean(-1), torch.zeros(2, 6), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.var(-1, unbiased=False), torch.ones(2, 6), atol=1e-3, rtol=0)
    pre = EncoderLayer(32, 4, 64, norm_first=True).eval()
    assert (pre(x).mean(-1) - x.mean(-1)).abs().max() < 2.0  # x + small updates: the level survives


def test_pre_and_post_norm_compute_different_functions_with_the_same_weights() -> None:
    torch.manual_seed(0)
    pre = EncoderLayer(16, 2, 32, norm_first=True).eval()
    post = EncoderLayer(16, 2, 32, norm_first=False).eval()
    post.load_state_dict(pre.state_dict())
    x = torch.randn(2, 5, 16)
    assert not torch.allclose(pre(x), post(x))


@pytest.mark.parametrize("norm_first", [True, False])
def test_padding_mask_makes_padded_keys_irrelevant(norm_first: bool) -> None:
    torch.manual_seed(0)
    encoder = Encoder([EncoderLayer(16, 4, 32, norm_first=norm_first) for _ in range(2)], torch.nn.LayerNorm(16))
    encoder.eval()
    x = torch.randn(2, 8, 16)
    real = torch.arange(8)[None, :] < torch.tensor([8, 5])[:, None]  # (B, L)
    changed = x.clone()
    changed[1, 5:] = 100.0 * torch.randn(3, 16)
    a = encoder(x, key_padding_mask=real)
    b = encoder(changed, key_padding_mask=real)
    torch.testing.assert_close(a[real], b[real], atol=1e-5, rtol=1e-5)
    c = encoder(changed)  # without the mask the garbage leaks into the real tokens
    assert not torch.allclose(a[1, :5], c[1, :5], atol=1e-3)


def test_causal_layer_does_not_look_ahead() -> None:
    torch.manual_seed(0)
    layer = EncoderLayer(16, 4, 32).eval()
    x = torch.randn(1, 6, 16)
    future = x.clone()
    future[:, 4:] += 10.0
    torch.testing.assert_close(layer(x, causal=True)[:, :4], layer(future, causal=True)[:, :4])


def test_encoder_stacks_layers_and_applies_the_final_norm() -> None:
    torch.manual_seed(0)
    layers = [EncoderLayer(16, 2, 32) for _ in range(3)]
    norm = torch.nn.LayerNorm(16)
    encoder = Encoder(layers, norm).eval()
    x = torch.randn(2, 4, 16)
    h = x
    for layer in layers:
        h = layer(h)
    torch.testing.assert_close(encoder(x), norm(h))
    assert len(encoder.layers) == 3
    assert Encoder(layers, None)(x).shape == x.shape


def test_rms_norm_matches_its_formula() -> None:
    norm = RMSNorm(8, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, 8))
    x = torch.randn(3, 8)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(norm(x), expected)


@pytest.mark.parametrize("d_model", [16, 15])
def test_sinusoidal_positions(d_model: int) -> None:
    pos = SinusoidalPositionalEncoding(d_model, max_len=50)
    x = torch.zeros(2, 10, d_model)
    pe = pos(x)
    assert pe.shape == (2, 10, d_model)
    torch.testing.assert_close(pe[0, 0, 0::2], torch.zeros((d_model + 1) // 2))  # sin(0)
    torch.testing.assert_close(pe[0, 0, 1::2], torch.ones(d_model // 2))  # cos(0)
    torch.testing.assert_close(pe[0, 3, 0], torch.tensor(math.sin(3.0)))
    torch.testing.assert_close(pos(x, offset=3)[0, 0], pe[0, 3])
    assert "pe" not in pos.state_dict()
    with pytest.raises(ValueError, match="max_len=50"):
        pos(torch.zeros(1, 51, d_model))
