"""BentoML service of the segmentation domain on port 3004.

- ``POST /segment``: multipart upload of one NIfTI per input channel in the model's channel order (or one 4-D
  NIfTI); returns the mask as NIfTI on the input's grid, with its affine and header (``format=nifti``, the
  default), or the volume of each label in mL with ``format=json``.
- ``POST /segment_json``: a small volume as JSON (one nested X x Y x Z list per channel, on an RAS grid of the
  given spacing); returns the label volumes and, with ``include_mask``, the mask.
- ``GET /model``: the channels, labels, regions, spacing, patch and limits.

The network runs in the service's model process (:class:`shared.serving.BatchingService`,
``inference.run_items``), one request after the other on its own core; reading, checking and writing volumes
runs on worker threads, off the event loop.

Wrong channel counts, channels whose shapes or affines disagree, non-3-D images, NaN, files that are not NIfTI:
a 422 saying which file and why; uploads over ``TESSERA_SEGMENTATION_MAX_BODY_BYTES`` (256 MiB) a 413; no
model yet a 503.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

import bentoml
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from services.segmentation.client import example_request, write_channels
from services.segmentation.inference import MAX_VOXELS, Inputs, Mask, check_inputs
from shared.loaded import LoadedModel
from shared.serving import BENTO_MAX_CONCURRENCY, JSON, BatchingService, ModelRef, RequestError, answers_errors, guard

MAX_JSON_VOXELS = 96**3  # per channel in the JSON form; larger volumes go through NIfTI uploads


class SegmentJSON(BaseModel):
    """A volume on an RAS grid: one nested list (X x Y x Z) per channel, named as ``/model`` lists them."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=True, json_schema_extra={"example": example_request()})
    channels: dict[str, list[list[list[float]]]] = Field(min_length=1, description="channel name -> X x Y x Z values")
    spacing: list[float] = Field(default=[1.0, 1.0, 1.0], min_length=3, max_length=3,
                                 description="voxel size (mm) along X, Y, Z")
    include_mask: bool = Field(default=False, description="return the mask (label values, X x Y x Z)")


class SegmentSummary(BaseModel):
    volumes_ml: dict[str, float]  # label name -> volume
    labels: dict[str, str]  # label value -> name
    shape: list[int]
    mask: list[list[list[int]]] = []  # with include_mask: label values, X x Y x Z (empty otherwise)
    latency_ms: float
    model: ModelRef


@bentoml.service(name="segmentation", workers=1, resources={"cpu": "2"},
                 traffic={"timeout": 600, "max_concurrency": BENTO_MAX_CONCURRENCY})
class Segmentation(BatchingService):
    """3-D segmentation of medical volumes: upload one NIfTI per channel (or one 4-D NIfTI) to `/segment` and get
    the mask back as NIfTI on the input's own grid, affine and header (or label volumes with `format=json`);
    `/segment_json` takes a small volume as JSON. `/model` lists the channels and labels the model expects."""

    domain = "segmentation"
    batch_function = "services.segmentation.inference:run_items"
    max_batch_items = 4

    @bentoml.api(route="/segment")
    @answers_errors
    async def segment(self, files: list[Path], format: Literal["nifti", "json"] = "nifti") -> Any:
        """Segment the uploaded channels (in the order `/model` lists them)."""
        loaded = self.holder.get()
        started = time.perf_counter()
        inputs = await asyncio.to_thread(check_inputs, [Path(f) for f in files], loaded.state.channels)
        found = await self._segment(loaded, inputs)
        if format == "json":
            return _summary(loaded, found, started, include_mask=False)
        from starlette.responses import Response

        return Response(await asyncio.to_thread(found.nifti_bytes), media_type="application/gzip",
                        headers={"Content-Disposition": 'attachment; filename="mask.nii.gz"',
                                 "X-Model-Version": str(loaded.version)})

    @bentoml.api(route="/segment_json")
    @answers_errors
    async def segment_json(self, request: SegmentJSON, /) -> SegmentSummary:
        """Segment a small volume sent as JSON (up to 96^3 voxels per channel)."""
        loaded = self.holder.get()
        started = time.perf_counter()
        channels = list(loaded.state.channels)
        unknown = sorted(set(request.channels) - set(channels))
        missing = [c for c in channels if c not in request.channels]
        if unknown or missing:
            raise RequestError(f"channels must be exactly the model's {channels}"
                               + (f"; missing {missing}" if missing else "")
                               + (f"; unknown {unknown}" if unknown else ""))
        if min(request.spacing) <= 0:
            raise RequestError(f"spacing {request.spacing}: every voxel size must be > 0")
        volumes = {}
        for name in channels:
            rows = request.channels[name]
            shape = (len(rows), len(rows[0]) if rows else 0, len(rows[0][0]) if rows and rows[0] else 0)
            if not all(shape) or any(len(r) != shape[1] or any(len(c) != shape[2] for c in r) for r in rows):
                raise RequestError(f"channel {name}: not a rectangular X x Y x Z volume")
            if int(np.prod(shape)) > MAX_JSON_VOXELS:
                raise RequestError(f"channel {name}: {int(np.prod(shape)):,} voxels; the JSON form takes up to "
                                   f"{MAX_JSON_VOXELS:,} (upload NIfTI to POST /segment)")
            volumes[name] = np.asarray(rows, dtype=np.float32)
        with tempfile.TemporaryDirectory() as tmp:  # the model process reads the files before it is left
            inputs = await asyncio.to_thread(_written, Path(tmp), volumes, channels, request.spacing)
            found = await self._segment(loaded, inputs)
        return _summary(loaded, found, started, include_mask=request.include_mask)

    async def _segment(self, loaded: LoadedModel, inputs: Inputs) -> Mask:
        """The mask of checked inputs, on the model they were checked on, in the model process."""
        (found,) = await self.batcher.submit(loaded, [inputs])
        return found


def _written(folder: Path, volumes: dict[str, np.ndarray], channels: list[str], spacing: list[float]) -> Inputs:
    return check_inputs(write_channels(folder, volumes, channels, spacing), channels)


def _summary(loaded: Any, found: Mask, started: float, include_mask: bool) -> SegmentSummary:
    state = loaded.state
    return SegmentSummary(
        volumes_ml=found.volumes_ml,
        labels={str(v): n for v, n in zip(state.label_values, state.label_names, strict=True)},
        shape=list(found.mask.shape), mask=found.mask.astype(int).tolist() if include_mask else [],
        latency_ms=(time.perf_counter() - started) * 1000, model=ModelRef(**loaded.describe()))


guard(Segmentation, "segmentation", answers={"/segment": (
    f"the mask: with format=nifti (the default) a gzipped NIfTI (mask.nii.gz) of label values on the input's grid, "
    f"affine and header (the version in X-Model-Version); with format=json the label volumes that /segment_json "
    f"answers. Volumes up to {MAX_VOXELS:,} voxels per channel.",
    {"application/gzip": {"type": "string", "format": "binary"}, JSON: "/segment_json"})})
