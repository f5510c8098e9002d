"""Client side of the transients service: light curves in (JSON or a PLAsTiCC-layout CSV), classes out."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.table import Table

from shared.client import post_json
from shared.registry import Prediction


def _object(curve: Any) -> dict[str, Any]:
    return {"object_id": curve.object_id, "mjd": [round(float(t), 5) for t in curve.mjd],
            "passband": [int(b) for b in curve.passband], "flux": [round(float(f), 3) for f in curve.flux],
            "flux_err": [round(float(e), 3) for e in curve.flux_err]}


def example_request() -> dict[str, Any]:
    """A ``POST /classify`` body: two synthetic two-band (g = 0, r = 1) light curves."""
    from .data import synthetic_curves

    curves, _, _ = synthetic_curves(2, seed=3)
    return {"objects": [_object(c) for c in curves]}


def example_input(folder: Path, data: str | None = None) -> Path:
    """A request file for ``tessera predict transients``: the first three objects of ``data`` (a PLAsTiCC-layout
    table) as JSON, or the synthetic example."""
    path = folder / "transients-request.json"
    body = example_request()
    if data:
        from .data import read_light_curves, to_curves

        frame = read_light_curves(data)
        first = frame["object_id"].drop_duplicates().head(3)
        body = {"objects": [_object(c) for c in to_curves(frame[frame["object_id"].isin(first)])]}
    path.write_text(json.dumps(body))
    return path


def request_from_table(path: Path) -> dict[str, Any]:
    """A ``/classify`` body from a CSV/Parquet file in the PLAsTiCC columns."""
    from .data import read_light_curves, to_curves

    return {"objects": [_object(c) for c in to_curves(read_light_curves(str(path)))]}


def predict_file(url: str, path: Path, *, output: Path | None = None, timeout: float = 120.0) -> Prediction:
    """Send a JSON body or a light-curve table; the classes as a table (and the answer as JSON)."""
    body = json.loads(path.read_text()) if path.suffix == ".json" else request_from_table(path)
    answer = post_json(url, body, timeout=timeout)
    text = json.dumps(answer, indent=1)
    if output is not None:
        output.write_text(text)
    model = answer["model"]
    table = Table(title=f"POST {url} -> {model.get('architecture')} v{model['version']}")
    for column in ("object", "points", "top class", "p", "OOD score", "out of distribution"):
        table.add_column(column, justify="left" if column in ("object", "top class") else "right")
    for row in answer["objects"]:
        table.add_row(row["object_id"], str(row["n_points"]), row["top_class"], f"{row['top_probability']:.3f}",
                      f"{row['ood_score']:.2f}", "yes" if row["out_of_distribution"] else "no")
    return Prediction(version=str(model["version"]), summary=table, output=output, text=None if output else text)
