"""BentoML service of the forecasting domain: ``POST /forecast`` on port 3001.

It holds ``models:/forecasting@production``, checks each request against it on the event loop, and runs the
model on batches of requests gathered while the previous batch ran, in its model process
(:class:`shared.serving.BatchingService`): the calendar features, the model and the answer's times are computed
there (``inference.run_items``).
"""

from __future__ import annotations

from datetime import datetime

import bentoml
from pydantic import BaseModel, ConfigDict, Field

from services.forecasting import inference
from services.forecasting.client import example_request
from shared.serving import BENTO_MAX_CONCURRENCY, BatchingService, ModelRef, answers_errors, guard

MAX_ROWS = 20_000
MAX_COLUMNS = 2_000


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


@bentoml.service(name="forecasting", workers=1, resources={"cpu": "2"},
                 traffic={"timeout": 60, "max_concurrency": BENTO_MAX_CONCURRENCY})
class Forecasting(BatchingService):
    """Multivariate forecasts from iTransformer or Autoformer: send the recent history (at least the model's
    lookback, with timestamps when it uses calendar features) to `/forecast` and get the next `horizon` steps
    of every column. (Requests that arrive together run through the model as one batch.)"""

    domain = "forecasting"
    batch_function = "services.forecasting.inference:run_items"
    max_batch_items = 64

    @bentoml.api(route="/forecast")
    @answers_errors
    async def forecast(self, request: ForecastRequest, /) -> ForecastResponse:
        """Forecast the next `horizon` steps of every column from the recent history."""
        loaded = self.holder.get()
        meta = self.card_of(loaded)
        checked = inference.validate(meta, request.columns, request.values, request.timestamps, request.horizon)
        # on the model the request was checked on, in the model process: the forecast rows and their times
        out, stamps = (await self.batcher.submit(loaded, [checked]))[0]
        # built from trusted values without validating them again (672 floats for the demo: ~70 µs a request)
        return ForecastResponse.model_construct(columns=meta["columns"], values=out.tolist(), timestamps=stamps,
                                                model=ModelRef(**loaded.describe()))


guard(Forecasting, "forecasting")
