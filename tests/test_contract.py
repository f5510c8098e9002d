"""The contract every registered domain keeps (the checks are in ``tests/contract.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared import registry
from tests.contract import check_declarations, check_mlflow_model, check_service, check_training

MODELS = [(name, model) for name in registry.names() for model in registry.get(name).models]


@pytest.mark.parametrize("name", registry.names())
def test_domain_declares_what_the_platform_needs(name: str) -> None:
    check_declarations(registry.get(name))


@pytest.mark.parametrize(("name", "model_name"), MODELS, ids=[f"{d}-{m}" for d, m in MODELS])
def test_build_train_evaluate_and_round_trip(name: str, model_name: str, tmp_path: Path) -> None:
    check_training(registry.get(name), model_name, tmp_path)


@pytest.mark.parametrize(("name", "model_name"), MODELS, ids=[f"{d}-{m}" for d, m in MODELS])
def test_an_mlflow_pyfunc_model_answers_its_input_example(name: str, model_name: str, tmp_path: Path) -> None:
    check_mlflow_model(registry.get(name), model_name, tmp_path)


@pytest.mark.parametrize("name", registry.names())
def test_service_is_a_bentoml_service_with_its_example(name: str) -> None:
    check_service(registry.get(name))
