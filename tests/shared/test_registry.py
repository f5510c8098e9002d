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


def test_domain_declares_its_contract() -> None:
    for domain in registry.domains():
        assert domain.port in range(3001, 3006)
        assert domain.endpoint.startswith("/")
        assert domain.service.startswith(f"services.{domain.name}.service:")
        assert domain.models, "a domain has at least one model"
