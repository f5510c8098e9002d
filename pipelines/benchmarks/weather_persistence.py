"""How hard is a data set for a forecast model? Persistence by period, and the best linear use of the past.

Prints, for every two days of an hourly record, the latitude-weighted RMSE of 6 h and 24 h persistence (a
low 24 h value with a high 6 h value is a large, repeating diurnal cycle), then fits, on the training part
of a 60/20/20 time split, least-squares regressions of the state ``lead`` hours ahead on the states now and
6, 12, 18 and 24 h earlier (one set of coefficients for all points), and scores them on the test part
against persistence; the same regressions fitted on the test part itself bound what such a model could do
there. Also prints, per lead, diurnal persistence (the state at the same hour a day earlier), and diurnal
persistence relaxed toward the training climatology by a factor fitted on the validation part: the weather
model's calibration with no network, the baseline its learned change has to add to. A learned model that
cannot beat these on the test part is facing a regime change, not only a lack of capacity.

Run: ``python -m pipelines.benchmarks.weather_persistence [--data PATH] [--variable t2m] [--lead 24]``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from services.weather.evaluation import diurnal_persistence, relaxed_diurnal_persistence
from services.weather.grid import Grid, spatial
from services.weather.metrics import weighted_rmse
from services.weather.readers import open_dataset

DEFAULT_DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "weather" / "era5-2mt-2019-03-uk.grib"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipelines.benchmarks.weather_persistence",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="an hourly (time, lat, lon) record")
    parser.add_argument("--variable", default=None, help="variable (default: the first one)")
    parser.add_argument("--lead", type=int, default=24, help="lead time of the regressions, in hours")
    args = parser.parse_args(argv)

    ds = open_dataset(args.data)
    name = args.variable or next(iter(ds.data_vars))
    _, _, lat, lon, _ = spatial(ds)
    weights = Grid(lat, lon).weights().astype(np.float64)
    times = ds["time"].values
    hours = (times - times[0]) / np.timedelta64(1, "h")
    if not np.allclose(np.diff(hours), 1.0):
        raise SystemExit(f"{args.data}: expected hourly data")
    x = ds[name].values.astype(np.float64)  # (T, H, W)
    total = len(x)

    print(f"{name}: {total} hourly states on a {x.shape[1]} x {x.shape[2]} grid")
    print(f"{'period':<24} {'6 h persistence':>16} {'24 h persistence':>17} {'mean':>8}")
    for start in range(0, total - 24, 48):
        inits = np.arange(start, min(start + 48, total - 24), 6)
        p6 = weighted_rmse(x[inits], x[inits + 6], weights)
        p24 = weighted_rmse(x[inits], x[inits + 24], weights)
        label = f"{str(times[start])[:13]} +48 h"
        print(f"{label:<24} {p6:16.2f} {p24:17.2f} {float(x[start:start + 48].mean()):8.2f}")

    train_end, test_start = int(total * 0.6), int(total * 0.8)
    lead = args.lead
    train_inits = np.arange(24, train_end - lead)
    test_inits = np.arange(test_start + 24, total - lead, 6)
    print(f"\non the test part ({len(test_inits)} initial times every 6 h), by lead:")
    for hours in (6, 12, 18, 24):
        inits = np.arange(test_start + 24, total - hours, 6)
        diurnal = diurnal_persistence(x, inits, [hours], data_step_hours=1.0)
        assert diurnal is not None  # hourly data, 24 h of record before every start
        print(f"  +{hours:>2} h: persistence {weighted_rmse(x[inits], x[inits + hours], weights):.3f}, "
              f"diurnal persistence (the same hour a day earlier) "
              f"{weighted_rmse(diurnal[:, 0], x[inits + hours], weights):.3f}")
    relaxed_toward_climatology(x, times, weights, train_end, test_start)
    persistence = weighted_rmse(x[test_inits], x[test_inits + lead], weights)
    print(f"\n+{lead} h on the test part: persistence {persistence:.3f}")
    dense_test = np.arange(test_start + 24, total - lead)
    for lags in ([0], [0, 6, 12, 18], [0, 6, 12, 18, 24]):
        def features(inits: np.ndarray, lags: list[int] = lags) -> np.ndarray:
            columns = [x[inits - lag].ravel() for lag in lags] + [np.ones(len(inits) * x[0].size)]
            return np.stack(columns, axis=1)

        for fitted_on, inits in (("training part", train_inits), ("test part itself", dense_test)):
            coef, *_ = np.linalg.lstsq(features(inits), x[inits + lead].ravel(), rcond=None)
            predicted = (features(test_inits) @ coef).reshape(len(test_inits), *x.shape[1:])
            shown = ", ".join(f"{c:+.3f}" for c in coef[:-1])
            print(f"linear on lags {lags} h fitted on the {fitted_on} (coefficients {shown}): "
                  f"{weighted_rmse(predicted, x[test_inits + lead], weights):.3f}")


def relaxed_toward_climatology(x: np.ndarray, times: np.ndarray, weights: np.ndarray, train_end: int,
                               test_start: int) -> None:
    """Diurnal persistence relaxed toward the training climatology, the factor per lead fitted on every hourly
    initial time of the validation part (``evaluation.relaxed_diurnal_persistence``)."""
    leads = [6, 12, 18, 24]
    fit_inits = np.arange(train_end + 24, test_start - max(leads))
    inits = np.arange(test_start + 24, len(x) - max(leads), 6)
    states = x[:, None]  # (T, 1, H, W)
    relaxed = relaxed_diurnal_persistence(states, times, (0, train_end), fit_inits, inits, leads, 1.0, weights)
    diurnal = diurnal_persistence(states, inits, leads, 1.0)
    assert relaxed is not None and diurnal is not None  # hourly data, a day of record before every start
    truth = np.stack([states[inits + h] for h in leads], axis=1)
    print(f"\ndiurnal persistence relaxed toward the training climatology (fitted on the validation part), "
          f"{len(inits)} test initial times every 6 h:")
    scores, plain = weighted_rmse(relaxed, truth, weights)[:, 0], weighted_rmse(diurnal, truth, weights)[:, 0]
    for k, h in enumerate(leads):
        print(f"  +{h:>2} h: {scores[k]:.3f} (diurnal persistence {plain[k]:.3f})")


if __name__ == "__main__":
    main()
