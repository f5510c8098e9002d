"""10-day forecast on a 1-degree global grid: 40 six-hourly WXFormer steps, with the default model.

The model is the weather domain's default config (fresh weights: speed does not depend on them) on a
181 x 360 grid (poles included, so earth padding with pole crossing) with the synthetic default's channels
(t_850, t_500, t2m) and statics (land-sea mask, orography). Forcings are computed for every step, as in
serving. The same rollout is timed with attention on fused SDPA and on the plain reference
softmax(QK^T)V, in the same run, and peak memory is reported.

Run: ``python -m pipelines.benchmarks.weather_rollout [--steps 40] [--threads N] [--grid 181,360]``.
"""

from __future__ import annotations

import argparse
import os
import resource
import time

import numpy as np
import torch

from services.weather.config import FORCINGS, WeatherConfig
from services.weather.data import WeatherState
from services.weather.grid import Grid
from services.weather.inference import forecast
from services.weather.model import WXFormer

CHANNELS = ["t_850", "t_500", "t2m"]


def global_state(n_lat: int, n_lon: int) -> WeatherState:
    """The saved state of a model on a global grid with poles (random static fields, no calibration)."""
    lat = np.linspace(90.0, -90.0, n_lat)
    lon = np.arange(n_lon) * 360.0 / n_lon
    lon2, lat2 = np.meshgrid(lon, lat)
    rng = np.random.default_rng(0)
    latitude, longitude = Grid(lat2, lon2).axes()
    statics = {"lsm": (rng.random((n_lat, n_lon)) > 0.7).astype(np.float32),
               "orography": (rng.random((n_lat, n_lon)) * 1000).astype(np.float32)}
    return WeatherState(data="benchmark", fingerprint="benchmark", channels=tuple(CHANNELS), units=("K",) * 3,
                        sources=(("t", 850.0), ("t", 500.0), ("t2m", None)), step_hours=6, data_step_hours=6.0,
                        forcings=FORCINGS, periods={}, regular_grid=True, static_names=tuple(statics),
                        latitude=latitude, longitude=longitude,
                        mean=torch.tensor([270.0, 245.0, 276.0], dtype=torch.float64),
                        std=torch.tensor([10.0, 8.0, 11.0], dtype=torch.float64),
                        statics={k: torch.from_numpy(v) for k, v in statics.items()})


def run_rollout(model: WXFormer, state: WeatherState, steps: int) -> tuple[float, np.ndarray]:
    h, w = state.grid.shape
    rng = np.random.default_rng(1)
    initial = (state.mean.numpy()[:, None, None] + rng.normal(size=(3, h, w)) * 5).astype(np.float32)
    started = time.perf_counter()
    out = forecast(model, state, initial[None, None], np.array(["2020-01-01T00"], dtype="datetime64[ns]"), steps)
    return time.perf_counter() - started, out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--grid", default="181,360", help="lat,lon points of the global grid")
    parser.add_argument("--skip-reference", action="store_true", help="time fused SDPA only")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    n_lat, n_lon = (int(v) for v in args.grid.split(","))
    state = global_state(n_lat, n_lon)
    cfg = WeatherConfig()
    torch.manual_seed(0)
    model = WXFormer(cfg, state).eval()
    params = sum(p.numel() for p in model.parameters())
    print(f"WXFormer default config: {params:,} parameters, dims {cfg.dims}, depths {cfg.depths}; grid {n_lat} x "
          f"{n_lon} ({180 / (n_lat - 1):.2f} deg), padded by {model.pads} (earth: {model.earth}); "
          f"{args.steps} steps of 6 h; {args.threads} thread(s)", flush=True)
    run_rollout(model, state, 1)  # warm-up
    results = {}
    backends = ["sdpa"] if args.skip_reference else ["sdpa", "reference"]
    for backend in backends:
        os.environ["TESSERA_ATTENTION_BACKEND"] = backend
        seconds, out = run_rollout(model, state, args.steps)
        results[backend] = seconds
        print(f"{backend:>9}: {seconds:7.1f} s for {args.steps} steps ({seconds / args.steps * 1000:.0f} ms/step); "
              f"finite: {bool(np.isfinite(out).all())}", flush=True)
    os.environ.pop("TESSERA_ATTENTION_BACKEND", None)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {peak:.0f} MiB")
    if "reference" in results:
        print(f"fused SDPA vs reference attention: {results['reference'] / results['sdpa']:.2f}x")


if __name__ == "__main__":
    main()
