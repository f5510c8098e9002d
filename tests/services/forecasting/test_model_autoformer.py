"""Tests of the Autoformer model: decomposition, Auto-Correlation, shapes, gradients and a tiny overfit."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipelines.benchmarks.autoformer_step import with_reference_correlation
from services.forecasting.config import ForecastingConfig
from services.forecasting.model_autoformer import (
    Autoformer,
    CircularConv,
    SeriesDecomp,
    autocorrelation,
    moving_average,
    select_delays,
    time_delay_aggregation,
)


def tiny_config(**overrides: object) -> ForecastingConfig:
    settings: dict[str, object] = dict(
        model="autoformer", seq_len=32, label_len=16, pred_len=8, d_model=16, n_heads=2, e_layers=2,
        d_layers=1, d_ff=32, dropout=0.0, factor=3, moving_avg=5,
    )
    settings.update(overrides)
    return ForecastingConfig(**settings)  # type: ignore[arg-type]


def naive_aggregation(values: torch.Tensor, delays: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_i w_i * roll(V, -d_i) sample by sample, the way the reference loops."""
    batch = values.shape[0]
    delays = delays.expand(batch, -1)
    out = torch.zeros_like(values)
    for b in range(batch):
        for i in range(delays.shape[1]):
            out[b] += weights[b, i] * torch.roll(values[b], -int(delays[b, i]), dims=0)
    return out


@pytest.mark.parametrize("n_marks", [0, 4])
def test_output_shape_with_and_without_marks(n_marks: int) -> None:
    cfg = tiny_config()
    model = Autoformer(cfg, n_vars=3, n_marks=n_marks)
    x = torch.randn(2, cfg.seq_len, 3)
    x_mark = torch.randn(2, cfg.seq_len, n_marks) if n_marks else None
    y_mark = torch.randn(2, cfg.label_len + cfg.pred_len, n_marks) if n_marks else None
    for training in (True, False):
        model.train(training)
        assert model(x, x_mark, y_mark).shape == (2, cfg.pred_len, 3)
    assert model(x).shape == (2, cfg.pred_len, 3)


def test_decoder_longer_and_shorter_than_encoder() -> None:
    # pred 40 + label 16 > seq 32 pads the cross-correlation memory; pred 4 + label 8 < 32 truncates it.
    for label_len, pred_len in ((16, 40), (8, 4), (0, 8)):
        cfg = tiny_config(label_len=label_len, pred_len=pred_len)
        model = Autoformer(cfg, n_vars=2, n_marks=0).eval()
        assert model(torch.randn(3, cfg.seq_len, 2)).shape == (3, pred_len, 2)


def test_series_decomp() -> None:
    decomp = SeriesDecomp(25)
    constant = torch.full((2, 50, 3), 1.7)
    seasonal, trend = decomp(constant)
    torch.testing.assert_close(trend, constant)
    torch.testing.assert_close(seasonal, torch.zeros_like(constant))

    x = torch.randn(2, 50, 3)
    seasonal, trend = decomp(x)
    torch.testing.assert_close(seasonal + trend, x)

    ramp = torch.arange(50, dtype=torch.float32)[None, :, None].expand(2, 50, 3)
    _, trend = decomp(ramp)
    torch.testing.assert_close(trend[:, 12:-12], ramp[:, 12:-12])  # edges are pulled towards the padding


def test_circular_conv_matches_conv1d() -> None:
    conv = CircularConv(5, 4)
    reference = nn.Conv1d(5, 4, kernel_size=3, padding=1, padding_mode="circular", bias=False)
    reference.weight.data.copy_(conv.weight.data)
    x = torch.randn(2, 11, 5)
    torch.testing.assert_close(conv(x), reference(x.transpose(1, 2)).transpose(1, 2))


