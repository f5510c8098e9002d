"""BentoML service of the transients domain: ``POST /classify`` on port 3003.

Two services: ``Transients`` (public: checks every object, formats the answer; JSON at ``/classify``, a
PLAsTiCC-layout CSV or Parquet upload at ``/classify_table``) and ``TransientsRunner`` (holds
``models:/transients@production`` and classifies adaptive batches of objects gathered across requests).
"""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import bentoml
from bentoml.exceptions import ServiceUnavailable
from pydantic import BaseModel, ConfigDict, Field

from services.transients import inference
from services.transients.client import example_request
from services.transients.curves import Curve
from shared.serving import (
    BENTO_MAX_CONCURRENCY,
    RUNNER_CONNECTION,
    FrontService,
    ModelRef,
    ModelUnavailable,
    RequestError,
    RunnerService,
    answers_errors,
    guard,
    setting,
)

MAX_LATENCY_MS = setting("transients", "MAX_LATENCY_MS", 5000)


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


def _encode(curve: Curve) -> dict[str, Any]:
    return {"object_id": curve.object_id, "mjd": curve.mjd.tolist(), "passband": curve.passband.tolist(),
            "flux": curve.flux.tolist(), "flux_err": curve.flux_err.tolist(), "detected": curve.detected.tolist(),
            "redshift": curve.redshift}


def _decode(item: dict[str, Any]) -> Curve:
    import numpy as np

    return Curve(item["object_id"], np.asarray(item["mjd"], dtype=np.float64), np.asarray(item["passband"], np.int64),
                 np.asarray(item["flux"], dtype=np.float64), np.asarray(item["flux_err"], dtype=np.float64),
                 np.asarray(item["detected"], dtype=bool), item.get("redshift"))


@bentoml.service(name="transients_runner", workers=1, resources={"cpu": "2"},
                 traffic={"timeout": 60, "max_concurrency": BENTO_MAX_CONCURRENCY},
                 runner_connection=RUNNER_CONNECTION)
class TransientsRunner(RunnerService):
    """Holds ``models:/transients@production`` and classifies adaptive batches of objects."""

    domain = "transients"

    @bentoml.api(batchable=True, max_batch_size=512, max_latency_ms=MAX_LATENCY_MS)
    def predict(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        try:
            loaded = self.holder.get()
        except ModelUnavailable as exc:
            raise ServiceUnavailable(str(exc)) from None
        curves = [_decode(item) for item in items]
        found = inference.answers(loaded, curves, inference.classify(loaded, curves))
        return [{**row, "version": str(loaded.version)} for row in found]


@bentoml.service(name="transients", workers=1, traffic={"timeout": 60, "max_concurrency": BENTO_MAX_CONCURRENCY})
class Transients(FrontService):
    """Calibrated classes of astronomical transients from their light curves: send objects (times, bands, fluxes
    and errors) to `/classify`, or upload a table in the PLAsTiCC columns to `/classify_table`, and get each
    object's class probabilities, its top class and an out-of-distribution score.
    (This front service checks and formats; a runner holds the model and batches objects across requests.)"""

    runner = bentoml.depends(TransientsRunner)

    async def _classify(self, curves_of: Any) -> ClassifyResponse:
        started = time.perf_counter()
        for attempt in (0, 1):  # a model swapped meanwhile for one with other bands: refresh, check again
            meta = await self.model_meta(refresh=attempt == 1)
            curves: list[Curve] = curves_of(meta)
            try:
                rows = await self.runner.to_async.predict([_encode(c) for c in curves])
            except ServiceUnavailable as exc:
                raise ModelUnavailable(str(exc)) from None
            except Exception as exc:
                if attempt == 1:
                    raise ModelUnavailable(f"the model runner could not answer: {exc}") from exc
                continue
            if all(row["version"] == str(meta["version"]) for row in rows):
                break
        meta = await self.model_meta(refresh=any(row["version"] != str(meta["version"]) for row in rows))
        objects = [ObjectClasses(**{k: v for k, v in row.items() if k != "version"}) for row in rows]
        return ClassifyResponse(objects=objects, classes=list(meta["classes"]),
                                latency_ms=(time.perf_counter() - started) * 1000,
                                model=ModelRef(name=meta["name"], version=rows[0]["version"], run_id=meta["run_id"],
                                               architecture=meta.get("architecture")))

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
