"""Figures of the robot_policy domain (logged to MLflow by the trainer and the evaluation job)."""

from __future__ import annotations

from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from .model import PolicyBase  # noqa: E402


def chunk_figure(model: torch.nn.Module, dataset: Any, n: int = 6) -> Figure:
    """Planned action chunks (from noise) against the demonstrated ones on test windows, in the workspace."""
    policy = model
    assert isinstance(policy, PolicyBase)
    picks = np.linspace(0, len(dataset) - 1, n).astype(int)
    obs = torch.stack([dataset[int(i)][0] for i in picks])
    chunk = torch.stack([dataset[int(i)][2] for i in picks])
    plan = policy.plan(obs.float(), None, generator=torch.Generator().manual_seed(0))
    fig, axes = plt.subplots(1, n, figsize=(3 * n, 3.2))
    for ax, o, demo, pred in zip(np.atleast_1d(axes), obs, chunk, plan.actions, strict=True):
        ax.plot(*demo.T.numpy(), "o-", ms=3, label="demonstration")
        ax.plot(*pred.T.numpy(), "s-", ms=3, label="planned")
        ax.plot(*o[-1, :2].numpy(), "k*", ms=10, label="agent")
        ax.plot(*o[-1, 2:4].numpy(), "r^", ms=8, label="block")
        ax.set_xlim(0, 512)
        ax.set_ylim(512, 0)  # image coordinates, as rendered
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    np.atleast_1d(axes)[0].legend(fontsize=7, loc="lower left")
    fig.suptitle(f"{policy.kind}: planned chunks vs demonstrations (test episodes)")
    fig.tight_layout()
    return fig


def energy_descent_figure(traces: list[list[float]], episode_energy: list[list[float]],
                          coverage: list[list[float]]) -> Figure:
    """Left: energy after each descent step (mean and spread over all planned chunks). Right: the final
    energy of each chunk and the coverage along a few episodes."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    longest = max((len(t) for t in traces), default=0)
    if longest:
        padded = np.full((len(traces), longest), np.nan)
        for i, trace in enumerate(traces):
            padded[i, :len(trace)] = trace
        steps = np.arange(1, longest + 1)
        mean, lo, hi = np.nanmean(padded, 0), np.nanpercentile(padded, 10, 0), np.nanpercentile(padded, 90, 0)
        left.plot(steps, mean, "o-", label="mean")
        left.fill_between(steps, lo, hi, alpha=0.3, label="10-90%")
        left.set_xticks(steps)
    left.set_xlabel("descent step")
    left.set_ylabel("energy")
    left.set_title("energy vs descent step (all chunks)")
    left.legend()
    twin = right.twinx()
    twin.set_ylabel("coverage (dashed)")
    twin.set_ylim(0, 1)
    for i, (energies, cov) in enumerate(zip(episode_energy, coverage, strict=True)):
        line = right.plot(energies, "o-", ms=3, label=f"episode {i} energy")[0]
        twin.plot(np.linspace(0, len(energies) - 1, len(cov)), cov, "--", color=line.get_color(), alpha=0.7)
    right.set_xlabel("chunk")
    right.set_ylabel("final energy")
    right.set_title("final energy and coverage along episodes")
    right.legend(fontsize=7)
    fig.tight_layout()
    return fig


def ood_figure(in_dist: np.ndarray, ood: dict[float, np.ndarray], auroc: dict[float, float]) -> Figure:
    """Final-energy histograms: held-out demonstration histories vs copies jittered by N(0, s) pixels."""
    fig, (hist, curve) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [2, 1]})
    bins = np.histogram_bin_edges(np.concatenate([in_dist, *ood.values()]), bins=40).tolist()
    hist.hist(in_dist, bins=bins, alpha=0.6, density=True, label=f"in-distribution (mean {in_dist.mean():.2f})")
    for scale, energies in ood.items():
        hist.hist(energies, bins=bins, alpha=0.4, density=True,
                  label=f"jittered {scale:g} px (mean {energies.mean():.2f}, AUROC {auroc[scale]:.2f})")
    hist.set_xlabel("final energy")
    hist.set_title("energy as uncertainty")
    hist.legend(fontsize=7)
    scales = sorted(auroc)
    curve.plot(scales, [auroc[s] for s in scales], "o-")
    curve.axhline(0.5, color="grey", ls="--", lw=1)
    curve.set_xlabel("jitter (px)")
    curve.set_ylabel("AUROC (OOD vs in-distribution)")
    curve.set_ylim(0.4, 1.0)
    fig.tight_layout()
    return fig
