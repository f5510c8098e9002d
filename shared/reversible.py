"""Reversible blocks with additive coupling, whose backward pass recomputes their inputs from their outputs.

A block splits its input in two halves along ``dim`` and computes ``y1 = x1 + F(x2)``, ``y2 = x2 + G(y1)``
(RevNet, Gomez et al. 2017; in 3-D segmentation, "Memory Efficient 3D U-Net with Reversible Mobile Inverted
Bottlenecks", Pendse et al. 2020). The inverse is exact up to rounding: ``x2 = y2 - G(y1)``, ``x1 = y1 - F(x2)``.
:class:`ReversibleSequence` runs blocks in one of three modes:

- ``"reversible"``: a custom autograd function runs the blocks without building a graph and keeps only the last
  outputs; the backward walks the blocks in reverse, recomputing each block's inputs from its outputs and its
  F and G with the random state of the forward pass replayed (dropout draws the same mask), so the memory of the
  activations does not grow with the number of blocks. One extra forward per block, like checkpointing.
- ``"checkpoint"``: gradient checkpointing of each block (``torch.utils.checkpoint``, non-reentrant): keeps
  every block's input, recomputes its inside.
- ``"plain"``: ordinary autograd, every intermediate kept (the reference the tests compare against).

F and G must be functions of their input and parameters only, besides random draws: no running statistics
(BatchNorm would update them again in the recomputation; use GroupNorm or InstanceNorm) and no in-place change
of their input. Gradients flow to the inputs and to every parameter of F and G that requires one; second
derivatives are not supported in the reversible mode (as with reentrant checkpointing).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

Mode = Literal["reversible", "checkpoint", "plain"]
MODES: tuple[str, ...] = ("reversible", "checkpoint", "plain")


class SavedBytes:
    """Counts the bytes of the tensors autograd keeps for the backward pass while the block runs (parameters
    left out): the activation memory reversible blocks save. ``with SavedBytes() as saved: y = net(x)``, then
    ``saved.total``. Tensors saved by several operations count once per operation."""

    def __init__(self) -> None:
        self.total = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: Tensor) -> Tensor:
        if not isinstance(t, nn.Parameter):
            self.total += t.numel() * t.element_size()
        return t

    def __enter__(self) -> SavedBytes:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)


class ReversibleBlock(nn.Module):
    """``(x1, x2) -> (x1 + F(x2), x2 + G(x1 + F(x2)))`` and its inverse."""

    def __init__(self, f: nn.Module, g: nn.Module) -> None:
        super().__init__()
        self.f, self.g = f, g

    def forward(self, x1: Tensor, x2: Tensor) -> tuple[Tensor, Tensor]:
        y1 = x1 + self.f(x2)
        return y1, x2 + self.g(y1)

    @torch.no_grad()
    def inverse(self, y1: Tensor, y2: Tensor) -> tuple[Tensor, Tensor]:
        x2 = y2 - self.g(y1)
        return y1 - self.f(x2), x2


# --- random state: what the forward drew, replayed in the backward ---------------------------------------------

def _rng_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


@contextlib.contextmanager
def _replayed(state: tuple[Tensor, Tensor | None], device: torch.device) -> Iterator[None]:
    """Run the body with the random state ``state``; the caller's random state is restored afterwards."""
    cpu, cuda = state
    with torch.random.fork_rng(devices=[device] if cuda is not None else [], enabled=True):
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)
        yield


def _autocast_state(device: torch.device) -> tuple[str, bool, torch.dtype]:
    kind = device.type if device.type in ("cuda", "cpu") else "cpu"
    return kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind)


