"""Static input fields beyond the data's own: fields read from another file onto the data's grid, and a land
fraction from a global land mask when no field of the data says where the land is.

The land-sea contrast drives the daily cycle of near-surface temperature (land warms and cools, the sea hardly),
so a regional model of 2 m temperature needs to know which points are land. ERA5 ships a land-sea mask (``lsm``,
the land fraction of each cell) and orography (``z`` at the surface) as invariant fields; a file of them (or of any
time-invariant field) is given with ``static_file``. A record that has no such field, as the UK 2 m temperature
file here, gets the land fraction of each cell from the 1 km GLOBE land mask of the ``global-land-mask`` package
(``land_fraction="auto"``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .grid import LAT_NAMES, LON_NAMES, Grid, spatial

if TYPE_CHECKING:
    import xarray as xr

LAND_NAMES = ("lsm", "land_sea_mask", "landsea", "land", "land_fraction", "LSM")  # fields that already say it
SUBCELLS = 8  # land-mask samples per cell side for the land fraction


def _invariant(ds: xr.Dataset) -> xr.Dataset:
    """``ds`` without its length-1 dimensions (the single time, step or surface level of an invariant file)."""
    singles = [d for d in ds.dims if ds.sizes[d] == 1]
    return ds.isel({d: 0 for d in singles}, drop=True) if singles else ds


def statics_from_file(path: str, grid: Grid) -> dict[str, np.ndarray]:
    """Every 2-D field of the file at ``path`` (netCDF, zarr, GRIB; any URI), interpolated linearly in latitude
    and longitude onto ``grid`` (H, W): name -> float32 (H, W). Longitudes are matched modulo 360; a grid point
    outside the file's area or on a missing value is an error, not a guess."""
    import xarray as xr

    from .readers import open_dataset

    with open_dataset(path) as opened:
        ds = _invariant(opened)
        try:
            ydim, xdim, _, _, regular = spatial(ds)
        except ValueError as exc:
            raise ValueError(f"static_file {path}: {exc}") from None
        if not regular:
            raise ValueError(f"static_file {path}: its grid must have 1-D latitude and longitude axes")
        names = [str(v) for v in ds.data_vars if set(ds[v].dims) == {ydim, xdim} and v not in LAT_NAMES + LON_NAMES]
        if not names:
            raise ValueError(f"static_file {path}: no 2-D (latitude, longitude) field (variables: "
                             f"{[str(v) for v in ds.data_vars]}, dims: {dict(ds.sizes)})")
        fields = ds[names].load().sortby(ydim)
    # Longitudes of the file and of the grid both into [base, base + 360), the seam half a turn from the grid's
    # west edge, so that a regional file around the grid (0-360 or -180-180) is one contiguous block
    base = float(np.nanmin(grid.lon)) - 180.0

    def wrap(lon: np.ndarray) -> np.ndarray:
        return (np.asarray(lon, np.float64) - base) % 360.0 + base

    fields = fields.assign_coords({xdim: wrap(fields[xdim].values)}).sortby(xdim)
    lon = fields[xdim].values
    if len(lon) > 1 and (lon[-1] - lon[0]) + np.diff(lon).max() > 360.0 - 1e-6:
        # a global file: one column repeated a turn away on each side, so that points at the seam interpolate
        fields = xr.concat([fields.isel({xdim: [-1]}).assign_coords({xdim: lon[-1:] - 360.0}), fields,
                            fields.isel({xdim: [0]}).assign_coords({xdim: lon[:1] + 360.0})], xdim)
    at = {ydim: xr.DataArray(grid.lat, dims=("y", "x")), xdim: xr.DataArray(wrap(grid.lon), dims=("y", "x"))}
    found: dict[str, np.ndarray] = {}
    for name in names:
        values = fields[name].interp(at, method="linear").transpose("y", "x").values.astype(np.float32)
        if not np.isfinite(values).all():
            missing = int((~np.isfinite(values)).sum())
            raise ValueError(f"static_file {path}: field {name!r} does not cover {missing} of the data's "
                             f"{values.size} grid points (outside its area or missing values)")
        found[name] = values
    return found


def has_land_field(names: list[str] | tuple[str, ...]) -> bool:
    return any(n in LAND_NAMES for n in names)


def land_fraction(grid: Grid, subcells: int = SUBCELLS) -> np.ndarray:
    """The land fraction of each grid cell (H, W) in [0, 1]: GLOBE's 1 km land mask (``global-land-mask``)
    sampled ``subcells`` x ``subcells`` times within the cell (its extent: half the spacing to the neighbours)."""
    try:
        from global_land_mask import globe
    except ImportError as exc:  # pragma: no cover - a dependency of the weather extra
        raise RuntimeError("land_fraction='auto' needs the global-land-mask package (pip install "
                           "'tessera[weather]'), or set land_fraction=off") from exc
    lat, lon = grid.lat, grid.lon
    dlat = np.abs(np.gradient(lat, axis=0)) if lat.shape[0] > 1 else np.full_like(lat, 0.25)
    dlon = np.abs(np.gradient(lon, axis=1)) if lon.shape[1] > 1 else np.full_like(lon, 0.25)
    offsets = (np.arange(subcells) + 0.5) / subcells - 0.5  # (S,) cell-relative positions
    sample_lat = (lat[..., None, None] + offsets[:, None] * dlat[..., None, None]).clip(-89.999, 89.999)
    sample_lon = lon[..., None, None] + offsets[None, :] * dlon[..., None, None]
    sample_lat, sample_lon = np.broadcast_arrays(sample_lat, sample_lon)
    sample_lon = (sample_lon + 180.0) % 360.0 - 180.0  # the package's convention
    land = globe.is_land(sample_lat.ravel(), sample_lon.ravel()).reshape(sample_lat.shape)
    return land.mean(axis=(-2, -1)).astype(np.float32)
