"""RevUNet: a 3-D U-Net whose stages are reversible mobile inverted bottlenecks and whose bottleneck is a
reversible transformer on ``shared.attention``.

Encoder: a 3x3x3 stem, then at 1, 1/2 and 1/4 resolution a :class:`~shared.reversible.ReversibleSequence` of
``depth`` mobile inverted bottlenecks (each coupling function F and G: 1x1x1 expansion, depthwise 3x3x3,
1x1x1 projection, GroupNorm and GELU between; after Pendse et al. 2020), strided 2x2x2 convolutions between
stages. At 1/8 resolution each voxel is a token (with 3-D sinusoidal positions) of a reversible transformer
(:class:`~shared.reversible.ReversibleEncoder`: attention through ``shared.attention``). Decoder: transposed
2x2x2 convolutions, the encoder's skip concatenated and fused by a 1x1x1 convolution, a reversible stage at
each resolution, a 1x1x1 head to the classes' logits.

``memory`` chooses how every reversible stage keeps its activations: ``reversible`` (recomputed from the
outputs in the backward pass), ``checkpoint`` (gradient checkpointing) or ``plain`` (all kept); the weights and
the function are the same, so a model trained one way runs the other.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from shared.reversible import ReversibleBlock, ReversibleEncoder, ReversibleSequence

from .config import SegmentationConfig


def _groups(channels: int) -> int:
    return math.gcd(channels, 8)


class InvertedBottleneck(nn.Module):
    """1x1x1 expansion, depthwise 3x3x3, 1x1x1 projection (zero-initialised: a new block starts as identity)."""

    def __init__(self, channels: int, expansion: int, dropout: float = 0.0) -> None:
        super().__init__()
        hidden = channels * expansion
        self.net = nn.Sequential(
            nn.Conv3d(channels, hidden, 1, bias=False), nn.GroupNorm(_groups(hidden), hidden), nn.GELU(),
            nn.Conv3d(hidden, hidden, 3, padding=1, groups=hidden, bias=False), nn.GroupNorm(_groups(hidden), hidden),
            nn.GELU(), nn.Dropout3d(dropout), nn.Conv3d(hidden, channels, 1))
        last = self.net[-1]
        assert isinstance(last, nn.Conv3d)
        nn.init.zeros_(last.weight)
        if last.bias is not None:
            nn.init.zeros_(last.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def reversible_stage(channels: int, cfg: SegmentationConfig) -> ReversibleSequence:
    half = channels // 2
    blocks = [ReversibleBlock(InvertedBottleneck(half, cfg.expansion, cfg.dropout),
                              InvertedBottleneck(half, cfg.expansion, cfg.dropout)) for _ in range(cfg.depth)]
    return ReversibleSequence(blocks, mode=cfg.memory, dim=1)


def positions_3d(shape: tuple[int, int, int], d_model: int, device: torch.device) -> Tensor:
    """Sinusoidal positions (X*Y*Z, d_model): a third of the features per axis (the rest zero)."""
    per_axis = (d_model // 6) * 2
    out = torch.zeros(*shape, d_model, device=device)
    freqs = torch.exp(torch.arange(0, per_axis, 2, device=device) * (-math.log(10000.0) / max(per_axis, 1)))
    for axis, size in enumerate(shape):
        pos = torch.arange(size, device=device, dtype=torch.float32)[:, None] * freqs  # (size, per_axis / 2)
        enc = torch.cat([pos.sin(), pos.cos()], dim=-1)  # (size, per_axis)
        view = [1, 1, 1, per_axis]
        view[axis] = size
        out[..., axis * per_axis:(axis + 1) * per_axis] = enc.view(*view)
    return out.reshape(-1, d_model)


class RevUNet(nn.Module):
    def __init__(self, cfg: SegmentationConfig, in_channels: int, n_classes: int) -> None:
        super().__init__()
        c = cfg.channels
        widths = (c, 2 * c, 4 * c)
        self.stem = nn.Sequential(nn.Conv3d(in_channels, c, 3, padding=1), nn.GroupNorm(_groups(c), c), nn.GELU())
        self.encoder = nn.ModuleList([reversible_stage(w, cfg) for w in widths])
        self.down = nn.ModuleList([nn.Conv3d(widths[0], widths[1], 2, stride=2),
                                   nn.Conv3d(widths[1], widths[2], 2, stride=2)])
        self.embed = nn.Sequential(nn.GroupNorm(_groups(widths[2]), widths[2]),
                                   nn.Conv3d(widths[2], cfg.d_model, 2, stride=2))
        self.transformer = ReversibleEncoder(cfg.d_model, cfg.n_heads, cfg.d_ff, cfg.n_layers, cfg.dropout,
                                             mode=cfg.memory)
        self.up = nn.ModuleList([nn.ConvTranspose3d(cfg.d_model, widths[2], 2, stride=2),
                                 nn.ConvTranspose3d(widths[2], widths[1], 2, stride=2),
                                 nn.ConvTranspose3d(widths[1], widths[0], 2, stride=2)])
        self.fuse = nn.ModuleList([nn.Conv3d(2 * w, w, 1) for w in reversed(widths)])
        self.decoder = nn.ModuleList([reversible_stage(w, cfg) for w in reversed(widths)])
        self.head = nn.Sequential(nn.GroupNorm(_groups(c), c), nn.GELU(), nn.Conv3d(c, n_classes, 1))
        self.d_model = cfg.d_model

    def forward(self, x: Tensor) -> Tensor:
        """x (B, C, X, Y, Z), each side a multiple of 8 -> logits (B, K, X, Y, Z)."""
        if any(s % 8 for s in x.shape[2:]):
            raise ValueError(f"RevUNet needs spatial sides that are multiples of 8, got {list(x.shape[2:])}")
        h = self.stem(x)
        skips = []
        for i, stage in enumerate(self.encoder):
            h = stage(h)
            skips.append(h)
            if i < len(self.down):
                h = self.down[i](h)
        t = self.embed(h)  # (B, d, X/8, Y/8, Z/8)
        b, d, *grid = t.shape
        tokens = t.flatten(2).transpose(1, 2) + positions_3d((grid[0], grid[1], grid[2]), d, t.device)
        h = self.transformer(tokens).transpose(1, 2).reshape(b, d, *grid)
        for up, fuse, stage, skip in zip(self.up, self.fuse, self.decoder, reversed(skips), strict=True):
            h = stage(fuse(torch.cat([up(h), skip], dim=1)))
        return self.head(h)


class Segmenter(nn.Module):
    """The network and how it runs on a whole volume: ``forward`` on patches, :meth:`segment` over MONAI's
    sliding windows of the training patch with Gaussian blending (``shared.inferers.SlidingWindowInferer``)."""

    def __init__(self, cfg: SegmentationConfig, in_channels: int, n_classes: int, patch: tuple[int, ...]) -> None:
        super().__init__()
        from shared.inferers import SlidingWindowInferer

        self.net = RevUNet(cfg, in_channels, n_classes)
        self.in_channels, self.n_classes = in_channels, n_classes
        # evaluation region -> class indices (set by the domain from the data's regions): what validation scores
        self.region_classes: dict[str, tuple[int, ...]] = {}
        self.inferer = SlidingWindowInferer(tuple(int(p) for p in patch), sw_batch_size=cfg.sw_batch_size,
                                            overlap=cfg.overlap, mode="gaussian")

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def segment(self, volume: Tensor) -> Tensor:
        """Class probabilities (B, K, X, Y, Z) of whole volumes (B, C, X, Y, Z) of any size."""
        logits: Tensor = self.inferer(self.net, volume)
        return torch.softmax(logits.float(), dim=1)


def build(cfg: SegmentationConfig, in_channels: int, n_classes: int, patch: tuple[int, ...]) -> Segmenter:
    return Segmenter(cfg, in_channels, n_classes, patch)
