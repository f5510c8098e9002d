"""Adding a domain is one folder: a throw-away sixth domain, copied from ``tests/fixtures/toy_domain/toy`` into
a temporary package outside this repository, is found through ``TESSERA_DOMAIN_PACKAGES`` and passes the
contract every domain keeps, with no edit anywhere else. (Its training job and its served model over HTTP:
``tests/integration/test_new_domain_stack.py``.)"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared import registry
from tests.contract import check_declarations, check_mlflow_model, check_service, check_training

TOY = Path(__file__).parent / "fixtures" / "toy_domain" / "toy"


def install_toy_package(root: Path, package: str = "tessera_extra_domains") -> str:
    """Copy the toy domain into ``root/<package>/toy`` (a package of domains outside the repository)."""
    folder = root / package
    (folder / "toy").parent.mkdir(parents=True, exist_ok=True)
    (folder / "__init__.py").write_text('"""Domains kept outside the Tessera repository."""\n')
    shutil.copytree(TOY, folder / "toy", ignore=shutil.ignore_patterns("__pycache__"))
    return package


@pytest.fixture()
def toy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[registry.Domain]:
    package = install_toy_package(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv(registry.DOMAIN_PACKAGES_ENV, package)
    yield registry.get("toy")
    registry.forget(package)


def test_the_toy_domain_is_registered_only_while_its_package_is_listed(toy: registry.Domain) -> None:
    assert "toy" in registry.names() and toy.service.startswith("tessera_extra_domains.toy.")
    assert set(registry.names()) - {"toy"} == {p.name for p in (Path(__file__).parents[1] / "services").iterdir()
                                                if (p / "__init__.py").exists()}


def test_the_toy_domain_keeps_the_contract(toy: registry.Domain, tmp_path: Path) -> None:
    check_declarations(toy)
    check_training(toy, "linear", tmp_path)
    check_mlflow_model(toy, "linear", tmp_path)
    check_service(toy)


def test_it_is_gone_when_its_package_is_not_listed() -> None:
    assert "toy" not in registry.names()
    with pytest.raises(KeyError, match="unknown domain 'toy'"):
        registry.get("toy")
