"""Benchmark: Tessera's forecasting models beside the reference implementations, side by side in one process.

    git clone https://github.com/thuml/iTransformer /tmp/ref_itransformer
    git clone https://github.com/thuml/Autoformer /tmp/ref_autoformer
    python -m pipelines.benchmarks.peers --reference-itransformer /tmp/ref_itransformer \\
        --reference-autoformer /tmp/ref_autoformer [--models itransformer autoformer] [--repeats 40]

(or set TESSERA_REFERENCE_ITRANSFORMER / TESSERA_REFERENCE_AUTOFORMER to the checkouts). The reference code is
never part of Tessera: its ``model``/``models``, ``layers`` and ``utils`` packages are copied from the given
checkout into a temporary folder and imported from there (its optional ``reformer_pytorch`` import is stubbed
when the package is absent; the models timed here do not use it). A model whose reference is not given, or does
not import, is timed without the comparison and says why.

Settings are the thuml scripts' ETTh1 96 -> 96 runs, for both sides:
- iTransformer (``scripts/multivariate_forecasting/ETT/iTransformer_ETTh1.sh``): d_model 256, d_ff 256, 8 heads,
  2 layers, dropout 0.1, GELU, instance normalisation, the 4 hourly calendar features as extra tokens;
- Autoformer (``scripts/ETT_script/Autoformer_ETTh1.sh``): d_model 512, d_ff 2048, 8 heads, 2 encoder and 1
  decoder layers, factor 3, moving average 25, dropout 0.05, label_len 48 (Tessera's own ETTh1 preset
  decomposes with 24 steps, the FEDformer benchmark run; here both use the script's 25).
One batch of 32 random ETTh1-shaped windows (7 variables, 4 calendar features) feeds every model. The
reference's weights are copied into ours first, so the two compute the same function: the eval outputs' max
|difference| is printed. A training step is forward, MSE loss, backward and a ``torch.optim.Adam(lr=1e-4)``
step (the reference's optimiser, for both): the reference's with torch's per-parameter loop, as its
``exp_long_term_forecasting.py`` builds it, ours with ``fused=True`` (one kernel over every parameter, what
Tessera's trainer uses; the same update up to float rounding); ``--same-optimizer`` gives ours the loop too.
Inference is one forward of the batch in eval mode under
``torch.inference_mode``. Ours and the reference's are timed alternately (ABAB...) so that the load of a shared
machine falls on both alike; the ratio is the median of the per-pair ratios (ours / reference: below 1 is
faster). The last line is a JSON object.
"""

from __future__ import annotations

import argparse
import atexit
import importlib
import importlib.util
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from services.forecasting.config import ForecastingConfig

ENV_VARS = {"itransformer": "TESSERA_REFERENCE_ITRANSFORMER", "autoformer": "TESSERA_REFERENCE_AUTOFORMER"}
REPOS = {"itransformer": "https://github.com/thuml/iTransformer", "autoformer": "https://github.com/thuml/Autoformer"}
# the reference module that holds ``Model``, and the top-level packages of the checkout it needs
REFERENCE_MODULE = {"itransformer": "model.iTransformer", "autoformer": "models.Autoformer"}
REFERENCE_PACKAGES = ("model", "models", "layers", "utils")
N_VARS, N_MARKS = 7, 4  # ETTh1: 7 variables; freq "h" with timeF: 4 calendar features

# The reference's argparse defaults (run.py) plus the ETTh1 96 -> 96 script's arguments.
REFERENCE_ARGS: dict[str, dict[str, Any]] = {
    "itransformer": {"seq_len": 96, "label_len": 48, "pred_len": 96, "enc_in": 7, "dec_in": 7, "c_out": 7,
                     "d_model": 256, "d_ff": 256, "n_heads": 8, "e_layers": 2, "d_layers": 1, "factor": 1,
                     "dropout": 0.1, "embed": "timeF", "freq": "h", "activation": "gelu", "output_attention": False,
                     "use_norm": True, "class_strategy": "projection", "moving_avg": 25, "distil": True},
    "autoformer": {"seq_len": 96, "label_len": 48, "pred_len": 96, "enc_in": 7, "dec_in": 7, "c_out": 7,
                   "d_model": 512, "d_ff": 2048, "n_heads": 8, "e_layers": 2, "d_layers": 1, "factor": 3,
                   "dropout": 0.05, "embed": "timeF", "freq": "h", "activation": "gelu", "output_attention": False,
                   "moving_avg": 25, "distil": True},
}


