"""Pretraining on synthetic light curves: which runs ask for it, and the shared trainer starting from it."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from pipelines.trainer import Trainer
from services.transients.data import synthetic_curves
from shared import registry

BTS_TYPE = {"SN Ia": "SN Ia-91T", "SN II": "SN IIP", "SN Ibc": "SN Ic-BL", "SLSN": "SLSN-I", "other": "TDE"}


@pytest.fixture(scope="module")
def survey_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A light-curve file in the BTS layout (ZTF g and r, BTS types): 60 objects, 12 of each class."""
    folder = tmp_path_factory.mktemp("bts")
    curves, labels, names = synthetic_curves(60, seed=5, weights=(1, 1, 1, 1, 1))
    rows = [{"object_id": c.object_id, "mjd": t, "passband": b, "flux": f, "flux_err": e}
            for c in curves for t, b, f, e in zip(c.mjd, c.passband, c.flux, c.flux_err, strict=True)]
    pd.DataFrame(rows).to_csv(folder / "survey_lightcurves.csv", index=False)
    pd.DataFrame({"object_id": [c.object_id for c in curves],
                  "type": [BTS_TYPE[names[k]] for k in labels]}).to_csv(folder / "survey_metadata.csv", index=False)
    return str(folder / "survey_lightcurves.csv")


def _cfg(data: str | None, **changes: object) -> object:
    domain = registry.get("transients")
    return domain.make_config(changes.pop("model", "native"), data,
                              {**domain.tiny, "cpus_per_worker": 1, "min_class_objects": 1, **changes})


def test_only_the_native_network_on_ztf_data_asks_for_pretraining(survey_file: str) -> None:
    domain = registry.get("transients")
    cfg = _cfg(survey_file, pretrain_objects=40, pretrain_epochs=2)
    state = domain.load_data(cfg).state
    pre = domain.pretraining(cfg, state)
    assert pre is not None
    assert pre.data is None and pre.synthetic_objects == 40 and pre.epochs == pre.patience == 2
    assert pre.d_model == cfg.d_model and pre.seed == cfg.seed  # the same network and seed
    assert domain.pretraining(pre, domain.load_data(pre).state) is None  # no pretraining of the pretraining
    assert domain.pretraining(_cfg(survey_file, pretrain_objects=0), state) is None
    t2 = _cfg(survey_file, model="t2", pretrain_objects=40)
    assert domain.pretraining(t2, state) is None  # t2 stays the published recipe
    ungrouped = _cfg(survey_file, pretrain_objects=40, grouping="none")
    assert domain.pretraining(ungrouped, domain.load_data(ungrouped).state) is None  # other classes than the
    # simulator's: its head would not fit


def test_a_new_run_starts_from_the_pretraining_runs_network(survey_file: str) -> None:
    domain = registry.get("transients")
    cfg = _cfg(survey_file, pretrain_objects=40, pretrain_epochs=1)
    pre_cfg = domain.pretraining(cfg, domain.load_data(cfg).state)
    alone = Trainer(domain, pre_cfg, log=None, pretrain=False)
    alone.fit()
    expected = alone.bare.state_dict()

    trainer = Trainer(domain, cfg, log=None)
    assert trainer.pretrained is not None and trainer.pretrained["pretrain_epochs"] == 1
    assert "pretrain_val_log_loss" in trainer.pretrained
    start = trainer.bare.state_dict()
    assert all(torch.equal(start[k], expected[k]) for k in expected)
    fresh = Trainer(domain, cfg, log=None, pretrain=False).bare.state_dict()
    assert not all(torch.equal(fresh[k], expected[k]) for k in expected)  # not the fresh initialisation
    final = trainer.fit()
    assert final["epochs_run"] == cfg.epochs


def test_given_weights_and_a_checkpoint_skip_the_pretraining(survey_file: str) -> None:
    domain = registry.get("transients")
    cfg = _cfg(survey_file, pretrain_objects=40, pretrain_epochs=1)
    plain = Trainer(domain, cfg, log=None, pretrain=False)
    given = Trainer(domain, cfg, log=None, init_weights=plain.bare.state_dict())
    assert given.pretrained is None
    plain.run_epoch()
    resumed = Trainer(domain, cfg, log=None, checkpoint=plain.checkpoint())
    assert resumed.pretrained is None and resumed.state.epoch == 1


def test_the_pretraining_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="pretrain_epochs"):
        _cfg(None, pretrain_epochs=0)
    with pytest.raises(ValueError, match="pretrain_objects"):
        _cfg(None, pretrain_objects=-1)


def test_the_pretraining_run_is_logged_before_the_run(survey_file: str) -> None:
    domain = registry.get("transients")
    cfg = _cfg(survey_file, pretrain_objects=40, pretrain_epochs=1)
    lines: list[str] = []
    Trainer(domain, cfg, log=lines.append)
    assert any(line.startswith("pretraining: ") for line in lines)
    assert any("started from the pretraining run's network" in line for line in lines)
