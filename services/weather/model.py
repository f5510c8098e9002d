"""WXFormer (Schreck et al. 2024, NCAR CREDIT): a CrossFormer-style hierarchical vision transformer that maps
the atmospheric state at t (plus static fields and forcings) to t + dt, rolled out autoregressively.

- **Cross-scale embedding** (CrossFormer, Wang et al. 2021): each stage embeds its input with several
  convolutions of one stride and different kernel sizes, concatenated, so every token sees several scales.
- **Short- and long-distance attention**: tokens attend inside w x w local windows, then inside groups of
  tokens spaced across the whole map (G x G tokens, one from each H/G x W/G block): long-range mixing at
  windowed cost. Both through :func:`shared.attention.attention`, with a learned dynamic position bias.
- **U-Net decoder**: PixelShuffle up-blocks with skip connections from every encoder stage.
- **Spectral normalization** on every convolution and linear layer (stable long rollouts).
- **Earth padding** for global grids: circular in longitude; above a pole the rows continue on the other
  side of the pole (rows mirrored, rolled by 180 degrees of longitude). Regional grids are padded plainly.
- The network predicts the change of the normalized state from a base state, the last one or (option) the one
  a day before the target; ``training.rollout`` adds it, step after step.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shared.attention import attention
from shared.layers import FeedForward

from .config import WeatherConfig
from .data import WeatherState
from .forcings import coordinate_statics, daily_harmonics


def earth_pad(x: Tensor, top: int, bottom: int, left: int, right: int, pole_row: bool) -> Tensor:
    """Pad (B, C, H, W) on a global lat-lon grid: longitude wraps; rows beyond a pole are the rows next to it,
    mirrored and shifted by half the longitudes. ``pole_row``: the grid's first/last rows lie on the poles
    (then the pole row itself is not repeated)."""
    width = x.shape[-1]
    skip = 1 if pole_row else 0
    parts = []
    if top:  # rows beyond the poles first, on the unpadded longitudes (the roll is half of them)
        parts.append(torch.roll(x[..., skip: skip + top, :].flip(-2), shifts=width // 2, dims=-1))
    parts.append(x)
    if bottom:
        h = x.shape[-2]
        parts.append(torch.roll(x[..., h - skip - bottom: h - skip, :].flip(-2), shifts=width // 2, dims=-1))
    x = torch.cat(parts, dim=-2) if len(parts) > 1 else x
    if left or right:
        x = torch.cat([x[..., width - left:], x, x[..., :right]], dim=-1)
    return x


class CrossEmbed(nn.Module):
    """Several convolutions with one stride and growing kernels, concatenated along channels (smaller
    kernels get more channels, as in CrossFormer)."""

    def __init__(self, dim_in: int, dim_out: int, kernels: tuple[int, ...], stride: int) -> None:
        super().__init__()
        kernels = tuple(sorted(kernels))
        splits = [dim_out // 2 ** (i + 1) for i in range(len(kernels) - 1)]
        splits.append(dim_out - sum(splits))
        self.convs = nn.ModuleList(nn.Conv2d(dim_in, d, k, stride=stride, padding=(k - stride) // 2)
                                   for k, d in zip(kernels, splits, strict=True))

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([conv(x) for conv in self.convs], dim=1)  # (B, dim_out, H / s, W / s)


class DynamicPositionBias(nn.Module):
    """Attention bias per head from the relative offset of two tokens in a window (a small MLP, CrossFormer)."""

    def __init__(self, window: int, heads: int, hidden: int = 32) -> None:
        super().__init__()
        self.window = window
        self.mlp = nn.Sequential(nn.Linear(2, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, heads))
        pos = torch.arange(window)
        grid = torch.stack(torch.meshgrid(pos, pos, indexing="ij")).flatten(1)  # (2, w*w)
        rel = grid[:, :, None] - grid[:, None, :]  # (2, w*w, w*w)
        offsets = torch.arange(-(window - 1), window)
        table = torch.stack(torch.meshgrid(offsets, offsets, indexing="ij"), dim=-1).reshape(-1, 2)  # (R, 2)
        index = (rel[0] + window - 1) * (2 * window - 1) + (rel[1] + window - 1)  # (w*w, w*w)
        self.register_buffer("table", table.float() / max(1, window - 1), persistent=False)
        self.register_buffer("index", index, persistent=False)

    def forward(self) -> Tensor:
        bias = self.mlp(self.table)  # (R, heads)
        return bias[self.index].permute(2, 0, 1)  # (heads, w*w, w*w)


class WindowAttention(nn.Module):
    """Multi-head attention inside windows of w x w tokens: contiguous (``local``) or spread across the map
    (``long``: one token per (H/w x W/w) block). Maps are zero-padded to a multiple of w; padded keys are
    masked out."""

    def __init__(self, dim: int, dim_head: int, window: int, kind: str, dropout: float) -> None:
        super().__init__()
        self.heads, self.window, self.kind, self.dropout = dim // dim_head, window, kind, dropout
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim)
        self.bias = DynamicPositionBias(window, self.heads)

    def _group(self, x: Tensor, w: int) -> Tensor:
        b, h, wd, c = x.shape  # (B, H, W, C) with H, W multiples of w
        if self.kind == "local":
            x = x.view(b, h // w, w, wd // w, w, c).permute(0, 1, 3, 2, 4, 5)  # (B, nH, nW, w, w, C)
        else:
            x = x.view(b, w, h // w, w, wd // w, c).permute(0, 2, 4, 1, 3, 5)  # (B, H/w, W/w, w, w, C)
        return x.reshape(-1, w * w, c)

    def _ungroup(self, x: Tensor, b: int, h: int, wd: int, w: int) -> Tensor:
        c = x.shape[-1]
        if self.kind == "local":
            x = x.view(b, h // w, wd // w, w, w, c).permute(0, 1, 3, 2, 4, 5)
        else:
            x = x.view(b, h // w, wd // w, w, w, c).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, h, wd, c)

    def forward(self, x: Tensor) -> Tensor:
        b, h, wd, c = x.shape  # (B, H, W, C)
        w = self.window
        ph, pw = (-h) % w, (-wd) % w
        y = F.pad(self.norm(x), (0, 0, 0, pw, 0, ph))  # (B, H', W', C)
        valid = None
        if ph or pw:
            mask = torch.zeros(1, h + ph, wd + pw, 1, dtype=torch.bool, device=x.device)
            mask[:, :h, :wd] = True
            valid = self._group(mask.expand(b, -1, -1, -1), w).squeeze(-1)  # (B*nW, w*w)
        tokens = self._group(y, w)  # (B*nW, w*w, C)
        q, k, v = self.qkv(tokens).view(tokens.shape[0], w * w, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        bias = self.bias().to(q.dtype)[None]  # (1, heads, w*w, w*w)
        o = attention(q, k, v, attn_mask=bias, key_padding_mask=valid,
                      dropout_p=self.dropout if self.training else 0.0)  # (B*nW, heads, w*w, dh)
        o = self.out(o.transpose(1, 2).reshape(tokens.shape[0], w * w, c))
        return self._ungroup(o, b, h + ph, wd + pw, w)[:, :h, :wd]


class CrossFormerBlock(nn.Module):
    """Local attention, feed-forward, long-distance attention, feed-forward; pre-norm residuals."""

    def __init__(self, dim: int, cfg: WeatherConfig, global_window: int) -> None:
        super().__init__()
        hidden = int(dim * cfg.mlp_ratio)
        self.local = WindowAttention(dim, cfg.dim_head, cfg.local_window, "local", cfg.dropout)
        self.long = WindowAttention(dim, cfg.dim_head, global_window, "long", cfg.dropout)
        self.ff1, self.ff2 = (FeedForward(dim, hidden, cfg.dropout) for _ in range(2))
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.local(x)  # (B, H, W, C)
        x = x + self.ff1(self.norm1(x))
        x = x + self.long(x)
        return x + self.ff2(self.norm2(x))


class UpBlock(nn.Module):
    """Upsample by ``scale`` with a convolution to scale^2 x channels and PixelShuffle, then a residual conv."""

    def __init__(self, dim_in: int, dim_out: int, scale: int) -> None:
        super().__init__()
        self.expand = nn.Conv2d(dim_in, dim_out * scale * scale, 3, padding=1)
        self.shuffle = nn.PixelShuffle(scale)
        self.norm = nn.GroupNorm(min(8, dim_out), dim_out)
        self.conv = nn.Conv2d(dim_out, dim_out, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.shuffle(self.expand(x))  # (B, dim_out, H * s, W * s)
        return x + self.conv(F.silu(self.norm(x)))


def apply_spectral_norm(module: nn.Module) -> nn.Module:
    """Spectral normalization on every Conv2d and Linear weight (one power iteration per training step)."""
    from torch.nn.utils.parametrizations import spectral_norm

    for child in list(module.modules()):
        if isinstance(child, nn.Conv2d | nn.Linear) and not hasattr(child, "parametrizations"):
            spectral_norm(child)
    return module


MIX_GAIN = 30.0


class WXFormer(nn.Module):
    """(history states, forcings at t and t + dt) -> state at t + dt, all normalized, on one fixed grid."""

    lat_weights: Tensor
    statics: Tensor
    mean: Tensor
    std: Tensor
    damping: Tensor
    tendency: Tensor
    climatology: Tensor
    relaxation: Tensor

    def __init__(self, cfg: WeatherConfig, state: WeatherState) -> None:
        super().__init__()
        self.cfg = cfg
        self.built_from = state  # what __reduce__ builds it again from
        grid = state.grid
        self.n_channels = len(state.channels)
        self.forcings = state.forcings
        self.n_forcings = len(self.forcings)
        h, w = grid.shape
        statics = [coordinate_statics(grid)]
        for name in state.static_names:
            values = state.statics[name].numpy().astype(np.float32)
            statics.append(((values - values.mean()) / (values.std() + 1e-6))[None])
        self.register_buffer("statics", torch.from_numpy(np.concatenate(statics)), persistent=False)  # (S, H, W)
        self.register_buffer("lat_weights", torch.from_numpy(grid.weights()), persistent=False)  # (H, W)
        self.register_buffer("mean", state.mean.float().view(-1, 1, 1), persistent=False)
        self.register_buffer("std", state.std.float().view(-1, 1, 1), persistent=False)
        # (C, 1, 1) the unit of the network's change (normalize_tendency); empty: the change as the network gives it
        tendency = state.tendency_std if state.tendency_std is not None else torch.zeros(0)
        self.register_buffer("tendency", tendency.float().view(-1, 1, 1), persistent=False)

        self.base_lag = cfg.base_lag  # read by advance
        # read by pull: as the saved relaxation factors were fitted, else as the config asks on this grid
        saved_keep = state.relaxation_keeps_mean
        self.keep_mean = bool(saved_keep) if saved_keep is not None or state.relaxation is not None \
            else cfg.relaxation_keeps_mean(grid.is_global)
        # (K, C, 1, 1) factors on the predicted change of rollout step k (the last one beyond K), fitted on
        # validation after training (training.fit_calibration) and saved in the state; none: the change as predicted.
        self.register_buffer("damping", torch.ones(0, self.n_channels, 1, 1), persistent=False)
        if state.damping is not None:
            self.set_damping(state.damping.float())
        # (J, C, H, W) the training period's mean daily cycle (data.fit_climatology; models saved before it
        # have none), and (K, C, 1, 1) factors relaxing step k toward it, fitted with the damping.
        self.step_hours = cfg.step_hours
        clim = state.climatology.float() if state.climatology is not None else torch.zeros(0)
        self.register_buffer("climatology", clim, persistent=False)
        self.register_buffer("relaxation", torch.zeros(0, self.n_channels, 1, 1), persistent=False)
        if state.relaxation is not None and state.relaxation.numel():
            self.set_relaxation(state.relaxation.float())
        self.earth = cfg.padding == "earth" or (cfg.padding == "auto" and grid.is_global)
        self.pole_row = bool(self.earth and abs(abs(float(grid.lat[0, 0])) - 90.0) < 1e-6)
        factor = math.prod(cfg.strides)
        margin = factor // 2 if self.earth else 0  # context across the dateline and the poles
        self.pads = self._pads(h, factor, margin) + self._pads(w, factor, margin)  # top, bottom, left, right
        if self.earth and w % 2:
            raise ValueError(f"earth padding needs an even number of longitudes, got {w}")

        dim_in = cfg.history * self.n_channels + 2 * self.n_forcings + self.statics.shape[0]
        dims = (dim_in, *cfg.dims)
        self.embeds = nn.ModuleList(CrossEmbed(dims[i], dims[i + 1], cfg.kernels[i], cfg.strides[i])
                                    for i in range(len(cfg.dims)))
        self.stages = nn.ModuleList(nn.Sequential(*(CrossFormerBlock(d, cfg, g) for _ in range(depth)))
                                    for d, depth, g in zip(cfg.dims, cfg.depths, cfg.global_windows, strict=True))
        self.ups = nn.ModuleList(UpBlock(cfg.dims[i + 1], cfg.dims[i], cfg.strides[i + 1])
                                 for i in reversed(range(len(cfg.dims) - 1)))
        self.fuse = nn.ModuleList(nn.Conv2d(2 * cfg.dims[i], cfg.dims[i], 1)
                                  for i in reversed(range(len(cfg.dims) - 1)))
        self.up_out = UpBlock(cfg.dims[0], cfg.dims[0], cfg.strides[0])
        self.head = nn.Conv2d(cfg.dims[0] + dim_in, self.n_channels, 3, padding=1)
        if cfg.spectral_norm:
            apply_spectral_norm(self)
        # Linear blend of the input states (C, h * C), added to the change; starts at zero. A plain parameter,
        # outside spectral normalization: the blend that matters, such as "the state one day earlier minus
        # now" with a 6-hourly history of 4, has a norm above 1, which a normalized head cannot express.
        # Stored divided by MIX_GAIN so that Adam's steps of about lr move the blend MIX_GAIN times faster.
        self.history_mix = nn.Parameter(torch.zeros(self.n_channels, cfg.history * self.n_channels)) \
            if cfg.history_skip else None

    def __reduce__(self) -> tuple[Any, ...]:
        """Parametrized modules (the spectral normalization) do not pickle, so a WXFormer pickles as what builds
        it again: its config, the saved state it was built from, its state dict and the buffers outside it (the
        calibration factors, the climatology, ...); a service's model process gets it whole."""
        weights = self.state_dict()
        buffers = {name: b for name, b in self.named_buffers() if name not in weights}
        return _rebuilt, (self.cfg, self.built_from, weights, buffers, self.keep_mean, self.training)

    @staticmethod
    def _pads(size: int, factor: int, margin: int) -> tuple[int, int]:
        total = (-(size + 2 * margin)) % factor + 2 * margin
        return total // 2, total - total // 2

    def _pad(self, x: Tensor) -> Tensor:
        top, bottom, left, right = self.pads
        if self.earth:
            return earth_pad(x, top, bottom, left, right, self.pole_row)
        return F.pad(x, (left, right, top, bottom), mode="replicate") if any(self.pads) else x

    def forward(self, history: Tensor, forcing_now: Tensor, forcing_next: Tensor) -> Tensor:
        """history (B, h, C, H, W), forcings (B, F, H, W) -> the change of the last state (B, C, H, W)."""
        b, _, _, h, w = history.shape
        inputs = torch.cat([history.flatten(1, 2), forcing_now, forcing_next,
                            self.statics.expand(b, -1, -1, -1).to(history.dtype)], dim=1)  # (B, Cin, H, W)
        x0 = self._pad(inputs)  # (B, Cin, H', W')
        skips, x = [], x0
        for embed, stage in zip(self.embeds, self.stages, strict=True):
            x = embed(x)  # (B, d, H'/s, W'/s)
            x = stage(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
            skips.append(x)
        for up, fuse, skip in zip(self.ups, self.fuse, reversed(skips[:-1]), strict=True):
            x = fuse(torch.cat([up(x), skip], dim=1))
        x = self.head(torch.cat([self.up_out(x), x0], dim=1))  # (B, C, H', W')
        top, _, left, _ = self.pads
        x = x[..., top: top + h, left: left + w]
        if self.history_mix is not None:
            x = x + torch.einsum("oi,bihw->bohw", MIX_GAIN * self.history_mix.to(x.dtype), history.flatten(1, 2))
        return x

    def advance(self, history: Tensor, change: Tensor, step: int, hours: Tensor | None = None) -> Tensor:
        """The state after rollout step ``step`` (0-based) from the history (B, h, C, H, W) and the network's
        ``change`` (B, C, H, W): the base state (the last one, or with ``base_lag`` n > 1 the state n steps
        before the target) plus the change, scaled by the damping factor and, when the model is calibrated
        toward the climatology, plus the relaxation factor times (climatology at the valid time - base).
        ``hours`` (B,) is the UTC hour of the last history state, needed by relaxation only."""
        base = history[:, -self.base_lag]
        if len(self.tendency):
            change = change * self.tendency.to(change.dtype)
        scale = self.step_scale(step)
        nxt = base + (change if scale is None else scale.to(change.dtype) * change)
        relax = self.step_relaxation(step)
        if relax is not None:
            if hours is None:
                raise ValueError("this model relaxes toward the climatology: give the hour of its initial states")
            nxt = nxt + relax.to(nxt.dtype) * self.pull(base, hours + (step + 1) * self.step_hours)
        return nxt

    def pull(self, base: Tensor, valid_hours: Tensor) -> Tensor:
        """Where relaxation moves a forecast from its ``base`` state (B, C, H, W), per unit of its factor: to the
        climatology at ``valid_hours`` (B,). With ``keep_mean`` (``relaxation_mean`` keep, or auto on a global
        grid) the target is that climatology plus the base state's own area-mean anomaly (latitude-weighted, per
        channel), so relaxation draws the anomaly's pattern toward the climatology's and leaves its area mean, a
        warm or cold spell over the whole domain, as the base state and the network have it."""
        towards = self.climate(valid_hours).to(base.dtype) - base
        if self.keep_mean:
            at_base = self.climate(valid_hours - self.base_lag * self.step_hours).to(base.dtype) - base
            w = (self.lat_weights / self.lat_weights.sum()).to(base.dtype)
            towards = towards - (at_base * w).sum(dim=(-2, -1), keepdim=True)
        return towards

    def _step_factors(self, factors: Tensor, what: str) -> Tensor:
        """(K, C) factors checked and shaped (K, C, 1, 1) on the model's device; an empty tensor means none."""
        if factors.numel() and (factors.ndim != 2 or factors.shape[1] != self.n_channels):
            raise ValueError(f"{what} factors of shape {tuple(factors.shape)}: expected (steps, {self.n_channels})")
        return factors.reshape(-1, self.n_channels, 1, 1).to(self.mean.device, torch.float32)

    @staticmethod
    def _at_step(table: Tensor, step: int) -> Tensor | None:
        """Row ``step`` (0-based) of a per-step table, its last row beyond it, None when the table is empty."""
        return table[min(step, len(table) - 1)] if len(table) else None

    def set_damping(self, factors: Tensor) -> None:
        """Per-step, per-channel factors (K, C) on the predicted change; an empty tensor removes them."""
        self.damping = self._step_factors(factors, "damping")

    def step_scale(self, step: int) -> Tensor | None:
        """The factor (C, 1, 1) on the change predicted at rollout step ``step`` (0-based), or None."""
        return self._at_step(self.damping, step)

    def set_relaxation(self, factors: Tensor) -> None:
        """Per-step, per-channel factors (K, C) relaxing the forecast toward the climatology; empty: none."""
        if factors.numel() and not len(self.climatology):
            raise ValueError("this model has no climatology to relax toward")
        self.relaxation = self._step_factors(factors, "relaxation")

    def step_relaxation(self, step: int) -> Tensor | None:
        """The factor (C, 1, 1) toward the climatology at rollout step ``step`` (0-based), or None."""
        return self._at_step(self.relaxation, step)

    def climate(self, hours: Tensor) -> Tensor:
        """The climatology (B, C, H, W), normalized, at ``hours`` (B,) of the day (UTC)."""
        basis = daily_harmonics(hours.detach().cpu().numpy(), (len(self.climatology) - 1) // 2)  # (B, J)
        return torch.einsum("bj,jchw->bchw", torch.from_numpy(basis).to(self.climatology), self.climatology)

    def normalize(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std

    def denormalize(self, x: Tensor) -> Tensor:
        return x * self.std + self.mean


def _rebuilt(cfg: WeatherConfig, state: WeatherState, weights: dict[str, Tensor], buffers: dict[str, Tensor],
             keep_mean: bool, training: bool) -> WXFormer:
    """A pickled WXFormer (:meth:`WXFormer.__reduce__`) built again."""
    model = WXFormer(cfg, state)
    model.load_state_dict(weights)
    for name, tensor in buffers.items():
        owner, _, attr = name.rpartition(".")
        model.get_submodule(owner)._buffers[attr] = tensor
    model.keep_mean = keep_mean
    return model.train(training)


def build(cfg: WeatherConfig, state: WeatherState) -> WXFormer:
    return WXFormer(cfg, state)