def _trainable(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


class _Reversible(torch.autograd.Function):
    """The blocks' forward without a graph; the backward recomputes inputs from outputs, block by block."""

    @staticmethod
    def forward(ctx: Any, x1: Tensor, x2: Tensor, blocks: Sequence[ReversibleBlock], *params: Tensor) -> Any:
        device = x1.device
        ctx.blocks, ctx.device, ctx.autocast = blocks, device, _autocast_state(device)
        states = []
        with torch.no_grad():
            for block in blocks:
                f_state = _rng_state(device)
                y1 = x1 + block.f(x2)
                g_state = _rng_state(device)
                y2 = x2 + block.g(y1)
                states.append((f_state, g_state))
                x1, x2 = y1, y2
        ctx.states = states
        ctx.save_for_backward(x1, x2)
        return x1, x2

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, dy1: Tensor | None, dy2: Tensor | None) -> Any:
        y1, y2 = ctx.saved_tensors
        dy1 = torch.zeros_like(y1) if dy1 is None else dy1
        dy2 = torch.zeros_like(y2) if dy2 is None else dy2
        kind, autocast_on, autocast_dtype = ctx.autocast
        param_grads: list[tuple[Tensor | None, ...]] = []
        for block, (f_state, g_state) in zip(reversed(ctx.blocks), reversed(ctx.states), strict=True):
            g_params, f_params = _trainable(block.g), _trainable(block.f)
            with torch.enable_grad(), torch.autocast(kind, dtype=autocast_dtype, enabled=autocast_on):
                y1_ = y1.detach().requires_grad_(True)
                with _replayed(g_state, ctx.device):
                    g = block.g(y1_)
                grads = torch.autograd.grad(g, (y1_, *g_params), dy2, allow_unused=True)
            dx1 = dy1 + grads[0]  # y1 feeds G and is x1 + F(x2)
            g_grads = grads[1:]
            x2 = (y2 - g).detach()
            del g, y1_
            with torch.enable_grad(), torch.autocast(kind, dtype=autocast_dtype, enabled=autocast_on):
                x2_ = x2.requires_grad_(True)
                with _replayed(f_state, ctx.device):
                    f = block.f(x2_)
                grads = torch.autograd.grad(f, (x2_, *f_params), dx1, allow_unused=True)
            dx2 = dy2 + grads[0]
            x1 = (y1 - f).detach()
            x2 = x2.detach()
            del f, x2_
            param_grads.append((*grads[1:], *g_grads))  # this block's parameters in forward's order: F, then G
            y1, y2, dy1, dy2 = x1, x2, dx1, dx2
        flat = [g for block_grads in reversed(param_grads) for g in block_grads]
        return (dy1, dy2, None, *flat)


class ReversibleSequence(nn.Module):
    """Reversible blocks applied in order to a tensor split in halves along ``dim`` (its size must be even)."""

    def __init__(self, blocks: Sequence[ReversibleBlock], mode: Mode = "reversible", dim: int = 1) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}: expected one of {list(MODES)}")
        self.blocks = nn.ModuleList(blocks)
        self.mode, self.dim = mode, dim

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[self.dim] % 2:
            raise ValueError(f"a reversible sequence splits dim {self.dim} in halves; it has odd size "
                             f"{x.shape[self.dim]}")
        x1, x2 = torch.chunk(x, 2, dim=self.dim)
        params = [p for block in self.blocks for p in _trainable(block)]  # F's, then G's, block by block
        needs_graph = torch.is_grad_enabled() and (x.requires_grad or bool(params))
        if self.mode == "reversible" and needs_graph and len(self.blocks):
            x1, x2 = _Reversible.apply(x1, x2, list(self.blocks), *params)
        elif self.mode == "checkpoint" and needs_graph:
            for block in self.blocks:
                x1, x2 = checkpoint(block, x1, x2, use_reentrant=False)
        else:
            for block in self.blocks:
                x1, x2 = block(x1, x2)
        return torch.cat([x1, x2], dim=self.dim)

    @torch.no_grad()
    def inverse(self, y: Tensor) -> Tensor:
        """The input that gives ``y`` (up to rounding)."""
        y1, y2 = torch.chunk(y, 2, dim=self.dim)
        for block in reversed(self.blocks):
            y1, y2 = block.inverse(y1, y2)  # type: ignore[operator]
        return torch.cat([y1, y2], dim=self.dim)


# --- the transformer blocks, reversible -----------------------------------------------------------------------

class _PreNorm(nn.Module):
    """``dropout(fn(norm(x)))``: one pre-norm sublayer of a transformer block without its residual (the
    coupling adds it)."""

    def __init__(self, d_model: int, fn: nn.Module, dropout: float) -> None:
        super().__init__()
        self.norm, self.fn, self.dropout = nn.LayerNorm(d_model), fn, nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.fn(self.norm(x)))


class _SelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        from shared.attention import MultiHeadAttention

        self.attn = MultiHeadAttention(d_model, n_heads, dropout=dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.attn(x)


class ReversibleEncoder(nn.Module):
    """A pre-norm transformer encoder (B, L, d_model) -> (B, L, d_model) made of reversible blocks, as in the
    Reformer: the tokens are duplicated into two streams, F is the attention sublayer (``shared.attention``)
    and G the feed-forward one, so ``y1 = x1 + Attn(x2)``, ``y2 = x2 + FF(y1)``; the output is the mean of the
    two streams, then a LayerNorm. ``mode`` as in :class:`ReversibleSequence`."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, n_layers: int, dropout: float = 0.0,
                 mode: Mode = "reversible") -> None:
        super().__init__()
        from shared.layers import FeedForward

        blocks = [ReversibleBlock(_PreNorm(d_model, _SelfAttention(d_model, n_heads, dropout), dropout),
                                  _PreNorm(d_model, FeedForward(d_model, d_ff, dropout=dropout), dropout))
                  for _ in range(n_layers)]
        self.blocks = ReversibleSequence(blocks, mode=mode, dim=-1)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x: Tensor) -> Tensor:
        y1, y2 = self.blocks(torch.cat([x, x], dim=-1)).chunk(2, dim=-1)
        return self.norm((y1 + y2) / 2)
