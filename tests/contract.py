"""The contract every domain keeps, as checks on one domain: ``tests/test_contract.py`` runs them on every
registered domain, ``tests/test_new_domain.py`` on a throw-away domain living outside ``services/``."""

from __future__ import annotations

import dataclasses
import importlib
import math
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Subset

from pipelines.trainer import MemoryTracker, Trainer
from shared.config import RunSettings
from shared.registry import Domain
from shared.saved import SavedState
from shared.tracking import load_model_dir

INFRA_PORTS = {5000, 6379, 8265}  # MLflow, Ray GCS, Ray dashboard


def check_declarations(domain: Domain) -> None:
    """Names, port, endpoint, classes, tiny and demo settings that the platform reads from the class."""
    assert domain.models, "a domain has at least one model"
    assert 1024 < domain.port < 65536 and domain.port not in INFRA_PORTS
    assert domain.endpoint.startswith("/")
    assert domain.service.partition(":")[2], "service is 'module:Class'"
    assert issubclass(domain.config_cls, RunSettings), "the config extends shared.config.RunSettings"
    assert issubclass(domain.state_cls, SavedState), "the saved state extends shared.saved.SavedState"
    assert domain.eval_config_cls is None or dataclasses.is_dataclass(domain.eval_config_cls)
    if domain.eval_config_cls is not None:
        domain.eval_config_cls()  # its defaults are valid
    assert domain.tiny, "tiny settings (tests and smoke runs) are declared on the domain"
    for model in domain.models:
        domain.make_config(model, None, domain.tiny)
    for job in domain.demo_jobs:
        assert job.model in domain.models
        domain.make_config(job.model, None, dict(o.split("=", 1) for o in job.overrides))
    assert all(s.startswith(".") for s in domain.data_suffixes)
    domain.check_dependencies()


def check_training(domain: Domain, model_name: str, tmp_path: Path) -> None:
    """Build, a train step with gradients, additive metrics, the plain trainer end to end, and the model folder
    written by the run loading back to the same metrics (no pickles)."""
    torch.manual_seed(0)
    cfg = domain.make_config(model_name, None, {**domain.tiny, "epochs": 1, "max_steps_per_epoch": 2,
                                                "cpus_per_worker": 1})
    data = domain.load_data(cfg)
    assert len(data.train) > 0 and len(data.val) > 1 and len(data.test) > 0
    assert isinstance(data.state, domain.state_cls)
    model = domain.build_model(cfg, data.state)
    batch = next(iter(DataLoader(data.train, batch_size=4, collate_fn=domain.collate(cfg))))  # type: ignore[arg-type]
    device = torch.device("cpu")
    model.train()
    loss = domain.training_loss(model, batch, device)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)

    # metric sums are additive: the halves of the validation set add up to the whole (sharded validation)
    model.eval()
    half = len(data.val) // 2
    with torch.inference_mode():
        collate = domain.collate(cfg)
        whole = domain.metric_sums(model, DataLoader(data.val, batch_size=8, collate_fn=collate), device)  # type: ignore[arg-type]
        parts = [domain.metric_sums(model, DataLoader(Subset(data.val, r), batch_size=8, collate_fn=collate),  # type: ignore[arg-type]
                                    device) for r in (range(half), range(half, len(data.val)))]
    added = {k: parts[0][k] + parts[1][k] for k in whole}
    assert set(parts[0]) == set(parts[1]) == set(whole)
    metrics = domain.metrics_from(whole)
    assert domain.val_metric in metrics and all(math.isfinite(v) for v in metrics.values())
    if domain.name != "robot_policy":  # its plans start from seeded noise: other batches, other noise
        for key, value in domain.metrics_from(added).items():
            assert math.isclose(value, metrics[key], rel_tol=1e-6, abs_tol=1e-9), key

    tracker = MemoryTracker(folder=tmp_path / "model")
    final = Trainer(domain, cfg, tracker=tracker, log=None, data=data).fit()
    assert final["kept_epoch"] == 1 and f"test_{domain.val_metric}" in final
    assert {"train_loss", f"val_{domain.val_metric}"} <= set(tracker.metrics) and "plots/loss.png" in tracker.figures
    assert tracker.tags["eval_signature"] == domain.eval_signature(cfg, tracker.model[2])  # type: ignore[index]
    loaded = load_model_dir(tmp_path / "model")
    assert loaded.cfg == cfg, (loaded.cfg, cfg)
    assert loaded.state.same_as(tracker.model[2])  # type: ignore[index]
    assert not list((tmp_path / "model").glob("*.pkl")), "a registered model holds no pickles"
    with torch.inference_mode():
        again = domain.evaluate(loaded.model, DataLoader(data.test, batch_size=cfg.batch_size * 2,
                                                         collate_fn=domain.collate(cfg)), device)  # type: ignore[arg-type]
    for key, value in again.items():
        assert math.isclose(value, final[f"test_{key}"], rel_tol=1e-5, abs_tol=1e-7), key


