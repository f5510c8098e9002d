"""iTransformer (Liu et al., ICLR 2024): "Inverted Transformers Are Effective for Time Series Forecasting".

The Transformer is applied on the inverted dimension: each variate's whole lookback window becomes one token
(Linear(seq_len, d_model)), so self-attention mixes variates and the feed-forward network learns the temporal
representation of each one. Calendar features (``x_mark``) join as extra tokens that the variates can attend
to; only the variate tokens are projected to the horizon (Linear(d_model, pred_len)). Per-instance
normalization (mean/std over time of each variate, undone at the output) handles non-stationary levels.

Built from :mod:`shared.layers`; the published model uses post-norm layers (``norm_first=False``), the default.

Three savings over the plain composition of those layers (:meth:`ITransformer.forward_plain`, kept as the
ground truth of the tests), measured by ``python -m pipelines.benchmarks.peers``; the parameters and the
state_dict are the same:
- fp32 Linear layers on CPU run their forward and both backward matmuls each on the faster of oneDNN and MKL
  for its shape on this machine, timed once per shape (:func:`linear`): on some of the project's AMD EPYC
  machines MKL's sgemm, behind ``F.linear``, reaches about half of oneDNN's throughput, on others MKL is up to
  1.6x ahead. The same products, summed in another order (differences of float rounding, ~1e-6 relative);
- the calendar tokens only serve as keys and values: in the last layer only the variate tokens are queried,
  and that layer's output projection, feed-forward block and norms, the final norm and the head run on the
  variate rows alone (the ETTh1 setting has 7 variate and 4 calendar tokens). The forecast is the same
  function (eval outputs and gradients agree to float rounding);
- on CPU, attention runs on :mod:`shared.attention`'s "small" backend (batched matmuls, a softmax over rows
  padded to 16 lanes, cheap dropout masks, its own backward) wherever
  ``python -m pipelines.benchmarks.attention_small`` measured it ahead of SDPA: up to 16 keys, and in training
  with dropout up to ``SMALL_TRAIN_MAX_KEYS``. The same function; with dropout, other random draws;
- on CPU, dropout masks are drawn 16 random bits per element from torch's generator (four elements per
  64-bit draw, :func:`fast_dropout`) instead of ``bernoulli_``, which costs as much as a d_model x d_model
  matmul per mask here. The drop probability is rounded to a multiple of 1/65536 (0.1 -> 0.100006) and the
  kept values are scaled by the exact 1 / (1 - p) of that probability, so the expectation is unchanged; the
  masks are other random draws than ``nn.Dropout``'s. The attention-weight dropout stays in
  :func:`shared.attention.attention`.
:func:`linear` and :func:`fast_dropout` also serve :mod:`services.forecasting.model_autoformer`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from services.forecasting.config import ForecastingConfig
from shared.attention import ENV_VAR as ATTENTION_BACKEND_VAR
from shared.attention import SMALL_AUTO_MAX_KEYS, MultiHeadAttention, attention
from shared.layers import Encoder, EncoderLayer, FeedForward

_MASK_BITS = 16  # random bits per dropout-mask element
_MASK_LEVELS = 1 << _MASK_BITS
# Training with attention dropout on CPU takes shared.attention's "small" backend up to this many tokens (it
# measured 0.6-0.9x SDPA's time up to 256 keys, pipelines/benchmarks/attention_small.py).
SMALL_TRAIN_MAX_KEYS = 256


def attention_backend(q: Tensor, n_keys: int, dropout_p: float) -> str | None:
    """The attention backend this model asks for: "small" for fp32 CPU tensors with at most 16 keys, or in
    training with dropout at most ``SMALL_TRAIN_MAX_KEYS``; None (automatic) otherwise, and whenever
    ``TESSERA_ATTENTION_BACKEND`` names a backend."""
    forced = os.environ.get(ATTENTION_BACKEND_VAR, "").strip().lower() not in ("", "auto")
    if forced or q.device.type != "cpu" or q.dtype != torch.float32:
        return None
    if n_keys <= SMALL_AUTO_MAX_KEYS or (dropout_p > 0.0 and n_keys <= SMALL_TRAIN_MAX_KEYS):
        return "small"
    return None


def fast_dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Inverted dropout as ``F.dropout(x, p, training)``, with a cheaper mask on CPU (see the module docstring).

    Falls back to ``F.dropout`` off CPU (CUDA's fused kernel is fast) and for a ``p`` that 16 bits round by more
    than 0.1 % of itself (p < 0.0076 or so).
    """
    if not training or p == 0.0:
        return x
    threshold = round(p * _MASK_LEVELS)
    if x.device.type != "cpu" or abs(threshold / _MASK_LEVELS - p) > 1e-3 * p or threshold >= _MASK_LEVELS:
        return F.dropout(x, p, training)
    n = x.numel()
    bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(1 << 63), None)  # every 64-bit pattern
    uniform = bits.view(torch.int16)[:n].view(x.shape)  # uniform over [-32768, 32767]
    keep = uniform >= threshold - _MASK_LEVELS // 2  # P(drop) = threshold / 65536
    return x * keep.to(x.dtype).mul_(_MASK_LEVELS / (_MASK_LEVELS - threshold))


