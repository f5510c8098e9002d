"""BentoML service of the transients domain: ``POST /classify`` on port 3003.

One process: it holds ``models:/transients@production``, checks every object of a request (JSON at
``/classify``, a PLAsTiCC-layout CSV or Parquet upload at ``/classify_table``) against it, and classifies the
objects of the requests that arrive together as one batch in its model process
(:class:`shared.serving.BatchingService`, ``inference.run_items``).
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bentoml
from pydantic import BaseModel, ConfigDict, Field

from services.transients import inference
from services.transients.client import example_request
from services.transients.curves import Curve
from shared.serving import BENTO_MAX_CONCURRENCY, BatchingService, ModelRef, RequestError, answers_errors, guard


class LightCurve(BaseModel):
    """One object's observations (any order; they are sorted by time)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=True)  # non-finite values get a 422 naming the object
    object_id: str | None = Field(default=None, max_length=200)
    mjd: list[float] = Field(description="observation times (MJD, days)")
    passband: list[int | str] = Field(description="band of each observation: index (PLAsTiCC: 0-5 = ugrizy; ZTF BTS: "
                                                  "0 = g, 1 = r) or name")
    flux: list[float] = Field(description="flux (any consistent unit; the BTS file uses zero point 27.5)")
    flux_err: list[float] = Field(description="flux error (> 0)")
    detected: list[bool] | None = Field(default=None, description="detection flags (default: every point)")
    redshift: float | None = Field(default=None, description="used by models trained with use_redshift")


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"example": example_request()})
    objects: list[LightCurve] = Field(min_length=1, max_length=inference.MAX_OBJECTS)


class ObjectClasses(BaseModel):
    object_id: str
    probabilities: dict[str, float]  # calibrated, one per class
    top_class: str  # the model's decision (default "balanced": argmax of p_c / pi_c^(1-w), see the README)
    top_probability: float  # the calibrated probability of top_class
    most_probable_class: str  # argmax of the probabilities
    ood_score: float  # energy score: higher = less like any known class
    out_of_distribution: bool  # ood_score above the threshold 95 % of validation objects fall below
    n_points: int


class ClassifyResponse(BaseModel):
    objects: list[ObjectClasses]
    classes: list[str]
    latency_ms: float
    model: ModelRef


@bentoml.service(name="transients", workers=1, resources={"cpu": "2"},
                 traffic={"timeout": 60, "max_concurrency": BENTO_MAX_CONCURRENCY})
class Transients(BatchingService):
    """Calibrated classes of astronomical transients from their light curves: send objects (times, bands, fluxes
    and errors) to `/classify`, or upload a table in the PLAsTiCC columns to `/classify_table`, and get each
    object's class probabilities, its top class and an out-of-distribution score.
    (The objects of requests that arrive together are classified as one batch.)"""

    domain = "transients"
    batch_function = "services.transients.inference:run_items"
    max_batch_items = 512  # objects

    async def _classify(self, curves_of: Callable[[dict[str, Any]], list[Curve]]) -> ClassifyResponse:
        started = time.perf_counter()
        loaded = self.holder.get()
        meta = self.card_of(loaded)
        rows = await self.batcher.submit(loaded, curves_of(meta))  # on the model the objects were checked on
        # built from the model process's rows (str, float, bool and int already) without validating them again
        return ClassifyResponse.model_construct(
            objects=[ObjectClasses.model_construct(**row) for row in rows], classes=list(meta["classes"]),
            latency_ms=(time.perf_counter() - started) * 1000, model=ModelRef(**loaded.describe()))

    @bentoml.api(route="/classify")
    @answers_errors
    async def classify(self, request: ClassifyRequest, /) -> ClassifyResponse:
        """Classify up to `max_objects` light curves (see `/model` for the bands, classes and limits)."""

        def curves_of(meta: dict[str, Any]) -> list[Curve]:
            return [inference.check_object(i, o.object_id, o.mjd, o.passband, o.flux, o.flux_err, meta["bands"],
                                           int(meta["max_points"]), o.redshift, o.detected)
                    for i, o in enumerate(request.objects)]

        return await self._classify(curves_of)

    @bentoml.api(route="/classify_table")
    @answers_errors
    async def classify_table(self, file: Path) -> ClassifyResponse:
        """Classify the objects of an uploaded CSV or Parquet table in the PLAsTiCC columns (object_id, mjd,
        passband, flux, flux_err[, detected, redshift])."""
        frame = _read_table(Path(file))

        def curves_of(meta: dict[str, Any]) -> list[Curve]:
            return inference.curves_from_table(frame, meta["bands"], int(meta["max_points"]))

        return await self._classify(curves_of)


def _read_table(path: Path) -> Any:
    import pandas as pd

    if not path.exists() or path.stat().st_size == 0:
        raise RequestError("the uploaded file is empty")
    content = path.read_bytes()
    try:
        if content[:4] == b"PAR1":
            return pd.read_parquet(io.BytesIO(content))
        return pd.read_csv(io.BytesIO(content))
    except Exception as exc:  # a file pandas cannot parse is the caller's
        raise RequestError(f"the upload is neither a readable CSV nor a Parquet table: {exc}") from None


guard(Transients, "transients")
