"""The training job's registry logic, in this process (``--no-ray``) against an MLflow store on SQLite:
registration with its score and signature, promotion, ``--init-from`` and the errors that stop a job before it
trains. (The same entry point as a Ray job on the real stack is in the integration suite.)"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from pipelines.train import UsageError, run
from shared import registry

TOY = ["--set", "samples=256", "epochs=3", "cpus_per_worker=1"]


@pytest.fixture()
def local_mlflow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.chdir(tmp_path)  # the store's artifacts go to ./mlruns
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv(registry.DOMAIN_PACKAGES_ENV, "tests.fixtures.toy_domain")
    yield uri


def test_a_run_registers_promotes_and_a_later_one_starts_from_it(local_mlflow: str) -> None:
    from shared.tracking import client

    first = run(["toy", "--no-ray", *TOY])
    assert first["version"] == 1 and first["promoted"] is True and first["kept_epoch"] == first["epochs_run"] == 3
    mlflow = client(local_mlflow)
    version = mlflow.get_model_version("toy", "1")
    assert version.tags["eval_signature"] == "toy-256x4-0" and float(version.tags["val_mse"]) == pytest.approx(
        first["kept_val_mse"], abs=1e-6)
    artifacts = {a.path for a in mlflow.list_artifacts(first["run_id"], "model")}
    assert {"model/MLmodel", "model/requirements.txt", "model/input_example.json"} <= artifacts  # an MLflow model
    folder = {a.path for a in mlflow.list_artifacts(first["run_id"], "model/artifacts/tessera_model")}
    assert {f"model/artifacts/tessera_model/{f}" for f in ("weights.safetensors", "config.json", "state.json",
                                                            "state.safetensors")} == folder
    from mlflow import pyfunc

    served = pyfunc.load_model("models:/toy@production")  # the registered version loads as MLflow's
    assert list(served.predict(served.input_example).columns) == ["prediction"]

    second = run(["toy", "--no-ray", *TOY, "keep=last", "--init-from", "production"])
    tags = mlflow.get_run(second["run_id"]).data.tags
    assert tags["init_from_version"] == "1" and tags["init_from_run"] == first["run_id"]
    first_epoch = {r: mlflow.get_metric_history(r, "train_loss")[0].value for r in (first["run_id"], second["run_id"])}
    assert first_epoch[second["run_id"]] < first_epoch[first["run_id"]] / 5  # it started from a trained model
    # the same data and settings: promoted only if its kept epoch validates better
    beats = second["kept_val_mse"] < first["kept_val_mse"]
    assert second["promoted"] is beats and ("beats" if beats else "does not beat") in second["promotion"]


def test_jobs_that_cannot_start_as_asked_stop_with_the_reason(local_mlflow: str) -> None:
    with pytest.raises(UsageError, match="unknown model 'cubic' for toy; known: linear"):
        run(["toy", "--no-ray", "--model", "cubic"])
    with pytest.raises(UsageError, match="epochs=0: must be >= 1"):
        run(["toy", "--no-ray", "--set", "epochs=0"])
    run(["toy", "--no-ray", *TOY])
    with pytest.raises(UsageError, match="no registered model 'toy' version '99'"):
        run(["toy", "--no-ray", *TOY, "--init-from", "99"])
    with pytest.raises(ValueError, match="another size or architecture"):  # the weights do not fit: no training
        run(["toy", "--no-ray", *TOY, "features=3", "--init-from", "1"])
    with pytest.raises(UsageError, match="ray_workers=2 needs Ray"):
        run(["toy", "--no-ray", *TOY, "ray_workers=2", "batch_size=16"])
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="use_gpu=true trains on this machine's GPU, and torch sees none"):
            run(["toy", "--no-ray", *TOY, "use_gpu=true"])
    with pytest.raises(UsageError, match="data /nonexistent/ETTh1.csv does not exist on this machine"):
        run(["toy", "--no-ray", "--data", "/nonexistent/ETTh1.csv", *TOY])


def test_checkpoint_storage_is_a_folder_or_a_usable_uri(s3: str, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from pipelines.train import checkpoint_storage

    monkeypatch.setenv("TESSERA_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("TESSERA_STORAGE", raising=False)
    assert checkpoint_storage(None) == str(tmp_path / "home" / "ray_results")
    assert (tmp_path / "home" / "ray_results").is_dir()
    monkeypatch.setenv("TESSERA_STORAGE", f"{s3}/checkpoints")
    assert checkpoint_storage(None) == f"{s3}/checkpoints"
    assert checkpoint_storage(str(tmp_path / "nfs")) == str(tmp_path / "nfs")  # --storage wins
    with pytest.raises(UsageError, match="checkpoint storage s3://no-such-bucket-here/ckpt cannot be used"):
        checkpoint_storage("s3://no-such-bucket-here/ckpt")


def test_the_command_line_exits_2_with_the_reason(local_mlflow: str, capsys: pytest.CaptureFixture[str]) -> None:
    from pipelines.train import main

    with pytest.raises(SystemExit) as exit_info:
        main(["toy", "--no-ray", "--set", "nope=1"])
    assert exit_info.value.code == 2 and "unknown setting 'nope'" in capsys.readouterr().err


def test_a_local_checkpoint_folder_on_a_multi_node_cluster_is_warned_about(capsys: pytest.CaptureFixture[str]) -> None:
    from pipelines.train import warn_if_storage_is_not_shared

    class Cluster:  # what ray.nodes() answers (a unit test: the real multi-node check is the message's wording)
        def __init__(self, alive: int) -> None:
            self.alive = alive

        def nodes(self) -> list[dict[str, object]]:
            return [{"Alive": True}] * self.alive + [{"Alive": False}]

    warn_if_storage_is_not_shared(Cluster(1), "/home/me/.tessera/ray_results")
    warn_if_storage_is_not_shared(Cluster(3), "s3://bucket/checkpoints")
    assert capsys.readouterr().out == ""
    warn_if_storage_is_not_shared(Cluster(3), "/home/me/.tessera/ray_results")
    assert "a local folder, on a 3-node cluster" in capsys.readouterr().out


def test_an_evaluation_of_data_that_is_not_there_stops_before_loading_a_model() -> None:
    from pipelines.evaluate import UsageError as EvaluationUsageError
    from pipelines.evaluate import run as evaluate

    with pytest.raises(EvaluationUsageError, match="evaluation data /nonexistent/era5.grib does not exist"):
        evaluate(["weather", "--data", "/nonexistent/era5.grib"])
