"""Figures of the segmentation domain: slices of image, truth and prediction."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

_COLOURS = ListedColormap([(0, 0, 0, 0), (0.9, 0.2, 0.2, 0.6), (0.2, 0.8, 0.2, 0.6), (0.2, 0.4, 1.0, 0.6),
                           (1.0, 0.85, 0.1, 0.6), (0.8, 0.2, 0.9, 0.6)])


def slices_figure(rows: Sequence[tuple[str, np.ndarray, np.ndarray, np.ndarray]]) -> Figure:
    """One row per case (id, image (X, Y, Z), truth and prediction as class indices): the axial slice with the
    most labelled voxels, the image alone, with the truth and with the prediction overlaid."""
    fig = Figure(figsize=(9, 3 * len(rows)))
    axes = fig.subplots(len(rows), 3, squeeze=False)
    for (case_id, image, truth, pred), row in zip(rows, axes, strict=True):
        z = int(np.argmax((truth > 0).sum(axis=(0, 1)))) if truth.any() else truth.shape[2] // 2
        base = np.rot90(image[:, :, z])
        for ax, overlay, title in zip(row, (None, truth, pred), ("image", "truth", "prediction"), strict=True):
            ax.imshow(base, cmap="gray")
            if overlay is not None:
                ax.imshow(np.rot90(overlay[:, :, z]), cmap=_COLOURS, vmin=0, vmax=_COLOURS.N - 1,
                          interpolation="nearest")
            ax.set_title(f"{case_id}: {title} (z={z})", fontsize=8)
            ax.axis("off")
    fig.tight_layout()
    return fig
