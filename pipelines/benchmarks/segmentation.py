"""Benchmark: the memory of reversible blocks against the plain network, and whole-volume inference speed.

    python -m pipelines.benchmarks.segmentation [--patch 64] [--budget-mib 1536] [--brats CASE_FOLDER]
        [--skip-inference]

In one run, with the default segmentation settings (2 input channels and 5 classes, as BraTS 2015):

1. activation memory of one training step at the same ``--patch``^3 input: the bytes autograd keeps from the
   forward pass for the backward (saved-tensor hooks), for ``memory=reversible``, ``checkpoint`` and ``plain``,
   and the peak resident memory of the step (forward, backward, AdamW) above the process before it, each in a
   fresh process;
2. the largest cubic patch (a multiple of 8) each mode trains within the same ``--budget-mib`` of step memory
   (peak resident memory above the process before the step; a bisection, each try in a fresh process);
3. sliding-window inference (96^3 windows, overlap 0.5, Gaussian blending, MONAI's ``sliding_window_inference``)
   on a whole 240 x 240 x 155 BraTS volume (``--brats``: a case folder; the first BraTS 2015 case of
   ``../shared/data`` when present, else random values of that shape): CPU wall time and peak memory of the
   default RevUNet (0.8 M parameters) and a wider one (4.1 M) beside MONAI's SwinUNETR at its smallest size
   (``feature_size=12``, 4.1 M), in fresh processes.

On a GPU (``--device cuda``) the same figures use ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "medical_segmentation"
MODES = ("plain", "checkpoint", "reversible")


def _rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _config(memory: str) -> Any:
    from services.segmentation.config import SegmentationConfig

    return SegmentationConfig(memory=memory)  # type: ignore[arg-type]


def child_step(memory: str, patch: int, device: str) -> dict[str, float]:
    """One training step (in this fresh process): saved bytes and the peak memory above the start."""
    import torch

    from services.segmentation.model import RevUNet
    from shared.reversible import SavedBytes

    torch.manual_seed(0)
    net = RevUNet(_config(memory), in_channels=2, n_classes=5).to(device).train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    x = torch.randn(1, 2, patch, patch, patch, device=device)
    target = torch.randint(0, 5, (1, patch, patch, patch), device=device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    else:
        before = _rss_mib()
        baseline_peak = _peak_mib()
    started = time.perf_counter()
    with SavedBytes() as saved:
        logits = net(x)
        loss = torch.nn.functional.cross_entropy(logits, target)
    loss.backward()
    optimizer.step()
    seconds = time.perf_counter() - started
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20 - before
    else:
        peak = max(_peak_mib(), baseline_peak) - before
    return {"saved_mib": saved.total / 2**20, "step_mib": peak, "seconds": seconds,
            "params": float(sum(p.numel() for p in net.parameters()))}


def child_infer(which: str, brats: str | None, device: str) -> dict[str, float]:
    """Sliding-window inference of a whole 240 x 240 x 155 two-channel volume (in this fresh process)."""
    import torch
    from monai.inferers import sliding_window_inference

    torch.manual_seed(0)
    if which.startswith("revunet"):
        from services.segmentation.model import RevUNet

        cfg = _config("reversible")
        if which == "revunet-wide":  # SwinUNETR's smallest size (feature_size 12): about 4 M parameters
            cfg = cfg.replace(channels=32, d_model=256, d_ff=512, n_layers=6)
        net: torch.nn.Module = RevUNet(cfg, in_channels=2, n_classes=5)
    else:
        from monai.networks.nets import SwinUNETR

        net = SwinUNETR(in_channels=2, out_channels=5, feature_size=12, use_checkpoint=False)
    net = net.to(device).eval()
    if brats:
        import numpy as np

        from services.segmentation.data import load_nifti

        files = sorted(p for p in Path(brats).iterdir() if p.name.lower().startswith(("flair", "t1c")))
        volume = torch.from_numpy(np.stack([np.asarray(load_nifti(f).dataobj, dtype=np.float32) for f in files]))
    else:
        volume = torch.randn(2, 240, 240, 155)
    x = volume[None].to(device)
    before = _rss_mib() if device == "cpu" else torch.cuda.memory_allocated() / 2**20
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    with torch.inference_mode():
        out: Any = sliding_window_inference(x, (96, 96, 96), 2, net, overlap=0.5, mode="gaussian")
    seconds = time.perf_counter() - started
    peak = (_peak_mib() if device == "cpu" else torch.cuda.max_memory_allocated() / 2**20) - before
    return {"seconds": seconds, "peak_mib": peak, "params": float(sum(p.numel() for p in net.parameters())),
            "voxels": float(out[0, 0].numel())}


def _run_child(*args: str) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count() or 1))}
    done = subprocess.run([sys.executable, "-m", "pipelines.benchmarks.segmentation", "--child", *args],
                          capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        return {"error": (done.stderr or done.stdout).strip().splitlines()[-1:]}
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def largest_patch(memory: str, budget: float, device: str, low: int = 16, high: int = 192) -> tuple[int, float]:
    """The largest multiple of 8 whose step stays within ``budget`` MiB (bisection), and that step's MiB."""
    best, best_mib = 0, float("nan")
    lo, hi = low // 8, high // 8
    while lo <= hi:
        mid = (lo + hi) // 2
        found = _run_child("step", memory, str(8 * mid), device)
        if "error" not in found and found["step_mib"] <= budget:
            best, best_mib = 8 * mid, float(found["step_mib"])
            lo = mid + 1
        else:
            hi = mid - 1
        print(f"  {memory}: patch {8 * mid}^3 -> "
              f"{found.get('step_mib', float('nan')):.0f} MiB{' (over budget)' if best != 8 * mid else ''}",
              flush=True)
    return best, best_mib


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patch", type=int, default=64, help="cubic patch of the memory comparison")
    parser.add_argument("--budget-mib", type=float, default=1536.0, help="step memory budget of the patch search")
    parser.add_argument("--brats", default=None, help="a BraTS 2015 case folder (Flair*, T1c*)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--skip-inference", action="store_true")
    parser.add_argument("--skip-search", action="store_true")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "step":
            print(json.dumps(child_step(rest[0], int(rest[1]), rest[2])))
        else:
            print(json.dumps(child_infer(rest[0], rest[1] if rest[1] != "-" else None, rest[2])))
        return

    print(f"1. one training step at {args.patch}^3, 2 channels, 5 classes, default settings ({args.device}):")
    steps = {mode: _run_child("step", mode, str(args.patch), args.device) for mode in MODES}
    for mode, found in steps.items():
        print(f"  {mode:>10}: activations kept {found['saved_mib']:8.1f} MiB, step peak {found['step_mib']:8.1f} MiB, "
              f"{found['seconds']:.2f} s")
    plain = steps["plain"]
    for mode in ("checkpoint", "reversible"):
        print(f"  {mode} / plain: activations {steps[mode]['saved_mib'] / plain['saved_mib']:.3f}, "
              f"step peak {steps[mode]['step_mib'] / plain['step_mib']:.3f}, "
              f"time {steps[mode]['seconds'] / plain['seconds']:.2f}x")

    if not args.skip_search:
        print(f"2. the largest cubic patch within {args.budget_mib:.0f} MiB of step memory:")
        largest = {mode: largest_patch(mode, args.budget_mib, args.device) for mode in ("plain", "reversible")}
        for mode, (side, mib) in largest.items():
            print(f"  {mode:>10}: {side}^3 = {side**3:,} voxels ({mib:.0f} MiB)")
        if largest["plain"][0]:
            print(f"  reversible / plain voxels: {(largest['reversible'][0] / largest['plain'][0]) ** 3:.2f}x")

    if not args.skip_inference:
        brats = args.brats
        if brats is None:
            default = DATA / "brats2015_deepmedic" / "validation" / "brats_2013_pat0003_1"
            brats = str(default) if default.is_dir() else "-"
        print(f"3. sliding-window inference of a 240 x 240 x 155 volume ({'random' if brats == '-' else brats}), "
              f"96^3 windows, overlap 0.5:")
        for which in ("revunet", "revunet-wide", "swinunetr"):
            found = _run_child("infer", which, brats, args.device)
            if "error" in found:
                print(f"  {which}: failed: {found['error']}")
                continue
            print(f"  {which:>10}: {found['params'] / 1e6:.2f} M parameters, {found['seconds']:.1f} s, peak "
                  f"{found['peak_mib']:.0f} MiB above the loaded model")


if __name__ == "__main__":
    main()
