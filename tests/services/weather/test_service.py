"""Initial states from netCDF/JSON checked against the model (grid, variables, levels, units, times), the
rollout written back in the data's layout, and the evaluation pipeline's output."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from services.weather.config import WeatherConfig, WeatherEvalConfig
from services.weather.data import WeatherState, prepare
from services.weather.evaluation import evaluate_forecasts
from services.weather.inference import (
    Rollout,
    StateError,
    forecast,
    rollout_dataset,
    run_items,
    state_from_dataset,
    to_model_units,
)
from services.weather.model import WXFormer
from services.weather.service import ForecastJSON, _state_from_json
from services.weather.synthetic import synthetic_dataset
from shared.loaded import LoadedModel
from shared.serving import RequestError

TINY = {"dims": (16, 32), "depths": (1, 1), "kernels": ((2, 4), (2, 4)), "strides": (2, 2), "local_window": 2,
        "global_windows": (2, 2), "dim_head": 8, "synthetic_days": 10, "synthetic_grid": (16, 32),
        "history": 1, "residual_base": "last"}


def _cfg(**settings: object) -> WeatherConfig:
    """The tiny model (one input state, the change added to the last one), ``settings`` on top."""
    return WeatherConfig(**{**TINY, **settings})  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def trained() -> tuple[WXFormer, WeatherState, WeatherConfig]:
    torch.manual_seed(0)
    cfg = _cfg()
    prepared = prepare(cfg)
    return WXFormer(cfg, prepared.state).eval(), prepared.state, cfg


@pytest.fixture()
def state() -> Any:
    return synthetic_dataset(days=1, grid=(16, 32), seed=0).isel(time=slice(5, 6))


def test_state_from_the_training_layout(trained: Any, state: Any) -> None:
    _, saved, _ = trained
    values, init_time, notes = state_from_dataset(state, saved, history=1)
    assert values.shape == (1, 3, 16, 32) and notes == []
    assert init_time == np.datetime64("2000-01-01T05:00", "ns")
    np.testing.assert_allclose(values[0, 2], state["t2m"].values[0])


def test_an_hourly_upload_gives_a_six_hourly_model_the_states_it_needs(trained: Any) -> None:
    _, saved, _ = trained
    hourly = synthetic_dataset(days=2, grid=(16, 32), seed=0).isel(time=slice(5, 30))  # 05:00 to 05:00 next day
    values, init_time, _ = state_from_dataset(hourly, saved, history=4)
    assert init_time == np.datetime64("2000-01-02T05:00", "ns") and values.shape == (4, 3, 16, 32)
    for k, hours_before in enumerate((18, 12, 6, 0)):  # t - 18 h, t - 12 h, t - 6 h, t, in that order
        np.testing.assert_allclose(values[k, 2], hourly["t2m"].values[-1 - hours_before])
    gap = hourly.drop_sel(time=np.datetime64("2000-01-01T17:00"))  # t - 12 h is missing
    with pytest.raises(StateError, match="missing 2000-01-01T17:00"):
        state_from_dataset(gap, saved, history=4)
    with pytest.raises(StateError, match="needs 4 states 6 h apart; the input has 3"):
        state_from_dataset(hourly.isel(time=slice(-3, None)), saved, history=4)


def test_celsius_is_converted_and_missing_units_are_assumed(trained: Any, state: Any) -> None:
    _, saved, _ = trained
    celsius = state.copy(deep=True)
    celsius["t2m"] = celsius["t2m"] - 273.15
    celsius["t2m"].attrs["units"] = "degC"
    del celsius["t"].attrs["units"]
    values, _, notes = state_from_dataset(celsius, saved, history=1)
    np.testing.assert_allclose(values[0, 2], state["t2m"].values[0], atol=1e-3)
    assert any("t_850: no units given, assumed K" in n for n in notes)
    with pytest.raises(StateError, match="units 'm s\\*\\*-1' do not match the model's 'K'"):
        to_model_units(np.zeros(2), "m s**-1", "K", "t2m")


@pytest.mark.parametrize(("change", "reason"), [
    (lambda ds: ds.isel(latitude=slice(0, 8)), "grid is 8 x 32"),
    (lambda ds: ds.assign_coords(longitude=ds.longitude + 1.0), "grid coordinates differ"),
    (lambda ds: ds.drop_vars("t2m"), "variable 't2m' is missing"),
    (lambda ds: ds.sel(level=[850.0]), "level 500 is missing"),
    (lambda ds: ds.isel(time=0).drop_vars("time"), "needs a 'time' coordinate"),
    (lambda ds: ds.expand_dims(number=3), "3 ensemble members"),
    (lambda ds: ds.where(ds.latitude < 80), "NaN"),
])
def test_bad_states_are_refused_with_the_reason(trained: Any, state: Any, change: Any, reason: str) -> None:
    _, saved, _ = trained
    with pytest.raises(StateError, match=reason):
        state_from_dataset(change(state), saved, history=1)


def test_json_form_checks_channels_shape_and_units(trained: Any, state: Any) -> None:
    _, saved, _ = trained
    fields = {"t_850": state["t"].values[0, 0].tolist(), "t_500": state["t"].values[0, 1].tolist(),
              "t2m": state["t2m"].values[0].tolist()}
    states, notes = _state_from_json(ForecastJSON(time="2000-01-01T05:00Z", fields=fields), saved, 1)
    assert states.shape == (1, 3, 16, 32) and len(notes) == 3
    with pytest.raises(RequestError, match="missing \\['t2m'\\]"):
        two = {k: fields[k] for k in ("t_850", "t_500")}
        _state_from_json(ForecastJSON(time="2000-01-01T05:00", fields=two), saved, 1)
    short = {**fields, "t2m": fields["t2m"][:-1]}
    with pytest.raises(RequestError, match="expected 16 rows"):
        _state_from_json(ForecastJSON(time="2000-01-01T05:00", fields=short), saved, 1)
    with pytest.raises(RequestError, match="units 'Pa'"):
        _state_from_json(ForecastJSON(time="2000-01-01T05:00", fields=fields, units={"t2m": "Pa"}), saved, 1)
    with pytest.raises(RequestError, match="needs 2 states 6 h apart and this endpoint takes one"):
        _state_from_json(ForecastJSON(time="2000-01-01T05:00", fields=fields), saved, 2)


def test_rollout_back_to_the_data_layout(trained: Any, state: Any) -> None:
    model, saved, _ = trained
    values, init_time, _ = state_from_dataset(state, saved, history=1)
    predicted = forecast(model, saved, values[None], np.array([init_time]), steps=3)[0]
    assert predicted.shape == (3, 3, 16, 32) and np.isfinite(predicted).all()
    out = rollout_dataset(predicted, init_time, saved, {"model": "weather v1"})
    assert out["t"].dims == ("time", "level", "latitude", "longitude") and out["t"].attrs["units"] == "K"
    assert out["level"].values.tolist() == [850.0, 500.0]
    assert str(out.time.values[0])[:16] == "2000-01-01T11:00" and out.attrs["model"] == "weather v1"
    np.testing.assert_allclose(out["t2m"].values, predicted[:, 2])
    again, _, _ = state_from_dataset(out.isel(time=slice(-1, None)), saved, history=1)  # a forecast is a valid state
    np.testing.assert_allclose(again[0], predicted[-1], rtol=1e-6)


def test_requests_batched_in_the_model_process_get_their_own_rollouts(trained: Any) -> None:
    """run_items (what the service's model process runs): requests with the same steps roll out together, others
    apart, and each gets the rollout it would get alone, in its own order."""
    model, saved, cfg = trained
    loaded = LoadedModel(model=model, cfg=cfg, state=saved, domain="weather", name="weather", version="1")
    world = synthetic_dataset(days=1, grid=(16, 32), seed=0)
    items = []
    for hour, steps in ((3, 2), (9, 1), (14, 2), (20, 2)):
        values, init_time, _ = state_from_dataset(world.isel(time=slice(hour, hour + 1)), saved, history=1)
        items.append(Rollout(values, init_time, steps))
    together = run_items(loaded, items)
    assert [p.shape for p in together] == [(2, 3, 16, 32), (1, 3, 16, 32), (2, 3, 16, 32), (2, 3, 16, 32)]
    for item, batched in zip(items, together, strict=True):
        alone = forecast(model, saved, item.history[None], np.array([item.init_time]), item.steps)[0]
        np.testing.assert_allclose(batched, alone, rtol=1e-5, atol=1e-4)  # K; float rounding of a batch only
    assert not np.allclose(together[0], together[2])  # another initial state, another forecast


def test_evaluation_reports_model_and_baselines_per_lead(trained: Any) -> None:
    model, saved, cfg = trained
    model.set_damping(torch.full((2, model.n_channels), 0.5))  # calibrated: the raw network must differ
    try:
        result = evaluate_forecasts(model, cfg, saved, None, WeatherEvalConfig(lead_steps=2))
        damping = model.damping.clone()
    finally:
        model.set_damping(torch.zeros(0, model.n_channels))
    m = result.metrics
    assert m["lead_hours"] == [6, 12]
    for score in ("rmse", "acc"):
        assert set(m[score]) == {"model", "model_raw", "persistence", "climatology", "diurnal_persistence",
                                  "relaxed_diurnal_persistence"}
        for table in m[score].values():
            assert set(table) == {"t_850", "t_500", "t2m"} and all(len(v) == 2 for v in table.values())
        for name, table in m[f"{score}_ci95"].items():  # every score inside its own interval
            for channel, bounds in table.items():
                for (lo, hi), point in zip(bounds, m[score][name][channel], strict=True):
                    assert lo - 1e-9 <= point <= hi + 1e-9
    assert all(v == 0.0 for v in m["acc"]["climatology"]["t2m"])
    assert m["initial_times"] > 2 and m["bootstrap"]["block_hours"] == 24  # hourly initial times, day blocks
    differences = m["rmse_difference_ci95"]
    assert set(differences) == {f"{a} - {b}" for a in ("model", "model_raw") for b in
                                ("persistence", "climatology", "diurnal_persistence", "relaxed_diurnal_persistence")}
    for channel, rows in differences["model - persistence"].items():
        for (point, lo, hi), ours, theirs in zip(rows, m["rmse"]["model"][channel],
                                                 m["rmse"]["persistence"][channel], strict=True):
            assert point == pytest.approx(ours - theirs, abs=1e-4) and lo <= hi
    assert set(m["activity"]) == {*m["rmse"], "truth"} and set(m["bias"]) == set(m["rmse"])
    assert all(v == pytest.approx(0.0, abs=1e-6) for v in m["activity"]["climatology"]["t2m"])
    # the raw network is the calibrated one with its factors off: both are there, and the model keeps them
    assert damping.shape[0] == 2 and bool((damping == 0.5).all())  # evaluating the raw network kept the factors
    assert not np.allclose(m["rmse"]["model"]["t2m"], m["rmse"]["model_raw"]["t2m"])
    # persistence error grows with lead time on a moving atmosphere
    assert m["rmse"]["persistence"]["t_500"][1] > m["rmse"]["persistence"]["t_500"][0] > 0
    assert {"rmse_vs_lead.png", "acc_vs_lead.png", "maps.png"} == set(result.figures)
