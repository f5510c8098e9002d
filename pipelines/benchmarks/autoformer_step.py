"""Training-step and inference timing of Tessera's Autoformer against a reference-style Auto-Correlation.

Autoformer (Wu et al., NeurIPS 2021) at the published ETTh1 size: d_model 512, d_ff 2048, 2 encoder layers,
1 decoder layer, batch 32, seq 96, label 48, pred 96, 7 variables, 4 calendar features, fp32 on 2 CPU threads.

The baseline is the same model with the same weights whose Auto-Correlation core is written the way the
reference implementation writes it: heads split and permuted to (B, H, E, L) with contiguous copies, the full
per-channel correlation through ``irfft`` before averaging, the time-delay aggregation as a Python loop over
the top-k delays with ``torch.roll`` (training) or ``torch.gather`` on a repeated sequence (inference), the
softmax weights repeated to the full value shape. Run: ``python -m pipelines.benchmarks.autoformer_step``.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import types
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from services.forecasting.config import ForecastingConfig
from services.forecasting.model_autoformer import AutoCorrelation, Autoformer


def _delay_agg_training(values: Tensor, corr: Tensor, factor: int) -> Tensor:
    """Reference-style aggregation, delays shared by the batch; values and corr are (B, H, E, L)."""
    _, head, channel, length = values.shape
    top_k = int(factor * math.log(length))
    mean_value = corr.mean(dim=1).mean(dim=1)  # (B, L)
    index = torch.topk(mean_value.mean(dim=0), top_k, dim=-1)[1]
    weights = torch.stack([mean_value[:, index[i]] for i in range(top_k)], dim=-1)  # (B, k)
    tmp_corr = torch.softmax(weights, dim=-1)
    delays_agg = torch.zeros_like(values)
    for i in range(top_k):
        pattern = torch.roll(values, -int(index[i]), -1)
        weight = tmp_corr[:, i][:, None, None, None].repeat(1, head, channel, length)  # full-size copy
        delays_agg = delays_agg + pattern * weight
    return delays_agg


def _delay_agg_inference(values: Tensor, corr: Tensor, factor: int) -> Tensor:
    """Reference-style aggregation with per-sample delays; values and corr are (B, H, E, L)."""
    batch, head, channel, length = values.shape
    init_index = torch.arange(length)[None, None, None, :].repeat(batch, head, channel, 1)
    top_k = int(factor * math.log(length))
    mean_value = corr.mean(dim=1).mean(dim=1)  # (B, L)
    weights, delay = torch.topk(mean_value, top_k, dim=-1)
    tmp_corr = torch.softmax(weights, dim=-1)
    doubled = values.repeat(1, 1, 1, 2)  # (B, H, E, 2L)
    delays_agg = torch.zeros_like(values)
    for i in range(top_k):
        tmp_delay = init_index + delay[:, i][:, None, None, None].repeat(1, head, channel, length)
        pattern = torch.gather(doubled, dim=-1, index=tmp_delay)
        weight = tmp_corr[:, i][:, None, None, None].repeat(1, head, channel, length)  # full-size copy
        delays_agg = delays_agg + pattern * weight
    return delays_agg


def reference_correlate(self: AutoCorrelation, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Drop-in for ``AutoCorrelation.correlate`` written like the reference (B, L, D) -> (B, L, D)."""
    batch, lq, d_model = q.shape
    heads = self.n_heads
    queries, keys, values = (t.view(t.shape[0], t.shape[1], heads, -1) for t in (q, k, v))  # (B, L, H, E)
    if lq > keys.shape[1]:
        zeros = torch.zeros_like(queries[:, : lq - keys.shape[1]])
        values = torch.cat([values, zeros], dim=1)
        keys = torch.cat([keys, zeros], dim=1)
    else:
        values, keys = values[:, :lq], keys[:, :lq]
    q_fft = torch.fft.rfft(queries.permute(0, 2, 3, 1).contiguous(), dim=-1)  # (B, H, E, F)
    k_fft = torch.fft.rfft(keys.permute(0, 2, 3, 1).contiguous(), dim=-1)
    corr = torch.fft.irfft(q_fft * torch.conj(k_fft), n=lq, dim=-1)  # (B, H, E, L)
    aggregate = _delay_agg_training if self.training else _delay_agg_inference
    out = aggregate(values.permute(0, 2, 3, 1).contiguous(), corr, self.factor)  # (B, H, E, L)
    return out.permute(0, 3, 1, 2).contiguous().view(batch, lq, d_model)


