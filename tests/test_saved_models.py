"""Backward compatibility: model folders saved by an earlier Tessera load and answer exactly as they did."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from shared.tracking import load_model_dir

FIXTURES = Path(__file__).parent / "fixtures" / "models"
FOLDERS = sorted(p.name for p in FIXTURES.iterdir() if p.is_dir())


def _outputs(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    loaded = load_model_dir(folder)
    ref = load_file(str(folder / "expected.safetensors"))
    out: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        if loaded.domain == "forecasting":
            out["out"] = loaded.model(ref["x"], ref["x_mark"], ref["y_mark"])
        elif loaded.domain == "weather":
            from services.weather.inference import forecast

            init_times = ref["init_times_ns"].numpy().astype("datetime64[ns]")
            out["out"] = torch.from_numpy(forecast(loaded.model, loaded.state, ref["history"].numpy(), init_times, 3))
        else:
            plan = loaded.model.plan(ref["obs"], None, generator=torch.Generator().manual_seed(123))
            warm = loaded.model.plan(ref["obs"], ref["previous"], generator=torch.Generator().manual_seed(7))
            out.update(actions=plan.actions, energy=plan.energy, warm_actions=warm.actions, warm_energy=warm.energy,
                       steps=torch.tensor([plan.steps, warm.steps]))
    return out, ref


def test_there_is_a_saved_model_of_every_model_of_every_domain() -> None:
    from shared import registry

    saved = set(FOLDERS)
    # the three domains of that commit; a domain added later has no earlier format to stay compatible with
    for name in ("forecasting", "weather", "robot_policy"):
        for model in registry.get(name).models:
            assert f"{name}-{model}" in saved


@pytest.mark.parametrize("name", FOLDERS)
def test_a_model_saved_before_typed_state_gives_the_same_outputs(name: str) -> None:
    folder = FIXTURES / name
    assert (folder / "stats.json").exists() and not (folder / "state.json").exists()
    assert "num_workers" in json.loads((folder / "config.json").read_text())["config"]
    torch.manual_seed(0)
    out, ref = _outputs(folder)
    for key, value in out.items():
        torch.testing.assert_close(value, ref[key], rtol=1e-6, atol=1e-6, equal_nan=True, msg=f"{name}: {key}")


@pytest.mark.parametrize("name", FOLDERS)
def test_resaving_an_old_model_writes_typed_state_that_loads_the_same(name: str, tmp_path: Path) -> None:
    from shared.tracking import save_model_dir

    old = load_model_dir(FIXTURES / name)
    save_model_dir(tmp_path / "model", old.model, old.domain, old.cfg, old.state)
    assert {p.name for p in (tmp_path / "model").iterdir()} == {"weights.safetensors", "config.json", "state.json",
                                                                 "state.safetensors"}
    shutil.copy(FIXTURES / name / "expected.safetensors", tmp_path / "model")
    new = load_model_dir(tmp_path / "model")
    assert new.cfg == old.cfg and new.state.same_as(old.state)
    meta = json.loads((tmp_path / "model" / "state.json").read_text())
    assert all(not isinstance(v, list) or len(v) < 64 for v in meta.values()), "arrays belong in state.safetensors"
    out, ref = _outputs(tmp_path / "model")
    for key, value in out.items():
        torch.testing.assert_close(value, ref[key], rtol=1e-6, atol=1e-6, equal_nan=True)


def test_a_model_from_a_newer_tessera_is_refused_with_the_reason(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    shutil.copytree(FIXTURES / "forecasting-itransformer", folder)
    meta = json.loads((folder / "config.json").read_text())
    meta["config"]["quantum_heads"] = 4
    (folder / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"\['quantum_heads'\].*newer version of Tessera"):
        load_model_dir(folder)
