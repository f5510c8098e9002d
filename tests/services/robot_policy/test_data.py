"""Push-T demonstrations: the replay-buffer reader, windows at episode edges, splits and normalization."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from services.robot_policy.data import (
    Demonstrations,
    Normalizer,
    RobotPolicyState,
    WindowDataset,
    expert_action,
    fit_normalizer,
    observation_features,
    read_replay_buffer,
    split_episodes,
    synthetic_demonstrations,
)
from tests.conftest import shared_data


def _toy(lengths: list[int]) -> Demonstrations:
    total = sum(lengths)
    states = np.arange(total * 5, dtype=np.float32).reshape(total, 5)
    actions = np.arange(total * 2, dtype=np.float32).reshape(total, 2)
    return Demonstrations(states, actions, np.cumsum(lengths), name="toy", fingerprint="x")


def test_windows_stay_inside_their_episode_and_repeat_the_edges() -> None:
    demos = _toy([5, 7])
    bounds = demos.episode_bounds()
    assert bounds == [(0, 5), (5, 12)]
    data = WindowDataset(demos, bounds, obs_horizon=2, action_horizon=4, action_exec=2)
    assert len(data) == 12
    obs, previous, chunk = data[5]  # first step of episode 2
    assert torch.equal(obs[0], obs[1]) and torch.equal(obs[1], torch.from_numpy(demos.states[5]))
    assert torch.equal(chunk, torch.from_numpy(demos.actions[5:9]))
    assert torch.equal(previous, torch.from_numpy(demos.actions[[5, 5, 5, 6]]))  # t - 2 clamped to the start
    obs, _, chunk = data[4]  # last step of episode 1: the last action repeats, nothing from episode 2
    assert torch.equal(obs, torch.from_numpy(demos.states[3:5]))
    assert torch.equal(chunk, torch.from_numpy(demos.actions[[4, 4, 4, 4]]))


def test_episode_split_is_disjoint_seeded_and_covers_everything() -> None:
    train, val, test = split_episodes(206, 0.05, seed=0)
    assert len(val) == len(test) == 10 and len(train) == 186
    assert not (set(train) & set(val)) and not (set(val) & set(test)) and not (set(train) & set(test))
    assert sorted(train + val + test) == list(range(206))
    assert split_episodes(206, 0.05, seed=0) == (train, val, test) != split_episodes(206, 0.05, seed=1)
    with pytest.raises(ValueError, match="at least 3 episodes"):
        split_episodes(2, 0.2, seed=0)


def test_normalizer_maps_training_range_to_unit_box_and_back() -> None:
    demos = _toy([6, 6])
    stats = fit_normalizer(demos, [(0, 6)])  # train on episode 1 only
    norm = Normalizer(RobotPolicyState(data="toy", fingerprint="toy", episodes={}, **stats))
    actions = torch.from_numpy(demos.actions[:6])
    scaled = norm.action(actions)
    assert scaled.min() == pytest.approx(-1) and scaled.max() == pytest.approx(1)
    torch.testing.assert_close(norm.unaction(scaled), actions)
    features = norm.obs(torch.from_numpy(demos.states[:6]))
    assert features.shape == (6, 6)
    assert features[:, :4].min() == pytest.approx(-1) and features[:, :4].max() == pytest.approx(1)


def test_angle_features_have_no_jump_at_two_pi() -> None:
    a = observation_features(np.array([[0, 0, 0, 0, 1e-4]], dtype=np.float32))
    b = observation_features(np.array([[0, 0, 0, 0, 2 * np.pi - 1e-4]], dtype=np.float32))
    assert np.abs(a - b).max() < 1e-3


def test_scripted_expert_makes_demonstrations_in_the_simulator() -> None:
    demos = synthetic_demonstrations(3, seed=0, max_steps=50)
    assert demos.n_episodes == 3 and demos.states.shape == (len(demos.actions), 5)
    assert demos.episode_ends[-1] == len(demos.states)
    assert (demos.actions >= 0).all() and (demos.actions <= 512).all()
    # deterministic for a seed
    again = synthetic_demonstrations(3, seed=0, max_steps=50)
    np.testing.assert_array_equal(demos.actions, again.actions)
    # the expert heads for the point behind the block (as seen from the goal) when far from it
    state = np.array([400.0, 400.0, 300.0, 300.0, 0.0])
    target = expert_action(state)
    assert np.linalg.norm(target - state[:2]) <= 60.0 + 40.0 + 1e-3


def test_reader_refuses_a_store_with_another_layout(tmp_path: Path) -> None:
    import zarr

    group = zarr.open_group(str(tmp_path / "bad.zarr"), mode="w")
    group.create_array("data/state", shape=(4, 5), dtype="float32")
    with pytest.raises(ValueError, match="not a Push-T replay buffer"):
        read_replay_buffer(tmp_path / "bad.zarr")
    with pytest.raises(FileNotFoundError):
        read_replay_buffer(tmp_path / "missing.zarr")


@pytest.mark.data
def test_real_pusht_replay_buffer() -> None:
    demos = read_replay_buffer(shared_data("robot_policy", "pusht_cchi_v7_replay.zarr"))
    assert demos.n_episodes == 206 and len(demos.states) == 25650
    assert demos.states.shape == (25650, 5) and demos.actions.shape == (25650, 2)
    assert demos.states[:, :4].min() >= 0 and demos.states[:, :4].max() <= 512
    assert demos.states[:, 4].min() >= 0 and demos.states[:, 4].max() < 2 * np.pi + 1e-3


def test_a_replay_buffer_in_an_object_store_reads_like_a_local_one(s3: str, tmp_path: Path) -> None:
    import s3fs
    import zarr

    local = tmp_path / "demos.zarr"
    group = zarr.open_group(str(local), mode="w")
    rng = np.random.default_rng(0)
    group.create_array("data/state", data=rng.uniform(0, 512, (30, 5)).astype("float32"))
    group.create_array("data/action", data=rng.uniform(0, 512, (30, 2)).astype("float32"))
    group.create_array("meta/episode_ends", data=np.array([12, 30], dtype="int64"))
    s3fs.S3FileSystem().put(str(local), f"{s3}/policy/demos.zarr", recursive=True)
    remote = read_replay_buffer(f"{s3}/policy/demos.zarr")
    here = read_replay_buffer(local)
    assert (remote.name, remote.fingerprint, remote.n_episodes) == ("demos.zarr", here.fingerprint, 2)
    np.testing.assert_array_equal(remote.states, here.states)
    with pytest.raises(FileNotFoundError, match="no replay buffer at s3://tessera-test/policy/other.zarr"):
        read_replay_buffer(f"{s3}/policy/other.zarr")
