"""The one attention entry point of Tessera.

Every model attends through :func:`attention` (or :class:`MultiHeadAttention`, which wraps it); nothing else in
the project calls SDPA, ``nn.MultiheadAttention`` or flash-attn (``tests/test_no_direct_attention.py``). The
function picks the fastest kernel that supports its inputs:

* ``"flash_attn"``: FlashAttention-2 (``flash_attn_func``; ``flash_attn_varlen_func`` for padded batches) on CUDA
  (sm80+) with fp16/bf16, head dim <= 256 and no arbitrary ``attn_mask``;
* ``"small"``: short sequences on the CPU (:class:`_SmallAttention`): batched matmuls, a softmax over rows padded
  to 16 lanes, dropout masks from 16 random bits per weight and a hand-written backward. For many heads of a few
  tokens (iTransformer's 256 heads of 11 variate tokens) SDPA's CPU kernels cost far more than their arithmetic:
  its softmax over rows of 11 runs several times slower than over rows of 16, and with dropout it falls back to
  its composite path with ``bernoulli_`` masks. Chosen automatically only where it cannot change a training run:
  CPU, float32/float64, no gradient, no dropout, at most ``SMALL_AUTO_MAX_KEYS`` keys (inference of short
  sequences: the same function up to float rounding). Anything else asks for it by name, as the forecasting
  fast path does for training (its dropout masks are other random draws than SDPA's);
* ``"sdpa"``: :func:`torch.nn.functional.scaled_dot_product_attention` (fused kernels on CUDA and on CPU);
* ``"reference"``: an explicit ``softmax(Q Kᵀ · scale + mask) V`` in plain torch, the ground truth of the tests.

One set of semantics holds for every backend:

* layout (B, H, L, D) as in SDPA; ``v`` may have its own head dim Dv (not on flash-attn); ``k`` and ``v`` may
  have fewer heads than ``q`` (grouped-query or multi-query attention: H a multiple of Hkv, query head i
  reading key/value head ``i // (H // Hkv)``);
* ``attn_mask`` is bool (True = may attend) or float (added to the scores), broadcastable to (B, H, Lq, Lk);
* ``key_padding_mask`` is (B, Lk) bool with True = a real token;
* ``causal`` is top-left aligned (query i sees keys j <= i), SDPA's ``is_causal``, also when Lq != Lk;
  flash-attn aligns bottom-right, so those cases go to SDPA;
* a query row that may attend to no key at all returns zeros (and zero gradients), never NaN;
* ``dropout_p`` is applied whenever it is > 0: callers pass 0 in eval mode (:class:`MultiHeadAttention` does);
* masks live on the device of ``q``; inputs with nothing to compute (no elements, or no real key in the whole
  batch) are answered without a fused kernel (the kernels cannot launch on an empty grid);
* under ``torch.use_deterministic_algorithms(True)`` flash-attn runs its deterministic backward.

Backend choice: the ``backend`` argument, else the ``TESSERA_ATTENTION_BACKEND`` environment variable, else
automatic. A forced backend that cannot run the inputs raises ``ValueError`` rather than silently falling back.

Second-order gradients: the fused kernels (flash-attn, SDPA's flash kernels) have no double backward. Code that
differentiates through a gradient (``torch.autograd.grad(..., create_graph=True)``, as energy-based models do
when they train through their own gradient descent) runs inside :func:`twice_differentiable`: there SDPA is
restricted to its composite "math" kernel, and flash-attn is never chosen. Outside that block a double
backward through flash-attn raises (flash-attn's backward is not differentiable; PyTorch would otherwise drop
the second-order terms without a word), as SDPA's fused kernels do.

flash-attn's limits that are checked before its kernels are called: a build for the GPU's architecture (probed
once per device), head dims <= 256, no dropout with head dims above 192 on GPUs with less than 144 KB of shared
memory per block (sm86/sm87/sm89: flash-attn 2 has no backward kernel for it and would return garbage
gradients), and at most 65,535 sequences per kernel launch (the CUDA grid's y limit; larger batches are split,
also for SDPA on CUDA).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import math
import os
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BACKENDS = ("flash_attn", "small", "sdpa", "reference")
ENV_VAR = "TESSERA_ATTENTION_BACKEND"
FLASH_MAX_HEAD_DIM = 256
# flash-attn 2's backward for head dims 193-256 (its hdim256 kernels) with dropout needs this much shared memory
# per block (csrc/flash_attn/src/flash_bwd_launch_template.h: A100/H100 have it; sm86/sm87/sm89 do not and
# launch nothing).
_FLASH_HDIM256_DROPOUT_SMEM = 144 * 1024
_FLASH_HDIM256_SMALL_SMEM = {(8, 6), (8, 7), (8, 9)}  # when the device properties do not say
# CUDA grids are at most 65,535 blocks in y and z; flash-attn's grid is (query blocks, batch, heads) and SDPA's
# memory-efficient kernel's (query blocks, heads, batch): more sequences than this go in several launches.
MAX_GRID_BATCH = 65535
_HALF = (torch.float16, torch.bfloat16)
# Devices whose SDPA kernels return zeros for fully-masked rows (PyTorch >= 2.5 on CPU; checked by the tests).
# Elsewhere (CUDA's memory-efficient kernel has returned NaN for them) such rows are patched around the call.
_SDPA_SAFE_DEVICES = {"cpu"}
# The "small" backend: automatic for CPU inference with at most this many keys (measured against SDPA's CPU
# kernel by ``python -m pipelines.benchmarks.attention --small``); its softmax rows are padded to this many lanes.
SMALL_AUTO_MAX_KEYS = 16
_SMALL_LANES = 16
_MASK_BITS = 16  # random bits per dropout-mask element of the "small" backend


@functools.cache
def _flash_module() -> ModuleType | None:
    """The ``flash_attn`` package, or None when it is absent or cannot load (a build for another CUDA/torch)."""
    try:
        return importlib.import_module("flash_attn")
    except Exception:  # a broken GPU build must not take CPU users down with it
        return None


def _capability(device: torch.device) -> tuple[int, int]:
    major, minor = torch.cuda.get_device_capability(device)
    return int(major), int(minor)


@functools.cache
def _flash_runs_on(device: torch.device) -> str | None:
    """None when the installed flash-attn has kernels for ``device``, else the error its first kernel gave.

    A build carries code for the architectures it was compiled for (``FLASH_ATTN_CUDA_ARCHS``), and a cubin runs
    on its own major version with an equal or higher minor only; one tiny call per device finds out.
    """
    fa = _flash_module()
    if fa is None:
        return "the flash_attn package is not installed"
    probe = torch.zeros(1, 1, 1, 8, dtype=torch.float16, device=device)
    try:
        with torch.no_grad():
            fa.flash_attn_func(probe, probe, probe)
    except RuntimeError as error:  # "no kernel image is available for execution on the device" (not sticky)
        message = str(error).strip()
        return message.splitlines()[0] if message else type(error).__name__
    return None


def _flash_device_problem(t: Tensor) -> str | None:
    """Why flash-attn cannot run on ``t``'s dtype and device, or None (fp16/bf16 on a CUDA GPU it was built for)."""
    if not t.is_cuda or t.dtype not in _HALF:
        return "flash_attn needs fp16/bf16 tensors on a CUDA GPU of compute capability >= 8.0"
    major, minor = _capability(t.device)
    if major < 8:
        return f"flash_attn needs a CUDA GPU of compute capability >= 8.0 (this one is sm_{major}{minor})"
    failed = _flash_runs_on(t.device)
    if failed is not None:
        return (f"the installed flash_attn has no kernels for this GPU (sm_{major}{minor}; build it with "
                f"FLASH_ATTN_CUDA_ARCHS including {major}{minor}): {failed}")
    return None


