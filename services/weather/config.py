"""Settings of the weather domain (WXFormer on gridded ERA5-layout data)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from shared.config import RunSettings, require_at_least

MODELS = ("wxformer",)
# Forcings computed from time and position (exact at any lead), in the order the model reads them.
FORCINGS = ("cos_zenith", "sin_local_hour", "cos_local_hour", "sin_day_of_year", "cos_day_of_year")


@dataclass(frozen=True)
class WeatherConfig(RunSettings, batch_size=8, lr=1e-3, lr_schedule="cosine", weight_decay=1e-4, decay_1d=True,
                    epochs=12, seed=0, precision="fp32"):
    model: str = "wxformer"  # one of MODELS
    data: str | None = None  # netCDF / zarr / GRIB path; None: the built-in synthetic advection-diffusion run
    variables: tuple[str, ...] = ()  # prognostic variables; () = every (time, [level,] lat, lon) variable
    levels: tuple[float, ...] = ()  # pressure levels kept for 3-D variables; () = all of them
    static_variables: tuple[str, ...] = ()  # time-invariant fields read from the data (orography, land-sea mask)
    # Time-invariant fields from another file (netCDF / zarr / GRIB, any URI; ERA5's invariant lsm and z, say):
    # every 2-D field of it, interpolated onto the data's grid, is a static input beside the data's own
    static_file: str | None = None
    # auto: when no static field is a land-sea mask (lsm, ...), add the land fraction of each grid cell from
    # GLOBE's 1 km land mask (the global-land-mask package); off: only the fields the data and static_file give
    land_fraction: Literal["auto", "off"] = "off"
    # Forcings given at t and t + dt, names from FORCINGS, or "auto": all of them, less the day of year on a
    # record shorter than a year (over one month it only tells the training days from the test days, values
    # the test period lies outside of, and can act as a date key).
    forcings: tuple[str, ...] = ("auto",)
    member: int = 0  # ensemble member kept when the data has a 'number' dimension
    step_hours: int = 6  # model time step: one forward pass advances the state this much
    sample_every_hours: int = 1  # initial times are taken this often (denser than the step: more samples)
    val_fraction: float = 0.2  # last part of the record held out for validation, then test (time-based)
    test_fraction: float = 0.2
    synthetic_days: int = 60  # length of the synthetic run (data None), hourly states
    synthetic_grid: tuple[int, int] = (32, 64)  # (lat, lon) points of the synthetic global grid

    # WXFormer (CREDIT's CrossFormer). One entry per stage.
    dims: tuple[int, ...] = (32, 64, 128)
    depths: tuple[int, ...] = (1, 1, 2)  # transformer blocks (local + long-range attention pairs) per stage
    kernels: tuple[tuple[int, ...], ...] = ((2, 4, 8), (2, 4), (2, 4))  # cross-scale embedding kernel sizes
    strides: tuple[int, ...] = (2, 2, 2)
    local_window: int = 3  # tokens per side of a local attention window
    global_windows: tuple[int, ...] = (3, 3, 2)  # long-range attention group size per stage (tokens per side)
    dim_head: int = 16
    mlp_ratio: float = 2.0
    dropout: float = 0.0
    spectral_norm: bool = True  # spectral normalization on every conv and linear layer (CREDIT)
    padding: Literal["auto", "earth", "plain"] = "auto"  # earth: circular lon + pole crossing; auto: by grid
    # Defaults chosen on validation (docs/results.md): on the UK record 4 input states, the change added to the
    # state a day before the target and a 4-step training rollout beat 1 state, "last" and 2 steps; 12 epochs
    # (the kept epoch was 2-3 of 12 there). On the synthetic world they reach 69 % below persistence at +6 h.
    history: int = 4  # input states (t, t - step, ...)
    history_skip: bool = False  # add a learned linear blend of the input states to the predicted change
    # The state the predicted change is added to: the last one ("last"), or the one 24 h before the target
    # ("day": needs history >= 24 / step_hours). With "day" a network that outputs nothing is diurnal
    # persistence, the better baseline for near-surface fields with a strong daily cycle.
    residual_base: Literal["last", "day"] = "day"
    # After training, fit per step and channel a factor in [0, 1] on the validation period that scales the
    # predicted change (least squares, step by step with the earlier factors applied), saved with the model.
    # A network that overfits predicts changes that are too large; this shrinks them toward its base state.
    damping: bool = True
    # Fitted with it: a second factor in [0, 1] per step and channel that relaxes the forecast toward the
    # training period's climatology for its valid hour (the mean daily cycle at every point, from
    # ``climatology_harmonics`` harmonics). Beyond a day, skill is mostly knowing how far an anomaly decays;
    # a network trained on a few weeks does not learn that reliably, a fit on validation does.
    relaxation: bool = True
    # What relaxation draws the forecast toward. keep: the climatology plus the state's own latitude-weighted
    # area-mean anomaly (per channel), so that only the anomaly's pattern relaxes and its area mean stays as the
    # network has it; relax: the climatology itself; auto: keep on a global grid, relax on a regional one.
    # Validation (docs/results.md): on the synthetic globe a training climatology from another part of the season
    # (0.26-0.31 K warmer there) pulled plain relaxation's global mean 0.27 K off in 10 days, 0.06 K with keep,
    # RMSE equal or lower at every lead; on the UK box keep was worse (calibrated 1.316 against 1.294 K), where a
    # box-wide warm or cold spell passes within days and relaxing it toward the climatology helps
    relaxation_mean: Literal["auto", "keep", "relax"] = "auto"
    climatology_harmonics: int = 2
    # Steps the calibration is fitted for: the training rollout's, then on longer validation windows as far as
    # the validation period holds 24 of them, up to this many (40 x 6 h = 10 days). Past the fitted steps a rollout
    # carries the last step's factors on; fitting them per lead keeps a long rollout's error near climatology's.
    calibration_steps: int = 40

    train_rollout: int = 4  # autoregressive steps in the training loss (multi-step training)
    # full: the loss backpropagates through the whole rollout; detached: each step's input state is detached
    # from the graph (NCAR CREDIT's trainer default), so a step learns from its own input, not its ancestors'
    rollout_gradient: Literal["full", "detached"] = "full"
    # The network predicts the change in units of each channel's training-period spread of that change (the
    # state minus its base state), so that channels with small and large tendencies weigh alike in its output
    normalize_tendency: bool = False

    def relaxation_keeps_mean(self, is_global: bool) -> bool:
        """Whether relaxation keeps the forecast's area-mean anomaly (``relaxation_mean``) on such a grid."""
        return self.relaxation_mean == "keep" or (self.relaxation_mean == "auto" and is_global)

    @property
    def base_lag(self) -> int:
        """Model steps from the base state the change is added to, to the target: 1, or a day's with "day"."""
        return 24 // self.step_hours if self.residual_base == "day" else 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.model not in MODELS:
            raise ValueError(f"model={self.model!r}: expected one of {list(MODELS)}")
        stages = len(self.dims)
        for name in ("depths", "kernels", "strides", "global_windows"):
            if len(getattr(self, name)) != stages:
                raise ValueError(f"{name}={getattr(self, name)!r}: needs one entry per stage ({stages}, as dims)")
        require_at_least(self, 1, ("step_hours", "sample_every_hours", "synthetic_days", "local_window",
                                   "dim_head", "history", "train_rollout"))
        if min(self.dims) < 1 or min(self.depths) < 1 or min(self.strides) < 1 or min(self.global_windows) < 1:
            raise ValueError("dims, depths, strides and global_windows must be >= 1")
        for stage, (dim, kernels, stride) in enumerate(zip(self.dims, self.kernels, self.strides, strict=True)):
            if not kernels or any(k < stride or (k - stride) % 2 for k in kernels):
                raise ValueError(f"kernels[{stage}]={kernels!r}: each kernel must be >= stride {stride} and differ "
                                 f"from it by an even number (symmetric padding)")
            if dim % self.dim_head:
                raise ValueError(f"dims[{stage}]={dim} must be a multiple of dim_head={self.dim_head}")
            if dim < 2 ** len(kernels):
                raise ValueError(f"dims[{stage}]={dim} is too small for {len(kernels)} embedding kernels")
        if self.residual_base == "day" and (24 % self.step_hours or self.history < 24 // self.step_hours):
            raise ValueError(f"residual_base='day' needs step_hours dividing 24 and history >= 24 / step_hours "
                             f"(here step_hours={self.step_hours}, history={self.history})")
        unknown = [f for f in self.forcings if f not in FORCINGS]
        if self.forcings != ("auto",) and (unknown or len(set(self.forcings)) != len(self.forcings)):
            raise ValueError(f"forcings={self.forcings!r}: expected 'auto' or distinct names among {list(FORCINGS)}")
        if len(self.synthetic_grid) != 2 or min(self.synthetic_grid) < 8:
            raise ValueError(f"synthetic_grid={self.synthetic_grid!r}: expected (lat, lon) of at least 8 points each")
        if not (0 < self.val_fraction < 0.5 and 0 < self.test_fraction < 0.5):
            raise ValueError("val_fraction and test_fraction must be in (0, 0.5)")
        require_at_least(self, 0, ("member", "climatology_harmonics"))
        require_at_least(self, 1, ("calibration_steps",))
        if self.land_fraction not in ("auto", "off"):
            raise ValueError(f"land_fraction={self.land_fraction!r}: expected 'auto' or 'off'")
        if self.relaxation_mean not in ("auto", "keep", "relax"):
            raise ValueError(f"relaxation_mean={self.relaxation_mean!r}: expected 'auto', 'keep' or 'relax'")
        if self.rollout_gradient not in ("full", "detached"):
            raise ValueError(f"rollout_gradient={self.rollout_gradient!r}: expected 'full' or 'detached'")
        if not self.mlp_ratio > 0:
            raise ValueError(f"mlp_ratio={self.mlp_ratio} must be > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")



@dataclass(frozen=True)
class WeatherEvalConfig:
    """Settings of the evaluation pipeline (``python -m pipelines.evaluate weather --set key=value``)."""

    lead_steps: int = 4  # rollout length in model steps (4 x 6 h = 24 h by default)
    init_every_hours: int = 1  # initial times in the evaluated period are taken this often (1: every hour)
    split: Literal["test", "val"] = "test"  # period evaluated
    map_lead: int = 1  # lead (in steps) of the truth / forecast / error maps
    # 95 % intervals: a circular block bootstrap over initial times (blocks of this many hours of consecutive
    # initial times keep their dependence), for every score and every model-minus-baseline difference
    bootstrap_samples: int = 1000
    bootstrap_block_hours: int = 24
    seed: int = 0  # of the bootstrap

    def __post_init__(self) -> None:
        require_at_least(self, 1, ("lead_steps", "init_every_hours", "map_lead", "bootstrap_samples",
                                   "bootstrap_block_hours"))
