"""MLflow tracking and model I/O shared by every domain.

A registered model is a folder of plain data, never pickles: ``weights.safetensors`` (the state dict),
``config.json`` (domain, model name and the full config), and the domain's typed saved state
(``state.json`` for metadata, ``state.safetensors`` for arrays; see :mod:`shared.saved`). Models saved
before typed state have one ``stats.json`` instead, which still loads. The folder is logged as run artifacts
under ``model/`` and registered as a model version whose source is that folder; the alias ``production``
marks the version the services answer with.
"""

from __future__ import annotations

import importlib
import json
import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from safetensors.torch import load_file, save_file

from shared import registry
from shared.config import from_dict, to_dict
from shared.layers import unwrap
from shared.loaded import LoadedModel
from shared.saved import SavedState

PRODUCTION = "production"
MODEL_DIR = "model"
DEFAULT_TRACKING_URI = "http://127.0.0.1:5000"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI)


def check_reachable(uri: str | None = None, timeout: float = 5.0) -> str:
    """The tracking URI once an MLflow server answers there (file and database URIs need none); otherwise a
    ConnectionError at once that says what to do, instead of minutes of the client's retries."""
    import urllib.error
    import urllib.request

    uri = uri or tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return uri
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):
            pass
    except urllib.error.HTTPError:
        pass  # a server answered (a proxy or an auth layer in front of MLflow)
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ConnectionError(f"MLflow is not reachable at {uri} ({reason}): start the local stack with "
                              f"`tessera up` (or `make up`), or point MLFLOW_TRACKING_URI at your MLflow server"
                              ) from None
    return uri


def client(uri: str | None = None) -> MlflowClient:
    return MlflowClient(tracking_uri=uri or tracking_uri())


def save_model_dir(path: Path, model: torch.nn.Module, domain: str, cfg: Any, state: SavedState) -> Path:
    """Write weights, config and saved state of a model into ``path`` (created)."""
    path.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in unwrap(model).state_dict().items()}
    save_file(weights, str(path / "weights.safetensors"))
    package = type(registry.get(domain)).__module__.rsplit(".", 1)[0]  # where the domain lives (services, ...)
    (path / "config.json").write_text(json.dumps({"domain": domain, "package": package, "config": to_dict(cfg)},
                                                 indent=2))
    state.save(path)
    return path


def model_dir_of(folder: Path) -> Path:
    """The Tessera model folder inside ``folder``: the pyfunc model's artifact when ``folder`` is an MLflow
    model (it has an ``MLmodel``), else ``folder`` itself (a bare folder, as models registered before were)."""
    if not (folder / "MLmodel").exists():
        return folder
    import yaml

    from shared.pyfunc_model import ARTIFACT

    flavor = yaml.safe_load((folder / "MLmodel").read_text())["flavors"]["python_function"]
    artifacts = flavor.get("artifacts") or (flavor.get("model_config") or {}).get("artifacts") or {}
    if ARTIFACT in artifacts:
        return folder / artifacts[ARTIFACT]["path"]
    return folder / "artifacts" / ARTIFACT


def pip_requirements(domain: str) -> list[str]:
    """The installed versions of what the platform and ``domain``'s extra need (the MLflow model's pip
    requirements); unpinned names where Tessera runs from a source tree without its metadata."""
    import importlib.metadata
    import re

    try:
        declared = importlib.metadata.requires("tessera") or []
    except importlib.metadata.PackageNotFoundError:
        return ["torch", "mlflow", "safetensors", "numpy", "pandas"]
    wanted = []
    for line in declared:
        requirement, _, marker = line.partition(";")
        extra = re.search(r"extra\s*==\s*['\"]([^'\"]+)['\"]", marker)
        if extra is None or extra.group(1) == domain:
            wanted.append(re.split(r"[<>=!~\[ ]", requirement.strip(), maxsplit=1)[0])
    pinned = []
    for name in dict.fromkeys(wanted):
        try:
            pinned.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            pinned.append(name)
    return pinned


def save_pyfunc(path: Path, model: torch.nn.Module, domain: str, cfg: Any, state: SavedState) -> Path:
    """Write the model as an MLflow pyfunc model into ``path``: the Tessera model folder as its artifact, the
    code of ``shared`` and of the domain's package, a signature and an input example from the model itself, and
    the pip requirements of the platform and the domain's extra. No pickle: "models from code"."""
    import tempfile as tmp

    import mlflow.pyfunc
    from mlflow.models import infer_signature

    import shared
    from shared.pyfunc_model import ARTIFACT

    described = registry.get(domain)
    with tmp.TemporaryDirectory() as scratch:
        folder = save_model_dir(Path(scratch) / ARTIFACT, model, domain, cfg, state)
        loaded = load_model_dir(folder)
        example, params = described.pyfunc_example(loaded)
        output = described.pyfunc_predict(loaded, example, dict(params))
        package = importlib.import_module(type(described).__module__.rsplit(".", 1)[0])
        code = [str(Path(shared.__file__).parent)]
        if "." not in package.__name__ and package.__file__:  # a top-level package (services, or a user's own)
            code.append(str(Path(package.__file__).parent))
        mlflow.pyfunc.save_model(
            str(path), python_model=str(Path(__file__).parent / "pyfunc_model.py"), artifacts={ARTIFACT: str(folder)},
            code_paths=code, signature=infer_signature(example, output, params=params or None),
            input_example=(example, params) if params else example, pip_requirements=pip_requirements(domain),
            metadata={"tessera_domain": domain, "architecture": str(getattr(cfg, "model", ""))})
    return path


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load ``state`` into ``model``; a ValueError naming the first mismatches when the saved model has other
    parameters or shapes (another architecture or size)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        raise ValueError(f"the weights do not fit this model (another size or architecture?): "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}, shapes {shapes[:5]}")
    model.load_state_dict(state)


