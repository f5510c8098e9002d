from __future__ import annotations

from pathlib import Path

import pytest

from shared import registry


def test_every_services_folder_is_a_registered_domain() -> None:
    root = Path(__file__).resolve().parents[2] / "services"
    folders = sorted(p.name for p in root.iterdir() if (p / "__init__.py").exists())
    assert registry.names() == folders
    assert "forecasting" in registry.names()


def test_unknown_domain_lists_the_known_ones() -> None:
    with pytest.raises(KeyError, match="known domains: .*forecasting"):
        registry.get("astrology")


def test_each_domain_has_a_port_of_its_own() -> None:
    ports = [d.port for d in registry.domains()]
    assert len(set(ports)) == len(ports)


def test_a_missing_dependency_names_the_extra_to_install() -> None:
    from tests.fixtures.toy_domain.toy import ToyDomain

    class Needy(ToyDomain):  # not registered: a class is enough
        name = "needy"
        requires = ("json", "no_such_module_for_tessera")

    with pytest.raises(ImportError, match=r"needs no_such_module_for_tessera: pip install 'tessera\[needy\]'"):
        Needy().check_dependencies()
    ToyDomain().check_dependencies()


def test_listing_domains_imports_none_of_their_heavy_parts() -> None:
    import subprocess
    import sys

    code = ("import sys; from shared import registry; registry.names(); "
            "heavy = [m for m in ('torch', 'xarray', 'gymnasium', 'pandas', 'bentoml') if m in sys.modules]; "
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[2], check=True)
    assert out.stdout.strip() == ""


def test_two_listed_domains_of_one_name_are_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.fixtures.toy_domain.toy import ToyDomain

    twin = type("ToyDomain", (ToyDomain,), {"__module__": "services.twin"})  # another 'toy', under services
    registry.register(twin)
    try:
        assert "toy" in registry.names()  # services is always listed
        monkeypatch.setenv(registry.DOMAIN_PACKAGES_ENV, "tests.fixtures.toy_domain")
        with pytest.raises(ValueError, match="domain 'toy' is registered twice"):
            registry.names()
    finally:
        registry.forget("services.twin")
    assert "toy" not in registry.names() or registry.get("toy").__module__.startswith("tests.")



def test_a_local_stack_serves_the_domains_whose_extra_is_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    from infra import stack

    assert registry.installed() == registry.names()  # the dev install has every extra
    monkeypatch.setattr(type(registry.get("weather")), "requires", ("no_such_module_for_tessera",))
    assert "weather" not in registry.installed()
    assert [c.name for c in stack.components()] == ["mlflow", "ray", *registry.installed()]
    assert "weather" in [c.name for c in stack.components(["weather"])]  # asked for by name: it is tried