def _onednn_linear_op() -> Callable[..., Tensor] | None:
    """oneDNN's fp32 matmul (``torch.ops.mkldnn._linear_pointwise``, what inductor lowers Linear to on CPU), or
    None where this torch build has none."""
    if not torch.backends.mkldnn.is_available():
        return None
    return getattr(torch.ops.mkldnn, "_linear_pointwise", None)


_ONEDNN_LINEAR = _onednn_linear_op()
# Which library runs an fp32 CPU product: "auto" (the default) times both once per shape and keeps the faster,
# "onednn" or "mkl" (torch's own ``F.linear`` / ``torch.mm``, MKL's sgemm on x86) forces one.
MATMUL_ENV_VAR = "TESSERA_CPU_MATMUL"
_MATMUL_CHOICES = ("auto", "onednn", "mkl")
# a product's shape key (_shape_key) -> True where oneDNN measured faster
_ONEDNN_FASTER: dict[tuple[Any, ...], bool] = {}


def _mkl_matmul(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """x (M, K) @ weight (N, K)ᵀ + bias through torch's own product (MKL's sgemm on x86)."""
    return F.linear(x, weight, bias)


def _onednn_matmul(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """x (M, K) @ weight (N, K)ᵀ + bias on oneDNN; either operand may be a strided view."""
    assert _ONEDNN_LINEAR is not None
    return _ONEDNN_LINEAR(x, weight, bias, "none", [], "")


def _min_time(fn: Callable[[], Tensor], repeats: int = 3) -> float:
    fn()  # warm: oneDNN builds its primitive, MKL its buffers
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _matmul_setting() -> str:
    """``TESSERA_CPU_MATMUL``: auto (the default), onednn or mkl; anything else is an error naming it."""
    choice = os.environ.get(MATMUL_ENV_VAR, "auto").strip().lower() or "auto"
    if choice not in _MATMUL_CHOICES:
        raise ValueError(f"{MATMUL_ENV_VAR}={choice!r}: expected one of {', '.join(_MATMUL_CHOICES)}")
    return choice


def _shape_key(x: Tensor, weight: Tensor, bias: Tensor | None) -> tuple[Any, ...]:
    """What a product's speed is remembered by: M rounded up to a power of two, K, N, whether each operand is
    contiguous, the bias, the threads."""
    rows = 1 << max(x.shape[0] - 1, 0).bit_length()
    return (rows, x.shape[1], weight.shape[0], x.is_contiguous(), weight.is_contiguous(), bias is not None,
            torch.get_num_threads())


def _prefers_onednn(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    """Whether oneDNN runs this product faster than MKL here: timed once per shape and layout (M rounded up to a
    power of two; a few calls of each, a few ms in all), then remembered for the process.

    Which library wins depends on the CPU: on the project's AMD EPYC family 26 machines (AVX-512) oneDNN ran
    the fp32 products at about twice MKL's rate, on family 25 model 17 (AVX-512) at about the same, on family
    25 model 1 (AVX2 only) MKL ran iTransformer's products 1.1-1.6x faster (``python -m
    pipelines.benchmarks.peers`` prints how many shapes went to each)."""
    choice = _matmul_setting()
    if choice != "auto":
        return choice == "onednn"
    key = _shape_key(x, weight, bias)
    faster = _ONEDNN_FASTER.get(key)
    if faster is None:
        with torch.no_grad():
            onednn = _min_time(lambda: _onednn_matmul(x, weight, bias))
            mkl = _min_time(lambda: _mkl_matmul(x, weight, bias))
        faster = _ONEDNN_FASTER[key] = onednn < mkl
    return faster


# forward key -> True where MKL measured faster for the forward and both backward products of that Linear
_ALL_MKL: dict[tuple[Any, ...], bool] = {}


def _all_on_mkl(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    """Whether the forward and both backward products of this Linear (x (M, K), weight (N, K)) all run on MKL:
    then ``F.linear`` with torch's own autograd does the same work without a Python backward. Timed with a
    stand-in gradient the first time a shape comes (:func:`_prefers_onednn` remembers each product)."""
    choice = _matmul_setting()
    if choice != "auto":
        return choice == "mkl"
    key = _shape_key(x, weight, bias)
    all_mkl = _ALL_MKL.get(key)
    if all_mkl is None:
        with torch.no_grad():
            x_, w_ = x.detach(), weight.detach()
            grad = torch.ones(x.shape[0], weight.shape[0])  # values do not change a product's time; no RNG draw
            all_mkl = _ALL_MKL[key] = not (_prefers_onednn(x_, w_, None if bias is None else bias.detach())
                                           or _prefers_onednn(grad, w_.t(), None)
                                           or _prefers_onednn(grad.t(), x_.t(), None))
    return all_mkl


def matmul_choices() -> dict[str, int]:
    """How many of the products timed so far in this process run on each library."""
    onednn = sum(_ONEDNN_FASTER.values())
    return {"onednn": onednn, "mkl": len(_ONEDNN_FASTER) - onednn}


def _cpu_matmul(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """x (M, K) @ weight (N, K)ᵀ + bias, fp32 on CPU, on whichever library is faster for it here."""
    if _prefers_onednn(x, weight, bias):
        return _onednn_matmul(x, weight, bias)
    return _mkl_matmul(x, weight, bias)


class _CPULinear(torch.autograd.Function):
    """``F.linear`` with the forward and both backward matmuls each on the faster of oneDNN and MKL (fp32)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _cpu_matmul(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _cpu_matmul(grad, weight.t(), None)  # (M, K)
        if ctx.needs_input_grad[1]:
            grad_w = _cpu_matmul(grad.t(), x.t(), None)  # (N, K)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum(dim=0)
        return grad_x, grad_w, grad_b


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)``; fp32 on CPU runs its forward and backward matmuls each on the faster of
    oneDNN and MKL for its shape on this machine (see :func:`_prefers_onednn`; ``TESSERA_CPU_MATMUL`` forces
    one). Elsewhere (CUDA, bf16 autocast, reduced dtypes, torch builds without oneDNN,
    ``torch.backends.mkldnn.enabled = False``) this is ``F.linear``.
    """
    if (_ONEDNN_LINEAR is None or x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != x.dtype
            or x.numel() == 0 or not torch.backends.mkldnn.enabled or torch.is_autocast_enabled("cpu")):
        return F.linear(x, weight, bias)
    flat = x.reshape(-1, x.shape[-1])  # (M, K)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        if _all_on_mkl(flat, weight, bias):
            return F.linear(x, weight, bias)
        out = _CPULinear.apply(flat, weight, bias)
    else:
        out = _cpu_matmul(flat, weight, bias)
    return out.view(*x.shape[:-1], weight.shape[0])


def _linear_module(module: nn.Linear, x: Tensor) -> Tensor:
    return linear(x, module.weight, module.bias)


def _self_attention(attn: MultiHeadAttention, x: Tensor, n_queries: int | None, training: bool) -> Tensor:
    """``MultiHeadAttention.forward(x)`` (its fused QKV weights, :func:`shared.attention.attention`) with the
    projections on :func:`linear`; with ``n_queries`` only ``x[:, :n_queries]`` is queried -> (B, n_queries, D)."""
    batch, length, d_model = x.shape
    heads, head_dim = attn.n_heads, attn.head_dim
    assert attn.qkv is not None
    if n_queries is None:
        n_queries = length
        qkv = _linear_module(attn.qkv, x).view(batch, length, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, H, L, Dh) each
    else:
        w_q, w_kv = attn.qkv.weight.split([d_model, 2 * d_model])
        b_q, b_kv = (None, None) if attn.qkv.bias is None else attn.qkv.bias.split([d_model, 2 * d_model])
        q = linear(x[:, :n_queries], w_q, b_q).view(batch, n_queries, heads, head_dim).transpose(1, 2)
        k, v = linear(x, w_kv, b_kv).view(batch, length, 2, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    p = attn.dropout if training else 0.0
    out = attention(q, k, v, dropout_p=p, backend=attention_backend(q, length, p))  # (B, H, n_queries, Dh)
    return _linear_module(attn.out_proj, out.transpose(1, 2).reshape(batch, n_queries, d_model))


def _feed_forward(ff: FeedForward, x: Tensor, training: bool) -> Tensor:
    """``FeedForward.forward`` with :func:`fast_dropout`."""
    h = _linear_module(ff.w_in, x)
    if ff.glu:
        value, gate = h.chunk(2, dim=-1)
        h = value * ff.act(gate)
    else:
        h = ff.act(h)
    return _linear_module(ff.w_out, fast_dropout(h, ff.dropout.p, training))


def _encoder_layer(layer: EncoderLayer, x: Tensor, n_queries: int | None, training: bool) -> Tensor:
    """``EncoderLayer.forward`` (pre- or post-norm) with :func:`fast_dropout`; with ``n_queries`` only the first
    ``n_queries`` tokens are queried (all tokens are keys and values) and only their rows are returned."""
    p = layer.dropout.p
    rows = x if n_queries is None else x[:, :n_queries]
    if layer.norm_first:
        x = rows + fast_dropout(_self_attention(layer.attn, layer.norm1(x), n_queries, training), p, training)
        return x + fast_dropout(_feed_forward(layer.ff, layer.norm2(x), training), p, training)
    x = layer.norm1(rows + fast_dropout(_self_attention(layer.attn, x, n_queries, training), p, training))
    return layer.norm2(x + fast_dropout(_feed_forward(layer.ff, x, training), p, training))


class ITransformer(nn.Module):
    """iTransformer: x (B, seq_len, n_vars) [+ x_mark (B, seq_len, n_marks)] -> (B, pred_len, n_vars)."""

    def __init__(self, cfg: ForecastingConfig, n_vars: int, n_marks: int, *, norm_first: bool = False) -> None:
        super().__init__()
        if n_vars < 1 or n_marks < 0:
            raise ValueError(f"n_vars={n_vars} must be >= 1 and n_marks={n_marks} >= 0")
        self.seq_len, self.pred_len = cfg.seq_len, cfg.pred_len
        self.n_vars, self.n_marks = n_vars, n_marks
        self.use_norm = cfg.use_norm
        self.embed = nn.Linear(cfg.seq_len, cfg.d_model)  # a variate's whole lookback -> one token
        self.embed_dropout = nn.Dropout(cfg.dropout)
        layers = [
            EncoderLayer(cfg.d_model, cfg.n_heads, cfg.d_ff, dropout=cfg.dropout, activation=cfg.activation,
                         norm_first=norm_first)
            for _ in range(cfg.e_layers)
        ]
        self.encoder = Encoder(layers, nn.LayerNorm(cfg.d_model))
        self.head = nn.Linear(cfg.d_model, cfg.pred_len)

    def _check(self, x: Tensor, x_mark: Tensor | None) -> None:
        if x.dim() != 3 or x.shape[1:] != (self.seq_len, self.n_vars):
            raise ValueError(f"x must be (B, seq_len={self.seq_len}, n_vars={self.n_vars}), got {tuple(x.shape)}")
        if x_mark is not None and self.n_marks > 0 and x_mark.shape != (x.shape[0], self.seq_len, self.n_marks):
            raise ValueError(f"x_mark must be (B={x.shape[0]}, seq_len={self.seq_len}, n_marks={self.n_marks}), "
                             f"got {tuple(x_mark.shape)}")

    def _normalize(self, x: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None]:
        if not self.use_norm:
            return x, None, None
        mean = x.mean(dim=1, keepdim=True).detach()  # (B, 1, N)
        x = x - mean
        std = torch.sqrt(torch.var(x, dim=1, keepdim=True, unbiased=False) + 1e-5)  # (B, 1, N)
        return x / std, mean, std

    def _tokens(self, x: Tensor, x_mark: Tensor | None) -> Tensor:
        tokens = x.transpose(1, 2)  # (B, N, L)
        if x_mark is not None and self.n_marks > 0:
            tokens = torch.cat([tokens, x_mark.to(x.dtype).transpose(1, 2)], dim=1)  # (B, N + F, L)
        return tokens

    def forward(self, x: Tensor, x_mark: Tensor | None = None, y_mark: Tensor | None = None) -> Tensor:
        """Forecast ``pred_len`` steps of every variate; ``y_mark`` (future calendar features) is unused."""
        self._check(x, x_mark)
        x, mean, std = self._normalize(x)
        tokens = self._tokens(x, x_mark)  # (B, N + F, L)
        h = fast_dropout(_linear_module(self.embed, tokens), self.embed_dropout.p, self.training)  # (B, N + F, d_model)
        layers = self.encoder.layers
        marks = tokens.shape[1] > self.n_vars  # calendar tokens are keys and values, never forecast
        for i, layer in enumerate(layers):
            last = marks and i == len(layers) - 1
            h = _encoder_layer(layer, h, self.n_vars if last else None, self.training)  # type: ignore[arg-type]
        h = h[:, : self.n_vars]  # (B, N, d_model); a no-op after a pruned last layer
        if self.encoder.norm is not None:
            h = self.encoder.norm(h)
        out = _linear_module(self.head, h).transpose(1, 2)  # (B, pred_len, N)
        if std is not None and mean is not None:
            out = out * std + mean
        return out

    def forward_plain(self, x: Tensor, x_mark: Tensor | None = None, y_mark: Tensor | None = None) -> Tensor:
        """The same model as the plain composition of :mod:`shared.layers` modules (every token through every
        layer, ``nn.Dropout``): the ground truth that :meth:`forward` is tested against."""
        self._check(x, x_mark)
        x, mean, std = self._normalize(x)
        h = self.embed_dropout(self.embed(self._tokens(x, x_mark)))  # (B, N + F, d_model)
        h = self.encoder(h)  # (B, N + F, d_model)
        out = self.head(h)[:, : self.n_vars].transpose(1, 2)  # (B, pred_len, N)
        if std is not None and mean is not None:
            out = out * std + mean
        return out
