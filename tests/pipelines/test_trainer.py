"""The plain trainer, in this process: the weights kept, early stopping, resuming from a checkpoint, starting
from given weights, the global batch with accumulation, warm-up, clipping and the AdamW groups. (What needs a
real cluster, Ray Train workers and a killed worker resuming, is in the integration suite.)"""

from __future__ import annotations

import io
import itertools
import math
from collections.abc import Mapping
from typing import Any

import pytest
import torch

from pipelines.trainer import MemoryTracker, Trainer, TrainState, kept_epoch, param_groups, shard
from services.forecasting.config import ForecastingConfig
from services.robot_policy.config import RobotPolicyConfig
from shared.config import apply_overrides
from tests.fixtures.toy_domain.toy import ToyDomain


class ScriptedToy(ToyDomain):
    """The toy domain whose validation metric follows a script, one value per evaluation."""

    def __init__(self, script: list[float]) -> None:
        self.script = list(script)

    def metrics_from(self, sums: Mapping[str, float]) -> dict[str, float]:
        return {"mse": self.script.pop(0) if self.script else super().metrics_from(sums)["mse"]}


def _cfg(**changes: Any) -> Any:
    return ToyDomain().make_config("linear", None, {"samples": 128, "cpus_per_worker": 1, **changes})


def _weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.bare.state_dict().items()}


def _state(vals: list[float]) -> TrainState:
    history = [{"epoch": i + 1, "val_mse": v} for i, v in enumerate(vals)]
    best = min(range(len(vals)), key=vals.__getitem__)
    return TrainState(epoch=len(vals), history=history, best_val=vals[best], best_epoch=best + 1,
                      best_model={"w": torch.full((2,), float(best + 1))})


def test_best_keeps_the_best_validation_epoch_weights_and_last_the_last() -> None:
    weights, epoch, val = kept_epoch(_state([0.5, 0.3, 0.4]), "best", "mse")
    assert epoch == 2 and val == 0.3 and weights is not None and torch.equal(weights["w"], torch.full((2,), 2.0))
    weights, epoch, val = kept_epoch(_state([0.5, 0.3, 0.4]), "last", "mse")
    assert weights is None and epoch == 3 and val == 0.4  # the caller keeps the current weights
    weights, epoch, val = kept_epoch(TrainState(), "best", "mse")
    assert weights is None and epoch == 0 and math.isnan(val)
    with pytest.raises(ValueError, match="keep='first'"):
        kept_epoch(_state([0.1]), "first", "mse")


def test_domain_defaults_for_keep_and_overrides() -> None:
    assert ForecastingConfig().keep == "best" and RobotPolicyConfig().keep == "last"
    assert apply_overrides(ForecastingConfig(), ["keep=last"]).keep == "last"
    with pytest.raises(ValueError, match="keep"):
        apply_overrides(ForecastingConfig(), ["keep=first"])


def test_early_stopping_keeps_the_first_best_epoch() -> None:
    domain = ScriptedToy([0.5, 0.4, 0.45, 0.4, 0.1])  # epoch 4 ties epoch 2: not better
    trainer = Trainer(domain, _cfg(epochs=10, patience=2), log=None)
    after: dict[int, dict[str, torch.Tensor]] = {}
    while trainer.running:
        trainer.run_epoch()
        after[trainer.state.epoch] = _weights(trainer)
    assert trainer.state.epoch == 4 and trainer.state.stopped  # two epochs without a better score
    final = trainer.finalize()
    assert (final["kept_epoch"], final["kept_val_mse"], final["best_val_mse"], final["epochs_run"]) == (2, 0.4, 0.4, 4)
    for key, value in trainer.bare.state_dict().items():  # the registered weights are epoch 2's
        assert torch.equal(value, after[2][key]), key
    assert not all(torch.equal(after[2][k], after[4][k]) for k in after[2])


def test_keep_last_registers_the_last_epoch_whatever_validated_best() -> None:
    trainer = Trainer(ScriptedToy([0.1, 0.5, 0.6]), _cfg(epochs=3, keep="last"), log=None)
    while trainer.running:
        trainer.run_epoch()
    last = _weights(trainer)
    final = trainer.finalize()
    assert final["kept_epoch"] == 3 and final["kept_val_mse"] == 0.6 and final["best_val_mse"] == 0.1
    assert trainer.state.best_model is None  # no copy of the best epoch is held
    assert all(torch.equal(v, last[k]) for k, v in trainer.bare.state_dict().items())


