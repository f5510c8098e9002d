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