def check_mlflow_model(domain: Domain, model_name: str, tmp_path: Path) -> None:
    """The model as an MLflow pyfunc model (models from code): ``mlflow.pyfunc.load_model`` answers its own
    input example the way the domain does, its signature and pip requirements are there, nothing is pickled."""
    import mlflow.pyfunc
    import numpy as np
    import pandas as pd
    import yaml

    from shared.tracking import save_pyfunc

    torch.manual_seed(0)
    cfg = domain.make_config(model_name, None, {**domain.tiny, "cpus_per_worker": 1})
    data = domain.load_data(cfg)
    model = domain.build_model(cfg, data.state).eval()
    save_pyfunc(tmp_path / "pyfunc", model, domain.name, cfg, data.state)
    mlmodel = yaml.safe_load((tmp_path / "pyfunc" / "MLmodel").read_text())
    assert mlmodel["signature"]["inputs"] and mlmodel["signature"]["outputs"]
    assert "python_function" in mlmodel["flavors"] and not list((tmp_path / "pyfunc").rglob("*.pkl"))
    requirements = (tmp_path / "pyfunc" / "requirements.txt").read_text()
    assert "torch==" in requirements and "safetensors==" in requirements
    loaded = mlflow.pyfunc.load_model(str(tmp_path / "pyfunc"))
    example = loaded.input_example
    answer = loaded.predict(example[0], params=example[1]) if isinstance(example, tuple) else loaded.predict(example)
    direct = load_model_dir(tmp_path / "pyfunc")  # the folder inside it: the services load this
    inputs, params = domain.pyfunc_example(direct)
    expected = domain.pyfunc_predict(direct, inputs, params)
    if isinstance(expected, pd.DataFrame):
        pd.testing.assert_frame_equal(pd.DataFrame(answer).reset_index(drop=True), expected, check_dtype=False,
                                      rtol=1e-5)
    else:
        np.testing.assert_allclose(np.asarray(answer), expected, rtol=1e-5, atol=1e-5)


def service_of(domain: Domain) -> Any:
    module, _, name = domain.service.partition(":")
    return getattr(importlib.import_module(module), name)


def check_service(domain: Domain) -> None:
    """A BentoML service named after the domain, with its endpoint and /model, whose OpenAPI document carries
    an example request that its own input schema accepts."""
    service = service_of(domain)
    assert service.name == domain.name
    apis = {api.route: api for api in service.apis.values()}
    assert domain.endpoint in apis and "/model" in apis
    route = domain.example_path
    example = domain.example_request()
    apis[route].input_spec.model_validate(example)  # a body the schema takes
    schema = service.openapi_spec.asdict()
    content = schema["paths"][route]["post"]["requestBody"]["content"]
    assert next(iter(content.values()))["schema"].get("example") == example, "the Swagger example"