def test_a_run_resumed_from_its_checkpoint_ends_exactly_as_one_that_never_stopped() -> None:
    domain = ToyDomain()
    whole = Trainer(domain, _cfg(epochs=4), log=None)
    whole_final = whole.fit()

    first = Trainer(domain, _cfg(epochs=4), log=None)
    first.run_epoch()
    first.run_epoch()
    buffer = io.BytesIO()
    torch.save(first.checkpoint(), buffer)  # as the Ray adapter stores it, read back weights-only
    saved = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    resumed = Trainer(domain, _cfg(epochs=4), log=None, checkpoint=saved)
    assert resumed.state.epoch == 2 and len(resumed.state.history) == 2
    resumed_final = resumed.fit()
    timing = ("epoch_seconds", "samples_per_second")
    assert ([{k: v for k, v in r.items() if k not in timing} for r in resumed.state.history]
            == [{k: v for k, v in r.items() if k not in timing} for r in whole.state.history])  # the same batches
    assert resumed_final == whole_final
    assert all(torch.equal(v, whole.bare.state_dict()[k]) for k, v in resumed.bare.state_dict().items())


def test_the_moving_average_is_what_validation_scores_and_training_keeps() -> None:
    domain = ToyDomain()
    trainer = Trainer(domain, _cfg(epochs=3, ema_decay=0.9), log=None)
    assert trainer.scored is trainer.ema and trainer.ema is not trainer.bare
    expected = {k: v.clone() for k, v in trainer.bare.named_parameters()}
    trainer.model.train()
    for step, batch in enumerate(itertools.islice(trainer.train_loader, 5), start=1):  # the update, by hand
        trainer.optimizer.zero_grad()
        domain.training_loss(trainer.model, batch, trainer.device).backward()
        trainer.optimizer.step()
        trainer.state.step += 1
        trainer._update_ema()
        decay = min(0.9, (1 + step) / (10 + step))
        expected = {k: decay * expected[k] + (1 - decay) * p.detach() for k, p in trainer.bare.named_parameters()}
    ema = dict(trainer.ema.named_parameters())
    for key, value in expected.items():
        torch.testing.assert_close(ema[key], value)
        assert not torch.equal(ema[key], trainer.bare.state_dict()[key])  # it lags the live weights

    trainer = Trainer(domain, _cfg(epochs=3, ema_decay=0.9), log=None)
    averaged: dict[int, dict[str, torch.Tensor]] = {}
    while trainer.running:
        trainer.run_epoch()
        assert trainer.ema is not None
        averaged[trainer.state.epoch] = {k: v.clone() for k, v in trainer.ema.state_dict().items()}
    final = trainer.finalize()
    assert trainer.ema is None
    kept = final["kept_epoch"]
    assert all(torch.equal(v, averaged[kept][k]) for k, v in trainer.bare.state_dict().items())
    assert Trainer(domain, _cfg(epochs=3), log=None).ema is None  # off by default
    with pytest.raises(ValueError, match="ema_decay"):
        _cfg(ema_decay=1.0)


def test_the_power_warm_up_of_the_moving_average_is_diffusion_policys() -> None:
    """ema_power: decay min(ema_decay, 1 - (1 + step) ** -power), as Diffusion Policy's EMAModel (power 0.75)."""
    domain = ToyDomain()
    trainer = Trainer(domain, _cfg(epochs=3, ema_decay=0.999, ema_power=0.75), log=None)
    expected = {k: v.clone() for k, v in trainer.bare.named_parameters()}
    trainer.model.train()
    for step, batch in enumerate(itertools.islice(trainer.train_loader, 4), start=1):
        trainer.optimizer.zero_grad()
        domain.training_loss(trainer.model, batch, trainer.device).backward()
        trainer.optimizer.step()
        trainer.state.step += 1
        trainer._update_ema()
        decay = min(0.999, 1 - (1 + step) ** -0.75)
        expected = {k: decay * expected[k] + (1 - decay) * p.detach() for k, p in trainer.bare.named_parameters()}
    ema = dict(trainer.ema.named_parameters())
    for key, value in expected.items():
        torch.testing.assert_close(ema[key], value)
    with pytest.raises(ValueError, match="ema_power"):
        _cfg(ema_power=-1.0)


def test_a_parameter_group_of_its_own_follows_the_schedule_times_its_scale() -> None:
    domain = ToyDomain()
    trainer = Trainer(domain, _cfg(epochs=2, lr=0.01), log=None)
    param = next(trainer.bare.parameters())
    trainer.optimizer.add_param_group({"params": [torch.nn.Parameter(param.detach().clone())], "lr_scale": 5.0})
    trainer._set_lr(0.002)
    lrs = [g["lr"] for g in trainer.optimizer.param_groups]
    assert lrs[-1] == pytest.approx(0.01) and all(lr == pytest.approx(0.002) for lr in lrs[:-1])


def test_a_resumed_run_carries_its_moving_average_on() -> None:
    domain = ToyDomain()
    whole = Trainer(domain, _cfg(epochs=3, ema_decay=0.8, keep="last"), log=None)
    whole.fit()
    first = Trainer(domain, _cfg(epochs=3, ema_decay=0.8, keep="last"), log=None)
    first.run_epoch()
    buffer = io.BytesIO()
    torch.save(first.checkpoint(), buffer)
    saved = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    resumed = Trainer(domain, _cfg(epochs=3, ema_decay=0.8, keep="last"), log=None, checkpoint=saved)
    resumed.fit()
    assert all(torch.equal(v, whole.bare.state_dict()[k]) for k, v in resumed.bare.state_dict().items())


