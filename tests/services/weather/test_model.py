"""WXFormer: earth padding, window grouping, spectral norm, shapes on regional and global grids, training."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from typing import Any

import numpy as np
import pytest
import torch

from services.weather.config import WeatherConfig
from services.weather.data import WeatherState, prepare
from services.weather.grid import Grid
from services.weather.model import WindowAttention, WXFormer, earth_pad
from services.weather.training import rollout_loss

TINY = {"dims": (16, 32), "depths": (1, 1), "kernels": ((2, 4), (2, 4)), "strides": (2, 2), "local_window": 2,
        "global_windows": (2, 2), "dim_head": 8, "history": 1, "residual_base": "last"}


def _cfg(**settings: object) -> WeatherConfig:
    """The tiny model (one input state, the change added to the last one), ``settings`` on top."""
    return WeatherConfig(**{**TINY, **settings})  # type: ignore[arg-type]


def _state(lat: np.ndarray, lon: np.ndarray, channels: int = 2) -> WeatherState:
    lon2, lat2 = np.meshgrid(lon, lat)
    latitude, longitude = Grid(lat2, lon2).axes()
    names = tuple(f"c{i}" for i in range(channels))
    return WeatherState(data="test", fingerprint="test", channels=names, sources=tuple((n, None) for n in names),
                        units=("K",) * channels, step_hours=6, data_step_hours=1.0,
                        forcings=("cos_zenith", "sin_local_hour", "cos_local_hour", "sin_day_of_year",
                                  "cos_day_of_year"),
                        periods={}, regular_grid=True, static_names=(), latitude=latitude, longitude=longitude,
                        mean=torch.zeros(channels, dtype=torch.float64), std=torch.ones(channels, dtype=torch.float64),
                        statics={})


def test_earth_pad_wraps_longitude_and_crosses_the_poles() -> None:
    x = torch.arange(4 * 8, dtype=torch.float32).view(1, 1, 4, 8)  # rows north to south, no pole rows
    padded = earth_pad(x, 2, 1, 1, 2, pole_row=False)
    assert padded.shape == (1, 1, 7, 11)
    inner = padded[0, 0, 2:6, 1:9]
    assert torch.equal(inner, x[0, 0])
    assert torch.equal(padded[0, 0, 2:6, 0], x[0, 0, :, -1])  # west of the first longitude: the last one
    assert torch.equal(padded[0, 0, 2:6, 9:], x[0, 0, :, :2])
    # the row just beyond the north pole is the first row, seen from the other side (180 degrees away)
    lon_shifted = torch.roll(x[0, 0, 0], 4)
    assert torch.equal(padded[0, 0, 1, 1:9], lon_shifted)
    assert torch.equal(padded[0, 0, 0, 1:9], torch.roll(x[0, 0, 1], 4))
    assert torch.equal(padded[0, 0, 6, 1:9], torch.roll(x[0, 0, 3], 4))
    with_pole = earth_pad(x, 1, 0, 0, 0, pole_row=True)  # the pole row itself is not repeated
    assert torch.equal(with_pole[0, 0, 0], torch.roll(x[0, 0, 1], 4))


@pytest.mark.parametrize("kind", ["local", "long"])
def test_window_grouping_is_a_permutation(kind: str) -> None:
    attn = WindowAttention(8, 4, window=3, kind=kind, dropout=0.0)
    x = torch.randn(2, 6, 9, 8)
    groups = attn._group(x, 3)
    assert groups.shape == (2 * 2 * 3, 9, 8)
    assert torch.equal(attn._ungroup(groups, 2, 6, 9, 3), x)
    if kind == "long":  # a long-range group holds tokens spread over the whole map
        rows = attn._group(torch.arange(6.0).view(1, 6, 1, 1).expand(1, 6, 9, 1), 3)[0, :, 0]
        assert sorted(set(rows.tolist())) == [0.0, 2.0, 4.0]


def test_window_attention_masks_padding_when_the_map_is_not_a_multiple() -> None:
    torch.manual_seed(0)
    attn = WindowAttention(8, 4, window=4, kind="local", dropout=0.0).eval()
    x = torch.randn(1, 4, 4, 8)
    full = attn(x)
    bigger = torch.cat([x, torch.randn(1, 4, 1, 8)], dim=2)  # a fifth column in a window of its own
    assert torch.allclose(attn(bigger)[:, :, :4], full, atol=1e-5)


@pytest.mark.parametrize(("lat", "lon", "earth"), [
    (np.linspace(58, 50, 33), np.linspace(-10, 2, 49), False),  # the UK ERA5 grid: regional, odd sizes
    (np.linspace(90, -90, 19), np.arange(0, 360, 10.0), True),  # global with pole rows
])
def test_forward_keeps_the_grid_and_pads_by_kind(lat: np.ndarray, lon: np.ndarray, earth: bool) -> None:
    cfg = _cfg()
    model = WXFormer(cfg, _state(lat, lon))
    assert model.earth is earth and model.pole_row is earth
    h, w = len(lat), len(lon)
    out = model(torch.randn(2, 1, 2, h, w), torch.randn(2, 5, h, w), torch.randn(2, 5, h, w))
    assert out.shape == (2, 2, h, w) and torch.isfinite(out).all()


def test_every_conv_and_linear_is_spectrally_normalized() -> None:
    model = WXFormer(_cfg(), _state(np.linspace(60, 50, 8), np.linspace(0, 7, 8)))  # type: ignore[arg-type]
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)]
    assert layers and all(hasattr(m, "parametrizations") for m in layers)
    model.train()
    for _ in range(30):  # power iterations converge; the effective weights then have spectral norm <= ~1
        model.head.weight  # noqa: B018
    sigma = torch.linalg.matrix_norm(model.head.weight.flatten(1), ord=2)
    assert sigma.item() < 1.05
    plain = WXFormer(_cfg(spectral_norm=False), _state(np.linspace(60, 50, 8), np.linspace(0, 7, 8)))  # type: ignore[arg-type]
    assert not any(hasattr(m, "parametrizations") for m in plain.modules())


def test_multi_step_training_lowers_the_loss_on_synthetic_weather() -> None:
    torch.manual_seed(0)
    cfg = _cfg(synthetic_days=6, synthetic_grid=(16, 32), train_rollout=2, lr=2e-3)
    prepared = prepare(cfg)
    model = WXFormer(cfg, prepared.state)
    batch = next(iter(torch.utils.data.DataLoader(prepared.datasets[0], batch_size=8, shuffle=True)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    losses = []
    for _ in range(15):
        loss = rollout_loss(model, batch, torch.device("cpu"))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0]
    # gradients reach the first step's parameters through the second step too
    assert all(p.grad is not None for p in model.embeds[0].parameters())


def test_history_skip_adds_a_linear_blend_of_the_inputs_outside_spectral_norm() -> None:
    from services.weather.model import MIX_GAIN

    torch.manual_seed(0)
    state = _state(np.linspace(60, 50, 8), np.linspace(0, 7, 8))
    model = WXFormer(_cfg(history=3, history_skip=True), state).eval()  # type: ignore[arg-type]
    assert model.history_mix is not None and model.history_mix.shape == (2, 6)
    assert torch.count_nonzero(model.history_mix) == 0  # starts as the plain network
    history, now, nxt = torch.randn(1, 3, 2, 8, 8), torch.randn(1, 5, 8, 8), torch.randn(1, 5, 8, 8)
    with torch.no_grad():
        plain = model(history, now, nxt)
        blend = torch.zeros(2, 6)
        blend[0, 0], blend[0, 4] = 1.0, -1.0  # channel 0: oldest state minus the newest (norm sqrt(2) > 1)
        model.history_mix.copy_(blend / MIX_GAIN)
        mixed = model(history, now, nxt)
    assert torch.allclose(mixed[:, 0] - plain[:, 0], history[:, 0, 0] - history[:, 2, 0], atol=1e-5)
    assert torch.allclose(mixed[:, 1], plain[:, 1])
    model.train()
    model(history, now, nxt).sum().backward()
    assert model.history_mix.grad is not None and torch.count_nonzero(model.history_mix.grad) > 0
    assert WXFormer(_cfg(), state).history_mix is None  # type: ignore[arg-type]


def test_validation_metrics_score_persistence_at_every_step() -> None:
    from services.weather.training import metric_sums, metrics_from

    state = _state(np.linspace(60, 50, 8), np.linspace(0, 7, 8), channels=1)
    model = WXFormer(_cfg(spectral_norm=False), state).eval()  # type: ignore[arg-type]
    for p in model.head.parameters():  # the network then predicts no change: it is persistence itself
        torch.nn.init.zeros_(p)
    history = torch.randn(4, 1, 1, 8, 8)
    target = history[:, -1:] + torch.arange(1, 4, dtype=torch.float32).view(1, 3, 1, 1, 1)  # off by 1, 2, 3
    forcing = torch.zeros(4, 4, 5, 8, 8)
    with torch.no_grad():
        out = metrics_from(metric_sums(model, [(history, forcing, target)], torch.device("cpu")))
    for k in (1, 2, 3):
        assert out[f"wrmse_persistence_step{k}"] == pytest.approx(k, rel=1e-5)
        assert out[f"wrmse_step{k}"] == pytest.approx(k, rel=1e-5)
    assert out["wrmse"] == pytest.approx(np.sqrt((1 + 4 + 9) / 3), rel=1e-5)


def test_day_residual_base_replays_yesterday_and_anchors_a_day_ahead_on_the_start() -> None:
    from services.weather.training import rollout

    state = _state(np.linspace(60, 50, 8), np.linspace(0, 7, 8), channels=1)
    cfg = _cfg(spectral_norm=False, history=4, residual_base="day")
    model = WXFormer(cfg, state).eval()
    assert model.base_lag == 4  # 24 h of 6 h steps
    for p in model.head.parameters():  # no change: the rollout is the base state itself
        torch.nn.init.zeros_(p)
    history = torch.randn(2, 4, 1, 8, 8)  # t - 18 h, t - 12 h, t - 6 h, t
    with torch.no_grad():
        states = rollout(model, history, torch.zeros(2, 6, 5, 8, 8), 5)
    # +6 h is t - 18 h, ..., +24 h is t itself, +30 h again yesterday's +6 h
    for k, expected in enumerate([history[:, 0], history[:, 1], history[:, 2], history[:, 3], history[:, 0]]):
        assert torch.equal(states[k], expected)
    assert WXFormer(_cfg(), state).base_lag == 1  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="residual_base='day' needs"):
        WeatherConfig(history=2, residual_base="day")
    with pytest.raises(ValueError, match="residual_base='day' needs"):
        WeatherConfig(step_hours=5, history=8, residual_base="day")


class _ScaledOracle(WXFormer):
    """Predicts ``gain`` times the true change: each target is the first forcing channel at its valid time."""

    gain = 2.0

    def forward(self, history: torch.Tensor, forcing_now: torch.Tensor, forcing_next: torch.Tensor) -> torch.Tensor:
        return self.gain * (forcing_next[:, :1] - history[:, -1])


def _oracle_windows(steps: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    history = torch.randn(6, 1, 1, 8, 8)
    forcing = torch.randn(6, steps + 3, 5, 8, 8)  # two steps more than the windows fitted on
    return history, forcing, forcing[:, 1:steps + 1, :1].clone()  # target k = forcing channel 0 at step k + 1


@pytest.mark.parametrize(("gain", "expected"), [(2.0, 0.5), (0.5, 1.0)])
def test_damping_fitted_on_validation_undoes_an_overconfident_change(gain: float, expected: float) -> None:
    from services.weather.training import fit_calibration, rollout

    state = _state(np.linspace(60, 50, 8), np.linspace(0, 7, 8), channels=1)
    model = _ScaledOracle(_cfg(spectral_norm=False), state).eval()  # type: ignore[arg-type]
    model.gain = gain
    history, forcing, target = _oracle_windows()
    with torch.no_grad():
        raw = torch.stack(rollout(model, history, forcing, 3), dim=1)
    assert not torch.allclose(raw, target, atol=1e-3)
    factors, relaxation = fit_calibration(
        model, [(history[:3], forcing[:3], target[:3]), (history[3:], forcing[3:], target[3:])],
        torch.device("cpu"), 3)
    assert factors.shape == (3, 1)
    assert not len(model.relaxation) and torch.equal(relaxation, torch.zeros(3, 1))  # no climatology: none
    # twice the change: halved at every step; half the change: not amplified (factors stay within [0, 1])
    assert torch.allclose(factors, torch.full((3, 1), expected), atol=1e-5)
    with torch.no_grad():
        damped = torch.stack(rollout(model, history, forcing, 5), dim=1)
    if gain > 1:  # the damped rollout is the truth, also past the fitted steps (the last factor carries on)
        assert torch.allclose(damped, forcing[:, 1:, :1], atol=1e-5)
    else:
        assert torch.allclose(damped[:, :3], raw)
    rebuilt = WXFormer(_cfg(spectral_norm=False), dataclasses.replace(state, damping=factors))  # type: ignore[arg-type]
    assert torch.equal(rebuilt.damping.flatten(), factors.flatten())  # saved in the state, restored at load


class _ChangeOracle(WXFormer):
    """Predicts ``gain`` times a known change, read from the first forcing channel at the valid time."""

    gain = 2.0

    def forward(self, history: torch.Tensor, forcing_now: torch.Tensor, forcing_next: torch.Tensor) -> torch.Tensor:
        return self.gain * forcing_next[:, :1]


def test_calibration_fits_damping_and_relaxation_toward_the_climatology_jointly() -> None:
    """Truth that moves by a known change and relaxes 30 % of the way to a daily climatology each 6 h step:
    a network predicting twice the change gets damping 0.5 and relaxation 0.3, and its rollout is then exact."""
    from services.weather.training import fit_calibration, rollout

    g = torch.Generator().manual_seed(0)
    clim = torch.randn(3, 1, 8, 8, generator=g)  # mean, cos and sin of the daily cycle
    saved = dataclasses.replace(_state(np.linspace(60, 50, 8), np.linspace(0, 7, 8), channels=1), climatology=clim)
    model = _ChangeOracle(_cfg(spectral_norm=False), saved).eval()  # type: ignore[arg-type]
    n, steps = 8, 3
    hours = torch.randint(0, 24, (n,), generator=g).float()
    forcing = torch.randn(n, steps + 3, 5, 8, 8, generator=g)
    history = torch.randn(n, 1, 1, 8, 8, generator=g)
    state, targets = history[:, -1], []
    for k in range(steps + 2):
        state = state + forcing[:, k + 1, :1] + 0.3 * (model.climate(hours + 6 * (k + 1)) - state)
        targets.append(state)
    truth = torch.stack(targets, dim=1)
    windows = [(history[:4], forcing[:4], truth[:4, :steps], hours[:4]),
               (history[4:], forcing[4:], truth[4:, :steps], hours[4:])]
    damping, relaxation = fit_calibration(model, windows, torch.device("cpu"), steps)
    assert torch.allclose(damping, torch.full((steps, 1), 0.5), atol=1e-4)
    assert torch.allclose(relaxation, torch.full((steps, 1), 0.3), atol=1e-4)
    with torch.no_grad():
        states = torch.stack(rollout(model, history, forcing, steps + 2, hours), dim=1)
    assert torch.allclose(states, truth, atol=1e-4)  # also past the fitted steps
    with pytest.raises(ValueError, match="give the hour"):
        rollout(model, history, forcing, 1)
    # damping off: the change is kept whole, the relaxation fitted on what it leaves
    damping, relaxation = fit_calibration(model, windows, torch.device("cpu"), 1, damping=False)
    assert torch.equal(damping, torch.ones(1, 1)) and 0.0 <= float(relaxation[0, 0]) <= 1.0
    # saved in the state, restored at load
    rebuilt = _ChangeOracle(_cfg(spectral_norm=False),  # type: ignore[arg-type]
                            dataclasses.replace(saved, damping=damping, relaxation=relaxation))
    assert torch.equal(rebuilt.relaxation.flatten(), relaxation.flatten())
    plain = _state(np.linspace(60, 50, 8), np.linspace(0, 7, 8), 1)
    without = WXFormer(_cfg(spectral_norm=False), plain)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no climatology"):
        without.set_relaxation(torch.ones(1, 1))


def test_calibration_past_the_training_rollout_fits_each_later_step_on_the_windows_that_reach_it() -> None:
    """The first steps' factors come from the training-length windows alone, with or without longer ones;
    the later steps get their own fitted factors instead of the last one carried on."""
    from services.weather.training import fit_calibration

    g = torch.Generator().manual_seed(2)
    clim = torch.randn(3, 1, 8, 8, generator=g)
    saved = dataclasses.replace(_state(np.linspace(60, 50, 8), np.linspace(0, 7, 8), channels=1), climatology=clim)
    model = _ChangeOracle(_cfg(spectral_norm=False), saved).eval()  # type: ignore[arg-type]
    n, steps, far = 8, 2, 5
    hours = torch.randint(0, 24, (n,), generator=g).float()
    forcing = torch.randn(n, far + 1, 5, 8, 8, generator=g)
    history = torch.randn(n, 1, 1, 8, 8, generator=g)
    state, targets = history[:, -1], []
    for k in range(far):  # the truth relaxes 30 % toward the climatology for two steps, then 60 %
        rate = 0.3 if k < steps else 0.6
        state = state + forcing[:, k + 1, :1] + rate * (model.climate(hours + 6 * (k + 1)) - state)
        targets.append(state)
    truth = torch.stack(targets, dim=1)
    short = [(history[:4], forcing[:4, :steps + 1], truth[:4, :steps], hours[:4]),
             (history[4:], forcing[4:, :steps + 1], truth[4:, :steps], hours[4:])]
    noisy = truth[:3] + 5 * torch.randn(3, far, 1, 8, 8, generator=g)  # longer windows disagree on the first steps
    long = [(history[:3], forcing[:3], noisy, hours[:3])]
    alone_damping, alone_relaxation = fit_calibration(model, short, torch.device("cpu"), steps)
    damping, relaxation = fit_calibration(model, short, torch.device("cpu"), far, longer=long)
    assert damping.shape == relaxation.shape == (far, 1)
    assert torch.equal(damping[:steps], alone_damping) and torch.equal(relaxation[:steps], alone_relaxation)
    assert torch.allclose(relaxation[:steps], torch.full((steps, 1), 0.3), atol=1e-4)
    assert not torch.allclose(relaxation[steps:], relaxation[steps - 1:steps].expand(far - steps, 1), atol=0.05)


def test_longest_validation_windows_reach_as_far_as_the_period_keeps_enough_of_them() -> None:
    cfg = _cfg(synthetic_days=10, synthetic_grid=(16, 32), train_rollout=2)
    val = prepare(cfg).datasets[1]  # 48 hourly states (10 days x 20 %)
    assert val.rollout == 2 and len(val) == 48 - 12
    longer = val.longest(40, min_windows=24)
    assert longer is not None and longer.rollout == 4 and len(longer) == 48 - 24  # 4 x 6 h leaves 24 starts
    hist, force, target, _ = longer[len(longer) - 1]
    assert target.shape[0] == 4 and force.shape[0] == 5 and torch.equal(target[-1], val.states[val.bounds[1] - 1])
    assert val.longest(40, min_windows=48) is None and val.longest(2, min_windows=1) is None
    assert len(val) == 36 and val.rollout == 2  # the validation set itself is left as it was


def test_bounded_least_squares_matches_a_grid_search() -> None:
    from services.weather.training import bounded_least_squares

    g = torch.Generator().manual_seed(1)
    a = torch.randn(200, 6, 2, generator=g, dtype=torch.float64)
    gram = a.transpose(1, 2) @ a  # (200, 2, 2), positive semi-definite
    rhs = torch.randn(200, 2, generator=g, dtype=torch.float64) * 4
    gram[0, 1] = gram[1, 0] = gram[0, 1] * 0  # one problem with a dead direction
    gram[0, 1, 1] = 0.0
    best = bounded_least_squares(gram, rhs)
    assert ((best >= 0) & (best <= 1)).all() and best[0, 1] == 0
    grid = torch.linspace(0, 1, 201, dtype=torch.float64)
    xs = torch.cartesian_prod(grid, grid)  # (G, 2)
    loss = torch.einsum("gi,cij,gj->cg", xs, gram, xs) - 2 * rhs @ xs.T  # (200, G)
    mine = torch.einsum("ci,cij,cj->c", best, gram, best) - 2 * (rhs * best).sum(dim=1)
    assert (mine <= loss.min(dim=1).values + 1e-9).all()


def test_damping_keeps_a_network_that_predicts_no_change() -> None:
    from services.weather.training import fit_calibration

    state = _state(np.linspace(60, 50, 8), np.linspace(0, 7, 8), channels=2)
    model = WXFormer(_cfg(spectral_norm=False), state).eval()  # type: ignore[arg-type]
    for p in model.head.parameters():
        torch.nn.init.zeros_(p)
    history = torch.randn(2, 1, 2, 8, 8)
    factors, _ = fit_calibration(model, [(history, torch.zeros(2, 3, 5, 8, 8), torch.randn(2, 2, 2, 8, 8))],
                                 torch.device("cpu"), 2)
    assert torch.equal(factors, torch.ones(2, 2))
    with pytest.raises(ValueError, match="expected \\(steps, 2\\)"):
        model.set_damping(torch.ones(3, 1))


def test_detached_rollout_training_cuts_the_gradient_between_steps() -> None:
    from services.weather.training import rollout, unpack

    torch.manual_seed(0)
    cfg = _cfg(synthetic_days=4, synthetic_grid=(16, 32), train_rollout=2)
    prepared = prepare(cfg)
    model = WXFormer(cfg, prepared.state)
    batch = next(iter(torch.utils.data.DataLoader(prepared.datasets[0], batch_size=2)))
    history, forcing, _, hours = unpack(batch, torch.device("cpu"))
    for detach in (False, True):
        first, second = rollout(model, history, forcing, 2, hours, detach=detach)
        (through,) = torch.autograd.grad(second.sum(), first, allow_unused=True)
        assert (through is None) == detach  # detached: the second step does not reach back into the first
    detached = _cfg(synthetic_days=4, synthetic_grid=(16, 32), train_rollout=2,
                             rollout_gradient="detached")
    model = WXFormer(detached, prepared.state)
    loss = rollout_loss(model, batch, torch.device("cpu"))
    loss.backward()
    assert loss.item() > 0 and all(p.grad is not None for p in model.embeds[0].parameters())
    with pytest.raises(ValueError, match="rollout_gradient='sometimes'"):
        WeatherConfig(rollout_gradient="sometimes")  # type: ignore[arg-type]


def test_normalized_tendencies_scale_the_change_and_are_saved(tmp_path: Any) -> None:
    cfg = _cfg(synthetic_days=10, synthetic_grid=(16, 32), history=4,
                        residual_base="day", normalize_tendency=True, train_rollout=1)
    state = prepare(cfg).state
    assert state.tendency_std is not None and state.tendency_std.shape == (3,)
    assert bool((state.tendency_std > 0).all()) and bool((state.tendency_std < 2).all())
    assert prepare(_cfg(synthetic_days=4, synthetic_grid=(16, 32), train_rollout=2)).state.tendency_std is None
    model = WXFormer(cfg, state).eval()
    history = torch.zeros(1, 4, 3, 16, 32)
    change = torch.ones(1, 3, 16, 32)
    out = model.advance(history, change, 0)
    torch.testing.assert_close(out[0, :, 0, 0], state.tendency_std)  # one unit of change = one spread
    state.save(tmp_path)
    again = WeatherState.load(tmp_path)
    assert again.tendency_std is not None and torch.equal(again.tendency_std, state.tendency_std)


def test_relaxation_that_keeps_the_mean_pulls_the_pattern_and_fits_truth_that_does() -> None:
    """With ``relaxation_mean="keep"`` relaxation moves the anomaly's pattern toward the climatology and leaves
    its latitude-weighted area mean: truth that relaxes so, from a state 2 K warmer than the climatology
    everywhere, is fitted exactly (relaxation 0.3) and the calibrated rollout keeps the domain 2 K warm, where
    plain relaxation pulls the mean toward the climatology's."""
    from services.weather.training import fit_calibration, rollout

    g = torch.Generator().manual_seed(1)
    clim = torch.randn(3, 1, 8, 8, generator=g)
    saved = dataclasses.replace(_state(np.linspace(60, 50, 8), np.linspace(0, 7, 8), channels=1), climatology=clim)
    model = _ChangeOracle(_cfg(spectral_norm=False, relaxation_mean="keep"), saved).eval()  # type: ignore[arg-type]
    w = model.lat_weights / model.lat_weights.sum()

    def area_mean(x: torch.Tensor) -> torch.Tensor:
        return (x * w).sum(dim=(-2, -1))

    n, steps = 8, 3
    hours = torch.randint(0, 24, (n,), generator=g).float()
    forcing = torch.zeros(n, steps + 3, 5, 8, 8)  # the oracle's change is forcing[:, k + 1, :1]: none here
    history = (model.climate(hours) + 2.0 + 0.5 * torch.randn(n, 1, 8, 8, generator=g))[:, None]  # (n, 1, 1, H, W)
    pull = model.pull(history[:, -1], hours + 6)
    anomaly_now = area_mean(history[:, -1] - model.climate(hours))
    target = model.climate(hours + 6) + anomaly_now[..., None, None]
    assert torch.allclose(pull, target - history[:, -1], atol=1e-5)  # toward the climatology + the mean anomaly
    state, targets = history[:, -1], []
    for k in range(steps):
        state = state + 0.3 * model.pull(state, hours + 6 * (k + 1))
        targets.append(state)
    truth = torch.stack(targets, dim=1)
    windows = [(history[:4], forcing[:4], truth[:4], hours[:4]), (history[4:], forcing[4:], truth[4:], hours[4:])]
    _, relaxation = fit_calibration(model, windows, torch.device("cpu"), steps, damping=False)
    assert torch.allclose(relaxation, torch.full((steps, 1), 0.3), atol=1e-4)
    with torch.no_grad():
        states = torch.stack(rollout(model, history, forcing, steps, hours), dim=1)
    assert torch.allclose(states, truth, atol=1e-4)
    # relaxation moves the area mean only by the climatology's own change between the base's hour and the valid
    # one: with a climatology without a daily cycle the 2 K warm spell is kept, where plain relaxation pulls it in
    flat = dataclasses.replace(saved, climatology=clim * torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1, 1),
                               relaxation=torch.full((steps, 1), 0.3))
    # a saved model relaxes as its factors were fitted, whatever the config says
    keeping = _ChangeOracle(_cfg(spectral_norm=False),  # type: ignore[arg-type]
                            dataclasses.replace(flat, relaxation_keeps_mean=True)).eval()
    plain = _ChangeOracle(_cfg(spectral_norm=False, relaxation_mean="keep"),  # type: ignore[arg-type]
                          dataclasses.replace(flat, relaxation_keeps_mean=False)).eval()
    legacy = _ChangeOracle(_cfg(spectral_norm=False, relaxation_mean="keep"), flat)  # type: ignore[arg-type]
    assert keeping.keep_mean and not plain.keep_mean and not legacy.keep_mean  # saved before the choice: relax
    start = area_mean(history[:, -1] - keeping.climate(hours))
    with torch.no_grad():
        kept = rollout(keeping, history, forcing, steps, hours)[-1]
        pulled = rollout(plain, history, forcing, steps, hours)[-1]
    assert torch.allclose(area_mean(kept - keeping.climate(hours)), start, atol=1e-4)
    assert torch.allclose(area_mean(pulled - plain.climate(hours)), 0.7 ** steps * start, atol=1e-4)