def with_reference_correlation(model: Autoformer) -> Autoformer:
    """A copy of ``model`` (same weights) whose Auto-Correlation layers use the reference-style core."""
    baseline = copy.deepcopy(model)
    for module in baseline.modules():
        if isinstance(module, AutoCorrelation):
            module.correlate = types.MethodType(reference_correlate, module)  # type: ignore[method-assign]
    return baseline


def _median_ms(fns: dict[str, Callable[[], None]], warmup: int, repeats: int) -> dict[str, float]:
    """Median wall time per call of each function; calls are interleaved so load drift hits all alike."""
    from pipelines.benchmarks.peers import interleaved

    times = interleaved(fns, warmup, repeats)
    return {name: 1e3 * statistics.median(ts) for name, ts in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(2021)
    cfg = ForecastingConfig.published("autoformer")
    n_vars, n_marks, batch = 7, 4, cfg.batch_size
    x = torch.randn(batch, cfg.seq_len, n_vars)
    x_mark = torch.randn(batch, cfg.seq_len, n_marks)
    y_mark = torch.randn(batch, cfg.label_len + cfg.pred_len, n_marks)
    target = torch.randn(batch, cfg.pred_len, n_vars)

    models = {"tessera": Autoformer(cfg, n_vars, n_marks)}
    models["reference-style"] = with_reference_correlation(models["tessera"])
    for model in models.values():  # same weights, same eval output: the two cores compute the same thing
        model.eval()
    with torch.no_grad():
        outs = [model(x, x_mark, y_mark) for model in models.values()]
    max_diff = (outs[0] - outs[1]).abs().max().item()

    def train_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> Callable[[], None]:
        def step() -> None:
            loss = F.mse_loss(model(x, x_mark, y_mark), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return step

    def infer(model: nn.Module) -> Callable[[], None]:
        def forward() -> None:
            with torch.inference_mode():
                model(x, x_mark, y_mark)
        return forward

    for model in models.values():
        model.train()
    steps = {name: train_step(m, torch.optim.Adam(m.parameters(), lr=cfg.lr)) for name, m in models.items()}
    train_ms = _median_ms(steps, args.warmup, args.repeats)
    for model in models.values():
        model.eval()
    infer_ms = _median_ms({name: infer(m) for name, m in models.items()}, args.warmup, args.repeats)

    n_params = sum(p.numel() for p in models["tessera"].parameters())
    print(f"Autoformer ETTh1 96->96 published size: {n_params / 1e6:.2f}M parameters, batch {batch}, "
          f"{torch.get_num_threads()} threads, fp32 CPU; eval outputs max |diff| = {max_diff:.2e}")
    print(f"median of {args.repeats} interleaved runs after {args.warmup} warm-up; "
          f"load average {os.getloadavg()[0]:.1f} (a shared CPU inflates both rows alike)")
    print(f"{'':16s} {'train step (ms)':>16s} {'inference (ms)':>16s}")
    for name in models:
        print(f"{name:16s} {train_ms[name]:16.1f} {infer_ms[name]:16.1f}")
    base, ours = train_ms["reference-style"], train_ms["tessera"]
    print(f"speed-up (reference-style / tessera): train {base / ours:.2f}x, "
          f"inference {infer_ms['reference-style'] / infer_ms['tessera']:.2f}x")


if __name__ == "__main__":
    main()
