"""One light curve: the unit every part of the transients domain reads, tokenizes, augments and classifies."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Curve:
    """Observations of one object, sorted by time: mjd (days), passband index, flux and its error (> 0)."""

    object_id: str
    mjd: np.ndarray  # float64 (n,), ascending
    passband: np.ndarray  # int64 (n,), 0 .. n_bands - 1
    flux: np.ndarray  # float64 (n,)
    flux_err: np.ndarray  # float64 (n,), > 0
    detected: np.ndarray  # bool (n,)
    redshift: float | None = None

    def __len__(self) -> int:
        return int(self.mjd.shape[0])

    def select(self, keep: np.ndarray) -> Curve:
        """The observations where ``keep`` (bool mask or indices) holds."""
        return Curve(self.object_id, self.mjd[keep], self.passband[keep], self.flux[keep], self.flux_err[keep],
                     self.detected[keep], self.redshift)

    def first_detections(self, k: int) -> Curve:
        """The light curve as it was known at its k-th detection (early classification): every observation up
        to and including that one."""
        det = np.flatnonzero(self.detected)
        if len(det) <= k:
            return self
        return self.select(np.arange(det[k - 1] + 1))
