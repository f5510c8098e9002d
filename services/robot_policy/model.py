"""EBT-Policy (energy-based transformer policy) and a diffusion baseline of the same transformer size.

Both read the same tokens: one per observation of the history (a pluggable encoder; state features first) and
one per patch of ``action_patch`` consecutive actions, with learned position embeddings, through a pre-norm
encoder from ``shared.layers`` (attention via ``shared.attention``).

EBT-Policy scores (observation history, action chunk) with a scalar energy and predicts by optimization:
start the chunk from noise (or from the previous chunk, shifted), take a few steps ``a <- a - alpha dE/da``
with a learned step size ``alpha``, keep the lowest-energy of several candidates refined in parallel. Training
unrolls those steps and backpropagates the behaviour-cloning loss of every iterate through the optimization
(a second-order gradient, hence :func:`shared.attention.twice_differentiable`). The final energy is returned
as an uncertainty signal; inference stops early once the energy stops falling.

The diffusion baseline (DDPM, epsilon prediction, cosine schedule, 100 steps as in Diffusion Policy) adds a
diffusion-time token to the same transformer and predicts the noise of each action patch.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shared.attention import twice_differentiable
from shared.inferers import EnergyDescentInferer, IndependentDescentInferer, autograd_enabled
from shared.layers import Encoder, EncoderLayer, make_norm

from .config import ACTION_DIM, RobotPolicyConfig
from .data import OBS_FEATURES, Normalizer, RobotPolicyState


class StateEncoder(nn.Module):
    """One token per observation: normalized state features -> d_model (image encoders plug in here)."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(OBS_FEATURES, d_model), nn.GELU(), nn.Linear(d_model, d_model))

    def forward(self, obs: Tensor) -> Tensor:
        return self.proj(obs)  # (B, To, F) -> (B, To, D)


OBS_ENCODERS = {"state": StateEncoder}