def load_model_dir(path: Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild a model from a folder written by :func:`save_model_dir` (or an MLflow model holding one), or by
    an earlier version (config with renamed fields, ``stats.json``); no code is unpickled."""
    path = model_dir_of(path)
    meta = json.loads((path / "config.json").read_text())
    domain = registry.get(meta["domain"])
    cfg: Any = from_dict(domain.config_cls, meta["config"])
    state = domain.state_cls.load(path)
    model = domain.build_model(cfg, state)
    load_weights(model, load_file(str(path / "weights.safetensors")))
    model.to(device).eval()
    return LoadedModel(model=model, cfg=cfg, state=state, domain=meta["domain"])


class MlflowTracker:
    """The trainer's :class:`pipelines.trainer.Tracker` for one MLflow run (rank 0 of a training job)."""

    def __init__(self, uri: str, run_id: str) -> None:
        self.client = client(uri)
        self.run_id = run_id

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step or 0) for k, v in metrics.items()])

    def log_figure(self, figure: Any, path: str) -> None:
        self.client.log_figure(self.run_id, figure, path)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, value)

    def log_model(self, model: torch.nn.Module, domain: str, cfg: Any, state: SavedState) -> None:
        """The model as an MLflow pyfunc model in the run's ``model/`` (what the registry's versions point at)."""
        with tempfile.TemporaryDirectory() as tmp:
            save_pyfunc(Path(tmp) / MODEL_DIR, model, domain, cfg, state)
            self.client.log_artifacts(self.run_id, str(Path(tmp) / MODEL_DIR), artifact_path=MODEL_DIR)


def production_version(mlflow_client: MlflowClient, name: str, alias: str = PRODUCTION) -> ModelVersion | None:
    try:
        return mlflow_client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def register(mlflow_client: MlflowClient, name: str, run_id: str, tags: dict[str, str]) -> ModelVersion:
    """Register ``runs:/<run_id>/model`` as a new version of ``name``."""
    try:
        mlflow_client.create_registered_model(name, description=f"Tessera {name} models (weights + config + stats)")
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    run = mlflow_client.get_run(run_id)
    source = f"{run.info.artifact_uri.rstrip('/')}/{MODEL_DIR}"
    version = mlflow_client.create_model_version(name, source=source, run_id=run_id, tags=tags)
    for _ in range(60):
        if version.status == "READY":
            break
        time.sleep(0.5)
        version = mlflow_client.get_model_version(name, version.version)
    return version


HISTORY_TAG = "production_history"  # registered-model tag: the versions that held @production, oldest first


def move_alias(mlflow_client: MlflowClient, name: str, version: str, alias: str = PRODUCTION) -> str | None:
    """Point ``alias`` at ``version`` and record it in the model's alias history (what ``rollback`` reads);
    returns the version that held it before (None: none did)."""
    current = production_version(mlflow_client, name, alias)
    mlflow_client.set_registered_model_alias(name, alias, str(version))
    if alias == PRODUCTION:
        history = _history(mlflow_client, name)
        if current is not None and (not history or history[-1] != str(current.version)):
            history.append(str(current.version))
        history.append(str(version))
        mlflow_client.set_registered_model_tag(name, HISTORY_TAG, ",".join(history[-50:]))
    return str(current.version) if current is not None else None


def _history(mlflow_client: MlflowClient, name: str) -> list[str]:
    tag = mlflow_client.get_registered_model(name).tags.get(HISTORY_TAG, "")
    return [v for v in tag.split(",") if v]


def rollback(mlflow_client: MlflowClient, name: str) -> tuple[str, str]:
    """Move @production back to the version that held it before the current one: (from, to) versions; a
    ValueError when there is nothing to go back to."""
    current = production_version(mlflow_client, name)
    if current is None:
        raise ValueError(f"no {name} version holds @{PRODUCTION}: nothing to roll back")
    history = _history(mlflow_client, name)
    while history and history[-1] == str(current.version):
        history.pop()
    if not history:
        raise ValueError(f"{name} v{current.version} is the first version that held @{PRODUCTION}; there is no "
                         f"earlier one to roll back to")
    previous = history[-1]
    mlflow_client.set_registered_model_alias(name, PRODUCTION, previous)
    mlflow_client.set_registered_model_tag(name, HISTORY_TAG, ",".join(history))
    return str(current.version), previous


