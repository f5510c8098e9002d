"""Request validation and the packed model path, without a server (the integration test covers HTTP)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from services.forecasting import inference
from services.forecasting.service import ForecastRequest
from shared import registry
from shared.serving import RequestError
from shared.tracking import LoadedModel


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    domain = registry.get("forecasting")
    cfg = domain.make_config("autoformer", None, {"d_model": 16, "d_ff": 32, "n_heads": 2, "seq_len": 48,
                                                  "label_len": 24, "pred_len": 24, "synthetic_vars": 3})
    data = domain.load_data(cfg)
    torch.manual_seed(0)
    model = domain.build_model(cfg, data.state).eval()
    return LoadedModel(model=model, cfg=cfg, state=data.state, domain="forecasting", name="forecasting",
                       version="7", run_id="r1")


def _meta(loaded: LoadedModel) -> dict:
    """What /model answers (the service validates requests against it)."""
    return {**loaded.describe(), **registry.get("forecasting").describe(loaded.cfg, loaded.state)}


def _check(request: ForecastRequest, meta: dict) -> tuple:
    """(packed model input, the history's times, steps) of a request."""
    checked = inference.validate(meta, request.columns, request.values, request.timestamps, request.horizon)
    return inference.pack(meta, checked.history, checked.times), checked.times, checked.steps


def _request(rows: int = 60, **changes: object) -> ForecastRequest:
    start = datetime(2021, 1, 1)
    body: dict[str, object] = {"columns": ["v0", "v1", "v2"], "values": [[float(i), 2.0 * i, 1.0] for i in range(rows)],
                               "timestamps": [start + timedelta(hours=i) for i in range(rows)]}
    body.update(changes)
    return ForecastRequest(**body)  # type: ignore[arg-type]


def test_model_output_matches_the_model_in_original_units(loaded: LoadedModel) -> None:
    meta = _meta(loaded)
    packed, times, steps = _check(_request(), meta)
    out = inference.run(loaded, packed[None])
    assert out.shape == (1, 24, 3) and steps == 24
    # the same forecast computed directly from standardized tensors
    mean, std = loaded.state.mean.numpy(), loaded.state.std.numpy()
    x = torch.tensor((packed[:48, :3] - mean) / std, dtype=torch.float32)[None]
    x_mark = torch.tensor(packed[:48, 3:])[None]
    y_mark = torch.tensor(packed[48 - 24 :, 3:])[None]
    with torch.inference_mode():
        direct = loaded.model(x, x_mark, y_mark)[0].numpy() * std + mean
    np.testing.assert_allclose(out[0], direct, rtol=1e-4, atol=1e-4)


def test_a_batch_of_checked_requests_gives_each_its_forecast_rows_and_times(loaded: LoadedModel) -> None:
    """run_items (what the model process runs) = pack, run and future_stamps, request by request."""
    meta = _meta(loaded)
    requests = [_request(), _request(rows=70, horizon=5), _request(values=[[1.0, 2.0, float(i)] for i in range(60)])]
    checked = [inference.validate(meta, r.columns, r.values, r.timestamps, r.horizon) for r in requests]
    answers = inference.run_items(loaded, checked)
    assert [len(rows) for rows, _ in answers] == [24, 5, 24]
    for item, (rows, stamps) in zip(checked, answers, strict=True):
        alone = inference.run(loaded, inference.pack(meta, item.history, item.times)[None])[0][: item.steps]
        np.testing.assert_allclose(rows, alone, rtol=1e-5, atol=1e-5)
        assert stamps == inference.future_stamps(meta, item.times, item.steps)
    assert answers[1][1][0] == "2021-01-03T22:00:00"  # the hour after the 70th (index 69) row


def test_columns_in_another_order_are_reordered(loaded: LoadedModel) -> None:
    meta = _meta(loaded)
    a, _, _ = _check(_request(), meta)
    swapped = _request(columns=["v2", "v0", "v1"], values=[[1.0, float(i), 2.0 * i] for i in range(60)])
    b, _, _ = _check(swapped, meta)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"columns": ["v0", "v1", "x"]}, "missing \\['v2'\\], unexpected \\['x'\\]"),
        ({"values": [[1.0, 2.0]] * 60}, "every row needs 3"),
        ({"horizon": 25}, "above the trained horizon 24"),
        ({"timestamps": None}, "send 'timestamps'"),
        ({"timestamps": [datetime(2021, 1, 1)] * 60}, "strictly increasing"),
        ({"timestamps": [datetime(2021, 1, 1) + timedelta(hours=i) for i in range(10)]}, "10 timestamps for 60 rows"),
    ],
)
def test_semantic_errors_are_422_with_the_reason(loaded: LoadedModel, changes: dict, message: str) -> None:
    with pytest.raises(RequestError, match=message) as info:
        _check(_request(**changes), _meta(loaded))
    assert info.value.status == 422