class PolicyTransformer(nn.Module):
    """Observation tokens + action-patch tokens (+ extra tokens) -> contextualized action-patch tokens."""

    def __init__(self, cfg: RobotPolicyConfig, extra_tokens: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        self.n_patches = cfg.action_horizon // cfg.action_patch
        self.obs_encoder = OBS_ENCODERS[cfg.obs_encoder](cfg.d_model)
        self.action_in = nn.Linear(ACTION_DIM * cfg.action_patch, cfg.d_model)
        n_tokens = cfg.obs_horizon + self.n_patches + extra_tokens
        self.position = nn.Parameter(torch.randn(n_tokens, cfg.d_model) * 0.02)
        self.encoder = Encoder(
            (EncoderLayer(cfg.d_model, cfg.n_heads, cfg.d_ff, dropout=cfg.dropout) for _ in range(cfg.n_layers)),
            norm=make_norm("layer", cfg.d_model))

    def forward(self, obs: Tensor, actions: Tensor, extra: Tensor | None = None) -> Tensor:
        """obs (B, To, F) normalized, actions (B, Ta, 2) normalized -> (B, Ta / patch, D)."""
        batch = actions.shape[0]
        patches = self.action_in(actions.reshape(batch, self.n_patches, -1))  # (B, P, D)
        tokens = [self.obs_encoder(obs), patches] + ([extra] if extra is not None else [])
        x = torch.cat(tokens, dim=1) + self.position  # (B, To + P [+ E], D)
        h = self.encoder(x)
        start = self.cfg.obs_horizon
        return h[:, start:start + self.n_patches]  # (B, P, D)


@dataclass
class Plan:
    """A refined action chunk per observation history (raw units) and how it was found."""

    actions: Tensor  # (B, Ta, 2) raw
    energy: Tensor  # (B,) final energy (NaN for models without one)
    steps: int  # descent / denoising steps taken
    energy_trace: list[float]  # mean energy of the kept candidates after each step (EBT)
    passes: int  # network forward(+backward) passes per chunk: steps * (fwd + bwd) or denoising steps


@dataclass
class Plans:
    """Independent plans, one per observation history (:meth:`EBTPolicy.plan_each`)."""

    actions: Tensor  # (B, Ta, 2) raw
    energy: Tensor  # (B,) final energy
    steps: Tensor  # (B,) descent steps each took
    passes: Tensor  # (B,) network passes each took


class PolicyBase(nn.Module):
    """What both policies share: the normalization statistics (from the saved state), inputs in raw units."""

    kind = "base"

    def __init__(self, cfg: RobotPolicyConfig, state: RobotPolicyState) -> None:
        super().__init__()
        self.cfg = cfg
        self.normalizer = Normalizer(state)

    def plan(self, obs: Tensor, previous: Tensor | None = None, *, steps: int | None = None,
             candidates: int | None = None, early_stop_tol: float | None = None,
             generator: torch.Generator | None = None) -> Plan:
        """Raw obs history (B, To, 5) [and the previous raw chunk (B, Ta, 2)] -> a planned chunk."""
        raise NotImplementedError


def shift_chunk(chunk: Tensor, by: int) -> Tensor:
    """(B, Ta, 2) -> the chunk advanced by ``by`` steps, its last action repeated at the end."""
    if by == 0:
        return chunk
    tail = chunk[:, -1:].expand(-1, by, -1)
    return torch.cat([chunk[:, by:], tail], dim=1)


class EBTPolicy(PolicyBase):
    kind = "ebt"

    def __init__(self, cfg: RobotPolicyConfig, state: RobotPolicyState) -> None:
        super().__init__(cfg, state)
        self.trunk = PolicyTransformer(cfg)
        self.head = nn.Sequential(nn.Linear(cfg.d_model, cfg.d_model), nn.GELU(), nn.Linear(cfg.d_model, 1))
        self.log_alpha = nn.Parameter(torch.tensor(math.log(cfg.step_size)))
        # its own optimizer group (pipelines.trainer.param_groups): a higher learning rate, no weight decay
        self.log_alpha.optim_group = {"lr_scale": cfg.alpha_lr_scale, "weight_decay": 0.0}  # type: ignore[attr-defined]

    @property
    def alpha(self) -> Tensor:
        return self.log_alpha.exp()

    def energy(self, obs: Tensor, actions: Tensor) -> Tensor:
        """E(obs history, action chunk), both normalized: (B, To, F), (B, Ta, 2) -> (B,)."""
        return self.head(self.trunk(obs, actions)).squeeze(-1).sum(dim=1)

    def forward(self, obs: Tensor, init: Tensor, steps: int, noise: float = 0.0,
                create_graph: bool = True) -> tuple[list[Tensor], list[Tensor]]:
        """Unrolled descent from ``init``: the iterates [a_0 .. a_K] and energies [E(a_0) .. E(a_K)].

        With ``create_graph`` each iterate stays a differentiable function of the parameters (training)."""
        iterates, energies = [init], []
        actions = init if create_graph and init.requires_grad else init.detach().requires_grad_(True)
        context = twice_differentiable() if create_graph else contextlib.nullcontext()
        with context:
            for _ in range(steps):
                energy = self.energy(obs, actions)
                (grad,) = torch.autograd.grad(energy.sum(), actions, create_graph=create_graph)
                actions = actions - self.alpha * grad
                if noise > 0:
                    actions = actions + noise * torch.randn_like(actions)
                if not create_graph:
                    actions = actions.detach().requires_grad_(True)
                iterates.append(actions)
                energies.append(energy)
            energies.append(self.energy(obs, actions))
        return iterates, energies

    def plan(self, obs: Tensor, previous: Tensor | None = None, *, steps: int | None = None,
             candidates: int | None = None, early_stop_tol: float | None = None,
             generator: torch.Generator | None = None, escalate_above: float | None = None,
             escalate_steps: int = 4, escalate_candidates: int = 8) -> Plan:
        """Raw obs history (B, To, 5) [and the previous raw chunk (B, Ta, 2)] -> the lowest-energy chunk.

        Energy-triggered extra compute: with ``escalate_above``, the observations whose final energy stays above
        it are planned again with ``escalate_steps`` steps and ``escalate_candidates`` candidates (the chunk
        found so far is one of them), and keep whichever chunk has the lower energy; ``steps`` and ``passes``
        then count both rounds."""
        cfg = self.cfg
        steps = cfg.infer_steps if steps is None else steps
        n_cand = cfg.candidates if candidates is None else candidates
        tol = cfg.early_stop_tol if early_stop_tol is None else early_stop_tol
        with autograd_enabled():
            obs_1 = self.normalizer.obs(obs.clone())
            starts = None
            if previous is not None:  # warm start: candidate 0 of each observation starts from the shifted plan
                starts = shift_chunk(self.normalizer.action(previous.clone().float()), cfg.action_exec)
            alpha = self.alpha.detach()
        best, energy, taken, trace, passes = self._descend(obs_1, starts, steps, n_cand, tol, generator, alpha)
        if escalate_above is not None and bool((energy > escalate_above).any()):
            hard = (energy > escalate_above).nonzero().squeeze(1)
            more = self._descend(obs_1[hard], best[hard], escalate_steps, escalate_candidates, tol, generator, alpha)
            better = more[1] < energy[hard]
            rows = hard[better]
            best, energy = best.clone(), energy.clone()
            best[rows], energy[rows] = more[0][better], more[1][better]
            taken, passes, trace = taken + more[2], passes + more[4], trace + more[3]
        raw = self.normalizer.unaction(best.clamp(-1.0, 1.0))
        return Plan(actions=raw, energy=energy, steps=taken, energy_trace=trace, passes=passes)

    def plan_each(self, obs: Tensor, previous: Sequence[Tensor | None], steps: Sequence[int],
                  candidates: Sequence[int], generators: Sequence[torch.Generator | None]) -> Plans:
        """Independent plans for B observation histories (B requests batched together): raw obs (B, To, 5),
        and per history its previous raw chunk (Ta, 2) or None, step budget, candidates and noise generator.
        Each history gets the plan it would get alone (:class:`shared.inferers.IndependentDescentInferer`: its
        own early stop; its noise drawn from its own generator, as :meth:`plan` draws it)."""
        cfg = self.cfg
        with autograd_enabled():
            obs_n = self.normalizer.obs(obs.clone())
            starts = []
            for prev, n_cand, generator in zip(previous, candidates, generators, strict=True):
                init = cfg.init_noise * torch.randn(n_cand, cfg.action_horizon, ACTION_DIM, generator=generator,
                                                    device=obs.device)
                if prev is not None:  # warm start: candidate 0 starts from the shifted plan
                    init[0] = shift_chunk(self.normalizer.action(prev[None].clone().float()), cfg.action_exec)[0]
                starts.append(init)
            obs_c = obs_n.repeat_interleave(torch.as_tensor(list(candidates), device=obs.device), dim=0)
            init, alpha = torch.cat(starts), self.alpha.detach()
        descent = IndependentDescentInferer(cfg.early_stop_tol)(
            lambda actions, rows: self.energy(obs_c[rows], actions), init,
            candidates=candidates, steps=steps, step_size=alpha)
        return Plans(actions=self.normalizer.unaction(descent.best.clamp(-1.0, 1.0)), energy=descent.energy,
                     steps=descent.steps, passes=descent.passes)

    def _descend(self, obs_n: Tensor, starts: Tensor | None, steps: int, n_cand: int, tol: float,
                 generator: torch.Generator | None, alpha: Tensor) -> tuple[Tensor, Tensor, int, list[float], int]:
        """Normalized obs (B, To, F) [and a normalized start for candidate 0 of each] -> the descent's best
        chunk (B, Ta, 2) and energy (B,), steps, trace and passes."""
        cfg = self.cfg
        batch = obs_n.shape[0]
        with autograd_enabled():  # (tensors made under torch.inference_mode could not enter the descent)
            init = cfg.init_noise * torch.randn(batch * n_cand, cfg.action_horizon, ACTION_DIM, generator=generator,
                                                device=obs_n.device)
            if starts is not None:
                init = init.view(batch, n_cand, *init.shape[1:]).clone()
                init[:, 0] = starts
                init = init.view(batch * n_cand, *init.shape[2:])
            obs_c = obs_n.repeat_interleave(n_cand, dim=0)  # (B*C, To, F)
        descent = EnergyDescentInferer(steps, n_cand, tol)(lambda actions: self.energy(obs_c, actions), init,
                                                           step_size=alpha)
        return descent.best, descent.energy, descent.steps, descent.trace, descent.passes


def cosine_betas(steps: int, max_beta: float = 0.999) -> Tensor:
    """The squared-cosine schedule of Nichol & Dhariwal (2021) (Diffusion Policy's ``squaredcos_cap_v2``)."""
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return torch.tensor([min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), max_beta) for i in range(steps)],
                        dtype=torch.float32)


