"""A CPU stand-in for the ``flash_attn`` 2.8 package that enforces its input rules and computes with the reference.

The rules are those ``csrc/flash_attn/flash_api.cpp`` (``mha_fwd``, ``mha_varlen_fwd`` and their backwards) and
``flash_attn_interface.py`` apply, so that a call ``shared.attention`` makes here would also be accepted by the
real kernels:

* q, k, v fp16/bf16 of one dtype; (B, L, H, D) for ``flash_attn_func``, (total, H, D) for the varlen function;
* one head dim for q, k and v, at most 256 once padded to a multiple of 8; H a multiple of k's and v's heads;
* at least one and at most 65,535 sequences (``MAX_GRID_BATCH``: the CUDA grid's y dimension), at least one
  query position (an empty grid does not launch), at least one key position for the backward (its grid runs
  over key blocks);
* ``cu_seqlens_*``: int32, contiguous, on q's device, B + 1 entries ending at the token count; ``max_seqlen_*``:
  Python ints;
* the results keep flash-attn's conventions: bottom-right aligned causal masks, zeros for queries with no key.

Every call is logged with what the tests check: the function, the batch size, ``dropout_p`` and
``deterministic``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

import shared.attention as attn_mod
from shared.attention import attention

_HALF = (torch.float16, torch.bfloat16)


class FlashRuleError(RuntimeError):
    """What the real package raises (a c10::Error from TORCH_CHECK), for a broken input rule."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise FlashRuleError(message)


def _check_qkv(q: Tensor, k: Tensor, v: Tensor, dims: int) -> None:
    for t in (q, k, v):
        _require(t.dim() == dims, f"expected {dims}-D inputs, got {tuple(t.shape)}")
    _require(q.dtype in _HALF, "FlashAttention only support fp16 and bf16 data type")
    _require(k.dtype == q.dtype and v.dtype == q.dtype, "query, key and value must have the same dtype")
    _require(q.device == k.device == v.device, "q, k, v must be on one CUDA device")
    head = q.shape[-1]
    _require(k.shape[-1] == head and v.shape[-1] == head, "q, k, v must have one head size")
    _require(-(-head // 8) * 8 <= 256, "FlashAttention forward only supports head dimension at most 256")
    heads, heads_k = q.shape[-2], k.shape[-2]
    _require(v.shape[-2] == heads_k, "key and value must have the same number of heads")
    _require(heads_k > 0 and heads % heads_k == 0,
             "Number of heads in key/value must divide number of heads in query")


def _check_batch(batch: int) -> None:
    _require(batch > 0, "batch size must be positive")
    _require(batch <= attn_mod.MAX_GRID_BATCH, f"{batch} sequences exceed the grid's y limit: the launch fails")


def _check_cu(name: str, cu: Tensor, q: Tensor, tokens: int) -> None:
    _require(cu.dtype == torch.int32, f"{name} must have dtype int32")
    _require(cu.device == q.device, f"{name} must be on CUDA (q's device)")
    _require(cu.is_contiguous(), f"{name} must be contiguous")
    _require(cu.dim() == 1 and int(cu[0]) == 0 and int(cu[-1]) == tokens,
             f"{name} must run from 0 to the token count {tokens}")


def _fail_in_backward(out: Tensor, message: str) -> Tensor:
    """``out``, whose backward raises as the real kernel launch would."""
    if out.requires_grad:
        def refuse(grad: Tensor) -> Tensor:
            raise FlashRuleError(message)

        out.register_hook(refuse)
    return out


def _one(q: Tensor, k: Tensor, v: Tensor, scale: float | None, causal: bool, dropout_p: float) -> Tensor:
    """(B, L, H, D) inputs -> (B, Lq, H, D), causal aligned bottom-right as flash-attn does."""
    lq, lk = q.shape[1], k.shape[1]
    mask = torch.ones(lq, lk, dtype=torch.bool).tril(diagonal=lk - lq) if causal else None
    out = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale,
                    dropout_p=dropout_p, backend="reference")
    return out.transpose(1, 2)


@dataclass
class FlashDouble:
    """``flash_attn_func`` and ``flash_attn_varlen_func`` with flash-attn 2.8's signatures and rules."""

    calls: list[dict[str, Any]] = field(default_factory=list)

    def names(self) -> list[str]:
        return [call["name"] for call in self.calls]

    def flash_attn_func(self, q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0,
                        softmax_scale: float | None = None, causal: bool = False, deterministic: bool = False,
                        **unused: Any) -> Tensor:
        _check_qkv(q, k, v, dims=4)
        _require(k.shape[0] == q.shape[0] and v.shape[:2] == k.shape[:2], "k and v must match q's batch")
        _check_batch(q.shape[0])
        _require(q.shape[1] > 0 and k.shape[1] > 0, "an empty sequence makes an empty grid: the launch fails")
        self.calls.append({"name": "flash_attn_func", "batch": q.shape[0], "dropout_p": dropout_p,
                           "deterministic": deterministic})
        return _one(q, k, v, softmax_scale, causal, dropout_p)

    def flash_attn_varlen_func(self, q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor,
                               cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int, dropout_p: float = 0.0,
                               softmax_scale: float | None = None, causal: bool = False,
                               deterministic: bool = False, **unused: Any) -> Tensor:
        _check_qkv(q, k, v, dims=3)
        _require(k.shape[0] == v.shape[0], "k and v must have the same number of tokens")
        for name, value in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
            _require(type(value) is int, f"{name} must be a Python int, got {type(value).__name__}")
        _check_cu("cu_seqlens_q", cu_seqlens_q, q, q.shape[0])
        _check_cu("cu_seqlens_k", cu_seqlens_k, q, k.shape[0])
        _require(cu_seqlens_k.numel() == cu_seqlens_q.numel(), "cu_seqlens_k must have shape (batch_size + 1)")
        batch = cu_seqlens_q.numel() - 1
        _check_batch(batch)
        lengths_q = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).tolist()
        lengths_k = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).tolist()
        _require(max(lengths_q) <= max_seqlen_q and max(lengths_k) <= max_seqlen_k,
                 "max_seqlen_* must bound the sequence lengths")
        _require(max_seqlen_q > 0, "no query position: an empty grid, the launch fails")
        self.calls.append({"name": "flash_attn_varlen_func", "batch": batch, "dropout_p": dropout_p,
                           "deterministic": deterministic})
        parts = []
        starts_q, starts_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        for i in range(batch):
            rows_q, rows_k = slice(starts_q[i], starts_q[i + 1]), slice(starts_k[i], starts_k[i + 1])
            if lengths_q[i] == 0:
                continue
            if lengths_k[i] == 0:  # the kernel writes zeros for a query block with no key block
                parts.append(q[rows_q].new_zeros(lengths_q[i], q.shape[1], v.shape[2]) + 0 * q[rows_q])
                continue
            parts.append(_one(q[rows_q][None], k[rows_k][None], v[rows_k][None], softmax_scale, causal,
                              dropout_p)[0])
        out = torch.cat(parts) if parts else q.new_zeros(0, q.shape[1], v.shape[2])
        if max_seqlen_k == 0:
            out = _fail_in_backward(out, "no key position: the backward's grid is empty, the launch fails")
        return out
