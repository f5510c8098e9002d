"""The contract every registered domain keeps: build, forward, train step, evaluate, save/load, service."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader

from shared import registry
from shared.tracking import load_model_dir, save_model_dir

# The smallest settings of each domain (a new domain adds one line here, or the test fails on purpose).
TINY: dict[str, dict[str, Any]] = {
    "forecasting": {"d_model": 16, "d_ff": 32, "e_layers": 1, "d_layers": 1, "n_heads": 2, "seq_len": 48,
                    "label_len": 24, "pred_len": 24, "synthetic_steps": 900, "synthetic_vars": 3, "batch_size": 8},
    "robot_policy": {"d_model": 16, "d_ff": 32, "n_layers": 1, "n_heads": 2, "synthetic_episodes": 4,
                     "train_steps": 2, "infer_steps": 2, "candidates": 2, "diffusion_steps": 5, "batch_size": 8},
    "weather": {"dims": (16, 32), "depths": (1, 1), "kernels": ((2, 4), (2, 4)), "strides": (2, 2), "local_window": 2,
                "global_windows": (2, 2), "dim_head": 8, "synthetic_days": 4, "synthetic_grid": (16, 32),
                "batch_size": 4},
}


@pytest.fixture(params=registry.names())
def domain(request: pytest.FixtureRequest) -> registry.Domain:
    return registry.get(request.param)


def test_every_domain_has_tiny_settings(domain: registry.Domain) -> None:
    assert domain.name in TINY, f"add tiny settings for {domain.name} to tests/test_contract.py"


MODELS = [(name, model) for name in registry.names() for model in registry.get(name).models]


@pytest.mark.parametrize(("name", "model_name"), MODELS, ids=[f"{d}-{m}" for d, m in MODELS])
def test_build_train_step_evaluate_and_round_trip(name: str, model_name: str, tmp_path: Path) -> None:
    domain = registry.get(name)
    torch.manual_seed(0)
    cfg = domain.make_config(model_name, None, TINY[domain.name])
    data = domain.load_data(cfg)
    assert len(data.train) > 0 and len(data.val) > 0 and len(data.test) > 0
    model = domain.build_model(cfg, data.info)
    batch = next(iter(DataLoader(data.train, batch_size=4)))
    device = torch.device("cpu")

    model.train()
    loss = domain.training_loss(model, batch, device)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)

    model.eval()
    with torch.inference_mode():
        metrics = domain.evaluate(model, DataLoader(data.val, batch_size=8), device)
    assert domain.val_metric in metrics and all(v == v for v in metrics.values())

    save_model_dir(tmp_path / "model", model, domain.name, cfg, data.info)
    loaded = load_model_dir(tmp_path / "model")
    assert loaded.cfg == cfg and loaded.info == data.info
    with torch.inference_mode():
        before = domain.evaluate(model, DataLoader(data.test, batch_size=8), device)
        after = domain.evaluate(loaded.model, DataLoader(data.test, batch_size=8), device)
    assert before == pytest.approx(after, rel=1e-6)
    assert not list((tmp_path / "model").glob("*.pkl")), "a registered model holds no pickles"


def test_service_is_a_bentoml_service_named_after_the_domain(domain: registry.Domain) -> None:
    module_name, _, class_name = domain.service.partition(":")
    service = getattr(importlib.import_module(module_name), class_name)
    assert service.name == domain.name
    routes = {api.route for api in service.apis.values()}
    assert domain.endpoint in routes