class DiffusionPolicy(PolicyBase):
    """DDPM over action chunks with the same transformer: the baseline for compute per chunk."""

    kind = "diffusion"
    betas: Tensor
    alpha_bars: Tensor

    def __init__(self, cfg: RobotPolicyConfig, state: RobotPolicyState) -> None:
        super().__init__(cfg, state)
        self.trunk = PolicyTransformer(cfg, extra_tokens=1)
        self.time_mlp = nn.Sequential(nn.Linear(cfg.d_model, cfg.d_model), nn.GELU(),
                                      nn.Linear(cfg.d_model, cfg.d_model))
        self.head = nn.Linear(cfg.d_model, ACTION_DIM * cfg.action_patch)
        betas = cosine_betas(cfg.diffusion_steps)
        self.register_buffer("betas", betas, persistent=False)
        self.register_buffer("alpha_bars", torch.cumprod(1 - betas, dim=0), persistent=False)

    def time_token(self, t: Tensor) -> Tensor:
        half = self.cfg.d_model // 2
        freq = torch.exp(-math.log(10_000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        angle = t.float()[:, None] * freq[None]
        emb = torch.cat([angle.sin(), angle.cos()], dim=-1)
        emb = F.pad(emb, (0, self.cfg.d_model - emb.shape[-1]))
        return self.time_mlp(emb).unsqueeze(1)  # (B, 1, D)

    def forward(self, obs: Tensor, noisy: Tensor, t: Tensor) -> Tensor:
        """Predicted noise (B, Ta, 2) of the normalized noisy chunk at diffusion steps ``t`` (B,)."""
        h = self.trunk(obs, noisy, extra=self.time_token(t))  # (B, P, D)
        return self.head(h).reshape(noisy.shape)

    def loss(self, obs: Tensor, actions: Tensor) -> Tensor:
        t = torch.randint(0, self.cfg.diffusion_steps, (actions.shape[0],), device=actions.device)
        noise = torch.randn_like(actions)
        a_bar = self.alpha_bars[t].view(-1, 1, 1)
        noisy = a_bar.sqrt() * actions + (1 - a_bar).sqrt() * noise
        return F.mse_loss(self(obs, noisy, t), noise)

    @torch.no_grad()
    def plan(self, obs: Tensor, previous: Tensor | None = None, *, steps: int | None = None,
             candidates: int | None = None, early_stop_tol: float | None = None,
             generator: torch.Generator | None = None) -> Plan:
        """DDPM ancestral sampling over all ``diffusion_steps`` (``previous`` and candidates are not used)."""
        obs_n = self.normalizer.obs(obs.clone())
        x = torch.randn(obs.shape[0], self.cfg.action_horizon, ACTION_DIM, generator=generator, device=obs.device)
        n = self.cfg.diffusion_steps
        for i in reversed(range(n)):
            t = torch.full((obs.shape[0],), i, device=obs.device, dtype=torch.long)
            eps = self(obs_n, x, t)
            a_bar, beta = self.alpha_bars[i], self.betas[i]
            x0 = ((x - (1 - a_bar).sqrt() * eps) / a_bar.sqrt()).clamp(-1, 1)
            if i == 0:
                x = x0
                break
            a_bar_prev = self.alpha_bars[i - 1]
            mean = ((a_bar_prev.sqrt() * beta / (1 - a_bar)) * x0
                    + ((1 - beta).sqrt() * (1 - a_bar_prev) / (1 - a_bar)) * x)
            var = beta * (1 - a_bar_prev) / (1 - a_bar)
            x = mean + var.sqrt() * torch.randn(x.shape, generator=generator, device=x.device)
        nan = torch.full((obs.shape[0],), float("nan"), device=obs.device)
        return Plan(actions=self.normalizer.unaction(x), energy=nan, steps=n, energy_trace=[], passes=n)


def build(cfg: RobotPolicyConfig, state: RobotPolicyState) -> PolicyBase:
    return EBTPolicy(cfg, state) if cfg.model == "ebt" else DiffusionPolicy(cfg, state)
