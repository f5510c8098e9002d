"""Forecast-vs-truth figure logged to MLflow after training."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from shared.registry import DataBundle  # noqa: E402

if TYPE_CHECKING:
    from .data import ForecastingState


@torch.inference_mode()
def forecast_figure(model: torch.nn.Module, data: DataBundle, cfg: Any, panels: int = 3) -> Figure:
    """History, truth and forecast of the last variable (the target, e.g. OT) on evenly spaced test windows."""
    model.eval()
    device = next(model.parameters()).device
    test = data.test
    picks = np.linspace(0, len(test) - 1, panels).astype(int)
    state = cast("ForecastingState", data.state)
    columns = state.columns
    mean, std = state.mean.numpy(), state.std.numpy()
    fig, axes = plt.subplots(panels, 1, figsize=(10, 2.6 * panels), squeeze=False)
    for ax, index in zip(axes[:, 0], picks, strict=True):
        x, y, x_mark, y_mark = (t.unsqueeze(0).to(device) for t in test[int(index)])
        marks = (x_mark, y_mark) if x_mark.shape[-1] else (None, None)
        pred = model(x, *marks)
        var = len(columns) - 1
        hist = x[0, :, var].cpu().numpy() * std[var] + mean[var]
        truth = y[0, :, var].cpu().numpy() * std[var] + mean[var]
        fcst = pred[0, :, var].float().cpu().numpy() * std[var] + mean[var]
        t_hist = np.arange(-len(hist), 0)
        t_fut = np.arange(len(truth))
        ax.plot(t_hist, hist, color="0.4", lw=1, label="history")
        ax.plot(t_fut, truth, color="tab:blue", lw=1.2, label="truth")
        ax.plot(t_fut, fcst, color="tab:orange", lw=1.2, label="forecast")
        ax.axvline(0, color="0.7", lw=0.8, ls="--")
        ax.set_title(f"{state.dataset} · {columns[var]} · test window {int(index)}", fontsize=9)
        ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return fig
