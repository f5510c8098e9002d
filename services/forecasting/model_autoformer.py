"""Autoformer: decomposition Transformer with Auto-Correlation (Wu et al., NeurIPS 2021).

Paper: "Autoformer: Decomposition Transformers with Auto-Correlation for Long-Term Series Forecasting".

The idea: every block splits its input into a smooth trend (a moving average) and a seasonal remainder, and
only the seasonal part goes on through the layers; the decoder accumulates the trend separately. Instead of
point-wise self-attention, Auto-Correlation finds the ``top_k = int(factor * ln L)`` most correlated lags of
the series (the circular cross-correlation of queries and keys, computed with the FFT) and mixes whole
sub-series: the values rolled by each lag, weighted by the softmax of their correlations.

Implementation notes (same mathematics as the reference, fewer passes over memory):
- the correlation is only needed as its mean over heads and channels, and ``irfft`` is linear, so the
  channels are summed in the frequency domain and one small ``irfft`` of shape ``(B, L)`` is taken;
- the time-delay aggregation ``sum_i w_i * roll(V, -d_i)`` is a circular correlation of V with a sparse
  kernel that holds ``w_i`` at lag ``d_i``; it is computed with one FFT over V instead of k rolled copies,
  for the batch-shared delays of training and the per-sample delays of inference alike;
- tensors stay in the ``(B, L, D)`` layout of the projections (heads are a view of D, the delays are shared
  by all heads and channels): the 1x1 convolutions of the feed-forward block are ``nn.Linear``, the
  kernel-3 circular convolutions are one matmul plus two rolls, the moving average pools channels-last;
- the query/key/value projections are one stacked Linear (one GEMM for self-correlation);
- every matmul (projections, feed-forward, the circular convolutions' taps) goes through
  :func:`services.forecasting.model_itransformer.linear`, oneDNN for fp32 on CPU (about twice MKL's sgemm
  throughput on the project's AMD EPYC machines), and dropout draws its masks with ``fast_dropout`` (16
  random bits per element instead of ``bernoulli_``; p rounded to a multiple of 1/65536).
Parameter shapes and initialisation follow the reference; the tests compare the outputs with a
reference-style core.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from services.forecasting.config import ForecastingConfig
from services.forecasting.model_itransformer import fast_dropout, linear


def _drop(dropout: nn.Dropout, x: Tensor) -> Tensor:
    """``dropout(x)`` with :func:`~services.forecasting.model_itransformer.fast_dropout`'s cheaper CPU mask."""
    return fast_dropout(x, dropout.p, dropout.training)


def moving_average(x: Tensor, kernel_size: int) -> Tensor:
    """Moving average over time of ``x`` (B, L, C), centred for an odd ``kernel_size``; an even kernel reaches
    one step further back than ahead (k/2 before, k/2 - 1 after, as in the FEDformer benchmark code). The edges
    repeat the first/last value."""
    ahead = (kernel_size - 1) // 2
    behind = kernel_size - 1 - ahead
    first, last = x[:, :1].expand(-1, behind, -1), x[:, -1:].expand(-1, ahead, -1)
    padded = torch.cat([first, x, last], dim=1)  # (B, L + k - 1, C)
    # Seen as (B, C, 1, L + k - 1) the (B, L, C) memory is channels-last, which avg_pool2d reads and writes in
    # place: no transposed copies forward or backward.
    trend = F.avg_pool2d(padded.transpose(1, 2).unsqueeze(2), (1, kernel_size), stride=1)  # (B, C, 1, L)
    return trend.squeeze(2).transpose(1, 2)  # (B, L, C), contiguous


class SeriesDecomp(nn.Module):
    """Splits a series into (seasonal, trend) with a moving average of ``kernel_size`` steps."""

    def __init__(self, kernel_size: int) -> None:
        super().__init__()
        self.kernel_size = kernel_size

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        trend = moving_average(x, self.kernel_size)
        return x - trend, trend


def autocorrelation(q: Tensor, k: Tensor) -> Tensor:
    """Circular cross-correlation ``R[tau] = mean_c sum_t q[t, c] * k[t - tau, c]`` of (B, L, C) -> (B, L)."""
    length = q.shape[1]
    spectrum = torch.fft.rfft(q.float(), dim=1) * torch.fft.rfft(k.float(), dim=1).conj()  # (B, L//2+1, C)
    return torch.fft.irfft(spectrum.mean(dim=-1), n=length, dim=1)  # (B, L)


def select_delays(corr: Tensor, top_k: int, shared: bool) -> tuple[Tensor, Tensor]:
    """The ``top_k`` lags of ``corr`` (B, L) and their softmax weights (B, k).

    ``shared`` (training): one set of lags (k,) for the whole batch, ranked by the batch-mean correlation.
    Otherwise (inference): lags (B, k) chosen per sample.
    """
    if shared:
        delays = torch.topk(corr.mean(dim=0), top_k, dim=-1).indices  # (k,)
        weights = corr[:, delays]  # (B, k)
    else:
        weights, delays = torch.topk(corr, top_k, dim=-1)  # (B, k), (B, k)
    return delays, torch.softmax(weights, dim=-1)