def our_config(model: str) -> ForecastingConfig:
    """Tessera's config with the same hyper-parameters as :data:`REFERENCE_ARGS`."""
    if model == "autoformer":
        return ForecastingConfig.published("autoformer", moving_avg=REFERENCE_ARGS["autoformer"]["moving_avg"])
    return ForecastingConfig.published("itransformer")


def build_ours(model: str, cfg: ForecastingConfig) -> nn.Module:
    if model == "autoformer":
        from services.forecasting.model_autoformer import Autoformer

        return Autoformer(cfg, N_VARS, N_MARKS)
    from services.forecasting.model_itransformer import ITransformer

    return ITransformer(cfg, N_VARS, N_MARKS)


# ----------------------------------------------------------------------------------------------------------------
# the reference code, imported from a temporary copy


def reference_dir(model: str, given: str | None) -> tuple[Path | None, str]:
    """The reference checkout for ``model`` (argument, else env var), or None and why not."""
    path = given or os.environ.get(ENV_VARS[model])
    if not path:
        return None, (f"no reference given (--reference-{model} DIR or {ENV_VARS[model]}; "
                      f"git clone {REPOS[model]})")
    root = Path(path).expanduser()
    module_file = root / (REFERENCE_MODULE[model].replace(".", "/") + ".py")
    if not module_file.is_file():
        return None, f"{module_file} not found: is {root} a checkout of {REPOS[model]}?"
    return root, ""


@contextmanager
def _isolated_imports(folder: Path) -> Iterator[None]:
    """Import from ``folder`` first, with the reference's generic package names (``layers``, ``utils``...) fresh
    and removed again afterwards (the two references both have ``layers``; Tessera keeps its own modules)."""
    saved = {name: mod for name, mod in sys.modules.items() if name.split(".")[0] in REFERENCE_PACKAGES}
    for name in saved:
        del sys.modules[name]
    stubbed = "reformer_pytorch" not in sys.modules and importlib.util.find_spec("reformer_pytorch") is None
    if stubbed:  # imported by iTransformer's layers/SelfAttention_Family.py for a model not timed here
        stub = types.ModuleType("reformer_pytorch")
        stub.LSHSelfAttention = None  # type: ignore[attr-defined]
        sys.modules["reformer_pytorch"] = stub
    sys.path.insert(0, str(folder))
    try:
        yield
    finally:
        sys.path.remove(str(folder))
        for name in [n for n in sys.modules if n.split(".")[0] in REFERENCE_PACKAGES]:
            del sys.modules[name]
        sys.modules.update(saved)
        if stubbed:
            del sys.modules["reformer_pytorch"]