def test_init_weights_replace_the_fresh_initialisation() -> None:
    domain = ToyDomain()
    trained = Trainer(domain, _cfg(epochs=3), log=None)
    trained.fit()
    given = _weights(trained)
    warm = Trainer(domain, _cfg(epochs=1, seed=5), log=None, init_weights=given)
    assert all(torch.equal(v, given[k]) for k, v in warm.bare.state_dict().items())
    cold = Trainer(domain, _cfg(epochs=1, seed=5), log=None)
    assert warm.run_epoch()["train_loss"] < cold.run_epoch()["train_loss"] / 10
    with pytest.raises(ValueError, match="another size or architecture"):
        Trainer(domain, _cfg(features=3), log=None, init_weights=given)


def test_batch_size_is_the_global_batch_and_accumulation_keeps_the_step() -> None:
    domain = ToyDomain()
    plain = Trainer(domain, _cfg(epochs=1, max_steps_per_epoch=1), log=None)
    accumulated = Trainer(domain, _cfg(epochs=1, max_steps_per_epoch=1, grad_accum=4), log=None)
    assert plain.train_loader.batch_size == 16 and accumulated.train_loader.batch_size == 4
    assert plain.steps_per_epoch == 1 and accumulated.steps_per_epoch == 1
    torch.manual_seed(3)  # the same shuffle for both
    plain.train_epoch()
    torch.manual_seed(3)
    accumulated.train_epoch()
    for key, value in plain.bare.state_dict().items():  # one optimizer step over the same 16 samples
        torch.testing.assert_close(accumulated.bare.state_dict()[key], value, rtol=1e-5, atol=1e-6)
    assert _cfg(ray_workers=4, grad_accum=2).micro_batch == 2
    with pytest.raises(ValueError, match="divisible by ray_workers x grad_accum"):
        _cfg(ray_workers=3)


def _lrs_and_norms(trainer: Trainer) -> tuple[list[float], list[float]]:
    lrs, norms = [], []
    step = trainer.optimizer.step

    def recording_step(*args: Any, **kwargs: Any) -> Any:
        lrs.append(trainer.optimizer.param_groups[0]["lr"])
        norms.append(float(torch.cat([p.grad.reshape(-1) for p in trainer.bare.parameters()]).norm()))
        return step(*args, **kwargs)

    trainer.optimizer.step = recording_step  # type: ignore[method-assign]
    return lrs, norms


def test_linear_warm_up_then_the_schedule() -> None:
    cfg = _cfg(epochs=3, max_steps_per_epoch=2, warmup_steps=3, lr=0.3, lr_schedule="constant")
    trainer = Trainer(ToyDomain(), cfg, log=None)
    lrs, _ = _lrs_and_norms(trainer)
    trainer.fit()
    assert lrs == pytest.approx([0.1, 0.2, 0.3, 0.3, 0.3, 0.3])  # constant schedule after 3 warm-up steps


def test_gradients_are_clipped_to_the_global_norm() -> None:
    free = Trainer(ToyDomain(), _cfg(epochs=1, max_steps_per_epoch=3), log=None)
    _, norms = _lrs_and_norms(free)
    free.fit()
    assert min(norms) > 0.5
    clipped = Trainer(ToyDomain(), _cfg(epochs=1, max_steps_per_epoch=3, grad_clip=0.5), log=None)
    _, norms = _lrs_and_norms(clipped)
    clipped.fit()
    assert max(norms) == pytest.approx(0.5, rel=1e-4)


def test_no_weight_decay_on_norms_and_biases_unless_asked() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    decay, no_decay = param_groups(model, 0.1, decay_1d=False)
    assert [p.shape for p in decay["params"]] == [(4, 3)] and decay["weight_decay"] == 0.1
    assert len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0.0  # bias, norm gain and norm bias
    (everything,) = param_groups(model, 0.1, decay_1d=True)
    assert len(everything["params"]) == 4 and everything["weight_decay"] == 0.1
    assert len(param_groups(model, 0.0, decay_1d=False)) == 1


def test_evaluation_shards_cover_each_sample_once() -> None:
    data = list(range(10))
    parts = [list(shard(data, rank, 3)) for rank in range(3)]
    assert sorted(sum(parts, [])) == data and shard(data, 0, 1) is data


def test_the_tracker_gets_the_epochs_the_final_figures_plots_and_the_model() -> None:
    tracker = MemoryTracker()
    final = Trainer(ToyDomain(), _cfg(epochs=2), log=None, tracker=tracker).fit()
    assert [step for step, _ in tracker.metrics["val_mse"]] == [1, 2]
    assert tracker.metrics["test_mse"] == [(None, final["test_mse"])]
    assert tracker.figures == ["plots/loss.png"] and tracker.model is not None
    assert tracker.tags["eval_signature"].startswith("toy-128x4")

