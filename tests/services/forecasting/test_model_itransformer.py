"""iTransformer: shapes, calendar tokens, normalization equivariance, gradients, and that it can learn."""

from __future__ import annotations

import pytest
import torch

from services.forecasting.config import ForecastingConfig
from services.forecasting.model_itransformer import ITransformer


def _cfg(**overrides: object) -> ForecastingConfig:
    settings: dict[str, object] = {"seq_len": 24, "pred_len": 12, "d_model": 32, "n_heads": 4, "e_layers": 2,
                                   "d_ff": 64, "dropout": 0.1, "label_len": 12}
    settings.update(overrides)
    return ForecastingConfig(**settings)  # type: ignore[arg-type]


def test_shapes_with_and_without_calendar_features() -> None:
    torch.manual_seed(0)
    model = ITransformer(_cfg(), n_vars=5, n_marks=4)
    x, marks = torch.randn(3, 24, 5), torch.randn(3, 24, 4)
    assert model(x, marks).shape == (3, 12, 5)
    assert model(x).shape == (3, 12, 5)
    assert model(x, marks, torch.randn(3, 12, 4)).shape == (3, 12, 5)  # y_mark is accepted and ignored
    no_marks = ITransformer(_cfg(), n_vars=5, n_marks=0)
    assert no_marks(x, marks).shape == (3, 12, 5)  # n_marks = 0: calendar features are ignored


def test_calendar_tokens_change_the_forecast() -> None:
    torch.manual_seed(0)
    model = ITransformer(_cfg(dropout=0.0), n_vars=3, n_marks=2).eval()
    x = torch.randn(2, 24, 3)
    assert not torch.allclose(model(x, torch.randn(2, 24, 2)), model(x, torch.randn(2, 24, 2)))


def test_post_norm_by_default_and_pre_norm_on_request() -> None:
    post = ITransformer(_cfg(), 2, 0)
    pre = ITransformer(_cfg(), 2, 0, norm_first=True)
    assert all(not layer.norm_first for layer in post.encoder.layers)
    assert all(layer.norm_first for layer in pre.encoder.layers)
    assert len(post.encoder.layers) == 2


def test_bad_shapes_are_rejected() -> None:
    model = ITransformer(_cfg(), n_vars=3, n_marks=2)
    with pytest.raises(ValueError, match="seq_len=24"):
        model(torch.randn(2, 20, 3))
    with pytest.raises(ValueError, match="n_vars=3"):
        model(torch.randn(2, 24, 4))
    with pytest.raises(ValueError, match="n_marks=2"):
        model(torch.randn(2, 24, 3), torch.randn(2, 24, 5))


def test_instance_norm_makes_the_model_equivariant_to_per_variate_affine_maps() -> None:
    torch.manual_seed(0)
    model = ITransformer(_cfg(), n_vars=3, n_marks=2).eval()
    x, marks = 2.0 * torch.randn(4, 24, 3), torch.randn(4, 24, 2)
    scale = torch.tensor([0.5, 3.0, 20.0])  # (N,), positive
    shift = torch.tensor([-4.0, 7.0, 100.0])
    with torch.no_grad():
        moved = model(x * scale + shift, marks)
        expected = model(x, marks) * scale + shift
    torch.testing.assert_close(moved, expected, atol=2e-3, rtol=1e-3)
    raw = ITransformer(_cfg(use_norm=False), n_vars=3, n_marks=2).eval()
    with torch.no_grad():
        assert not torch.allclose(raw(x * scale + shift, marks), raw(x, marks) * scale + shift, atol=1e-1)


def test_gradient_reaches_every_parameter() -> None:
    torch.manual_seed(0)
    model = ITransformer(_cfg(), n_vars=3, n_marks=2).train()
    loss = model(torch.randn(4, 24, 3), torch.randn(4, 24, 2)).pow(2).mean()
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name


def test_tiny_model_overfits_a_tiny_batch() -> None:
    torch.manual_seed(0)
    cfg = _cfg(seq_len=32, pred_len=16, dropout=0.0)
    model = ITransformer(cfg, n_vars=3, n_marks=0)
    t = torch.arange(48, dtype=torch.float32)
    period = torch.tensor([8.0, 12.0, 16.0])  # (N,)
    phase = 6.28 * torch.rand(8, 1, 3)  # (B, 1, N)
    series = torch.sin(6.28 * t[None, :, None] / period + phase) + 0.3 * torch.randn(8, 48, 3)  # (B, 48, N)
    x, y = series[:, :32], series[:, 32:]
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(100):
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 5, f"loss {losses[0]:.4f} -> {losses[-1]:.4f}"
