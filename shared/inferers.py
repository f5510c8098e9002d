"""Inference strategies apart from the networks (MONAI's ``Inferer`` design).

The trainer's validation, a domain's evaluation pipeline and its service call the same :class:`Inferer`, so
the way a model is run (in one pass, over sliding windows, rolled out step by step, or by energy descent)
is written once per strategy and cannot drift between training, evaluation and serving.

- :class:`SimpleInferer`: one forward pass (forecasting).
- :class:`SlidingWindowInferer`: patch-wise inference over a large volume with Gaussian blending, through
  MONAI's ``sliding_window_inference`` (segmentation; needs ``monai``).
- :class:`RolloutInferer`: an autoregressive rollout, each predicted state fed back as the newest input
  (weather).
- :class:`EnergyDescentInferer`: gradient descent on a learned energy from several starts, keeping the
  lowest-energy candidate, stopping early once the energy stops falling (robot_policy).
- :class:`IndependentDescentInferer`: the same descent for problems that must not depend on each other (the
  requests a service batches together): each with its own candidates, step budget and early stop.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


class Inferer(abc.ABC):
    """Runs ``network`` on ``inputs`` with one inference strategy."""

    @abc.abstractmethod
    def __call__(self, network: Callable[..., Any], inputs: Any, *args: Any, **kwargs: Any) -> Any:
        """The network's prediction for ``inputs`` under this strategy."""


class SimpleInferer(Inferer):
    """``network(inputs, *args, **kwargs)``: the model sees the whole input at once."""

    def __call__(self, network: Callable[..., Any], inputs: Any, *args: Any, **kwargs: Any) -> Any:
        return network(inputs, *args, **kwargs)


class SlidingWindowInferer(Inferer):
    """Windows of ``roi_size`` over the spatial dimensions of (B, C, *spatial) inputs, ``overlap`` between
    neighbours, blended with Gaussian weights (MONAI's ``sliding_window_inference``). ``sw_device`` runs the
    windows, ``device`` holds the stitched output (the CPU keeps a whole-volume output out of GPU memory)."""

    def __init__(self, roi_size: Sequence[int], sw_batch_size: int = 1, overlap: float = 0.25,
                 mode: str = "gaussian", sw_device: torch.device | str | None = None,
                 device: torch.device | str | None = None) -> None:
        if not 0.0 <= overlap < 1.0:
            raise ValueError(f"overlap={overlap} must be in [0, 1)")
        if sw_batch_size < 1 or any(r < 1 for r in roi_size):
            raise ValueError("sw_batch_size and every roi_size entry must be >= 1")
        self.roi_size, self.sw_batch_size, self.overlap, self.mode = tuple(roi_size), sw_batch_size, overlap, mode
        self.sw_device, self.device = sw_device, device

    def __call__(self, network: Callable[..., Any], inputs: Any, *args: Any, **kwargs: Any) -> Any:
        from monai.inferers import sliding_window_inference

        if args:
            raise TypeError("SlidingWindowInferer passes extra network inputs by keyword only")
        return sliding_window_inference(inputs, self.roi_size, self.sw_batch_size, network, overlap=self.overlap,
                                        mode=self.mode, sw_device=self.sw_device, device=self.device, **kwargs)


class RolloutInferer(Inferer):
    """``steps`` autoregressive steps: ``network(history, k)`` gives the state after step k from the history
    (B, h, ...); the history then drops its oldest state and takes the new one. Returns the ``steps`` states."""

    def __init__(self, steps: int) -> None:
        if steps < 0:
            raise ValueError(f"steps={steps} must be >= 0")
        self.steps = steps

    def __call__(self, network: Callable[..., Any], inputs: Any, *args: Any, **kwargs: Any) -> list[Tensor]:
        history: Tensor = inputs
        states = []
        for k in range(self.steps):
            state = network(history, k, *args, **kwargs)  # (B, ...)
            states.append(state)
            history = torch.cat([history[:, 1:], state[:, None]], dim=1)
        return states


