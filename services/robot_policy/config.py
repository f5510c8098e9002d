"""Settings of the robot_policy domain (EBT-Policy and a diffusion baseline on Push-T)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from shared.config import RunSettings, require_at_least

MODELS = ("ebt", "diffusion")

STATE_DIM = 5  # Push-T state: agent x, y, block x, y, block angle (pixels, radians)
STATE_LAYOUT = ("agent_x", "agent_y", "block_x", "block_y", "block_angle")
ACTION_DIM = 2  # target agent position (pixels)
WORKSPACE = (0.0, 512.0)  # the simulator's window; the walls are at 5 and 506


# Run settings: no early stopping (behaviour cloning keeps improving in closed loop), and the last epoch's
# weights: open-loop validation action MSE does not track closed-loop coverage (44 epochs on Push-T: the
# best-MSE epoch scored 0.61 mean max coverage, the last 0.80).
# The moving average of the weights is what validation scores and the model registers, as Diffusion Policy and
# LeRobot evaluate theirs (decay 1 - (1 + step) ** -0.75, at most 0.9999). Linear warm-up and gradient clipping at
# 1.0 as in EBT.
@dataclass(frozen=True)
class RobotPolicyConfig(RunSettings, batch_size=256, lr=3e-4, lr_schedule="cosine", weight_decay=1e-4, decay_1d=True,
                        epochs=60, patience=0, keep="last", seed=0, precision="fp32", ema_decay=0.9999,
                        ema_power=0.75, warmup_steps=500, grad_clip=1.0):
    model: str = "ebt"  # one of MODELS
    data: str | None = None  # Push-T replay buffer (zarr); None: demonstrations of the scripted expert
    synthetic_episodes: int = 60  # scripted-expert demonstrations when data is None
    val_fraction: float = 0.05  # episodes held out for validation (and as many for test), by episode
    obs_encoder: Literal["state"] = "state"  # pluggable: image encoders are a later step

    obs_horizon: int = 2  # observations in the history
    action_horizon: int = 16  # actions per chunk
    action_exec: int = 8  # actions executed per chunk before replanning
    action_patch: int = 4  # consecutive actions embedded as one token (16 actions -> 4 tokens)

    d_model: int = 192
    n_heads: int = 4
    n_layers: int = 3
    d_ff: int = 768
    dropout: float = 0.0

    # EBT: energy descent a <- a - alpha * dE/da, alpha learned (initial value below)
    train_steps: int = 3  # descent steps unrolled in training (the loss is taken after each)
    infer_steps: int = 4  # descent steps at inference (the target allows at most 4)
    step_size: float = 1.0  # initial learned step size alpha
    langevin_noise: float = 0.05  # std of the noise added to each training descent step (0 disables)
    init_noise: float = 1.0  # std of the initial chunk (normalized action units)
    warm_start_prob: float = 0.3  # training: start from the shifted demonstrated chunk plus noise this often
    candidates: int = 4  # chunks refined in parallel at inference; the lowest final energy is kept
    energy_margin: float = 1.0  # contrastive term: E(demo) below E(initial chunk) by this margin (0 disables)
    energy_weight: float = 0.1  # weight of that term
    # ranking (InfoNCE over energies): the demonstration against negatives, the final iterate of the model's own
    # descent (detached) and ranking_negatives - 1 noised copies of the demonstration (std ranking_noise), so the
    # energy ranks chunks and candidates can be verified by it (0 disables). Off by default: with weight 1,
    # denoise_start_prob 0.2 and alpha_lr_scale 10, 24 epochs on Push-T scored 0.14 mean max reward (the energy
    # grew into a steep well of about -89 that one step reaches and more steps overshoot; docs/results.md)
    ranking_weight: float = 0.0
    ranking_negatives: int = 3
    ranking_noise: float = 0.3  # std (normalized action units) of the noised-demonstration negatives, times U(0.1, 1)
    denoise_start_prob: float = 0.0  # training: start the descent from the demonstration plus N(0, s), s ~ U(0, 1)
    alpha_lr_scale: float = 1.0  # the learned step size's learning rate, times the schedule's (no weight decay)
    early_stop_tol: float = 1e-3  # inference stops when the energy falls by less than this (dynamic compute)

    # diffusion baseline: DDPM epsilon-prediction with the same transformer
    diffusion_steps: int = 100

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.model not in MODELS:
            raise ValueError(f"model={self.model!r}: expected one of {list(MODELS)}")
        require_at_least(self, 1, ("synthetic_episodes", "obs_horizon", "action_horizon", "action_exec",
                                   "action_patch", "d_model", "n_heads", "n_layers", "d_ff", "train_steps",
                                   "infer_steps", "candidates", "diffusion_steps"))
        if self.action_horizon % self.action_patch:
            raise ValueError(f"action_patch={self.action_patch} must divide action_horizon={self.action_horizon}")
        if self.action_exec > self.action_horizon:
            raise ValueError(f"action_exec={self.action_exec} must not exceed action_horizon={self.action_horizon}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if not 0.0 < self.val_fraction < 0.5:
            raise ValueError(f"val_fraction={self.val_fraction} must be in (0, 0.5)")
        require_at_least(self, 0, ("langevin_noise", "init_noise", "energy_margin", "energy_weight",
                                   "early_stop_tol", "ranking_weight", "ranking_noise"))
        require_at_least(self, 1, ("ranking_negatives",))
        if not self.alpha_lr_scale > 0:
            raise ValueError(f"alpha_lr_scale={self.alpha_lr_scale} must be > 0")
        for name in ("warm_start_prob", "denoise_start_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}={getattr(self, name)} must be in [0, 1]")
        if self.warm_start_prob + self.denoise_start_prob > 1.0:
            raise ValueError(f"warm_start_prob + denoise_start_prob = "
                             f"{self.warm_start_prob + self.denoise_start_prob:g} must not exceed 1")
        if not self.step_size > 0:
            raise ValueError(f"step_size={self.step_size} must be > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")



@dataclass(frozen=True)
class RobotPolicyEvalConfig:
    """Settings of the closed-loop evaluation (``python -m pipelines.evaluate robot_policy --set key=value``)."""

    episodes: int = 50  # seeded episodes
    seed_start: int = 100_000  # episode i uses seed seed_start + i
    max_steps: int = 300  # environment steps per episode
    # initial-state protocols, the first is the headline: legacy = Diffusion Policy's (np.random.RandomState(seed)),
    # gym = gym-pusht 0.1.8's own reset (the environment's np_random), other states for the same seeds
    resets: tuple[Literal["legacy", "gym"], ...] = ("legacy", "gym")
    descent_steps: tuple[int, ...] = (2, 1, 4)  # EBT descent budgets evaluated, the first is the headline; 0: the
    # model's infer_steps
    candidates: int = 0  # 0: the model's candidates
    # energy-triggered extra compute, on the first protocol at the first budget: a chunk whose final energy is
    # above this quantile of the held-out demonstrations' is planned again with more steps and candidates (0: off)
    escalate_quantile: float = 0.75
    escalate_steps: int = 4
    escalate_candidates: int = 8
    gif_episodes: int = 3  # episodes recorded into the rollout GIF
    ood_samples: int = 512  # observation histories for the energy-as-uncertainty check
    workers: int = 0  # parallel rollout tasks on Ray; 0: one per CPU of the cluster, 1: in this process

    def __post_init__(self) -> None:
        require_at_least(self, 1, ("episodes", "max_steps", "ood_samples"))
        require_at_least(self, 0, ("seed_start", "candidates", "gif_episodes", "workers"))
        require_at_least(self, 1, ("escalate_steps", "escalate_candidates"))
        if not 0.0 <= self.escalate_quantile < 1.0:
            raise ValueError(f"escalate_quantile={self.escalate_quantile} must be in [0, 1)")
        if not self.resets or not self.descent_steps:
            raise ValueError("resets and descent_steps need at least one value each")
        if min(self.descent_steps) < 0:
            raise ValueError(f"descent_steps={list(self.descent_steps)}: must be >= 0")
        unknown = sorted(set(self.resets) - {"legacy", "gym"})
        if unknown:
            raise ValueError(f"resets={list(self.resets)}: {unknown} are not protocols (legacy, gym)")
