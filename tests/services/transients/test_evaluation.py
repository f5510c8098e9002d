"""The evaluation pipeline on a tiny model: the JSON the issue names, the baseline beside it, an external file."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from services.transients.config import TransientsEvalConfig
from services.transients.data import synthetic_curves
from services.transients.evaluation import INTERVAL_METRICS, METRICS, evaluate_classifier
from shared import registry

BTS_TYPE = {"SN Ia": "SN Ia-91T", "SN II": "SN IIP", "SN Ibc": "SN Ic-BL", "SLSN": "SLSN-I", "other": "TDE"}


@pytest.fixture(scope="module")
def trained() -> tuple:
    domain = registry.get("transients")
    cfg = domain.make_config("native", None, {**domain.tiny, "synthetic_objects": 200})
    data = domain.load_data(cfg)
    torch.manual_seed(0)
    return domain.build_model(cfg, data.state).eval(), cfg, data.state


def _check(metrics: dict, early: tuple[int, ...]) -> None:
    for system in ("model", "baseline"):
        found = metrics[system]
        assert set(METRICS) <= set(found) and set(found["early"]) == {str(k) for k in early}
        for values in (found, *found["early"].values()):
            assert all(math.isfinite(values[k]) for k in METRICS)
            assert 0.0 <= values["macro_auc"] <= 1.0 and 0.0 <= values["ece"] <= 1.0


def test_the_model_and_the_baseline_are_scored_on_the_test_split(trained: tuple) -> None:
    model, cfg, state = trained
    result = evaluate_classifier(model, cfg, state, None, TransientsEvalConfig(early=(3, 5), bootstrap=50))
    metrics = result.metrics
    _check(metrics, (3, 5))
    # 95 % intervals beside every score set, and the paired model - baseline differences
    assert metrics["bootstrap"]["resamples"] == 50
    for system in ("model", "baseline"):
        for values in (metrics[system], *metrics[system]["early"].values()):
            assert set(values["ci95"]) == set(INTERVAL_METRICS)
            low, high = values["ci95"]["macro_auc"]
            assert 0.0 <= low <= high <= 1.0
    assert set(metrics["model_minus_baseline"]) == {"all", "3", "5"}
    gap = metrics["model_minus_baseline"]["all"]["macro_auc"]
    assert gap["value"] == pytest.approx(metrics["model"]["macro_auc"] - metrics["baseline"]["macro_auc"], abs=1e-4)
    assert gap["ci95"][0] <= gap["ci95"][1]
    assert metrics["classes"] == list(state.classes) and metrics["split"] == "test"
    assert metrics["n_objects"] == len(state.objects["test"]) == sum(metrics["class_counts"].values())
    assert {"confusion.png", "reliability.png", "early_classification.png"} <= set(result.figures)


def test_with_data_every_labelled_object_of_the_file_is_scored(trained: tuple, tmp_path: Path) -> None:
    model, cfg, state = trained
    curves, labels, names = synthetic_curves(40, seed=11)
    rows = [{"object_id": c.object_id, "mjd": t, "passband": b, "flux": f, "flux_err": e}
            for c in curves for t, b, f, e in zip(c.mjd, c.passband, c.flux, c.flux_err, strict=True)]
    pd.DataFrame(rows).to_csv(tmp_path / "new_lightcurves.csv", index=False)
    pd.DataFrame({"object_id": [c.object_id for c in curves],
                  "type": [BTS_TYPE[names[k]] for k in labels]}).to_csv(tmp_path / "new_metadata.csv", index=False)
    result = evaluate_classifier(model, cfg, state, str(tmp_path / "new_lightcurves.csv"),
                                 TransientsEvalConfig(early=(3,), bootstrap=0))
    _check(result.metrics, (3,))
    assert "ci95" not in result.metrics["model"] and "model_minus_baseline" not in result.metrics  # bootstrap=0
    assert result.metrics["split"] == "external" and result.metrics["n_objects"] == 40