def promote_if_better(mlflow_client: MlflowClient, name: str, version: ModelVersion, metric: str,
                      value: float, signature: str, alias: str = PRODUCTION, *, prefix: str = "val_",
                      signature_tag: str = "eval_signature", higher_is_better: bool = False) -> tuple[bool, str]:
    """Champion / challenger: move ``alias`` to ``version`` when it beats the current holder on ``metric``.

    The holder's score is its ``{prefix}{metric}`` tag (lower is better unless ``higher_is_better``). Scores
    are only comparable on the same data and settings (``signature``, the holder's ``signature_tag`` tag): a
    model scored on something else stays registered, the alias stays where it is, and the reason says how to
    move it on purpose (``tessera promote``). With no holder yet, the first model takes the alias.
    """
    label = f"{prefix}{metric}"
    current = production_version(mlflow_client, name, alias)
    if current is None:
        reason = f"first model: no {alias} version yet"
    elif str(current.version) == str(version.version):
        return False, f"v{version.version} already holds @{alias}"
    else:
        cur_sig = current.tags.get(signature_tag)
        cur_val = current.tags.get(label)
        if cur_sig != signature or cur_val is None:
            return False, (f"{alias} v{current.version} was scored on other data or settings ({cur_sig}, this "
                           f"one: {signature}), so the two do not compare; v{version.version} is registered, and "
                           f"`tessera promote {name} {version.version}` moves @{alias} to it")
        better = value > float(cur_val) if higher_is_better else value < float(cur_val)
        if not better:
            return False, f"{label} {value:.4f} does not beat {alias} v{current.version} ({float(cur_val):.4f})"
        reason = f"{label} {value:.4f} beats {alias} v{current.version} ({float(cur_val):.4f})"
    move_alias(mlflow_client, name, str(version.version), alias)
    return True, reason


def list_versions(mlflow_client: MlflowClient, name: str) -> list[dict[str, Any]]:
    """Every registered version of ``name``, newest first: version, aliases, run, created time and its tags
    (validation score, evaluation signature, closed-loop scores)."""
    versions = mlflow_client.search_model_versions(f"name = '{name}'")
    try:
        aliases = mlflow_client.get_registered_model(name).aliases
    except MlflowException:
        aliases = {}
    out = []
    for v in sorted(versions, key=lambda v: int(v.version), reverse=True):
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(v.creation_timestamp / 1000))
        out.append({"version": int(v.version), "run_id": v.run_id, "created": created, "tags": dict(v.tags),
                    "aliases": sorted(a for a, n in aliases.items() if str(n) == str(v.version))})
    return out


def _download_model_dir(mlflow_client: MlflowClient, name: str, version: ModelVersion, into: str) -> Path:
    """The model folder of a registered version, downloaded under ``into``."""
    if not version.run_id:
        raise ValueError(f"model version {name} v{version.version} has no run to download from")
    return Path(mlflow_client.download_artifacts(version.run_id, MODEL_DIR, into))


def resolve_version(mlflow_client: MlflowClient, name: str, ref: str) -> ModelVersion:
    """A registered version of ``name`` from ``ref``: a version number (``"3"``) or an alias (``"production"``,
    ``"@production"``); a clear ValueError when there is none."""
    ref = ref.strip().lstrip("@")
    if not ref:
        raise ValueError("empty model reference: give a version number or an alias such as 'production'")
    try:
        if ref.isdigit():
            return mlflow_client.get_model_version(name, ref)
        return mlflow_client.get_model_version_by_alias(name, ref)
    except MlflowException as exc:
        raise ValueError(f"no registered model {name!r} {'version' if ref.isdigit() else 'alias'} {ref!r}: "
                         f"{exc.message}") from None


def registered_weights(mlflow_client: MlflowClient, name: str,
                       ref: str) -> tuple[ModelVersion, dict[str, Any], bytes]:
    """(version, its config.json, its safetensors weights as bytes) of a registered model, e.g. to start a
    training run from it."""
    version = resolve_version(mlflow_client, name, ref)
    with tempfile.TemporaryDirectory() as tmp:
        local = model_dir_of(_download_model_dir(mlflow_client, name, version, tmp))
        meta = json.loads((local / "config.json").read_text())
        return version, meta, (local / "weights.safetensors").read_bytes()


def load_registered(name: str, alias: str = PRODUCTION, uri: str | None = None,
                    device: str | torch.device = "cpu", version_number: str | int | None = None) -> LoadedModel | None:
    """Download and rebuild ``models:/<name>@<alias>`` (or version ``version_number``); None when no version
    holds the alias."""
    mlflow_client = client(uri)
    version: ModelVersion | None
    if version_number is not None:
        version = mlflow_client.get_model_version(name, str(version_number))
    else:
        version = production_version(mlflow_client, name, alias)
    if version is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        loaded = load_model_dir(_download_model_dir(mlflow_client, name, version, tmp), device)
    loaded.name, loaded.version, loaded.run_id = name, str(version.version), version.run_id
    return loaded
