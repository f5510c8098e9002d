"""``TESSERA_DATA`` in the demo goes to the domains that match the file best."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.demo import data_for
from shared import registry


def _takers(path: Path) -> list[str]:
    domains = [registry.get(name) for name in registry.names()]
    return [d.name for d in domains if data_for(d, str(path), domains)]


def test_a_table_goes_to_forecasting_and_light_curves_with_their_metadata_to_transients(tmp_path: Path) -> None:
    series = tmp_path / "ETTh1.csv"
    series.write_text("date,a\n2020-01-01,1\n")
    assert _takers(series) == ["forecasting"]
    curves = tmp_path / "survey_lightcurves.csv"
    curves.write_text("object_id,mjd,passband,flux,flux_err\n")
    (tmp_path / "survey_metadata.csv").write_text("object_id,type\n")
    assert _takers(curves) == ["transients"]
    assert _takers(tmp_path / "replay.zarr") == ["robot_policy"] and _takers(tmp_path / "notes.md") == []


def test_help_prints_usage_and_starts_nothing(capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import pipelines.demo as demo

    def fail() -> None:
        raise AssertionError("--help started the stack")

    monkeypatch.setattr(demo.stack, "up", fail)
    with pytest.raises(SystemExit) as exit_:
        demo.main(["--help"])
    assert exit_.value.code == 0 and "TESSERA_DATA" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        demo.main(["--domains", "x"])  # an unknown option is a usage error (2), not a demo
    assert exit_.value.code == 2
