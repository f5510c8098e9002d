"""Starting a training run from a registered version: loading the weights and resolving the reference."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
from mlflow.exceptions import MlflowException
from safetensors.torch import load, save

from shared.tracking import load_weights


def _net(width: int = 4) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(3, width), torch.nn.ReLU(), torch.nn.Linear(width, 1))


def test_initial_weights_are_loaded_exactly() -> None:
    torch.manual_seed(0)
    source, target = _net(), _net()
    load_weights(target, load(save({k: v.contiguous() for k, v in source.state_dict().items()})))  # as the job does
    for (name, a), (_, b) in zip(source.state_dict().items(), target.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_weights_of_another_size_or_architecture_are_refused_with_the_mismatch() -> None:
    weights = _net(width=8).state_dict()
    with pytest.raises(ValueError, match=r"another size or architecture.*0\.weight \(8, 3\) vs \(4, 3\)"):
        load_weights(_net(width=4), weights)
    other = {"encoder.weight": torch.zeros(2, 2)}
    with pytest.raises(ValueError, match=r"missing \['0\.weight'.*unexpected \['encoder\.weight'\]"):
        load_weights(_net(), other)


class _FakeRegistry:
    """A stand-in MLflow client for the resolution logic (the real registry is exercised by the stack test)."""

    def __init__(self) -> None:
        self.version = SimpleNamespace(version="1", run_id="abc")

    def get_model_version(self, name: str, version: str) -> SimpleNamespace:
        if version != "1":
            raise MlflowException(f"Model Version (name={name}, version={version}) not found")
        return self.version

    def get_model_version_by_alias(self, name: str, alias: str) -> SimpleNamespace:
        if alias != "production":
            raise MlflowException(f"Registered model alias {alias} not found.")
        return self.version


def test_registered_versions_resolve_by_number_or_alias_and_unknown_ones_say_so() -> None:
    from shared.tracking import resolve_version

    registry: Any = _FakeRegistry()
    assert resolve_version(registry, "forecasting", "1").run_id == "abc"
    assert resolve_version(registry, "forecasting", "@production").version == "1"
    assert resolve_version(registry, "forecasting", "production").version == "1"
    with pytest.raises(ValueError, match="no registered model 'forecasting' version '7'"):
        resolve_version(registry, "forecasting", "7")
    with pytest.raises(ValueError, match="alias 'staging'"):
        resolve_version(registry, "forecasting", "staging")
    with pytest.raises(ValueError, match="empty model reference"):
        resolve_version(registry, "forecasting", "@")