def load_reference(model: str, root: Path) -> Callable[[types.SimpleNamespace], nn.Module]:
    """The reference's ``Model`` class, imported from a temporary copy of its packages."""
    folder = Path(tempfile.mkdtemp(prefix=f"tessera_ref_{model}_"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)  # the class stays usable until the process ends
    for package in REFERENCE_PACKAGES:
        if (root / package).is_dir():
            shutil.copytree(root / package, folder / package,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    with _isolated_imports(folder):
        module = importlib.import_module(REFERENCE_MODULE[model])
    return module.Model


def _conv1x1(w: Tensor) -> Tensor:
    return w.squeeze(-1)  # Conv1d (out, in, 1) -> Linear (out, in)


def _qkv(sd: dict[str, Tensor], prefix: str, kind: str) -> Tensor:
    return torch.cat([sd[f"{prefix}.{name}_projection.{kind}"] for name in ("query", "key", "value")])


def itransformer_weights(ref: dict[str, Tensor], e_layers: int) -> dict[str, Tensor]:
    """The thuml iTransformer state_dict in Tessera's ITransformer layout (same function, fused QKV)."""
    out = {"embed.weight": ref["enc_embedding.value_embedding.weight"],
           "embed.bias": ref["enc_embedding.value_embedding.bias"],
           "encoder.norm.weight": ref["encoder.norm.weight"], "encoder.norm.bias": ref["encoder.norm.bias"],
           "head.weight": ref["projector.weight"], "head.bias": ref["projector.bias"]}
    for i in range(e_layers):
        src, dst = f"encoder.attn_layers.{i}", f"encoder.layers.{i}"
        for kind in ("weight", "bias"):
            out[f"{dst}.attn.qkv.{kind}"] = _qkv(ref, f"{src}.attention", kind)
            out[f"{dst}.attn.out_proj.{kind}"] = ref[f"{src}.attention.out_projection.{kind}"]
            out[f"{dst}.norm1.{kind}"] = ref[f"{src}.norm1.{kind}"]
            out[f"{dst}.norm2.{kind}"] = ref[f"{src}.norm2.{kind}"]
        out[f"{dst}.ff.w_in.weight"] = _conv1x1(ref[f"{src}.conv1.weight"])
        out[f"{dst}.ff.w_in.bias"] = ref[f"{src}.conv1.bias"]
        out[f"{dst}.ff.w_out.weight"] = _conv1x1(ref[f"{src}.conv2.weight"])
        out[f"{dst}.ff.w_out.bias"] = ref[f"{src}.conv2.bias"]
    return out


def autoformer_weights(ref: dict[str, Tensor], e_layers: int, d_layers: int) -> dict[str, Tensor]:
    """The thuml Autoformer state_dict in Tessera's Autoformer layout (same function, fused QKV)."""
    out: dict[str, Tensor] = {}
    for side in ("enc", "dec"):
        out[f"{side}_embedding.token.weight"] = ref[f"{side}_embedding.value_embedding.tokenConv.weight"]
        out[f"{side}_embedding.marks.weight"] = ref[f"{side}_embedding.temporal_embedding.embed.weight"]

    def correlation(src: str, dst: str) -> None:
        for kind in ("weight", "bias"):
            out[f"{dst}.qkv.{kind}"] = _qkv(ref, src, kind)
            out[f"{dst}.out.{kind}"] = ref[f"{src}.out_projection.{kind}"]

    def ffn(src: str, dst: str) -> None:
        out[f"{dst}.ffn.up.weight"] = _conv1x1(ref[f"{src}.conv1.weight"])
        out[f"{dst}.ffn.down.weight"] = _conv1x1(ref[f"{src}.conv2.weight"])

    for i in range(e_layers):
        correlation(f"encoder.attn_layers.{i}.attention", f"encoder.{i}.attention")
        ffn(f"encoder.attn_layers.{i}", f"encoder.{i}")
    for i in range(d_layers):
        src, dst = f"decoder.layers.{i}", f"decoder.{i}"
        correlation(f"{src}.self_attention", f"{dst}.self_attention")
        correlation(f"{src}.cross_attention", f"{dst}.cross_attention")
        ffn(src, dst)
        out[f"{dst}.trend_projection.weight"] = ref[f"{src}.projection.weight"]
    for kind in ("weight", "bias"):
        out[f"encoder_norm.norm.{kind}"] = ref[f"encoder.norm.layernorm.{kind}"]
        out[f"decoder_norm.norm.{kind}"] = ref[f"decoder.norm.layernorm.{kind}"]
        out[f"projection.{kind}"] = ref[f"decoder.projection.{kind}"]
    return out


def copy_reference_weights(model: str, ours: nn.Module, ref: nn.Module, cfg: ForecastingConfig) -> None:
    sd = ref.state_dict()
    mapped = (itransformer_weights(sd, cfg.e_layers) if model == "itransformer"
              else autoformer_weights(sd, cfg.e_layers, cfg.d_layers))
    ours.load_state_dict({k: v.clone() for k, v in mapped.items()}, strict=True)


# ----------------------------------------------------------------------------------------------------------------
# timing


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def interleaved(fns: dict[str, Callable[[], None]], warmup: int, repeats: int,
                clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Seconds per call of each function, called in turn (A B A B ...) so that load drift hits all alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = clock()
            fn()
            times[name].append(clock() - start)
    return times


def paired_ratio(ours: list[float], ref: list[float]) -> float:
    """Median over the alternating pairs of ours / reference."""
    return statistics.median(a / b for a, b in zip(ours, ref, strict=True))


def make_batch(cfg: ForecastingConfig, batch: int) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(0)
    dec_len = cfg.label_len + cfg.pred_len
    y = torch.randn(batch, dec_len, N_VARS, generator=gen)
    return {"x": torch.randn(batch, cfg.seq_len, N_VARS, generator=gen),
            "x_mark": torch.rand(batch, cfg.seq_len, N_MARKS, generator=gen) - 0.5,  # timeF features in [-0.5, 0.5]
            "y_mark": torch.rand(batch, dec_len, N_MARKS, generator=gen) - 0.5,
            # the reference's decoder input: the label part of the target window, then zeros
            "x_dec": torch.cat([y[:, : cfg.label_len], torch.zeros(batch, cfg.pred_len, N_VARS)], dim=1),
            "target": y[:, -cfg.pred_len:]}


def forward_fns(model: str, ours: nn.Module, ref: nn.Module | None,
                b: dict[str, Tensor], precision: str = "fp32") -> dict[str, Callable[[], Tensor]]:
    """Each side's forward of the batch; with ``precision="bf16"`` ours runs under CPU bf16 autocast (what
    ``--set precision=bf16`` trains with) and returns fp32, the reference stays fp32."""
    def tessera() -> Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out: Tensor = ours(b["x"], b["x_mark"], b["y_mark"])
        return out.float()

    fns: dict[str, Callable[[], Tensor]] = {"tessera": tessera}
    if ref is not None:
        fns["reference"] = lambda: ref(b["x"], b["x_mark"], b["x_dec"], b["y_mark"])
    return fns


def bench_model(model: str, ref_root: Path | None, why: str, batch: int, warmup: int, repeats: int,
                infer_repeats: int, clock: Callable[[], float] = time.perf_counter,
                same_optimizer: bool = False, precision: str = "fp32") -> dict[str, Any]:
    cfg = our_config(model)
    torch.manual_seed(2023)
    ref: nn.Module | None = None
    if ref_root is not None:
        try:
            ref = load_reference(model, ref_root)(types.SimpleNamespace(**REFERENCE_ARGS[model]))
        except Exception as exc:  # a checkout of another version, a missing dependency
            ref, why = None, f"the reference at {ref_root} did not load: {type(exc).__name__}: {exc}"
    ours = build_ours(model, cfg)
    b = make_batch(cfg, batch)
    forwards = forward_fns(model, ours, ref, b, precision)
    result: dict[str, Any] = {"params": sum(p.numel() for p in ours.parameters())}
    if ref is not None:
        copy_reference_weights(model, ours, ref, cfg)
        ours.eval()
        ref.eval()
        with torch.inference_mode():
            result["max_abs_diff"] = (forwards["tessera"]() - forwards["reference"]()).abs().max().item()
    else:
        result["skipped"] = why

    def train_step(forward: Callable[[], Tensor], optimizer: torch.optim.Optimizer) -> Callable[[], None]:
        def step() -> None:
            loss = F.mse_loss(forward(), b["target"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return step

    def infer(forward: Callable[[], Tensor]) -> Callable[[], None]:
        def run() -> None:
            with torch.inference_mode():
                forward()
        return run

    modules = {"tessera": ours, "reference": ref}
    for m in modules.values():
        if m is not None:
            m.train()
    steps = {name: train_step(fn, torch.optim.Adam(modules[name].parameters(), lr=cfg.lr,  # type: ignore[union-attr]
                                                   fused=name == "tessera" and not same_optimizer))
             for name, fn in forwards.items()}
    train = interleaved(steps, warmup, repeats, clock)
    for m in modules.values():
        if m is not None:
            m.eval()
    inference = interleaved({name: infer(fn) for name, fn in forwards.items()}, warmup, infer_repeats, clock)
    for phase, times in (("train", train), ("infer", inference)):
        for name, ts in times.items():
            result[f"{phase}_ms_{name}"] = 1e3 * statistics.median(ts)
        if ref is not None:
            result[f"{phase}_ratio"] = paired_ratio(times["tessera"], times["reference"])
    return result


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference-itransformer", default=None, metavar="DIR")
    parser.add_argument("--reference-autoformer", default=None, metavar="DIR")
    parser.add_argument("--models", nargs="+", default=["itransformer", "autoformer"], choices=list(ENV_VARS))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=40, help="timed training steps per model (iTransformer)")
    parser.add_argument("--autoformer-repeats", type=int, default=10, help="timed training steps, Autoformer")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clock", choices=list(CLOCKS), default="wall",
                        help="wall: elapsed time; cpu: the process's CPU time on one thread (--threads is set to 1), "
                             "which a loaded machine's time slicing does not inflate")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="ours in fp32, or under CPU bf16 autocast (fp32 weights and optimizer; the reference "
                             "stays fp32; worth it where the CPU has native BF16 instructions)")
    parser.add_argument("--same-optimizer", action="store_true",
                        help="ours steps torch's per-parameter Adam loop too, as the reference does (default: the "
                             "fused Adam kernel Tessera's trainer uses)")
    args = parser.parse_args(argv)
    if args.clock == "cpu":
        args.threads = 1  # the CPU time of several threads would count the OpenMP workers' spinning
    torch.set_num_threads(args.threads)

    given = {"itransformer": args.reference_itransformer, "autoformer": args.reference_autoformer}
    results: dict[str, dict[str, Any]] = {}
    for model in args.models:
        root, why = reference_dir(model, given[model])
        repeats = args.autoformer_repeats if model == "autoformer" else args.repeats
        results[model] = bench_model(model, root, why, args.batch, args.warmup, repeats, infer_repeats=2 * repeats,
                                     clock=CLOCKS[args.clock], same_optimizer=args.same_optimizer,
                                     precision=args.precision)

    print(f"Forecasting models beside the reference code: ETTh1 96 -> 96, batch {args.batch}, ours {args.precision}, "
          f"{torch.get_num_threads()} thread(s) on {cpu_name()}; load average {os.getloadavg()[0]:.1f}")
    adam = "the per-parameter loop for both" if args.same_optimizer else "fused for ours, the loop for the reference"
    print(f"{args.clock} clock; medians of alternating runs ({args.repeats} training steps for iTransformer, "
          f"{args.autoformer_repeats} for Autoformer, twice as many forwards); ratio = ours / reference; Adam: {adam}")
    print(f"{'model':14s} {'phase':10s} {'tessera ms':>11s} {'ref ms':>9s} {'ratio':>7s}  same function")
    for model, r in results.items():
        for phase, label in (("train", "train step"), ("infer", "inference")):
            ours_ms = f"{r[f'{phase}_ms_tessera']:11.1f}"
            if "skipped" in r:
                print(f"{model:14s} {label:10s} {ours_ms} {'-':>9s} {'-':>7s}")
                continue
            print(f"{model:14s} {label:10s} {ours_ms} {r[f'{phase}_ms_reference']:9.1f} "
                  f"{r[f'{phase}_ratio']:6.2f}x  max |diff| {r['max_abs_diff']:.1e}")
        if "skipped" in r:
            print(f"  {model}: reference skipped: {r['skipped']}")
    from services.forecasting.model_itransformer import MATMUL_ENV_VAR, matmul_choices

    choices, library = matmul_choices(), os.environ.get(MATMUL_ENV_VAR, "auto").strip().lower() or "auto"
    if library == "auto":
        print(f"ours' fp32 products, timed per shape: {choices['onednn']} shapes on oneDNN, {choices['mkl']} on MKL")
    else:
        print(f"ours' fp32 products: all on {library} ({MATMUL_ENV_VAR})")
    print(json.dumps({"benchmark": "peers", "batch": args.batch, "threads": torch.get_num_threads(),
                      "clock": args.clock, "cpu": cpu_name(), "same_optimizer": args.same_optimizer,
                      "precision": args.precision, "matmul": library, "matmul_choices": choices,
                      "results": results}))


if __name__ == "__main__":
    main()