def _small_shared_memory(t: Tensor) -> bool:
    """True on GPUs with less shared memory per block than flash-attn's hdim-256 backward with dropout needs."""
    optin = getattr(torch.cuda.get_device_properties(t.device), "shared_memory_per_block_optin", None)
    if optin is None:
        return _capability(t.device) in _FLASH_HDIM256_SMALL_SMEM
    return int(optin) < _FLASH_HDIM256_DROPOUT_SMEM


def _flash_shape_problem(q: Tensor, k: Tensor, v: Tensor, dropout_p: float) -> str | None:
    """Why flash-attn cannot run these head dims (and dropout), or None. Layout-agnostic: D is the last dim."""
    d = q.shape[-1]
    if d > FLASH_MAX_HEAD_DIM or v.shape[-1] != d:
        return f"flash_attn needs one head dim <= {FLASH_MAX_HEAD_DIM} for q, k and v"
    padded = -(-d // 8) * 8  # flash-attn pads head dims to a multiple of 8, then picks the kernel for 192 or 256
    if dropout_p > 0.0 and padded > 192 and _needs_grad(q, k, v) and _small_shared_memory(q):
        return (f"flash_attn 2 has no backward kernel for head dim {d} with dropout on this GPU (less than "
                f"{_FLASH_HDIM256_DROPOUT_SMEM // 1024} KB of shared memory per block: sm86/sm87/sm89)")
    return None


def _needs_grad(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


_TWICE_DIFFERENTIABLE: contextvars.ContextVar[bool] = contextvars.ContextVar("twice_differentiable", default=False)


@contextlib.contextmanager
def twice_differentiable() -> Iterator[None]:
    """Within this block attention is differentiable twice (composite kernels only; slower on long sequences)."""
    token = _TWICE_DIFFERENTIABLE.set(True)
    try:
        yield
    finally:
        _TWICE_DIFFERENTIABLE.reset(token)


def _math_kernel_only() -> contextlib.AbstractContextManager[None]:
    """SDPA restricted to its composite kernel (the only one with a double backward)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


def available_backends() -> list[str]:
    """Backends usable in this process, fastest first (flash-attn only when the package imports)."""
    return (["flash_attn"] if _flash_module() is not None else []) + ["small", "sdpa", "reference"]


# ----------------------------------------------------------------------------------------------------------------
# validation and backend selection


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None,
                  key_padding_mask: Tensor | None, dropout_p: float) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise ValueError(f"attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"attention: {name} must be 4-D (B, H, L, D), got shape {_shape(t)}")
        if not t.is_floating_point():
            raise ValueError(f"attention: {name} must be floating point, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"attention: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    (b, h, lq, d), (bk, hk, lk, dk), (bv, hv, lv, _) = q.shape, k.shape, v.shape
    if not b == bk == bv:
        raise ValueError(f"attention: batch sizes differ: q {b}, k {bk}, v {bv}")
    if hk != hv or hk < 1 or h % hk:
        raise ValueError(f"attention: k and v must have the same number of heads, and q's must be a multiple of "
                         f"it (grouped-query attention): q {h}, k {hk}, v {hv} (shapes are (B, H, L, D))")
    if dk != d:
        raise ValueError(f"attention: q and k head dims differ: {d} vs {dk}")
    if lv != lk:
        raise ValueError(f"attention: k and v lengths differ: {lk} vs {lv}")
    if attn_mask is not None:
        if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
            raise ValueError(f"attention: attn_mask must be bool (True = may attend) or float, got {attn_mask.dtype}")
        target = (b, h, lq, lk)
        shape = (1,) * (4 - attn_mask.dim()) + _shape(attn_mask)
        if attn_mask.dim() > 4 or any(s not in (1, t) for s, t in zip(shape, target, strict=True)):
            raise ValueError(f"attention: attn_mask of shape {_shape(attn_mask)} does not broadcast to "
                             f"(B, H, Lq, Lk) = {target}")
        if attn_mask.device != q.device:
            raise ValueError(f"attention: attn_mask is on {attn_mask.device} but q on {q.device}")
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool:
            raise ValueError(f"attention: key_padding_mask must be bool (True = real token), got "
                             f"{key_padding_mask.dtype}")
        if _shape(key_padding_mask) != (b, lk):
            raise ValueError(f"attention: key_padding_mask must have shape (B, Lk) = {(b, lk)}, got "
                             f"{_shape(key_padding_mask)}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"attention: key_padding_mask is on {key_padding_mask.device} but q on {q.device}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"attention: dropout_p={dropout_p} must be in [0, 1)")


def _flash_input_problem(q: Tensor, k: Tensor, v: Tensor, dropout_p: float) -> str | None:
    """Why flash-attn cannot run on these tensors at all (package, dtype, device, head dims), or None. Either
    layout: D is the last dim, q's dtype and device are k's and v's (checked before)."""
    if _flash_module() is None:
        return "the flash_attn package is not installed"
    return _flash_device_problem(q) or _flash_shape_problem(q, k, v, dropout_p)


def _flash_unsupported(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None,
                       key_padding_mask: Tensor | None, causal: bool, dropout_p: float = 0.0) -> str | None:
    """Why flash-attn cannot run these inputs, or None when it can."""
    problem = _flash_input_problem(q, k, v, dropout_p)
    if problem is not None:
        return problem
    if attn_mask is not None:
        return "flash_attn takes no arbitrary attn_mask (key_padding_mask is fine)"
    if causal and (q.shape[-2] != k.shape[-2] or key_padding_mask is not None):
        return "flash_attn aligns the causal mask bottom-right; Tessera's causal is top-left"
    return None


def _requested_backend(backend: str | None) -> str | None:
    name = backend if backend is not None else os.environ.get(ENV_VAR, "").strip().lower()
    if name in (None, "", "auto"):
        return None
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}: expected one of {list(BACKENDS)} or 'auto'")
    return name


def _small_unsupported(q: Tensor) -> str | None:
    """Why the "small" backend cannot run on these tensors, or None."""
    if q.device.type != "cpu":
        return f"the small backend runs on the CPU (these tensors are on {q.device})"
    if _TWICE_DIFFERENTIABLE.get():
        return "the small backend has no double backward (inside twice_differentiable())"
    return None


def _small_by_default(q: Tensor, k: Tensor, v: Tensor, dropout_p: float) -> bool:
    """Automatic choice of "small": CPU inference of short sequences in full precision (see the module docstring)."""
    return (_small_unsupported(q) is None and q.dtype in (torch.float32, torch.float64) and dropout_p == 0.0
            and k.shape[-2] <= SMALL_AUTO_MAX_KEYS and k.shape[1] == q.shape[1] and not _needs_grad(q, k, v))


def _select(requested: str | None, flash_reason: str | None, small: bool = False,
            small_reason: str | None = None) -> str:
    if _TWICE_DIFFERENTIABLE.get():
        flash_reason = flash_reason or "flash-attn has no double backward (inside twice_differentiable())"
    if requested is None:
        return "flash_attn" if flash_reason is None else "small" if small else "sdpa"
    if requested == "flash_attn" and flash_reason is not None:
        raise ValueError(f"attention backend 'flash_attn' was forced but cannot run these inputs: {flash_reason}")
    if requested == "small" and small_reason is not None:
        raise ValueError(f"attention backend 'small' was forced but cannot run these inputs: {small_reason}")
    return requested


def _choose(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, key_padding_mask: Tensor | None,
            causal: bool, dropout_p: float, backend: str | None) -> str:
    return _select(_requested_backend(backend),
                   _flash_unsupported(q, k, v, attn_mask, key_padding_mask, causal, dropout_p),
                   _small_by_default(q, k, v, dropout_p), _small_unsupported(q))


def select_backend(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, *,
                   key_padding_mask: Tensor | None = None, causal: bool = False, dropout_p: float = 0.0,
                   backend: str | None = None) -> str:
    """The backend :func:`attention` uses for these arguments (the argument, else the env var, else auto)."""
    _check_inputs(q, k, v, attn_mask, key_padding_mask, dropout_p)
    return _choose(q, k, v, attn_mask, key_padding_mask, causal, dropout_p, backend)


# ----------------------------------------------------------------------------------------------------------------
# masks


def _keep_only(mask: Tensor | None, keep: Tensor) -> Tensor:
    """``mask`` restricted to where ``keep`` (bool) is True; stays bool, or float with -inf where dropped."""
    if mask is None:
        return keep
    if mask.dtype == torch.bool:
        return mask & keep
    return torch.where(keep, mask, float("-inf"))


def _combined_mask(q: Tensor, k: Tensor, attn_mask: Tensor | None, key_padding_mask: Tensor | None,
                   causal: bool) -> Tensor | None:
    """One bool or float mask broadcastable to (B, H, Lq, Lk) from the three ways of masking."""
    mask = attn_mask
    if mask is not None and mask.is_floating_point() and mask.dtype != q.dtype:
        mask = mask.to(q.dtype)
    if key_padding_mask is not None:
        mask = _keep_only(mask, key_padding_mask[:, None, None, :])  # (B, 1, 1, Lk)
    if causal:
        lq, lk = q.shape[-2], k.shape[-2]
        mask = _keep_only(mask, torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril())  # (Lq, Lk)
    return mask


def _live_rows(mask: Tensor) -> Tensor:
    """(..., Lq, 1) bool: query rows that may attend to at least one key."""
    if mask.dtype == torch.bool:
        return mask.any(dim=-1, keepdim=True)
    return ~torch.isneginf(mask).all(dim=-1, keepdim=True)


# ----------------------------------------------------------------------------------------------------------------
# backends


def _reference(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout_p: float,
               scale: float | None) -> Tensor:
    out_dtype = q.dtype
    compute = torch.float32 if out_dtype in _HALF else out_dtype
    q, k, v = q.to(compute), k.to(compute), v.to(compute)
    if k.shape[1] != q.shape[1]:  # grouped-query attention: each key/value head serves H // Hkv query heads
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale  # (B, H, Lq, Lk)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.to(compute)
    dead = torch.isneginf(scores).all(dim=-1, keepdim=True)  # (B, H, Lq, 1): nothing to attend to (or Lk = 0)
    probs = scores.masked_fill(dead, 0.0).softmax(dim=-1).masked_fill(dead, 0.0)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    return (probs @ v).to(out_dtype)  # (B, H, Lq, Dv)


def _sdpa(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, key_padding_mask: Tensor | None,
          causal: bool, dropout_p: float, scale: float | None) -> Tensor:
    gqa = k.shape[1] != q.shape[1]
    if attn_mask is None and key_padding_mask is None:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal, scale=scale,
                                              enable_gqa=gqa)
    mask = _combined_mask(q, k, attn_mask, key_padding_mask, causal)
    assert mask is not None
    if q.device.type in _SDPA_SAFE_DEVICES:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale,
                                              enable_gqa=gqa)
    # Let dead rows attend everywhere (finite values and gradients), then zero them.
    live = _live_rows(mask)
    mask = mask | ~live if mask.dtype == torch.bool else mask.masked_fill(~live, 0.0)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale, enable_gqa=gqa)
    return out.masked_fill(~live, 0.0)


