"""The light-curve features as extra global inputs of the `native` model (``lc_features=true``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from services.transients import inference
from services.transients.baseline import extract_features, feature_names
from services.transients.data import (
    N_GLOBALS,
    CurveDataset,
    collate_packed,
    collate_padded,
    curve_features,
    n_curve_features,
    synthetic_curves,
)
from shared import registry
from shared.tracking import LoadedModel


def test_features_are_scaled_with_a_flag_where_undefined() -> None:
    curves, _, _ = synthetic_curves(6, seed=3)
    short = curves[0].first_detections(3)  # too few points for the Bazin fit and kurtosis: undefined there
    found = curve_features([*curves, short], n_bands=2)
    n = len(feature_names(2))
    assert found.shape == (7, n_curve_features(2)) == (7, 2 * n) and found.dtype == np.float32
    values, missing = found[:, :n], found[:, n:]
    raw = extract_features([*curves, short], n_bands=2)
    assert np.array_equal(missing.astype(bool), np.isnan(raw))  # the flag is exactly where the baseline has NaN
    assert missing[-1].sum() > missing[:-1].sum(axis=1).max()  # the short curve misses more
    assert np.all(values[missing.astype(bool)] == 0.0) and np.isfinite(values).all()
    ok = ~np.isnan(raw)
    expect = np.clip(np.sign(raw[ok]) * np.log1p(np.abs(raw[ok])) / 3.0, -10, 10)
    assert np.allclose(values[ok], expect, atol=1e-5)


@pytest.fixture(scope="module")
def with_features() -> LoadedModel:
    domain = registry.get("transients")
    cfg = domain.make_config("native", None, {**domain.tiny, "dropout": 0.0, "lc_features": True})
    data = domain.load_data(cfg)
    torch.manual_seed(0)
    return LoadedModel(model=domain.build_model(cfg, data.state).eval(), cfg=cfg, state=data.state,
                       domain="transients", name="transients", version="1", run_id="r")


def test_the_datasets_carry_the_features_in_the_globals(with_features: LoadedModel) -> None:
    cfg = with_features.cfg
    curves, labels, _ = synthetic_curves(5, seed=7)
    evaluation = CurveDataset(curves, labels, cfg, train=False, n_bands=2)
    training = CurveDataset(curves, labels, cfg, train=True, n_bands=2)
    width = N_GLOBALS + n_curve_features(2)
    item = evaluation[2]
    assert item["globals"].shape == (width,)
    assert np.allclose(item["globals"][N_GLOBALS:], curve_features([curves[2]], 2)[0])
    torch.manual_seed(1)
    assert training[2]["globals"].shape == (width,)  # a view's own features, computed per access


def test_the_model_uses_them_and_packing_still_equals_padding(with_features: LoadedModel) -> None:
    model, cfg = with_features.model, with_features.cfg
    curves, labels, _ = synthetic_curves(10, seed=4)
    items = [CurveDataset(curves, labels, cfg, n_bands=2)[i] for i in range(len(curves))]
    packed, padded = collate_packed(items), collate_padded(items)
    a, b = model(packed), model(padded)
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    changed = collate_packed(items)
    changed.globals[:, N_GLOBALS:] = 0.0
    assert not torch.allclose(model(changed), a, atol=1e-4)  # the features reach the logits
    # served: the inference path computes the same features from the raw curves
    served = inference.classify(with_features, curves).probabilities
    assert np.allclose(served, torch.softmax(a, -1).detach().numpy(), atol=1e-5)


def test_only_the_native_model_takes_them() -> None:
    from services.transients.config import TransientsConfig

    assert TransientsConfig(lc_features=True).lc_features
    with pytest.raises(ValueError, match="native model"):
        TransientsConfig(model="t2", lc_features=True)
