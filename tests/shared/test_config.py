from __future__ import annotations

import pytest

from services.forecasting.config import ForecastingConfig
from shared.config import apply_overrides, from_dict, parse_overrides, to_dict


def test_overrides_are_parsed_to_field_types_and_revalidated() -> None:
    cfg = apply_overrides(ForecastingConfig(), ["epochs=1", "d_model=128", "dropout=0.2", "use_norm=false",
                                                "data=none", "lr_schedule=cosine"])
    assert (cfg.epochs, cfg.d_model, cfg.dropout, cfg.use_norm, cfg.data, cfg.lr_schedule) == (
        1, 128, 0.2, False, None, "cosine")


@pytest.mark.parametrize(
    ("pairs", "message"),
    [
        (["epochs=zero"], "expected an integer"),
        (["nope=1"], "unknown setting 'nope'"),
        (["d_model=100", "n_heads=8"], "divisible by n_heads"),
        (["moving_avg=0"], "moving_avg"),
        (["lr_schedule=linear"], "expected one of"),
        (["epochs"], "not of the form key=value"),
        (["use_norm=maybe"], "expected a boolean"),
        (["model=lstm"], "expected one of"),
    ],
)
def test_bad_overrides_name_the_bad_value(pairs: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        apply_overrides(ForecastingConfig(), pairs)


def test_parse_overrides_keeps_equals_in_values() -> None:
    assert parse_overrides(["data=/a=b.csv"]) == {"data": "/a=b.csv"}


def test_round_trip_through_json_dict() -> None:
    cfg = ForecastingConfig.published("autoformer", pred_len=192)
    assert from_dict(ForecastingConfig, to_dict(cfg)) == cfg


def test_published_settings_per_model() -> None:
    itr = ForecastingConfig.published("itransformer")
    assert (itr.d_model, itr.d_ff, itr.e_layers, itr.dropout, itr.lr, itr.batch_size) == (256, 256, 2, 0.1, 1e-4, 32)
    assert ForecastingConfig.published("itransformer", pred_len=336).d_model == 512
    af = ForecastingConfig.published("autoformer")
    assert (af.d_model, af.d_ff, af.factor, af.moving_avg, af.dropout, af.d_layers) == (512, 2048, 3, 24, 0.05, 1)


def test_domain_configs_name_the_field_below_its_minimum() -> None:
    from services.forecasting.config import ForecastingConfig
    from services.weather.config import WeatherConfig

    with pytest.raises(ValueError, match="^history=0: must be >= 1$"):
        WeatherConfig(history=0)
    with pytest.raises(ValueError, match="^patience=-1: must be >= 0$"):
        ForecastingConfig(patience=-1)


def test_every_domain_config_extends_one_run_settings_base_with_its_own_defaults() -> None:
    import dataclasses

    from services.robot_policy.config import RobotPolicyConfig
    from services.weather.config import WeatherConfig
    from shared.config import RunSettings

    run = [f.name for f in dataclasses.fields(RunSettings)]
    for cls, batch, lr in ((ForecastingConfig, 32, 1e-4), (WeatherConfig, 8, 1e-3), (RobotPolicyConfig, 256, 3e-4)):
        assert issubclass(cls, RunSettings)
        assert [f.name for f in dataclasses.fields(cls)][: len(run)] == run  # declared once, in the base
        assert (cls().batch_size, cls().lr) == (batch, lr)  # the domain's defaults
    with pytest.raises(TypeError, match=r"\['learning_rate'\] are not run settings"):
        @dataclasses.dataclass(frozen=True)
        class Bad(RunSettings, learning_rate=1.0):
            pass


@pytest.mark.parametrize(("pairs", "message"), [
    (["batch_size=0"], "batch_size=0: must be >= 1"),
    (["grad_clip=-1"], "grad_clip=-1.0: must be >= 0"),
    (["batch_size=30", "ray_workers=4"], "divisible by ray_workers x grad_accum"),
    (["num_workers=4"], "'num_workers' is now called 'ray_workers'"),
    (["warmup_steps=-3"], "warmup_steps=-3: must be >= 0"),
])
def test_run_settings_are_validated_once_for_every_domain(pairs: list[str], message: str) -> None:
    from services.weather.config import WeatherConfig

    for cfg in (ForecastingConfig(), WeatherConfig()):
        with pytest.raises(ValueError, match=message):
            apply_overrides(cfg, pairs)


def test_saved_configs_read_renamed_fields_and_refuse_unknown_ones() -> None:
    saved = to_dict(ForecastingConfig(ray_workers=1))
    saved["num_workers"] = saved.pop("ray_workers")  # as models saved before the rename have it
    assert from_dict(ForecastingConfig, saved) == ForecastingConfig()
    del saved["grad_clip"]  # a field added since: its default
    assert from_dict(ForecastingConfig, saved).grad_clip == 0.0
    with pytest.raises(ValueError, match=r"fields \['flux_capacitor'\].*newer version of Tessera"):
        from_dict(ForecastingConfig, {**saved, "flux_capacitor": 1})