def _keep_mask(shape: torch.Size, p: float, device: torch.device) -> tuple[Tensor, float]:
    """A dropout keep-mask (bool, ``shape``) and the scale of the kept values: 16 random bits per element (four
    per 64-bit draw of torch's generator), p rounded to a multiple of 1/65536 and the kept values scaled by the
    exact 1 / (1 - p) of that p; ``bernoulli_`` where that rounding moves p by more than 0.1 % of itself."""
    levels = 1 << _MASK_BITS
    threshold = round(p * levels)
    if abs(threshold / levels - p) > 1e-3 * p or threshold >= levels:
        return torch.empty(shape, device=device).bernoulli_(1.0 - p).bool(), 1.0 / (1.0 - p)
    n = math.prod(shape)
    bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-(1 << 63), None)
    uniform = bits.view(torch.int16)[:n].view(shape)  # uniform over [-32768, 32767]
    return uniform >= threshold - levels // 2, levels / (levels - threshold)


class _SmallAttention(torch.autograd.Function):
    """softmax(Q Kᵀ · scale + mask) V for short sequences on the CPU, with its own backward (first order only).

    The heads are one batch of (B·H) matrices. The scores' rows are padded with -inf to a multiple of
    ``_SMALL_LANES`` before the softmax (which is several times faster on such rows), and sliced back. A row with
    no key to attend to gives zeros (its NaNs from the softmax are zeroed, so are its gradients).
    """

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float,
                dropout_p: float) -> Tensor:
        b, h, lq, d = q.shape
        lk, dv = k.shape[2], v.shape[3]
        q3, k3, v3 = q.reshape(b * h, lq, d), k.reshape(b * h, lk, d), v.reshape(b * h, lk, dv)
        scores = torch.bmm(q3, k3.transpose(1, 2)).mul_(scale)  # (B·H, Lq, Lk)
        if mask is not None:
            view = scores.view(b, h, lq, lk)
            if mask.dtype == torch.bool:
                view.masked_fill_(~mask, -math.inf)
            else:
                view.add_(mask)
        width = -(-lk // _SMALL_LANES) * _SMALL_LANES
        if width != lk:
            scores = F.pad(scores, (0, width - lk), value=-math.inf)
        prob = torch.softmax(scores, dim=-1)[..., :lk]  # (B·H, Lq, Lk), rows of stride `width`
        if mask is not None:
            prob = prob.nan_to_num(0.0)  # rows that attend to nothing
        keep: Tensor | None = None
        weights, kept_scale = prob, 1.0
        if dropout_p > 0.0:
            keep, kept_scale = _keep_mask(prob.shape, dropout_p, prob.device)
            weights = prob * keep.to(prob.dtype).mul_(kept_scale)
        ctx.save_for_backward(q3, k3, v3, prob, weights, keep if keep is not None else prob)
        ctx.scale, ctx.kept_scale, ctx.dropped = scale, kept_scale, keep is not None
        ctx.shapes = q.shape, k.shape, v.shape
        return torch.bmm(weights, v3).view(b, h, lq, dv)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        q3, k3, v3, prob, weights, keep = ctx.saved_tensors
        q_shape, k_shape, v_shape = ctx.shapes
        g = grad.reshape(q3.shape[0], q3.shape[1], v3.shape[2])  # (B·H, Lq, Dv)
        grad_v = torch.bmm(weights.transpose(1, 2), g) if ctx.needs_input_grad[2] else None
        grad_q = grad_k = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            grad_w = torch.bmm(g, v3.transpose(1, 2))  # (B·H, Lq, Lk)
            if ctx.dropped:
                grad_w.mul_(keep.to(grad_w.dtype)).mul_(ctx.kept_scale)
            # the softmax's backward: p * (dp - sum(dp * p)), times the scale of the scores
            grad_s = (grad_w - (grad_w * prob).sum(-1, keepdim=True)).mul_(prob).mul_(ctx.scale)
            if ctx.needs_input_grad[0]:
                grad_q = torch.bmm(grad_s, k3).view(q_shape)
            if ctx.needs_input_grad[1]:
                grad_k = torch.bmm(grad_s.transpose(1, 2), q3).view(k_shape)
        return grad_q, grad_k, None if grad_v is None else grad_v.view(v_shape), None, None, None


def _small(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout_p: float, scale: float | None) -> Tensor:
    if k.shape[1] != q.shape[1]:  # grouped-query attention: each key/value head serves H // Hkv query heads
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    if mask is not None and mask.is_floating_point() and mask.dtype != q.dtype:
        mask = mask.to(q.dtype)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    out: Tensor = _SmallAttention.apply(q, k, v, mask, scale, dropout_p)
    return out


class _FirstOrderOnly(torch.autograd.Function):
    """Identity on the inputs of a flash-attn call whose backward refuses to build a graph (create_graph=True).

    flash-attn's backward is a CUDA kernel with no derivative of its own and no ``once_differentiable``: without
    this, a double backward through it would silently leave out its second-order terms.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, q: Tensor, k: Tensor,
                v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return q.view_as(q), k.view_as(k), v.view_as(v)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx,
                 *grads: Tensor) -> tuple[Tensor, ...]:
        if torch.is_grad_enabled():  # backward runs with grad mode on only when create_graph=True
            raise RuntimeError("attention: flash-attn has no double backward (create_graph=True went through it); "
                               "run code that differentiates through a gradient inside "
                               "shared.attention.twice_differentiable()")
        return grads


def _first_order_only(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    if _needs_grad(q, k, v):
        q, k, v = _FirstOrderOnly.apply(q, k, v)
    return q, k, v


def _grid_limited(t: Tensor) -> bool:
    """True where fused kernels launch one CUDA grid per call (MAX_GRID_BATCH sequences at most)."""
    return t.is_cuda


def _batch_slices(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, key_padding_mask: Tensor | None,
                  size: int) -> Iterator[tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]]:
    """The inputs cut into batches of at most ``size`` (masks cut along B where they have it)."""
    mask4 = None if attn_mask is None else attn_mask.reshape((1,) * (4 - attn_mask.dim()) + _shape(attn_mask))
    for start in range(0, q.shape[0], size):
        part = slice(start, start + size)
        mask = None if mask4 is None else (mask4 if mask4.shape[0] == 1 else mask4[part])
        padding = None if key_padding_mask is None else key_padding_mask[part]
        yield q[part], k[part], v[part], mask, padding


def _flash(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, causal: bool, dropout_p: float,
           scale: float | None) -> Tensor:
    """flash-attn on (B, H, L, D) inputs of at most MAX_GRID_BATCH sequences, with at least one query and key."""
    fa = _flash_module()
    assert fa is not None
    deterministic = torch.are_deterministic_algorithms_enabled()
    given = q, k, v
    q, k, v = _first_order_only(q, k, v)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, L, H, D): flash-attn's layout
    if key_padding_mask is None:
        out = fa.flash_attn_func(q, k, v, dropout_p=dropout_p, softmax_scale=scale, causal=causal,
                                 deterministic=deterministic)  # (B, Lq, H, D)
        return out.transpose(1, 2)  # (B, H, Lq, D)
    # Padded keys: pack the real keys, keep every query (a cross-attention query side may have no padding).
    # pack's cu_k is contiguous int32 on the mask's device, which _check_inputs made q's.
    k_packed, cu_k, max_k = pack(k, key_padding_mask)  # (total_k, Hkv, D); max_k syncs with the GPU once
    if max_k == 0:  # no real key anywhere: flash-attn's backward would launch an empty grid; zeros it is
        return _sdpa(*given, None, key_padding_mask, False, dropout_p, scale)
    batch, lq, heads, dim = q.shape
    v_packed = v[key_padding_mask]  # (total_k, Hkv, D)
    cu_q = torch.arange(0, (batch + 1) * lq, lq, dtype=torch.int32, device=q.device)
    out = fa.flash_attn_varlen_func(q.reshape(batch * lq, heads, dim), k_packed, v_packed, cu_q, cu_k, lq, max_k,
                                    dropout_p=dropout_p, softmax_scale=scale, causal=False,
                                    deterministic=deterministic)  # (B * Lq, H, D)
    return out.view(batch, lq, heads, dim).transpose(1, 2)  # (B, H, Lq, D)


def attention(q: Tensor, k: Tensor, v: Tensor, *, attn_mask: Tensor | None = None,
              key_padding_mask: Tensor | None = None, causal: bool = False, dropout_p: float = 0.0,
              scale: float | None = None, backend: str | None = None) -> Tensor:
    """Scaled dot-product attention: q (B, H, Lq, D), k (B, H, Lk, D), v (B, H, Lk, Dv) -> (B, H, Lq, Dv).

    See the module docstring for the mask conventions and how the backend is chosen.
    """
    _check_inputs(q, k, v, attn_mask, key_padding_mask, dropout_p)
    name = _choose(q, k, v, attn_mask, key_padding_mask, causal, dropout_p, backend)
    if q.numel() == 0 or k.numel() == 0 or v.numel() == 0:  # nothing to compute: no kernel can launch on it
        return _reference(q, k, v, _combined_mask(q, k, attn_mask, key_padding_mask, causal), dropout_p, scale)
    if name != "reference" and q.shape[0] > MAX_GRID_BATCH and _grid_limited(q):
        return torch.cat([attention(*part[:3], attn_mask=part[3], key_padding_mask=part[4], causal=causal,
                                    dropout_p=dropout_p, scale=scale, backend=name)
                          for part in _batch_slices(q, k, v, attn_mask, key_padding_mask, MAX_GRID_BATCH)])
    if name == "flash_attn":
        return _flash(q, k, v, key_padding_mask, causal, dropout_p, scale)
    if name == "small":
        return _small(q, k, v, _combined_mask(q, k, attn_mask, key_padding_mask, causal), dropout_p, scale)
    if name == "sdpa":
        with _math_kernel_only() if _TWICE_DIFFERENTIABLE.get() else contextlib.nullcontext():
            return _sdpa(q, k, v, attn_mask, key_padding_mask, causal, dropout_p, scale)
    return _reference(q, k, v, _combined_mask(q, k, attn_mask, key_padding_mask, causal), dropout_p, scale)


# ----------------------------------------------------------------------------------------------------------------
# packed variable-length sequences (flash-attn's convention: int32 cu_seqlens of length B + 1)


def pack(x: Tensor, key_padding_mask: Tensor) -> tuple[Tensor, Tensor, int]:
    """Drop the padding of ``x`` (B, L, ...) with mask (B, L) (True = real): (total, ...), cu_seqlens, max_seqlen.

    Real tokens keep their order; :func:`unpack` puts them back left-aligned, so the round trip is exact for
    right-padded batches.
    """
    if key_padding_mask.dtype != torch.bool or key_padding_mask.dim() != 2:
        raise ValueError(f"pack: key_padding_mask must be 2-D bool (B, L), got {key_padding_mask.dtype} "
                         f"{_shape(key_padding_mask)}")
    if x.shape[:2] != key_padding_mask.shape:
        raise ValueError(f"pack: x {_shape(x)} and key_padding_mask {_shape(key_padding_mask)} differ in (B, L)")
    lengths = key_padding_mask.sum(dim=1, dtype=torch.int32)  # (B,)
    cu_seqlens = F.pad(torch.cumsum(lengths, dim=0, dtype=torch.int32), (1, 0))  # (B + 1,)
    max_seqlen = int(lengths.max()) if lengths.numel() else 0
    return x[key_padding_mask], cu_seqlens, max_seqlen  # (total, ...)


def _token_index(cu_seqlens: Tensor, total: int) -> tuple[Tensor, Tensor]:
    """(sequence, position) of every packed token, each (total,)."""
    cu = cu_seqlens.long()
    lengths = cu[1:] - cu[:-1]
    seq = torch.repeat_interleave(torch.arange(lengths.numel(), device=cu.device), lengths, output_size=total)
    pos = torch.arange(total, device=cu.device) - cu[:-1][seq]
    return seq, pos


def unpack(packed: Tensor, cu_seqlens: Tensor, batch: int, max_len: int) -> Tensor:
    """Inverse of :func:`pack`: (total, ...) -> (batch, max_len, ...), sequences left-aligned, zeros after."""
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() != batch + 1:
        raise ValueError(f"unpack: cu_seqlens must have length batch + 1 = {batch + 1}, got {_shape(cu_seqlens)}")
    seq, pos = _token_index(cu_seqlens, packed.shape[0])
    out = packed.new_zeros((batch, max_len, *packed.shape[1:]))  # (B, Lmax, ...)
    return out.index_put((seq, pos), packed)


def _check_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                  max_seqlen_q: int, max_seqlen_k: int, dropout_p: float) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 3:
            raise ValueError(f"varlen_attention: {name} must be 3-D (total_tokens, H, D), got shape {_shape(t)}")
    if k.shape[1] != v.shape[1] or k.shape[1] < 1 or q.shape[1] % k.shape[1]:
        raise ValueError(f"varlen_attention: k and v must have the same number of heads, and q's must be a "
                         f"multiple of it (grouped-query attention): q {q.shape[1]}, k {k.shape[1]}, v {v.shape[1]}")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"varlen_attention: q and k head dims differ: {q.shape[2]} vs {k.shape[2]}")
    if k.shape[0] != v.shape[0]:
        raise ValueError(f"varlen_attention: k and v token counts differ: {k.shape[0]} vs {v.shape[0]}")
    for name, cu, t in (("cu_seqlens_q", cu_seqlens_q, q), ("cu_seqlens_k", cu_seqlens_k, k)):
        if cu.dim() != 1 or cu.numel() < 2 or cu.is_floating_point() or cu.dtype == torch.bool:
            raise ValueError(f"varlen_attention: {name} must be a 1-D integer tensor of length B + 1, got "
                             f"{cu.dtype} {_shape(cu)}")
        if cu.device.type == "cpu" and int(cu[-1]) != t.shape[0]:  # free on CPU; a sync on GPU, so skipped
            raise ValueError(f"varlen_attention: {name}[-1] = {int(cu[-1])} but there are {t.shape[0]} tokens")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"varlen_attention: cu_seqlens_q and cu_seqlens_k describe different batch sizes "
                         f"({cu_seqlens_q.numel() - 1} vs {cu_seqlens_k.numel() - 1})")
    if max_seqlen_q < 0 or max_seqlen_k < 0:
        raise ValueError(f"varlen_attention: max_seqlen_q={max_seqlen_q}, max_seqlen_k={max_seqlen_k} must be >= 0")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"varlen_attention: dropout_p={dropout_p} must be in [0, 1)")


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                     max_seqlen_q: int, max_seqlen_k: int, *, causal: bool = False, dropout_p: float = 0.0,
                     scale: float | None = None, backend: str | None = None) -> Tensor:
    """Attention over packed sequences: q (total_q, H, D), k (total_k, Hkv, D), v (total_k, Hkv, Dv) ->
    (total_q, H, Dv), H a multiple of Hkv.

    Sequence b holds tokens ``cu_seqlens[b]:cu_seqlens[b + 1]`` and attends only within itself. flash-attn runs
    it as is; otherwise the batch is padded to (B, H, Lmax, D), run through :func:`attention` with a key-padding
    mask and re-packed (on the CPU in groups of similar length). ``causal`` is top-left per sequence, like
    :func:`attention`. ``cu_seqlens_*`` are integer tensors on any device; ``max_seqlen_*`` bound the lengths.
    """
    _check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p)
    max_seqlen_q, max_seqlen_k = int(max_seqlen_q), int(max_seqlen_k)  # flash-attn takes Python ints only
    same = cu_seqlens_q is cu_seqlens_k or torch.equal(cu_seqlens_q, cu_seqlens_k.to(cu_seqlens_q.device))
    flash_reason = _flash_input_problem(q, k, v, dropout_p)
    if flash_reason is None and causal and not same:
        flash_reason = "flash_attn aligns the causal mask bottom-right; Tessera's causal is top-left"
    name = _select(_requested_backend(backend), flash_reason)
    if q.shape[0] == 0 or k.shape[0] == 0:  # no query or no key at all: zeros, without a kernel launch
        return _padded_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q if q.shape[0] else 0,
                              max_seqlen_k if k.shape[0] else 0, causal=causal, dropout_p=dropout_p, scale=scale,
                              backend="reference")
    if name == "flash_attn":
        return _flash_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=causal,
                             dropout_p=dropout_p, scale=scale)
    if same and q.device.type == "cpu":
        groups = _length_groups(cu_seqlens_q)
        if len(groups) > 1:  # sequences of similar length together: little padding in each attention call
            return _grouped_varlen(q, k, v, cu_seqlens_q, groups, causal=causal, dropout_p=dropout_p, scale=scale,
                                   backend=name)
    return _padded_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=causal,
                          dropout_p=dropout_p, scale=scale, backend=name)


def _flash_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int,
                  max_seqlen_k: int, *, causal: bool, dropout_p: float, scale: float | None) -> Tensor:
    """flash-attn's varlen kernel: int32 contiguous cu_seqlens on q's device, MAX_GRID_BATCH sequences a launch."""
    fa = _flash_module()
    assert fa is not None
    cu_q = cu_seqlens_q.to(device=q.device, dtype=torch.int32).contiguous()
    cu_k = cu_seqlens_k.to(device=q.device, dtype=torch.int32).contiguous()
    batch = cu_q.numel() - 1
    if batch > MAX_GRID_BATCH:  # rare: the boundaries come to the host once
        bounds_q, bounds_k = cu_q.tolist(), cu_k.tolist()
        parts = []
        for s in range(0, batch, MAX_GRID_BATCH):
            e = min(s + MAX_GRID_BATCH, batch)
            rows_q, rows_k = slice(bounds_q[s], bounds_q[e]), slice(bounds_k[s], bounds_k[e])
            parts.append(varlen_attention(q[rows_q], k[rows_k], v[rows_k], cu_q[s:e + 1] - bounds_q[s],
                                          cu_k[s:e + 1] - bounds_k[s], max_seqlen_q, max_seqlen_k, causal=causal,
                                          dropout_p=dropout_p, scale=scale, backend="flash_attn"))
        return torch.cat(parts)
    q, k, v = _first_order_only(q, k, v)
    return fa.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_seqlen_q, max_seqlen_k, dropout_p=dropout_p,
                                     softmax_scale=scale, causal=causal,
                                     deterministic=torch.are_deterministic_algorithms_enabled())


# Grouping for the CPU varlen path: sequences sorted by length are cut into groups whose padded size exceeds
# their real size by at most this factor (or that are short enough for padding not to matter).
_GROUP_SLACK = 1.25
_GROUP_SHORT = 16


def _length_groups(cu_seqlens: Tensor) -> list[Tensor]:
    """Indices of the sequences in each group of similar length (self-attention over packed sequences)."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    order = torch.argsort(lengths, stable=True)
    sorted_lengths = lengths[order].tolist()
    groups: list[Tensor] = []
    start = 0
    for i in range(1, len(sorted_lengths) + 1):
        if i == len(sorted_lengths) or (sorted_lengths[i] > _GROUP_SHORT
                                        and sorted_lengths[i] > _GROUP_SLACK * max(sorted_lengths[start], 1)):
            groups.append(order[start:i])
            start = i
    return groups


def _grouped_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, groups: list[Tensor], *, causal: bool,
                    dropout_p: float, scale: float | None, backend: str) -> Tensor:
    """Self-attention of packed sequences, one padded call per group of similar lengths (CPU)."""
    cu = cu_seqlens.long()
    seq, pos = _token_index(cu_seqlens, q.shape[0])
    parts: list[Tensor] = []
    where: list[Tensor] = []
    for members in groups:
        lengths = cu[members + 1] - cu[members]
        longest = int(lengths.max())
        slot = torch.full((cu.numel() - 1,), -1, dtype=torch.long, device=q.device)
        slot[members] = torch.arange(members.numel(), device=q.device)
        tokens = torch.nonzero(slot[seq] >= 0).squeeze(1)  # (T_group,) packed indices of the group's tokens
        index = (slot[seq[tokens]], pos[tokens])
        shape = (members.numel(), longest)
        q_pad = q.new_zeros(*shape, *q.shape[1:]).index_put(index, q[tokens])  # (G, L, H, D)
        k_pad = k.new_zeros(*shape, *k.shape[1:]).index_put(index, k[tokens])
        v_pad = v.new_zeros(*shape, *v.shape[1:]).index_put(index, v[tokens])  # (G, L, H, Dv)
        real = torch.arange(longest, device=q.device)[None, :] < lengths[:, None]  # (G, L)
        mask = None if bool(real.all()) else real
        res = attention(q_pad.transpose(1, 2), k_pad.transpose(1, 2), v_pad.transpose(1, 2), key_padding_mask=mask,
                        causal=causal, dropout_p=dropout_p, scale=scale, backend=backend)  # (G, H, L, Dv)
        parts.append(res.transpose(1, 2)[index])  # (T_group, H, Dv)
        where.append(tokens)
    order = torch.cat(where)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return torch.cat(parts)[inverse]  # (total, H, Dv)