def test_an_inference_rollout_computes_each_spectral_norm_once_with_the_same_values() -> None:
    from torch.nn.utils.parametrizations import _SpectralNorm

    from services.weather import training
    from services.weather.training import rollout, unpack

    torch.manual_seed(0)
    cfg = _cfg(synthetic_days=4, synthetic_grid=(16, 32), train_rollout=2)
    prepared = prepare(cfg)
    model = WXFormer(cfg, prepared.state).eval()
    batch = next(iter(torch.utils.data.DataLoader(prepared.datasets[0], batch_size=2)))
    history, forcing, _, hours = unpack(batch, torch.device("cpu"))
    calls = {"n": 0}
    original = _SpectralNorm.forward

    def counted(self: Any, weight: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        return original(self, weight)

    layers = sum(isinstance(m, _SpectralNorm) for m in model.modules())
    with pytest.MonkeyPatch.context() as patch, torch.inference_mode():
        patch.setattr(_SpectralNorm, "forward", counted)
        found = rollout(model, history, forcing, 2, hours)
        once = calls["n"]
        calls["n"] = 0
        patch.setattr(training.parametrize, "cached", contextlib.nullcontext)  # as before: at every call
        expected = rollout(model, history, forcing, 2, hours)
    assert once <= layers < calls["n"]  # once per layer at most, against every call of every step
    assert all(torch.equal(a, b) for a, b in zip(expected, found, strict=True))


def test_a_pickled_model_is_built_again_whole_for_the_model_process() -> None:
    """Spectrally normalized (parametrized) modules do not pickle by themselves: a WXFormer pickles as its config,
    state, state dict and the buffers outside it, and comes back rolling out the same states, its calibration
    factors and training mode included."""
    import pickle

    from services.weather.training import rollout, unpack

    torch.manual_seed(0)
    cfg = _cfg(synthetic_days=4, synthetic_grid=(16, 32), train_rollout=2)
    prepared = prepare(cfg)
    model = WXFormer(cfg, prepared.state)
    with torch.no_grad():  # weights and a calibration unlike a fresh model's
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.set_damping(torch.tensor([[0.8, 0.5, 0.9], [0.3, 0.2, 0.6]]))
    model.eval()
    again = pickle.loads(pickle.dumps(model))
    assert isinstance(again, WXFormer) and not again.training and again.keep_mean == model.keep_mean
    assert torch.equal(again.damping, model.damping) and torch.equal(again.climatology, model.climatology)
    batch = next(iter(torch.utils.data.DataLoader(prepared.datasets[0], batch_size=2)))
    history, forcing, _, hours = unpack(batch, torch.device("cpu"))
    with torch.inference_mode():
        expected = rollout(model, history, forcing, 2, hours)
        found = rollout(again, history, forcing, 2, hours)
    assert all(torch.equal(a, b) for a, b in zip(expected, found, strict=True))
    copied = copy.deepcopy(model)  # the trainer's moving average copies the model this way: through __reduce__ too
    with torch.inference_mode():
        assert all(torch.equal(a, b) for a, b in zip(expected, rollout(copied, history, forcing, 2, hours),
                                                      strict=True))
    assert [n for n, _ in copied.named_buffers()] == [n for n, _ in model.named_buffers()]  # the EMA zips them
    assert pickle.loads(pickle.dumps(model.train())).training
