"""Plots of the weather domain: truth / forecast / error maps and scores against lead time."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from .data import WeatherState
    from .grid import Grid


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def maps_figure(truth: np.ndarray, forecast: np.ndarray, grid: Grid, channels: list[str], units: list[str],
                title: str, max_channels: int = 4) -> Figure:
    """One row per channel (C, H, W): truth, forecast (same colour scale) and their difference."""
    plt = _plt()
    rows = min(len(channels), max_channels)
    fig, axes = plt.subplots(rows, 3, figsize=(11, 3.0 * rows), squeeze=False)
    extent = (float(grid.lon.min()), float(grid.lon.max()), float(grid.lat.min()), float(grid.lat.max()))
    origin = "upper" if grid.lat[0, 0] > grid.lat[-1, 0] else "lower"
    for i in range(rows):
        low, high = float(min(truth[i].min(), forecast[i].min())), float(max(truth[i].max(), forecast[i].max()))
        error = forecast[i] - truth[i]
        bound = float(np.abs(error).max()) or 1.0
        scale = {"vmin": low, "vmax": high, "cmap": "viridis"}
        panels = ((axes[i, 0], truth[i], "truth", scale), (axes[i, 1], forecast[i], "forecast", scale),
                  (axes[i, 2], error, "forecast - truth", {"vmin": -bound, "vmax": bound, "cmap": "RdBu_r"}))
        for ax, field, name, kw in panels:
            image = ax.imshow(field, extent=extent, origin=origin, aspect="auto", **kw)
            ax.set_title(f"{channels[i]} {name}", fontsize=9)
            fig.colorbar(image, ax=ax, shrink=0.8, label=units[i] or None)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def scores_figure(lead_hours: list[int], scores: dict[str, np.ndarray], channels: list[str],
                  units: list[str] | None, label: str, bands: dict[str, np.ndarray] | None = None) -> Figure:
    """One panel per channel: the score of each forecast (model, baselines) against lead time, with the 95 %
    interval (2, L, C) shaded for the forecasts in ``bands``."""
    plt = _plt()
    n = len(channels)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.4), squeeze=False)
    for i, channel in enumerate(channels):
        ax = axes[0, i]
        for name, table in scores.items():
            (line,) = ax.plot(lead_hours, table[:, i], marker="o", label=name)
            if bands and name in bands:
                ax.fill_between(lead_hours, bands[name][0, :, i], bands[name][1, :, i], color=line.get_color(),
                                alpha=0.15, linewidth=0)
        ax.set_xlabel("lead time (h)")
        ax.set_ylabel(f"{label}" + (f" ({units[i]})" if units and units[i] else ""))
        ax.set_title(channel)
        ax.grid(alpha=0.3)
    axes[0, 0].legend()
    fig.tight_layout()
    return fig


@torch.inference_mode()
def sample_figure(model: Any, dataset: Any, state: WeatherState) -> Figure:
    """Truth / forecast / error maps one step ahead for the first test window (physical units)."""
    from .training import rollout

    history, forcing, target, hour = dataset[0]
    device = model.mean.device
    nxt = rollout(model, history[None].to(device), forcing[None].to(device), 1, hour[None].to(device))[0]
    pred = model.denormalize(nxt)[0].float().cpu().numpy()
    truth = model.denormalize(target[0].to(model.mean.device)).float().cpu().numpy()
    return maps_figure(truth, pred, state.grid, list(state.channels), list(state.units),
                       f"first test window, +{state.step_hours} h")
