"""Compute per action chunk: EBT-Policy's energy descent vs a 100-step diffusion policy of the same size.

Both policies use the robot_policy default transformer (the same trunk; the diffusion one adds a time token).
EBT plans with 1 forward for E(a_0) then per descent step one backward (dE/da) and one forward; the diffusion
baseline runs one forward per denoising step. Latency is the median over ``--repeats`` single-observation
calls on ``--threads`` CPU threads. With ``--registry`` the served EBT model (``robot_policy@production``) is
timed as trained, so early stopping shows in its step counts; otherwise fresh weights with early stopping off
(every step taken: EBT's worst case). With ``--url`` the ``/act`` endpoint is timed over HTTP as well.

Run: ``python -m pipelines.benchmarks.robot_policy [--registry] [--url http://127.0.0.1:3005]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from services.robot_policy.config import RobotPolicyConfig
from services.robot_policy.data import RobotPolicyState
from services.robot_policy.model import DiffusionPolicy, EBTPolicy, PolicyBase
from shared.saved import tensor

# the whole workspace as the normalization range (fresh weights)
WORKSPACE_STATE = RobotPolicyState(data="benchmark", fingerprint="benchmark", episodes={},
                                   obs_min=tensor([0.0] * 4 + [-1.0, -1.0]), obs_max=tensor([512.0] * 4 + [1.0, 1.0]),
                                   action_min=tensor([0.0, 0.0]), action_max=tensor([512.0, 512.0]))
HISTORY = torch.tensor([[[200.0, 300.0, 250.0, 260.0, 0.5], [205.0, 298.0, 250.0, 260.0, 0.5]]])


def _time(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    fn()  # warm-up
    times, out = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        out = fn()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times), out


def _params(model: PolicyBase) -> int:
    trunk = getattr(model, "trunk")  # noqa: B009 (both policies have one)
    assert isinstance(trunk, torch.nn.Module)
    return sum(p.numel() for p in trunk.parameters())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--registry", action="store_true", help="time the registered production EBT model")
    parser.add_argument("--url", help="also time POST {url}/act")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    ebt: PolicyBase
    if args.registry:
        from shared.tracking import load_registered

        loaded = load_registered("robot_policy")
        if loaded is None or loaded.cfg.model != "ebt":
            raise SystemExit("no EBT model holds robot_policy@production")
        assert isinstance(loaded.model, PolicyBase)
        ebt, cfg, saved, tol = loaded.model.eval(), loaded.cfg, loaded.state, None
        print(f"EBT: registered robot_policy v{loaded.version}")
    else:
        cfg, saved, tol = RobotPolicyConfig(), WORKSPACE_STATE, 0.0
        ebt = EBTPolicy(cfg, saved).eval()
        print("EBT: fresh weights, early stopping off (every descent step taken)")
    diffusion = DiffusionPolicy(cfg.replace(model="diffusion", diffusion_steps=100), saved).eval()
    print(f"transformer: d_model {cfg.d_model}, {cfg.n_layers} layers, {cfg.n_heads} heads, d_ff {cfg.d_ff}; "
          f"trunk parameters EBT {_params(ebt):,}, diffusion {_params(diffusion):,}; "
          f"{args.threads} thread(s), median of {args.repeats}")

    base_ms, base_plan = _time(lambda: diffusion.plan(HISTORY), args.repeats)
    print(f"\n{'policy':<34}{'passes/chunk':>14}{'ms/chunk':>11}{'vs diffusion':>14}")
    print(f"{'diffusion, 100 denoising steps':<34}{base_plan.passes:>14}{base_ms:>11.1f}{1.0:>13.1f}x")
    rows = []
    for candidates in (1, cfg.candidates):
        for steps in (1, 2, 3, 4):
            ms, plan = _time(lambda s=steps, c=candidates: ebt.plan(HISTORY, steps=s, candidates=c,  # type: ignore[misc]
                                                                  early_stop_tol=tol), args.repeats)
            label = f"EBT, {steps} step(s), {candidates} cand."
            fwd_bwd = f"{plan.passes} ({plan.steps} fwd+bwd)"
            print(f"{label:<34}{fwd_bwd:>14}{ms:>11.1f}{base_ms / ms:>13.1f}x")
            rows.append((steps, candidates, ms))

    if args.url:
        import httpx

        url = args.url.rstrip("/") + "/act"
        body = {"observations": HISTORY[0].tolist()}
        with httpx.Client(timeout=30) as client:
            response = client.post(url, json=body)
            if response.status_code != 200:
                raise SystemExit(f"{url}: {response.status_code} {response.text}")
            ms, answer = _time(lambda: client.post(url, json=body).json(), args.repeats)
        print(f"\nPOST /act over HTTP ({answer['model']['architecture']} v{answer['model']['version']}, "
              f"{answer['descent_steps']} step(s)): {ms:.1f} ms per call (model time {answer['latency_ms']:.1f} ms)")


if __name__ == "__main__":
    main()
