"""BentoML service of the forecasting domain: ``POST /forecast`` on port 3001.

Two services: ``Forecasting`` (public: validates requests, formats answers) and ``ForecastingRunner``
(holds ``models:/forecasting@production`` and runs it on adaptive batches of requests).
"""

from __future__ import annotations

from datetime import datetime

import bentoml
import numpy as np
from bentoml.exceptions import ServiceUnavailable
from pydantic import BaseModel, ConfigDict, Field

from services.forecasting import inference
from services.forecasting.client import example_request
from shared.serving import (
    BENTO_MAX_CONCURRENCY,
    RUNNER_CONNECTION,
    FrontService,
    ModelRef,
    ModelUnavailable,
    RunnerService,
    answers_errors,
    guard,
    setting,
)

MAX_ROWS = 20_000
MAX_COLUMNS = 2_000
# Adaptive batching: a request waits at most this long for a batch; BentoML sheds load (503) past it, so keep
# it well above one batch's time on a small CPU box.
MAX_LATENCY_MS = setting("forecasting", "MAX_LATENCY_MS", 5000)


class ForecastRequest(BaseModel):
    """Recent history, oldest row first, at least the model's lookback (seq_len) rows."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, json_schema_extra={"example": example_request()})
    columns: list[str] = Field(min_length=1, max_length=MAX_COLUMNS,
                               description="variable names, in the order of each row")
    values: list[list[float]] = Field(min_length=1, max_length=MAX_ROWS,
                                      description="rows = time steps, in column order")
    timestamps: list[datetime] | None = Field(
        default=None, max_length=MAX_ROWS, description="one per row (needed by models trained with calendar features)")
    horizon: int | None = Field(default=None, ge=1, le=10_000,
                                description="steps to forecast (default: the trained horizon)")


class ForecastResponse(BaseModel):
    columns: list[str]
    values: list[list[float]]
    timestamps: list[str] | None
    model: ModelRef


@bentoml.service(name="forecasting_runner", workers=1, resources={"cpu": "2"},
                 traffic={"timeout": 60, "max_concurrency": BENTO_MAX_CONCURRENCY},
                 runner_connection=RUNNER_CONNECTION)
class ForecastingRunner(RunnerService):
    """Holds ``models:/forecasting@production`` and runs it on adaptive batches of packed requests."""

    domain = "forecasting"

    @bentoml.api(batchable=True, max_batch_size=64, max_latency_ms=MAX_LATENCY_MS)
    def predict(self, batch: np.ndarray) -> np.ndarray:
        try:
            loaded = self.holder.get()
        except ModelUnavailable as exc:
            raise ServiceUnavailable(str(exc)) from None
        return inference.run(loaded, batch)


@bentoml.service(name="forecasting", workers=1, traffic={"timeout": 60, "max_concurrency": BENTO_MAX_CONCURRENCY})
class Forecasting(FrontService):
    """Multivariate forecasts from iTransformer or Autoformer: send the recent history (at least the model's
    lookback, with timestamps when it uses calendar features) to `/forecast` and get the next `horizon` steps
    of every column. (This front service validates and formats; a runner holds the model and batches calls.)"""

    runner = bentoml.depends(ForecastingRunner)

    @bentoml.api(route="/forecast")
    @answers_errors
    async def forecast(self, request: ForecastRequest, /) -> ForecastResponse:
        """Forecast the next `horizon` steps of every column from the recent history."""
        # Validate against the runner's model; if it was swapped for one of another shape meanwhile,
        # refresh and try once more.
        for attempt in (0, 1):
            meta = await self.model_meta(refresh=attempt == 1)
            packed, times, steps = inference.validate(meta, request.columns, request.values, request.timestamps,
                                                      request.horizon)
            try:
                out = (await self.runner.to_async.predict(packed[None]))[0]  # (H + 1, N)
            except Exception as exc:
                if attempt == 1:
                    raise ModelUnavailable(f"the model runner could not answer: {exc}") from exc
                continue
            served = str(int(out[-1, 0]))
            if served == str(meta["version"]):
                break
        if served != str(meta["version"]):
            meta = await self.model_meta(refresh=True)
        future = inference.future_stamps(meta, times, steps)
        return ForecastResponse(columns=meta["columns"], values=out[:steps].tolist(), timestamps=future,
                                model=ModelRef(name=meta["name"], version=served, run_id=meta["run_id"],
                                               architecture=meta.get("architecture")))


guard(Forecasting, "forecasting")