@contextlib.contextmanager
def autograd_enabled() -> Iterator[None]:
    """Gradients on, also when called under ``torch.inference_mode`` / ``no_grad`` (serving, evaluation)."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


@dataclass
class Descent:
    """The outcome of an energy descent for B problems."""

    best: Tensor  # (B, ...) the lowest-energy candidate of each problem
    energy: Tensor  # (B,) its final energy
    steps: int  # descent steps taken (the same for every problem)
    trace: list[float]  # mean energy over all candidates after each step
    passes: int  # network passes: one forward for the start, then a backward and a forward per step


class EnergyDescentInferer(Inferer):
    """Minimise a learned energy by gradient steps ``x <- x - step_size * dE/dx`` from ``candidates`` starts per
    problem, keep the lowest final energy (self-verification), and stop once no candidate's energy falls by
    ``early_stop_tol`` in a step (dynamic compute; 0 disables).

    ``network(candidates)`` maps (B * K, ...) candidates to (B * K,) energies (the context, such as an
    observation history, is bound into it); ``inputs`` are the (B * K, ...) starting candidates, problem-major
    (the K candidates of problem b are rows b * K .. b * K + K - 1).
    """

    def __init__(self, steps: int, candidates: int = 1, early_stop_tol: float = 0.0) -> None:
        if steps < 0 or candidates < 1 or early_stop_tol < 0:
            raise ValueError("steps >= 0, candidates >= 1 and early_stop_tol >= 0 are required")
        self.steps, self.candidates, self.early_stop_tol = steps, candidates, early_stop_tol

    def __call__(self, network: Callable[..., Any], inputs: Any, *args: Any, **kwargs: Any) -> Descent:
        step_size: Tensor | float = kwargs.pop("step_size", 1.0)
        with autograd_enabled():
            x = inputs.detach().requires_grad_(True)
            energy = network(x, *args, **kwargs)
            trace: list[float] = []
            taken = 0
            for _ in range(self.steps):
                (grad,) = torch.autograd.grad(energy.sum(), x)
                x = (x - step_size * grad).detach().requires_grad_(True)
                new_energy = network(x, *args, **kwargs)
                taken += 1
                fell = (energy - new_energy).detach()
                energy = new_energy
                trace.append(float(energy.detach().mean()))
                if self.early_stop_tol > 0 and float(fell.max()) < self.early_stop_tol:
                    break
            problems = x.shape[0] // self.candidates
            energy = energy.detach().view(problems, self.candidates)
            pick = energy.argmin(dim=1)  # self-verification: the lowest final energy
            rows = torch.arange(problems, device=pick.device)
            best = x.detach().view(problems, self.candidates, *x.shape[1:])[rows, pick]
        return Descent(best=best, energy=energy[rows, pick], steps=taken, trace=trace, passes=1 + 2 * taken)


@dataclass
class Descents:
    """The outcome of B independent energy descents."""

    best: Tensor  # (B, ...) the lowest-energy candidate of each problem
    energy: Tensor  # (B,) its final energy
    steps: Tensor  # (B,) descent steps each problem took
    passes: Tensor  # (B,) network passes over each problem's candidates: 1 + 2 * steps


class IndependentDescentInferer(Inferer):
    """:class:`EnergyDescentInferer`'s descent for problems that must not depend on each other, such as the
    requests a service runs as one batch: problem b has ``candidates[b]`` starts and at most ``steps[b]`` steps,
    stops on its own once none of its candidates' energy falls by ``early_stop_tol``, and then leaves the
    batch (its rows are no longer computed). A problem's answer is the one it gets alone (up to float rounding),
    whatever it was batched with; a batch-wide stop would let one problem's progress decide another's.

    ``network(candidates, rows)`` maps (R, ...) candidates to (R,) energies; ``rows`` (R,) are their indices in
    ``inputs`` so that the network can take their contexts. ``inputs`` are the (sum(candidates), ...) starts,
    problem-major.
    """

    def __init__(self, early_stop_tol: float = 0.0) -> None:
        if early_stop_tol < 0:
            raise ValueError("early_stop_tol >= 0 is required")
        self.early_stop_tol = early_stop_tol

    def __call__(self, network: Callable[..., Any], inputs: Any, *args: Any, **kwargs: Any) -> Descents:
        counts: Sequence[int] = kwargs.pop("candidates")
        budgets: Sequence[int] = kwargs.pop("steps")
        step_size: Tensor | float = kwargs.pop("step_size", 1.0)
        if args or kwargs:
            raise TypeError("IndependentDescentInferer takes candidates=, steps= and step_size= only")
        if len(counts) != len(budgets) or sum(counts) != inputs.shape[0] or min(counts, default=1) < 1 \
                or min(budgets, default=0) < 0:
            raise ValueError(f"one count >= 1 and one budget >= 0 per problem, the counts summing to the "
                             f"{inputs.shape[0]} inputs (got {list(counts)} and {list(budgets)})")
        device = inputs.device
        with autograd_enabled():  # (also the bookkeeping: tensors made under inference_mode cannot be updated here)
            owner = torch.repeat_interleave(torch.arange(len(counts), device=device),
                                            torch.as_tensor(counts, device=device))  # (N,) problem of each row
            budget = torch.as_tensor(budgets, device=device).clone()
            taken = torch.zeros_like(budget)
            final = inputs.detach().clone()  # where each row ended
            rows = torch.arange(inputs.shape[0], device=device)
            x = inputs.detach().requires_grad_(True)
            energy = network(x, rows)
            final_energy = energy.detach().clone()
            while True:
                going = (taken < budget)[owner[rows]]
                if not bool(going.any()):
                    break
                (grad,) = torch.autograd.grad(energy[going].sum(), x)
                rows = rows[going]
                x = (x.detach()[going] - step_size * grad[going]).requires_grad_(True)
                new_energy = network(x, rows)
                fell = (energy.detach()[going] - new_energy.detach())
                energy = new_energy
                moved = torch.zeros_like(budget, dtype=torch.bool)
                moved[owner[rows]] = True
                taken += moved.long()
                final[rows], final_energy[rows] = x.detach(), energy.detach()
                if self.early_stop_tol > 0:  # a problem none of whose candidates fell by the tolerance stops
                    most = torch.full(budget.shape, -torch.inf, device=device, dtype=fell.dtype)
                    most = most.scatter_reduce(0, owner[rows], fell, reduce="amax")
                    stopped = moved & (most < self.early_stop_tol)
                    budget[stopped] = taken[stopped]
        best, lowest = [], []
        for cands, energies in zip(final.split(list(counts)), final_energy.split(list(counts)), strict=True):
            pick = int(energies.argmin())  # self-verification: the lowest final energy
            best.append(cands[pick])
            lowest.append(energies[pick])
        return Descents(best=torch.stack(best), energy=torch.stack(lowest), steps=taken, passes=1 + 2 * taken)
