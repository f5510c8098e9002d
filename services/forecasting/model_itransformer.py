"""iTransformer (Liu et al., ICLR 2024): "Inverted Transformers Are Effective for Time Series Forecasting".

The Transformer is applied on the inverted dimension: each variate's whole lookback window becomes one token
(Linear(seq_len, d_model)), so self-attention mixes variates and the feed-forward network learns the temporal
representation of each one. Calendar features (``x_mark``) join as extra tokens that the variates can attend
to; only the variate tokens are projected to the horizon (Linear(d_model, pred_len)). Per-instance
normalization (mean/std over time of each variate, undone at the output) handles non-stationary levels.

Built from :mod:`shared.layers`; the published model uses post-norm layers (``norm_first=False``), the default.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from services.forecasting.config import ForecastingConfig
from shared.layers import Encoder, EncoderLayer


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

    def forward(self, x: Tensor, x_mark: Tensor | None = None, y_mark: Tensor | None = None) -> Tensor:
        """Forecast ``pred_len`` steps of every variate; ``y_mark`` (future calendar features) is unused."""
        self._check(x, x_mark)
        if self.use_norm:
            mean = x.mean(dim=1, keepdim=True).detach()  # (B, 1, N)
            x = x - mean
            std = torch.sqrt(torch.var(x, dim=1, keepdim=True, unbiased=False) + 1e-5)  # (B, 1, N)
            x = x / std
        tokens = x.transpose(1, 2)  # (B, N, L)
        if x_mark is not None and self.n_marks > 0:
            tokens = torch.cat([tokens, x_mark.to(x.dtype).transpose(1, 2)], dim=1)  # (B, N + F, L)
        h = self.embed_dropout(self.embed(tokens))  # (B, N + F, d_model)
        h = self.encoder(h)  # (B, N + F, d_model)
        out = self.head(h)[:, : self.n_vars].transpose(1, 2)  # (B, pred_len, N)
        if self.use_norm:
            out = out * std + mean
        return out
