"""Push-T demonstrations: the Diffusion Policy replay buffer, a scripted expert, windows and normalization.

A demonstration set is a flat array of states (T, 5), actions (T, 2) and the exclusive end index of each
episode, the layout of Diffusion Policy's zarr replay buffer (``data/state``, ``data/action``,
``meta/episode_ends``). Training samples are windows ``(obs[t - To + 1 .. t], actions[t .. t + Ta - 1])`` inside
one episode; near the edges the first observation / last action is repeated, as in Diffusion Policy.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from shared import datapath
from shared.saved import SavedState, tensor

from .config import ACTION_DIM, STATE_DIM

GOAL = np.array([256.0, 256.0, np.pi / 4])  # gym-pusht's goal pose of the T block (x, y, angle)


@dataclass
class Demonstrations:
    states: np.ndarray  # (T, 5) float32
    actions: np.ndarray  # (T, 2) float32
    episode_ends: np.ndarray  # (E,) int64, exclusive
    name: str
    fingerprint: str

    @property
    def n_episodes(self) -> int:
        return len(self.episode_ends)

    def episode_bounds(self) -> list[tuple[int, int]]:
        starts = np.concatenate([[0], self.episode_ends[:-1]])
        return [(int(a), int(b)) for a, b in zip(starts, self.episode_ends, strict=True)]


def read_replay_buffer(path: str | Path) -> Demonstrations:
    """Read a Diffusion Policy replay buffer (zarr directory store) and check its layout."""
    import zarr

    try:
        datapath.require(path, "replay buffer")
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"no replay buffer at {path} ({exc})") from None
    group: Any = zarr.open_group(datapath.normalize(path), mode="r")  # a folder, or a store at a URI (fsspec)
    try:
        states = np.asarray(group["data/state"][:], dtype=np.float32)
        actions = np.asarray(group["data/action"][:], dtype=np.float32)
        ends = np.asarray(group["meta/episode_ends"][:], dtype=np.int64)
    except KeyError as exc:
        raise ValueError(f"{path}: not a Push-T replay buffer (needs data/state, data/action, "
                         f"meta/episode_ends): missing {exc}") from None
    if states.ndim != 2 or states.shape[1] != STATE_DIM:
        raise ValueError(f"{path}: data/state has shape {states.shape}, expected (T, {STATE_DIM})")
    if actions.shape != (len(states), ACTION_DIM):
        raise ValueError(f"{path}: data/action has shape {actions.shape}, expected ({len(states)}, {ACTION_DIM})")
    if len(ends) == 0 or ends[-1] != len(states) or np.any(np.diff(np.concatenate([[0], ends])) <= 0):
        raise ValueError(f"{path}: meta/episode_ends must increase strictly and end at {len(states)}")
    digest = hashlib.sha256(states.tobytes() + actions.tobytes() + ends.tobytes()).hexdigest()[:16]
    return Demonstrations(states, actions, ends, name=datapath.name(path), fingerprint=digest)


# ----------------------------------------------------------------------------------------------------------------
# the scripted expert (offline default and tests)


def _wrap(angle: float) -> float:
    return float((angle + np.pi) % (2 * np.pi) - np.pi)


def expert_action(state: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
    """A scripted pusher: get behind the T (seen from the goal), then push it toward the goal; near the goal,
    push one arm of the T sideways to turn it. It reaches the goal region often, not always: the point is
    plausible, multimodal demonstrations in the real simulator, not a strong policy."""
    agent, block, angle = state[:2], state[2:4], float(state[4])
    to_goal = GOAL[:2] - block
    distance = float(np.linalg.norm(to_goal))
    turn = _wrap(GOAL[2] - angle)
    if distance > 25.0 or abs(turn) < 0.25:
        direction = to_goal / max(distance, 1e-6)
        contact = block - direction * 70.0  # behind the block
        push = block + direction * min(distance, 60.0)
    else:  # rotate: push the end of the top bar perpendicular to it
        bar = np.array([np.cos(angle), np.sin(angle)])
        sign = 1.0 if turn > 0 else -1.0
        normal = np.array([-bar[1], bar[0]]) * -sign
        lever = block + bar * 60.0
        contact = lever - normal * 40.0
        push = lever + normal * 30.0
    to_contact = contact - agent
    if np.linalg.norm(to_contact) > 20.0:
        # go around the block rather than through it: aim at the contact point, pushed away from the block
        away = agent - block
        if np.linalg.norm(away) < 90.0:
            target = agent + to_contact / max(np.linalg.norm(to_contact), 1e-6) * 40.0
            target += away / max(np.linalg.norm(away), 1e-6) * 40.0
        else:
            target = agent + to_contact / max(np.linalg.norm(to_contact), 1e-6) * min(np.linalg.norm(to_contact), 60.0)
    else:
        target = push
    if rng is not None:
        target = target + rng.normal(0.0, 3.0, size=2)
    return np.clip(target, 20.0, 492.0).astype(np.float32)


def make_env(render: bool = False, size: int = 192) -> Any:
    """gym-pusht with state observations (headless; ``render()`` gives size x size RGB frames)."""
    import gym_pusht  # noqa: F401  (registers gym_pusht/PushT-v0)
    import gymnasium as gym

    return gym.make("gym_pusht/PushT-v0", obs_type="state", render_mode="rgb_array" if render else None,
                    max_episode_steps=300, visualization_width=size, visualization_height=size)


def synthetic_demonstrations(episodes: int, seed: int = 0, max_steps: int = 200) -> Demonstrations:
    """Roll the scripted expert out in gym-pusht from seeded random starts (seeds below the evaluation's)."""
    env = make_env()
    rng = np.random.default_rng(seed)
    states, actions, ends = [], [], []
    try:
        for episode in range(episodes):
            obs, _ = env.reset(seed=seed * 10_000 + episode)
            for _ in range(max_steps):
                action = expert_action(obs, rng)
                states.append(obs.astype(np.float32))
                actions.append(action)
                obs, _, terminated, truncated, _ = env.step(action)
                if terminated or truncated:
                    break
            ends.append(len(states))
    finally:
        env.close()
    states_arr, actions_arr = np.stack(states), np.stack(actions)
    digest = hashlib.sha256(f"scripted:{episodes}:{seed}:{max_steps}".encode()).hexdigest()[:16]
    return Demonstrations(states_arr, actions_arr, np.asarray(ends, dtype=np.int64), name="scripted-expert",
                          fingerprint=digest)


# ----------------------------------------------------------------------------------------------------------------
# features, normalization and windows


def observation_features(states: np.ndarray | Tensor) -> np.ndarray | Tensor:
    """(..., 5) states -> (..., 6) features: positions, then the block angle as (sin, cos) (no 0/2pi jump)."""
    if isinstance(states, Tensor):
        theta = states[..., 4:5]
        return torch.cat([states[..., :4], torch.sin(theta), torch.cos(theta)], dim=-1)
    angle = states[..., 4:5]
    return np.concatenate([states[..., :4], np.sin(angle), np.cos(angle)], axis=-1).astype(np.float32)


OBS_FEATURES = STATE_DIM + 1


@dataclass(frozen=True)
class RobotPolicyState(SavedState):
    """What a policy keeps from its demonstrations: where they came from, the episode split and the min-max
    statistics of observation features and actions (training episodes only)."""

    data: str  # replay buffer name, or "scripted-expert"
    fingerprint: str
    episodes: dict[str, tuple[int, ...]]  # train / val / test episode ids
    obs_min: Tensor  # (OBS_FEATURES,) float32
    obs_max: Tensor
    action_min: Tensor  # (ACTION_DIM,) float32
    action_max: Tensor

    @classmethod
    def from_legacy(cls, info: Mapping[str, Any]) -> RobotPolicyState:
        stats = info["normalizer"]
        arrays = {k: tensor(stats[k]) for k in ("obs_min", "obs_max", "action_min", "action_max")}
        return cls.from_parts({k: info[k] for k in ("data", "fingerprint", "episodes")}, arrays)


def fit_normalizer(demos: Demonstrations, episodes: list[tuple[int, int]]) -> dict[str, Tensor]:
    """Min-max statistics (to [-1, 1]) of positions and actions over the training episodes only; the block
    angle's sin and cos keep [-1, 1]."""
    index = np.concatenate([np.arange(a, b) for a, b in episodes])
    positions = demos.states[index, :4]
    actions = demos.actions[index]
    return {"obs_min": tensor(positions.min(0).tolist() + [-1.0, -1.0]),
            "obs_max": tensor(positions.max(0).tolist() + [1.0, 1.0]),
            "action_min": tensor(actions.min(0)), "action_max": tensor(actions.max(0))}


class Normalizer:
    """Maps observations (as features) and actions to [-1, 1] and back, from the saved statistics."""

    def __init__(self, state: RobotPolicyState) -> None:
        self.obs_min = state.obs_min.float()
        self.obs_span = (state.obs_max.float() - self.obs_min).clamp_min(1e-6)
        self.act_min = state.action_min.float()
        self.act_span = (state.action_max.float() - self.act_min).clamp_min(1e-6)

    def obs(self, states: Tensor) -> Tensor:
        """(..., 5) raw states -> (..., 6) normalized features."""
        features = observation_features(states.float())
        assert isinstance(features, Tensor)
        return (features - self.obs_min.to(states.device)) / self.obs_span.to(states.device) * 2 - 1

    def action(self, actions: Tensor) -> Tensor:
        return (actions - self.act_min.to(actions.device)) / self.act_span.to(actions.device) * 2 - 1

    def unaction(self, normalized: Tensor) -> Tensor:
        return (normalized + 1) / 2 * self.act_span.to(normalized.device) + self.act_min.to(normalized.device)


def window_index(episodes: list[tuple[int, int]]) -> np.ndarray:
    """(N, 3) rows of (t, episode start, episode end): one window per step of each episode."""
    rows = [np.stack([np.arange(a, b), np.full(b - a, a), np.full(b - a, b)], axis=1) for a, b in episodes]
    return np.concatenate(rows).astype(np.int64) if rows else np.zeros((0, 3), dtype=np.int64)


class WindowDataset(Dataset):
    """(raw obs history (To, 5), raw previous-chunk actions (Ta, 2), raw action chunk (Ta, 2)) per step.

    The previous chunk is the chunk planned ``action_exec`` steps earlier (what a warm start at inference has).
    """

    def __init__(self, demos: Demonstrations, episodes: list[tuple[int, int]], obs_horizon: int,
                 action_horizon: int, action_exec: int) -> None:
        self.states = torch.from_numpy(demos.states)
        self.actions = torch.from_numpy(demos.actions)
        self.index = torch.from_numpy(window_index(episodes))
        self.obs_offsets = torch.arange(-obs_horizon + 1, 1)
        self.act_offsets = torch.arange(action_horizon)
        self.action_exec = action_exec

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, Tensor]:
        t, start, end = (int(v) for v in self.index[i])
        obs = self.states[(t + self.obs_offsets).clamp(start, end - 1)]
        chunk = self.actions[(t + self.act_offsets).clamp(start, end - 1)]
        previous = self.actions[(t - self.action_exec + self.act_offsets).clamp(start, end - 1)]
        return obs, previous, chunk


def split_episodes(n_episodes: int, val_fraction: float, seed: int) -> tuple[list[int], list[int], list[int]]:
    """Episode ids for train / val / test: a seeded shuffle, at least one episode in each."""
    order = np.random.default_rng(seed).permutation(n_episodes)
    n_hold = max(1, round(n_episodes * val_fraction))
    if n_episodes < 3:
        raise ValueError(f"need at least 3 episodes to split train/val/test, got {n_episodes}")
    n_hold = min(n_hold, (n_episodes - 1) // 2)
    train, val, test = order[2 * n_hold:], order[:n_hold], order[n_hold:2 * n_hold]
    return sorted(train.tolist()), sorted(val.tolist()), sorted(test.tolist())
