"""Light-curve classifiers on the shared core: ``native`` (a token per observation, packed) and ``t2`` (a GP grid).

``native``: each observation is a token, the sum of an embedding of its scaled flux, error and detection flag,
its band's embedding, a continuous-time encoding of its date since the first detection (sines and cosines of
periods from 1 day to ``time_scale_max``) and the object's global features (brightness, redshift). A batch is
packed: the tokens of all its light curves back to back (``cu_seqlens``), so the feed-forward layers and
projections see no padding and attention runs per sequence (``shared.attention.varlen_attention``: flash-attn's
varlen kernel on a GPU, groups of similar length on the CPU). Masked mean pooling (or attention pooling: a
learned score per token and head, softmaxed within each light curve; or both), the globals again, a small head.
The same weights run a padded batch (``packing=pad``), the comparison of the benchmark and the tests.

``t2`` (Allam & McEwen 2023): the Gaussian-process grid (steps, bands), a kernel-1 convolution (a linear map of
each step's band values), sinusoidal positions, encoder blocks, global average pooling, the globals, a head.

Both return logits divided by the softmax temperature fitted on validation (1 before calibration).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from shared.layers import Encoder, EncoderLayer, SinusoidalPositionalEncoding, make_norm

from .config import TransientsConfig
from .data import N_GLOBALS, N_VALUES, REDSHIFT_GLOBAL, Batch, TransientsState, n_curve_features


class ContinuousTime(nn.Module):
    """Sines and cosines of t (days) at periods geometric from 1 day to ``longest``, projected to d_model."""

    periods: Tensor

    def __init__(self, d_model: int, longest: float, n_periods: int = 16) -> None:
        super().__init__()
        self.register_buffer("periods", torch.logspace(0.0, math.log10(longest), n_periods), persistent=False)
        self.proj = nn.Linear(2 * n_periods, d_model)

    def forward(self, t: Tensor) -> Tensor:
        phase = 2 * math.pi * t.unsqueeze(-1) / self.periods  # (..., P)
        return self.proj(torch.cat([phase.sin(), phase.cos()], dim=-1))  # (..., d_model)


POWERS = {"none": 0.0, "sqrt": 0.5, "balanced": 1.0}  # class_weighting -> exponent of the inverse frequency


def class_weights_for(counts: Tensor, power: float) -> Tensor:
    """Cross-entropy weights (K,) from training counts: the inverse frequency to ``power`` (0: ones, 0.5: its
    square root, 1: balanced); mean 1 over the training objects."""
    if power == 0.0:
        return torch.ones_like(counts)
    weights = counts.sum() / (len(counts) * counts)
    weights = weights.sqrt() if power == 0.5 else weights if power == 1.0 else weights.pow(power)
    return weights * counts.sum() / (weights * counts).sum()


def weight_power(cfg: TransientsConfig) -> float:
    """The exponent of the inverse class frequency in the cross-entropy weights."""
    if cfg.class_weight_power is not None:
        return float(cfg.class_weight_power)
    return POWERS[cfg.class_weighting]


def decision_bias_for(counts: Tensor, cfg: TransientsConfig) -> Tensor:
    """Added to the log-probabilities before the argmax that picks the top class (K,).

    ``decision="balanced"``: the Bayes rule for balanced accuracy (every class's recall counts the same). A
    cross-entropy with weights proportional to pi_c^-w (pi: the training class frequencies) is minimised by
    q(c|x) proportional to pi_c^(1-w) p(x|c), so the class of highest likelihood p(x|c) is the argmax of
    log q(c|x) - (1 - w) log pi_c. With balanced weights (w = 1) that is the plain argmax; with the default
    sqrt weights it divides the probabilities by sqrt(pi_c) before the argmax. The probabilities themselves are
    not changed. ``decision="probable"``: the plain argmax (the most probable class, best for accuracy).
    """
    if cfg.decision == "probable":
        return torch.zeros_like(counts)
    prior = counts / counts.sum()
    return -(1.0 - weight_power(cfg)) * prior.log()


def decision_bias(cfg: TransientsConfig, state: TransientsState) -> dict[str, float]:
    """The decision bias per class name (what ``/info`` shows)."""
    counts = torch.tensor(state.class_counts or (1,) * len(state.classes), dtype=torch.float32).clamp(min=1)
    return {c: round(float(b), 6) for c, b in zip(state.classes, decision_bias_for(counts, cfg), strict=True)}


class Classifier(nn.Module):
    """Shared parts: temperature, class weights, the head on pooled features and globals."""

    temperature: Tensor
    class_weights: Tensor
    decision_bias: Tensor
    globals_mask: Tensor

    def __init__(self, cfg: TransientsConfig, n_classes: int, temperature: float,
                 class_counts: tuple[int, ...] = (), pooled_dim: int | None = None, n_globals: int = N_GLOBALS) -> None:
        super().__init__()
        self.label_smoothing = cfg.label_smoothing
        self.register_buffer("temperature", torch.tensor(float(temperature)))
        counts = torch.tensor(class_counts or (1,) * n_classes, dtype=torch.float32).clamp(min=1)
        weights = class_weights_for(counts, weight_power(cfg))
        self.register_buffer("class_weights", weights, persistent=False)  # (K,) cross-entropy weights
        self.register_buffer("decision_bias", decision_bias_for(counts, cfg), persistent=False)  # (K,)
        mask = torch.ones(n_globals)
        if not cfg.use_redshift:
            mask[REDSHIFT_GLOBAL] = 0.0
        self.register_buffer("globals_mask", mask, persistent=False)  # (n_globals,)
        pooled_dim = cfg.d_model if pooled_dim is None else pooled_dim
        self.head = nn.Sequential(nn.Linear(pooled_dim + n_globals, cfg.d_model), nn.GELU(),
                                  nn.Dropout(cfg.dropout), nn.Linear(cfg.d_model, n_classes))

    def decide(self, logits: Tensor) -> Tensor:
        """The class picked for each row of (calibrated) logits (N, K): see :func:`decision_bias_for`."""
        return (logits.float() + self.decision_bias.to(logits.device)).argmax(dim=-1)

    def globals_of(self, globals_: Tensor) -> Tensor:
        return globals_ * self.globals_mask.to(globals_.dtype)  # (B, n_globals)

    def classify(self, pooled: Tensor, globals_: Tensor) -> Tensor:
        logits = self.head(torch.cat([pooled, globals_], dim=-1))  # (B, K)
        return logits / self.temperature


class NativeClassifier(Classifier):
    def __init__(self, cfg: TransientsConfig, n_bands: int, n_classes: int, temperature: float = 1.0,
                 class_counts: tuple[int, ...] = ()) -> None:
        d = cfg.d_model
        n_globals = N_GLOBALS + (n_curve_features(n_bands) if cfg.lc_features else 0)
        super().__init__(cfg, n_classes, temperature, class_counts, pooled_dim=2 * d if cfg.pooling == "both" else d,
                         n_globals=n_globals)
        self.pooling, self.n_heads = cfg.pooling, cfg.n_heads
        self.values = nn.Linear(N_VALUES, d)
        self.band = nn.Embedding(n_bands, d)
        self.time = ContinuousTime(d, cfg.time_scale_max)
        self.globals_proj = nn.Linear(n_globals, d)
        self.encoder = Encoder([EncoderLayer(d, cfg.n_heads, cfg.d_ff, dropout=cfg.dropout)
                                for _ in range(cfg.n_layers)], norm=make_norm("layer", d))
        if cfg.pooling != "mean":
            self.score = nn.Linear(d, cfg.n_heads)  # attention pooling: a score per token and head

    def embed(self, batch: Batch, globals_: Tensor) -> Tensor:
        x = self.values(batch.values) + self.band(batch.band) + self.time(batch.time)  # (T, d) / (B, L, d)
        g = self.globals_proj(globals_)  # (B, d)
        if batch.packed:
            assert batch.cu_seqlens is not None
            lengths = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).long()
            return x + torch.repeat_interleave(g, lengths, dim=0, output_size=x.shape[0])
        return x + g[:, None, :]

    def _pool_packed(self, h: Tensor, cu_seqlens: Tensor) -> Tensor:
        """Pooled features (B, pooled) of packed tokens h (T, d)."""
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()  # (B,)
        b, (t, d) = len(lengths), h.shape
        seq = torch.repeat_interleave(torch.arange(b, device=h.device), lengths, output_size=t)  # (T,)
        parts = []
        if self.pooling != "mean":
            s = self.score(h).float()  # (T, H)
            top = s.new_full((b, self.n_heads), -math.inf).scatter_reduce(
                0, seq[:, None].expand(-1, self.n_heads), s, reduce="amax", include_self=True)  # (B, H)
            w = (s - top[seq]).exp()  # (T, H)
            w = w / w.new_zeros(b, self.n_heads).index_add_(0, seq, w)[seq]
            heads = (h.view(t, self.n_heads, d // self.n_heads) * w.to(h.dtype)[..., None]).reshape(t, d)
            parts.append(h.new_zeros(b, d).index_add_(0, seq, heads))
        if self.pooling != "attention":
            parts.append(h.new_zeros(b, d).index_add_(0, seq, h) / lengths[:, None].clamp(min=1))
        return torch.cat(parts, dim=-1)

    def _pool_padded(self, h: Tensor, mask: Tensor) -> Tensor:
        """Pooled features (B, pooled) of padded tokens h (B, L, d) with ``mask`` (B, L) True = real."""
        b, length, d = h.shape
        parts = []
        if self.pooling != "mean":
            s = self.score(h).float().masked_fill(~mask[..., None], -math.inf)  # (B, L, H)
            w = torch.softmax(s, dim=1).nan_to_num(0.0)  # (B, L, H); an empty row pools to 0
            heads = h.view(b, length, self.n_heads, d // self.n_heads) * w.to(h.dtype)[..., None]
            parts.append(heads.sum(1).reshape(b, d))
        if self.pooling != "attention":
            m = mask.unsqueeze(-1).to(h.dtype)
            parts.append((h * m).sum(1) / m.sum(1).clamp(min=1))
        return torch.cat(parts, dim=-1)

    def forward(self, batch: Batch) -> Tensor:
        """Logits (B, K) of a packed or padded batch."""
        globals_ = self.globals_of(batch.globals)
        x = self.embed(batch, globals_)
        if batch.packed:
            assert batch.cu_seqlens is not None
            h = self.encoder.forward_packed(x, batch.cu_seqlens, batch.max_seqlen)  # (T, d)
            pooled = self._pool_packed(h, batch.cu_seqlens)
        else:
            assert batch.mask is not None
            h = self.encoder(x, key_padding_mask=batch.mask)  # (B, L, d)
            pooled = self._pool_padded(h, batch.mask)
        return self.classify(pooled, globals_)


class T2Classifier(Classifier):
    def __init__(self, cfg: TransientsConfig, n_bands: int, n_classes: int, temperature: float = 1.0,
                 class_counts: tuple[int, ...] = ()) -> None:
        super().__init__(cfg, n_classes, temperature, class_counts)
        d = cfg.d_model
        self.embedding = nn.Conv1d(n_bands, d, kernel_size=1)  # t2's kernel-1 convolution over the grid
        self.positions = SinusoidalPositionalEncoding(d, max_len=max(cfg.gp_steps, 16))
        self.encoder = Encoder([EncoderLayer(d, cfg.n_heads, cfg.d_ff, dropout=cfg.dropout)
                                for _ in range(cfg.n_layers)], norm=make_norm("layer", d))

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        grid = batch["grid"]  # (B, steps, bands)
        x = self.embedding(grid.transpose(1, 2)).transpose(1, 2)  # (B, steps, d)
        h = self.encoder(self.positions(x))  # (B, steps, d)
        return self.classify(h.mean(dim=1), self.globals_of(batch["globals"]))


class Ensemble(nn.Module):
    """``members`` classifiers of the same settings, initialised apart and trained side by side on the same
    batches, each on its own cross-entropy (a deep ensemble; their dropout masks differ too). The ensemble's
    logits are the log of the members' mean probability, divided by one temperature fitted on validation after
    training (the members keep temperature 1)."""

    temperature: Tensor

    def __init__(self, members: list[Classifier], temperature: float = 1.0) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.register_buffer("temperature", torch.tensor(float(temperature)))
        self.label_smoothing = members[0].label_smoothing

    @property
    def class_weights(self) -> Tensor:
        """The members' cross-entropy weights (a buffer of the first, so it follows ``.to(device)``)."""
        first: Any = self.members[0]
        return first.class_weights

    def member_logits(self, batch: Any) -> Tensor:
        """Each member's logits (M, B, K)."""
        return torch.stack([m(batch) for m in self.members])

    def forward(self, batch: Any) -> Tensor:
        log_p = torch.log_softmax(self.member_logits(batch).float(), dim=-1)  # (M, B, K)
        mean = torch.logsumexp(log_p, dim=0) - math.log(len(self.members))  # (B, K) log of the mean probability
        return mean / self.temperature

    def decide(self, logits: Tensor) -> Tensor:
        first: Any = self.members[0]
        return first.decide(logits)


def build(cfg: TransientsConfig, state: TransientsState) -> nn.Module:
    cls: Any = NativeClassifier if cfg.model == "native" else T2Classifier
    if cfg.members == 1:
        return cls(cfg, len(state.bands), len(state.classes), state.temperature, tuple(state.class_counts))
    members = [cls(cfg, len(state.bands), len(state.classes), 1.0, tuple(state.class_counts))
               for _ in range(cfg.members)]
    return Ensemble(members, state.temperature)


def labels_of(batch: Batch | dict[str, Tensor]) -> Tensor:
    return batch.labels if isinstance(batch, Batch) else batch["labels"]


def to_device(batch: Batch | dict[str, Tensor], device: torch.device) -> Batch | dict[str, Tensor]:
    if isinstance(batch, Batch):
        return batch.to(device)
    return {k: v.to(device) for k, v in batch.items()}