def test_autocorrelation_matches_direct_circular_cross_correlation() -> None:
    torch.manual_seed(0)
    q, k = torch.randn(2, 9, 4), torch.randn(2, 9, 4)
    direct = torch.zeros(2, 9)
    for tau in range(9):
        for t in range(9):
            direct[:, tau] += (q[:, t] * k[:, (t - tau) % 9]).mean(dim=-1)
    torch.testing.assert_close(autocorrelation(q, k), direct, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shared", [True, False])
def test_time_delay_aggregation_matches_roll_loop(shared: bool) -> None:
    torch.manual_seed(0)
    values, corr = torch.randn(3, 20, 6), torch.randn(3, 20)
    top_k = int(3 * math.log(20))
    delays, weights = select_delays(corr, top_k, shared=shared)
    assert delays.shape == ((top_k,) if shared else (3, top_k))
    torch.testing.assert_close(weights.sum(dim=-1), torch.ones(3))
    torch.testing.assert_close(
        time_delay_aggregation(values, delays, weights), naive_aggregation(values, delays, weights),
        atol=1e-5, rtol=1e-5,
    )


def test_select_delays_training_uses_batch_mean_and_inference_per_sample() -> None:
    corr = torch.tensor([[0.0, 5.0, 1.0, 0.0], [0.0, 0.0, 3.0, 4.0]])
    shared, _ = select_delays(corr, 1, shared=True)
    assert shared.tolist() == [1]  # batch mean [0, 2.5, 2, 2]
    per_sample, weights = select_delays(corr, 1, shared=False)
    assert per_sample.tolist() == [[1], [3]]
    torch.testing.assert_close(weights, torch.ones(2, 1))


@pytest.mark.parametrize("training", [True, False])
def test_model_matches_reference_style_correlation(training: bool) -> None:
    # The benchmark's baseline core: per-head permutes, full irfft, roll (training) / gather (inference).
    cfg = tiny_config(label_len=16, pred_len=24)  # decoder 40 > encoder 32: the cross-correlation pads
    model = Autoformer(cfg, n_vars=3, n_marks=2).train(training)
    baseline = with_reference_correlation(model).train(training)
    x, x_mark, y_mark = torch.randn(4, 32, 3), torch.randn(4, 32, 2), torch.randn(4, 40, 2)
    torch.testing.assert_close(model(x, x_mark, y_mark), baseline(x, x_mark, y_mark), atol=1e-5, rtol=1e-5)


def test_top_delay_finds_planted_period() -> None:
    t = torch.arange(96, dtype=torch.float32)
    phase = torch.rand(4, 1, 8) * 2 * math.pi
    series = torch.sin(2 * math.pi * t[None, :, None] / 24 + phase)  # (B, L, C)
    series = series + 0.05 * torch.randn(4, 96, 8)
    corr = autocorrelation(series, series)
    corr[:, 0] = -math.inf  # lag 0 is trivially the largest
    for shared in (True, False):
        delays, _ = select_delays(corr, 1, shared=shared)
        assert (delays % 24 == 0).all(), delays


def test_gradients_reach_every_parameter() -> None:
    cfg = tiny_config(dropout=0.1)
    model = Autoformer(cfg, n_vars=3, n_marks=4)
    x = torch.randn(4, cfg.seq_len, 3)
    out = model(x, torch.randn(4, cfg.seq_len, 4), torch.randn(4, cfg.label_len + cfg.pred_len, 4))
    out.pow(2).mean().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_tiny_model_overfits_tiny_batch() -> None:
    torch.manual_seed(0)
    cfg = tiny_config(d_model=32, d_ff=64)
    model = Autoformer(cfg, n_vars=2, n_marks=0)
    t = torch.arange(cfg.seq_len + cfg.pred_len, dtype=torch.float32)
    phase = torch.rand(8, 1, 2) * 2 * math.pi
    series = torch.sin(2 * math.pi * t[None, :, None] / 12 + phase) + 0.02 * t[None, :, None]  # (B, L+P, N)
    x, y = series[:, : cfg.seq_len], series[:, cfg.seq_len:]
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        loss = F.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert min(losses[-10:]) < losses[0] / 5, (losses[0], losses[-10:])


def test_even_moving_average_reaches_one_step_further_back() -> None:
    # k = 24 (the FEDformer benchmark's Autoformer): the mean of x[t-12 .. t+11], ends repeated.
    x = torch.randn(2, 60, 3, dtype=torch.float64)
    trend = moving_average(x, 24)
    padded = torch.cat([x[:, :1].expand(-1, 12, -1), x, x[:, -1:].expand(-1, 11, -1)], dim=1)
    expected = torch.stack([padded[:, t: t + 24].mean(dim=1) for t in range(60)], dim=1)
    torch.testing.assert_close(trend, expected)
    # a daily cycle of 24 steps averages out exactly away from the edges
    cycle = torch.sin(2 * torch.pi * torch.arange(96, dtype=torch.float64) / 24)[None, :, None]
    torch.testing.assert_close(moving_average(cycle, 24)[:, 12:-11], torch.zeros(1, 73, 1, dtype=torch.float64))