def test_too_short_history(loaded: LoadedModel) -> None:
    with pytest.raises(RequestError, match="history has 20 rows; this model needs at least 48"):
        _check(_request(rows=20), _meta(loaded))


@pytest.mark.parametrize(
    "changes",
    [{"values": [[float("nan"), 1.0, 1.0]] * 60}, {"values": [[float("inf"), 1.0, 1.0]] * 60},
     {"horizon": 0}, {"unknown": 1}, {"columns": []}],
)
def test_schema_rejects_non_finite_unknown_and_empty(changes: dict) -> None:
    with pytest.raises(ValidationError):
        _request(**changes)


def test_the_model_path_refuses_arrays_of_another_model(loaded: LoadedModel) -> None:
    with pytest.raises(ValueError, match="expects"):
        inference.run(loaded, np.zeros((1, 10, 3), dtype=np.float32))


def test_packed_calendar_rows_and_future_stamps_are_those_of_pandas(loaded: LoadedModel) -> None:
    """The numpy fast paths of pack and future_stamps give what pandas' date arithmetic gives."""
    import pandas as pd

    from services.forecasting.data import calendar_features

    meta = _meta(loaded)
    packed, stamps, steps = _check(_request(rows=70), meta)
    times = pd.DatetimeIndex(stamps)
    seq_len, pred_len = meta["seq_len"], meta["pred_len"]
    step = pd.Timedelta(seconds=meta["step_seconds"])
    span = times[-seq_len:].append(pd.DatetimeIndex(times[-1] + step * np.arange(1, pred_len + 1)))
    np.testing.assert_array_equal(packed[:, 3:], calendar_features(span, meta["marks"]))
    expected = [t.isoformat() for t in pd.date_range(times[-1] + step, periods=steps, freq=step)]
    assert inference.future_stamps(meta, times, steps) == expected
    # sub-second times keep pandas' own formatting
    odd = pd.DatetimeIndex([times[-2], times[-1] + pd.Timedelta(milliseconds=250)])
    assert inference.future_stamps(meta, odd, 2) == [
        t.isoformat() for t in pd.date_range(odd[-1] + step, periods=2, freq=step)]
    # so does a tz-aware index, at its wall-clock time
    assert inference.future_stamps(meta, times.tz_localize("Asia/Kolkata"), steps) == expected
    # tz-aware timestamps are read as their wall-clock time, as before
    aware = _request(rows=70, timestamps=[t.replace(tzinfo=UTC) for t in _request(rows=70).timestamps])
    np.testing.assert_array_equal(_check(aware, meta)[0], packed)


def test_wall_times_are_numpys_conversion_of_the_naive_datetimes() -> None:
    """The fast field arithmetic of wall_times gives what numpy gives for the same datetimes, offsets dropped."""
    from datetime import timezone

    naive = [datetime(1969, 12, 31, 23, 59, 59, 999_999), datetime(2000, 2, 29, 12, 30, 1, 5),
             datetime(2021, 1, 1), datetime(2262, 4, 11, 23, 47, 16)]
    offset = timezone(timedelta(hours=5, minutes=30))
    aware = [t.replace(tzinfo=offset) for t in naive[1:]] + [naive[0].replace(tzinfo=UTC)]
    expected = np.array(naive[1:] + naive[:1], dtype="datetime64[ns]")
    np.testing.assert_array_equal(inference.wall_times(naive[1:] + naive[:1]), expected)
    np.testing.assert_array_equal(inference.wall_times(aware), expected)
    assert inference.wall_times([]).shape == (0,)