def _padded_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int,
                   max_seqlen_k: int, *, causal: bool, dropout_p: float, scale: float | None, backend: str) -> Tensor:
    """Packed attention as one padded call with a key-padding mask."""
    batch = cu_seqlens_q.numel() - 1
    seq_q, pos_q = _token_index(cu_seqlens_q, q.shape[0])
    seq_k, pos_k = _token_index(cu_seqlens_k, k.shape[0])
    q_pad = q.new_zeros(batch, max_seqlen_q, *q.shape[1:]).index_put((seq_q, pos_q), q)  # (B, Lq, H, D)
    k_pad = k.new_zeros(batch, max_seqlen_k, *k.shape[1:]).index_put((seq_k, pos_k), k)  # (B, Lk, H, D)
    v_pad = v.new_zeros(batch, max_seqlen_k, *v.shape[1:]).index_put((seq_k, pos_k), v)  # (B, Lk, H, Dv)
    real_k = torch.zeros(batch, max_seqlen_k, dtype=torch.bool, device=k.device)
    real_k = real_k.index_put((seq_k, pos_k), torch.ones_like(pos_k, dtype=torch.bool))  # (B, Lk)
    out = attention(q_pad.transpose(1, 2), k_pad.transpose(1, 2), v_pad.transpose(1, 2), key_padding_mask=real_k,
                    causal=causal, dropout_p=dropout_p, scale=scale, backend=backend)  # (B, H, Lq, Dv)
    return out.transpose(1, 2)[seq_q, pos_q]  # (total_q, H, Dv)