def time_delay_aggregation(values: Tensor, delays: Tensor, weights: Tensor) -> Tensor:
    """``out[b, t] = sum_i weights[b, i] * values[b, (t + delays[., i]) mod L]`` for values (B, L, C).

    ``delays`` is (k,) when shared by the batch or (B, k) per sample. The sum is a circular correlation of
    the values with a sparse per-sample kernel (weight ``w_i`` at lag ``d_i``), evaluated in the frequency
    domain: O(L log L) per channel whatever k is, and one pass over V instead of k rolled copies.
    """
    batch, length = values.shape[:2]
    values = values.float()  # FFTs in fp32 (also under bf16 autocast, which has no bf16 FFT)
    kernel = values.new_zeros(batch, length)
    kernel = kernel.scatter(1, delays.expand(batch, -1), weights.float())  # (B, L), lags are distinct
    spectrum = torch.fft.rfft(values, dim=1) * torch.fft.rfft(kernel, dim=1).conj().unsqueeze(-1)  # (B, F, C)
    return torch.fft.irfft(spectrum, n=length, dim=1)  # (B, L, C)


class AutoCorrelation(nn.Module):
    """Multi-head Auto-Correlation layer: projections, period-based dependencies, output projection.

    The reference projects per head; the lags are shared by all heads (the correlation is averaged over
    heads and channels), so the heads only appear as the split of ``d_model`` and need no reshaping here.
    """

    def __init__(self, d_model: int, n_heads: int, factor: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.factor = factor
        # Query, key and value projections stacked in one (3D, D) Linear: one GEMM when they read the same
        # input (self-correlation), two for cross-correlation; nn.Linear(D, 3D) has the init of three (D, D).
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, queries: Tensor, memory: Tensor | None = None) -> Tensor:
        """Self-correlation of ``queries`` (B, L, D), or cross-correlation with ``memory`` (B, S, D)."""
        if memory is None:
            q, k, v = linear(queries, self.qkv.weight, self.qkv.bias).chunk(3, dim=-1)  # (B, L, D) each, D = H * E
        else:
            d_model = queries.shape[-1]
            q = linear(queries, self.qkv.weight[:d_model], self.qkv.bias[:d_model])  # (B, L, D)
            kv = linear(memory, self.qkv.weight[d_model:], self.qkv.bias[d_model:])  # (B, S, 2D)
            k, v = kv.chunk(2, dim=-1)
        return linear(self.correlate(q, k, v), self.out.weight, self.out.bias)  # (B, L, D)

    def correlate(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Auto-Correlation of projected (B, Lq, D) queries with (B, Lk, D) keys/values -> (B, Lq, D)."""
        lq, lk = q.shape[1], k.shape[1]
        if lq > lk:  # cross-correlation with a shorter memory: zero-pad keys and values
            k = F.pad(k, (0, 0, 0, lq - lk))
            v = F.pad(v, (0, 0, 0, lq - lk))
        elif lq < lk:
            k, v = k[:, :lq], v[:, :lq]
        corr = autocorrelation(q, k)  # (B, Lq)
        top_k = max(1, min(lq, int(self.factor * math.log(lq))))
        delays, weights = select_delays(corr, top_k, shared=self.training)
        return time_delay_aggregation(v, delays, weights)


class SeasonalLayerNorm(nn.Module):
    """LayerNorm over channels, then the mean over time removed (the seasonal part has no level)."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm(x)
        return x - x.mean(dim=1, keepdim=True)


class CircularConv(nn.Module):
    """Conv1d with kernel 3, circular padding and no bias, on (B, L, C_in) -> (B, L, C_out).

    The parameter is a Conv1d weight (C_out, C_in, 3); the forward runs one matmul of the three taps and
    two rolls, which avoids transposing (B, L, C) activations to the (B, C, L) layout of ``nn.Conv1d``.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        conv = nn.Conv1d(in_channels, out_channels, kernel_size=3, bias=False)  # default Conv1d init
        self.weight = nn.Parameter(conv.weight.detach())  # (C_out, C_in, 3)

    def forward(self, x: Tensor) -> Tensor:
        out_channels = self.weight.shape[0]
        taps = linear(x, self.weight.permute(2, 0, 1).reshape(3 * out_channels, x.shape[-1]))  # (B, L, 3 * C_out)
        prev, centre, nxt = taps.split(out_channels, dim=-1)  # tap j reads x[t - 1 + j]
        return prev.roll(1, dims=1) + centre + nxt.roll(-1, dims=1)  # (B, L, C_out)


class DataEmbedding(nn.Module):
    """Token embedding (circular conv over the variables) plus a linear calendar embedding; no positions."""

    def __init__(self, n_vars: int, n_marks: int, d_model: int, dropout: float) -> None:
        super().__init__()
        self.token = CircularConv(n_vars, d_model)
        nn.init.kaiming_normal_(self.token.weight, mode="fan_in", nonlinearity="leaky_relu")
        self.marks = nn.Linear(n_marks, d_model, bias=False) if n_marks > 0 else None
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, x_mark: Tensor | None) -> Tensor:
        out = self.token(x)  # (B, L, D)
        if self.marks is not None and x_mark is not None:
            out = out + linear(x_mark, self.marks.weight)
        return _drop(self.dropout, out)


class FeedForward(nn.Module):
    """Position-wise FFN d_model -> d_ff -> d_model without biases (the reference's 1x1 Conv1d pair)."""

    def __init__(self, d_model: int, d_ff: int, dropout: float, activation: str) -> None:
        super().__init__()
        self.up = nn.Linear(d_model, d_ff, bias=False)
        self.down = nn.Linear(d_ff, d_model, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.activation = F.gelu if activation == "gelu" else F.relu

    def forward(self, x: Tensor) -> Tensor:
        h = _drop(self.dropout, self.activation(linear(x, self.up.weight)))  # (B, L, d_ff)
        return _drop(self.dropout, linear(h, self.down.weight))  # (B, L, D)


class EncoderLayer(nn.Module):
    """Auto-Correlation and FFN, each followed by a residual and a decomposition that drops the trend."""

    def __init__(self, cfg: ForecastingConfig) -> None:
        super().__init__()
        self.attention = AutoCorrelation(cfg.d_model, cfg.n_heads, cfg.factor)
        self.ffn = FeedForward(cfg.d_model, cfg.d_ff, cfg.dropout, cfg.activation)
        self.decomp = SeriesDecomp(cfg.moving_avg)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        x, _ = self.decomp(x + _drop(self.dropout, self.attention(x)))
        x, _ = self.decomp(x + self.ffn(x))
        return x


class DecoderLayer(nn.Module):
    """Self and cross Auto-Correlation and FFN with decompositions; returns (seasonal, projected trend)."""

    def __init__(self, cfg: ForecastingConfig, n_vars: int) -> None:
        super().__init__()
        self.self_attention = AutoCorrelation(cfg.d_model, cfg.n_heads, cfg.factor)
        self.cross_attention = AutoCorrelation(cfg.d_model, cfg.n_heads, cfg.factor)
        self.ffn = FeedForward(cfg.d_model, cfg.d_ff, cfg.dropout, cfg.activation)
        self.decomp = SeriesDecomp(cfg.moving_avg)
        self.dropout = nn.Dropout(cfg.dropout)
        self.trend_projection = CircularConv(cfg.d_model, n_vars)

    def forward(self, x: Tensor, memory: Tensor) -> tuple[Tensor, Tensor]:
        x, trend1 = self.decomp(x + _drop(self.dropout, self.self_attention(x)))
        x, trend2 = self.decomp(x + _drop(self.dropout, self.cross_attention(x, memory)))
        x, trend3 = self.decomp(x + self.ffn(x))
        return x, self.trend_projection(trend1 + trend2 + trend3)  # (B, L, D), (B, L, N)


class Autoformer(nn.Module):
    """Encoder-decoder Autoformer: (B, seq_len, N) lookback -> (B, pred_len, N) forecast."""

    def __init__(self, cfg: ForecastingConfig, n_vars: int, n_marks: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.decomp = SeriesDecomp(cfg.moving_avg)
        self.enc_embedding = DataEmbedding(n_vars, n_marks, cfg.d_model, cfg.dropout)
        self.dec_embedding = DataEmbedding(n_vars, n_marks, cfg.d_model, cfg.dropout)
        self.encoder = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.e_layers))
        self.encoder_norm = SeasonalLayerNorm(cfg.d_model)
        self.decoder = nn.ModuleList(DecoderLayer(cfg, n_vars) for _ in range(cfg.d_layers))
        self.decoder_norm = SeasonalLayerNorm(cfg.d_model)
        self.projection = nn.Linear(cfg.d_model, n_vars)

    def forward(self, x: Tensor, x_mark: Tensor | None = None, y_mark: Tensor | None = None) -> Tensor:
        label_len, pred_len = self.cfg.label_len, self.cfg.pred_len
        batch, _, n_vars = x.shape
        # Decoder start: the last label_len steps of the decomposed input, then zeros (seasonal) and the
        # input mean (trend) for the horizon.
        seasonal, trend = self.decomp(x)  # (B, L, N) each
        horizon_mean = x.mean(dim=1, keepdim=True).expand(-1, pred_len, -1)  # (B, P, N)
        trend = torch.cat([trend[:, x.shape[1] - label_len:], horizon_mean], dim=1)  # (B, S+P, N)
        zeros = x.new_zeros(batch, pred_len, n_vars)
        seasonal = torch.cat([seasonal[:, x.shape[1] - label_len:], zeros], dim=1)  # (B, S+P, N)

        memory = self.enc_embedding(x, x_mark)  # (B, L, D)
        for enc_layer in self.encoder:
            memory = enc_layer(memory)
        memory = self.encoder_norm(memory)

        out = self.dec_embedding(seasonal, y_mark)  # (B, S+P, D)
        for dec_layer in self.decoder:
            out, residual_trend = dec_layer(out, memory)
            trend = trend + residual_trend
        out = linear(self.decoder_norm(out), self.projection.weight, self.projection.bias)  # (B, S+P, N)
        return (trend + out)[:, -pred_len:]  # (B, P, N)
