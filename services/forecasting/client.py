"""Client side of the forecasting service: CSV in, CSV out (``tessera predict forecasting``, the demo)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
from rich.table import Table

from shared.client import post_json
from shared.registry import Prediction

from .data import find_time_column, read_table, request_body, synthetic_frame

EXAMPLE_ROWS = 96  # the lookback of the published settings (and more than the tiny settings need)


def example_request() -> dict[str, Any]:
    """The last 96 hours of the built-in synthetic series (what the demo's models are trained on)."""
    return {**request_body(synthetic_frame().tail(EXAMPLE_ROWS)), "horizon": 24}


def example_csv(folder: Path, data: str | None = None) -> Path:
    """The last 96 rows of ``data`` (or of the synthetic series) as a CSV history."""
    frame = read_table(data) if data else synthetic_frame()
    path = folder / "forecasting-history.csv"
    frame.tail(EXAMPLE_ROWS).to_csv(path, index=False)
    return path


def predict_csv(url: str, path: Path, *, horizon: int | None = None, output: Path | None = None,
                timeout: float = 120.0) -> Prediction:
    """Send a CSV history (a time column and the model's variables) and get the forecast as a table."""
    frame = read_table(path)
    time_column = find_time_column(frame)
    body = request_body(frame)
    if horizon:
        body["horizon"] = horizon
    answer = post_json(url, body, timeout=timeout)
    out = pd.DataFrame(answer["values"], columns=answer["columns"])
    if answer.get("timestamps"):
        out.insert(0, time_column or "date", answer["timestamps"])
    text = out.to_csv(index=False)
    if output is not None:
        out.to_csv(output, index=False)
    model = answer["model"]
    shown = answer["columns"][:4]
    table = Table(title=f"POST {url} -> {model.get('architecture')} v{model['version']}: first 6 of "
                        f"{len(out)} steps")
    table.add_column("timestamp")
    for column in shown:
        table.add_column(column, justify="right")
    for i in range(min(6, len(out))):
        stamp = answer["timestamps"][i] if answer.get("timestamps") else f"t+{i + 1}"
        table.add_row(stamp, *(f"{v:.3f}" for v in answer["values"][i][: len(shown)]))
    return Prediction(version=str(model["version"]), summary=table, output=output,
                      text=None if output else text)
