"""Reusable transformer blocks built on :mod:`shared.attention`.

``FeedForward`` (optionally gated: GEGLU / SwiGLU, Shazeer 2020), ``EncoderLayer`` (pre-norm by default;
``norm_first=False`` is the post-norm layer of the original Transformer and of iTransformer), ``Encoder`` (a
stack plus an optional final norm), ``SinusoidalPositionalEncoding`` (Vaswani et al. 2017) and ``RMSNorm``.
All attention goes through :class:`shared.attention.MultiHeadAttention`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shared.attention import MultiHeadAttention

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu, "swish": F.silu}


def _activation(name: str) -> Callable[[Tensor], Tensor]:
    if name not in ACTIVATIONS:
        raise ValueError(f"activation={name!r}: expected one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019): x / rms(x) * weight, no centring and no bias."""

    def __init__(self, d_model: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d_model))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (self.weight.shape[0],), self.weight, self.eps)


def make_norm(kind: Literal["layer", "rms"], d_model: int) -> nn.Module:
    """``LayerNorm`` or ``RMSNorm`` over the last dimension."""
    if kind == "layer":
        return nn.LayerNorm(d_model)
    if kind == "rms":
        return RMSNorm(d_model)
    raise ValueError(f"norm={kind!r}: expected 'layer' or 'rms'")


class FeedForward(nn.Module):
    """Position-wise MLP: Linear -> activation -> dropout -> Linear; ``glu`` gates it (act(x W) * (x V)).

    With ``glu`` the input projection is one fused Linear(d_model, 2 * d_ff) split into value and gate, so
    ``activation="gelu"`` gives GEGLU and ``"silu"`` SwiGLU.
    """

    def __init__(self, d_model: int, d_ff: int, dropout: float = 0.0, activation: str = "gelu",
                 glu: bool = False) -> None:
        super().__init__()
        self.act = _activation(activation)
        self.glu = glu
        self.w_in = nn.Linear(d_model, 2 * d_ff if glu else d_ff)
        self.w_out = nn.Linear(d_ff, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        h = self.w_in(x)  # (..., d_ff) or (..., 2 * d_ff)
        if self.glu:
            value, gate = h.chunk(2, dim=-1)
            h = value * self.act(gate)  # (..., d_ff)
        else:
            h = self.act(h)
        return self.w_out(self.dropout(h))  # (..., d_model)


class EncoderLayer(nn.Module):
    """Self-attention and feed-forward sublayers with residuals and dropout.

    Pre-norm (``norm_first=True``, default): x + drop(f(norm(x))), stable for deep stacks. Post-norm:
    norm(x + drop(f(x))), the original Transformer's and iTransformer's layer.
    """

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float = 0.0, activation: str = "gelu",
                 norm_first: bool = True, glu: bool = False, norm: Literal["layer", "rms"] = "layer") -> None:
        super().__init__()
        self.norm_first = norm_first
        self.attn = MultiHeadAttention(d_model, n_heads, dropout=dropout)
        self.ff = FeedForward(d_model, d_ff, dropout=dropout, activation=activation, glu=glu)
        self.norm1 = make_norm(norm, d_model)
        self.norm2 = make_norm(norm, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, *, key_padding_mask: Tensor | None = None, attn_mask: Tensor | None = None,
                causal: bool = False) -> Tensor:
        """x (B, L, d_model) -> (B, L, d_model); masks as in :class:`MultiHeadAttention`."""
        masks = {"key_padding_mask": key_padding_mask, "attn_mask": attn_mask, "causal": causal}
        if self.norm_first:
            x = x + self.dropout(self.attn(self.norm1(x), **masks))
            return x + self.dropout(self.ff(self.norm2(x)))
        x = self.norm1(x + self.dropout(self.attn(x, **masks)))
        return self.norm2(x + self.dropout(self.ff(x)))

    def forward_packed(self, x: Tensor, cu_seqlens: Tensor, max_seqlen: int) -> Tensor:
        """Packed sequences x (total, d_model) (see ``MultiHeadAttention.forward_packed``) -> (total, d_model)."""
        if self.norm_first:
            x = x + self.dropout(self.attn.forward_packed(self.norm1(x), cu_seqlens, max_seqlen))
            return x + self.dropout(self.ff(self.norm2(x)))
        x = self.norm1(x + self.dropout(self.attn.forward_packed(x, cu_seqlens, max_seqlen)))
        return self.norm2(x + self.dropout(self.ff(x)))


class Encoder(nn.Module):
    """A stack of encoder layers followed by an optional final norm (needed after pre-norm layers)."""

    def __init__(self, layers: Iterable[nn.Module], norm: nn.Module | None = None) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = norm

    def forward(self, x: Tensor, *, key_padding_mask: Tensor | None = None, attn_mask: Tensor | None = None,
                causal: bool = False) -> Tensor:
        """x (B, L, d_model) -> (B, L, d_model)."""
        for layer in self.layers:
            x = layer(x, key_padding_mask=key_padding_mask, attn_mask=attn_mask, causal=causal)
        return x if self.norm is None else self.norm(x)

    def forward_packed(self, x: Tensor, cu_seqlens: Tensor, max_seqlen: int) -> Tensor:
        """Packed sequences x (total, d_model) -> (total, d_model): no compute spent on padding."""
        for layer in self.layers:
            x = layer.forward_packed(x, cu_seqlens, max_seqlen)  # type: ignore[operator]
        return x if self.norm is None else self.norm(x)


class SinusoidalPositionalEncoding(nn.Module):
    """Adds the fixed sin/cos position code of Vaswani et al. (2017) to x (B, L, d_model), from ``offset`` on."""

    pe: Tensor  # (max_len, d_model) buffer

    def __init__(self, d_model: int, max_len: int = 5000) -> None:
        super().__init__()
        position = torch.arange(max_len, dtype=torch.float32).unsqueeze(1)  # (max_len, 1)
        freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
        pe = torch.zeros(max_len, d_model)
        pe[:, 0::2] = torch.sin(position * freq)
        pe[:, 1::2] = torch.cos(position * freq[: d_model // 2])  # odd d_model: one cosine fewer
        self.register_buffer("pe", pe, persistent=False)  # (max_len, d_model); rebuilt, not saved
        self.max_len = max_len

    def forward(self, x: Tensor, offset: int = 0) -> Tensor:
        length = x.shape[-2]
        if offset + length > self.max_len:
            raise ValueError(f"positions up to {offset + length} exceed max_len={self.max_len}")
        return x + self.pe[offset:offset + length].to(x.dtype)  # (B, L, d_model)


def unwrap(model: nn.Module) -> nn.Module:
    """The bare module under DDP / torch.compile wrappers (here, not in :mod:`shared.tracking`, so that a model
    process rolls a model out without importing MLflow)."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner
