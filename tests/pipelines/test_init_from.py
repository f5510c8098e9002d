"""Starting a training run from a registered version: loading the weights and resolving the reference."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save

from pipelines.trainer import load_initial_weights


def _net(width: int = 4) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(3, width), torch.nn.ReLU(), torch.nn.Linear(width, 1))


def test_initial_weights_are_loaded_exactly() -> None:
    torch.manual_seed(0)
    source, target = _net(), _net()
    load_initial_weights(target, save({k: v.contiguous() for k, v in source.state_dict().items()}))
    for (name, a), (_, b) in zip(source.state_dict().items(), target.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_weights_of_another_size_or_architecture_are_refused_with_the_mismatch() -> None:
    weights = save({k: v.contiguous() for k, v in _net(width=8).state_dict().items()})
    with pytest.raises(ValueError, match=r"another size or architecture.*0\.weight \(8, 3\) vs \(4, 3\)"):
        load_initial_weights(_net(width=4), weights)
    other = save({"encoder.weight": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match=r"missing \['0\.weight'.*unexpected \['encoder\.weight'\]"):
        load_initial_weights(_net(), other)


def test_registered_versions_resolve_by_number_or_alias_and_unknown_ones_say_so(tmp_path: Path) -> None:
    import mlflow
    from mlflow import MlflowClient

    from services.forecasting.config import ForecastingConfig
    from shared.tracking import MODEL_DIR, registered_weights, resolve_version, save_model_dir

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    experiment = client.create_experiment("t", artifact_location=str(tmp_path / "artifacts"))
    run = client.create_run(experiment)
    net = _net()
    save_model_dir(tmp_path / "m", net, "forecasting", ForecastingConfig(), {})
    client.log_artifacts(run.info.run_id, str(tmp_path / "m"), artifact_path=MODEL_DIR)
    client.create_registered_model("forecasting")
    version = client.create_model_version("forecasting", f"runs:/{run.info.run_id}/{MODEL_DIR}", run.info.run_id)
    client.set_registered_model_alias("forecasting", "production", version.version)

    assert resolve_version(client, "forecasting", "1").run_id == run.info.run_id
    assert resolve_version(client, "forecasting", "@production").version == version.version
    found, meta, weights = registered_weights(client, "forecasting", "production")
    assert found.version == version.version and meta["config"]["model"] == "itransformer"
    load_initial_weights(_net(), weights)  # the bytes are the saved weights
    with pytest.raises(ValueError, match="no registered model 'forecasting' version '7'"):
        resolve_version(client, "forecasting", "7")
    with pytest.raises(ValueError, match="alias 'staging'"):
        resolve_version(client, "forecasting", "staging")