# ----------------------------------------------------------------------------------------------------------------
# module


class MultiHeadAttention(nn.Module):
    """Multi-head attention on :func:`attention`: self-attention when ``context`` is None, else cross-attention.

    When the keys come from ``d_model``-wide inputs (``kv_dim`` None or equal), Q, K and V share one fused
    projection, so self-attention is one matmul and cross-attention slices it; a different ``kv_dim`` makes a
    cross-attention-only module with separate Q and KV projections. ``dropout`` acts on the attention weights,
    in training mode only. ``n_kv_heads`` below ``n_heads`` (a divisor of it) gives grouped-query attention
    (1: multi-query): K and V get that many heads of the same head dim, shared by groups of query heads.
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0, bias: bool = True,
                 kv_dim: int | None = None, n_kv_heads: int | None = None) -> None:
        super().__init__()
        if d_model < 1 or n_heads < 1 or d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be a positive multiple of n_heads={n_heads}")
        if n_kv_heads is not None and (n_kv_heads < 1 or n_heads % n_kv_heads):
            raise ValueError(f"n_kv_heads={n_kv_heads} must be a positive divisor of n_heads={n_heads}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout={dropout} must be in [0, 1)")
        self.d_model, self.n_heads, self.head_dim = d_model, n_heads, d_model // n_heads
        self.n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        self.kv_width = self.n_kv_heads * self.head_dim  # of K and of V
        self.kv_dim = d_model if kv_dim is None else kv_dim
        self.dropout = dropout
        self.qkv: nn.Linear | None = None
        self.q_proj: nn.Linear | None = None
        self.kv_proj: nn.Linear | None = None
        if self.kv_dim == d_model:
            self.qkv = nn.Linear(d_model, d_model + 2 * self.kv_width, bias=bias)
        else:
            self.q_proj = nn.Linear(d_model, d_model, bias=bias)
            self.kv_proj = nn.Linear(self.kv_dim, 2 * self.kv_width, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)

    def _project(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        batch, lq, _ = x.shape
        heads, kv_heads, dim = self.n_heads, self.n_kv_heads, self.head_dim
        if context is None:
            if self.qkv is None:
                raise ValueError(f"MultiHeadAttention(kv_dim={self.kv_dim}) is cross-attention only: pass context")
            q, kv = self.qkv(x).split([self.d_model, 2 * self.kv_width], dim=-1)  # views of one matmul's output
            context_len = lq
        else:
            if self.qkv is not None:
                w_q, w_kv = self.qkv.weight.split([self.d_model, 2 * self.kv_width])
                b_q, b_kv = ((None, None) if self.qkv.bias is None
                             else self.qkv.bias.split([self.d_model, 2 * self.kv_width]))
                q, kv = F.linear(x, w_q, b_q), F.linear(context, w_kv, b_kv)
            else:
                assert self.q_proj is not None and self.kv_proj is not None
                q, kv = self.q_proj(x), self.kv_proj(context)
            context_len = context.shape[1]
        q = q.reshape(batch, lq, heads, dim).transpose(1, 2)  # (B, H, Lq, Dh)
        k, v = kv.reshape(batch, context_len, 2, kv_heads, dim).permute(2, 0, 3, 1, 4).unbind(0)  # (B, Hkv, Lk, Dh)
        return q, k, v

    def forward(self, x: Tensor, context: Tensor | None = None, *, attn_mask: Tensor | None = None,
                key_padding_mask: Tensor | None = None, causal: bool = False) -> Tensor:
        """x (B, Lq, d_model), context (B, Lk, kv_dim) or None -> (B, Lq, d_model).

        ``attn_mask`` may also be (B, Lq, Lk) (the same mask for every head); ``key_padding_mask`` is (B, Lk),
        True = real token.
        """
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"MultiHeadAttention: x must be (B, L, d_model={self.d_model}), got {_shape(x)}")
        if context is not None and (context.dim() != 3 or context.shape[-1] != self.kv_dim
                                    or context.shape[0] != x.shape[0]):
            raise ValueError(f"MultiHeadAttention: context must be (B={x.shape[0]}, Lk, kv_dim={self.kv_dim}), "
                             f"got {_shape(context)}")
        q, k, v = self._project(x, context)
        if attn_mask is not None and attn_mask.dim() == 3:
            attn_mask = attn_mask.unsqueeze(1)  # (B, 1, Lq, Lk)
        out = attention(q, k, v, attn_mask=attn_mask, key_padding_mask=key_padding_mask, causal=causal,
                        dropout_p=self.dropout if self.training else 0.0)  # (B, H, Lq, Dh)
        return self.out_proj(out.transpose(1, 2).reshape(x.shape[0], x.shape[1], self.d_model))  # (B, Lq, d_model)

    def forward_packed(self, x: Tensor, cu_seqlens: Tensor, max_seqlen: int) -> Tensor:
        """Self-attention over packed sequences: x (total, d_model), sequence b is rows
        ``cu_seqlens[b]:cu_seqlens[b + 1]`` -> (total, d_model). The same weights and result as :meth:`forward`
        on the padded batch with its key-padding mask, without computing the padding."""
        if x.dim() != 2 or x.shape[-1] != self.d_model:
            raise ValueError(f"MultiHeadAttention: packed x must be (total, d_model={self.d_model}), got {_shape(x)}")
        if self.qkv is None:
            raise ValueError(f"MultiHeadAttention(kv_dim={self.kv_dim}) is cross-attention only")
        q, kv = self.qkv(x).split([self.d_model, 2 * self.kv_width], dim=-1)
        q = q.reshape(x.shape[0], self.n_heads, self.head_dim)  # (total, H, Dh)
        k, v = kv.reshape(x.shape[0], 2, self.n_kv_heads, self.head_dim).unbind(1)  # (total, Hkv, Dh) each
        out = varlen_attention(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                               dropout_p=self.dropout if self.training else 0.0)  # (total, H, Dh)
        return self.out_proj(out.reshape(x.shape[0], self.d_model))

    def extra_repr(self) -> str:
        kv_heads = "" if self.n_kv_heads == self.n_heads else f", n_kv_heads={self.n_kv_heads}"
        return f"d_model={self.d_model}, n_heads={self.n_heads}{kv_heads}, kv_dim={self.kv_dim}, dropout={self.dropout}"
