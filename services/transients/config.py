"""Settings of the transients domain (light-curve classification: a native per-observation transformer and t2)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from shared.config import RunSettings, require_at_least

MODELS = ("native", "t2")

# Effective wavelengths (Angstrom) of each survey's bands, by passband index: ZTF g, r (PLAsTiCC-style files of
# the ZTF Bright Transient Survey number them 0, 1) and LSST u, g, r, i, z, y (PLAsTiCC's 0-5). t2's Gaussian
# process uses them as its second input dimension.
SURVEYS: dict[str, dict[str, tuple]] = {
    "ztf": {"bands": ("g", "r"), "wavelengths": (4746.48, 6366.38)},
    "lsst": {"bands": ("u", "g", "r", "i", "z", "y"), "wavelengths": (3670.69, 4826.85, 6223.24, 7545.98, 8590.90,
                                                                        9710.28)},
}

# Class groupings: the label of the metadata (BTS `type`, PLAsTiCC `target`) -> the class the model predicts.
# ZTF BTS: the five groups of the issue (Ia subtypes together, the hydrogen-rich and the stripped-envelope
# core-collapse supernovae, superluminous ones, everything else).
GROUPINGS: dict[str, dict[str, tuple[str, ...]]] = {
    "ztf_bts": {
        "SN Ia": ("SN Ia", "SN Ia-91T", "SN Ia-91bg", "SN Ia-CSM", "SN Ia-pec", "SN Iax"),
        "SN II": ("SN II", "SN IIP", "SN IIb", "SN IIn", "SN II-pec"),
        "SN Ibc": ("SN Ib", "SN Ic", "SN Ic-BL", "SN Ib/c", "SN Ibn", "SN Icn", "SN Ib-pec"),
        "SLSN": ("SLSN-I", "SLSN-II"),
        "other": ("TDE", "nova", "LBV", "ILRT", "LRN", "Ca-rich", "other"),
    },
}


# epochs 80 / patience 20 (were 60 / 15) go with dropout 0.2: the kept epoch comes later (37-50 against 27-39).
@dataclass(frozen=True)
class TransientsConfig(RunSettings, batch_size=64, lr=1e-3, lr_schedule="cosine", weight_decay=0.01, epochs=80,
                       patience=20, seed=0, precision="fp32"):
    model: str = "native"  # one of MODELS
    data: str | None = None  # light curves (CSV/Parquet, PLAsTiCC columns); None: synthetic light curves
    metadata: str | None = None  # object_id + label (+ redshift) table; None: found beside `data` by its name
    survey: Literal["auto", "ztf", "lsst"] = "auto"  # band names and wavelengths; auto: from the passbands seen
    grouping: str = "auto"  # a GROUPINGS key, or "none" (every label its own class); auto: ztf_bts for BTS types
    label_column: str = "auto"  # metadata column of the label; auto: `type` when present, else `target`
    min_class_objects: int = 3  # labels with fewer objects (after grouping) are left out, and reported
    use_redshift: bool = False  # redshift as an extra input (the model then needs it at serving time)
    synthetic_objects: int = 1500  # synthetic light curves when data is None
    # pretrain_objects > 0: the native network first learns on that many synthetic light curves (the offline
    # default's generator: ZTF g and r, the same five classes) for pretrain_epochs, then on the data from there
    # (only for data of ZTF's bands and these classes). BTS validation, seeds 0-5 (split and initialisation),
    # 10,000 curves x 8 epochs against none, paired means: class-weighted log-loss 0.942 (1.070; lower on 5 of 6),
    # macro AUC at 10 detections 0.860 (0.848), but whole curves 0.926 (0.923), at 5 detections 0.754 (0.751),
    # balanced accuracy 0.660 (0.643) within the seeds' spread and ECE 0.056 (0.049); 1.5-2x the training time.
    # Not the default: none of the targets' scores moves beyond the spread between seeds
    pretrain_objects: int = 0
    pretrain_epochs: int = 8
    val_fraction: float = 0.15  # objects held out for validation (and as many for test), stratified by class
    max_points: int = 1024  # observations per object at most (serving rejects more; training keeps the first)

    # the `native` model: one token per observation
    d_model: int = 64
    n_heads: int = 4
    n_layers: int = 3
    d_ff: int = 128
    dropout: float = 0.2  # BTS validation, 2 torch seeds on the seed-0 split, against 0.1: macro AUC the same
    # (0.91/0.93), at 5 detections 0.75/0.77 (0.72/0.76), ECE 0.03/0.06 (0.06/0.08); d_model 96 / d_ff 256 was worse
    members: int = 1  # > 1: a deep ensemble of this many networks trained side by side on the same batches. BTS
    # validation, 2 initialisations: 3 members gave macro AUC 0.914 / 0.920, at 5 detections 0.726 / 0.731,
    # against 0.911 / 0.932 and 0.750 / 0.765 for one network (averaging 3 separately trained runs did help:
    # 0.918 and 0.741, mean of 4 runs 0.912 and 0.731), for 3x the training and serving time: not the default
    # ema_decay (the shared trainer's moving average of the weights) stays 0 here: BTS validation, 2 torch seeds,
    # 0.99 / 0.995 gave macro AUC 0.917/0.927 and 0.918/0.929 (0.911/0.932 without), balanced accuracy
    # 0.586/0.538 and 0.591/0.532 (0.582/0.590), AUC at 5 detections 0.737/0.764 and 0.738/0.758 (0.750/0.765)
    lc_features: bool = False  # `native` only: the feature baseline's light-curve features of the visible curve
    # (Bazin and linear fits, amplitude, variability statistics per band, colours, rise and decline) as extra
    # global inputs beside the tokens. BTS validation, seeds 0 / 1 (split and initialisation), against the default:
    # macro AUC 0.918 / 0.929 (0.911 / 0.928), log-loss 1.10 / 0.97 (1.20 / 1.02), balanced accuracy 0.631 / 0.657
    # (0.582 / 0.657), but at 5 detections 0.706 / 0.699 (0.750 / 0.723) and ECE 0.054 / 0.074 (0.035 / 0.052);
    # withholding them from half the training views: 0.887 / 0.915 whole, 0.671 / 0.741 at 5. 1.9x the training
    # time. Not the default: no consistent gain, and the early figure falls
    time_scale_max: float = 1000.0  # longest period (days) of the continuous-time encoding
    packing: Literal["pack", "pad"] = "pack"  # pack: tokens without padding, batches by length; pad: to the longest
    class_weighting: Literal["balanced", "sqrt", "none"] = "sqrt"  # cross-entropy weights: inverse class
    # frequency (balanced), its square root, or none. sqrt: on the BTS validation split macro AUC 0.92-0.93 and
    # ECE ~0.05 against balanced's 0.85-0.88 and 0.07-0.15, for a few points of balanced accuracy
    class_weight_power: float | None = None  # when set, replaces class_weighting: the inverse class frequency
    # to this power (0: none, 0.5: sqrt, 1: balanced)
    pooling: Literal["mean", "attention", "both"] = "mean"  # of the tokens: masked mean, attention pooling
    # (a learned score per token and head, softmax within each light curve) or both side by side
    label_smoothing: float = 0.0  # of the cross-entropy targets
    decision: Literal["balanced", "probable"] = "balanced"  # the top class: balanced, the Bayes rule for balanced
    # accuracy given the class weighting (argmax of p_c / pi_c^(1-w); model.decision_bias_for); probable: argmax
    # p_c. BTS validation, 4 initialisations: balanced accuracy 0.553 (probable) -> 0.605 (balanced), mean of 4

    # t2: Gaussian-process grid (time x wavelength, Matern-3/2)
    window_days: float = 50.0  # days kept around the detections (t2 trims the light curve)
    gp_steps: int = 100  # grid steps per band
    gp_wavelength_scale: float = 6000.0  # fixed length scale in wavelength (Angstrom)

    # augmentation of training light curves (how alerts arrive)
    truncate_prob: float = 0.65  # cut to the first k detections, k in [min_detections, n] drawn by truncate_k
    # (0.65 against 0.5, 2 seeds on validation: macro AUC at 5 detections 0.69 -> 0.74, whole curves ~0.92 both)
    truncate_k: Literal["uniform", "log"] = "log"  # k uniform, or log-uniform (2-10 detections common, as
    # early alerts are: whole-curve macro AUC 0.84 -> 0.88 and ECE 0.15 -> 0.04 on validation against uniform)
    min_detections: int = 2
    drop_point_prob: float = 0.1  # each observation dropped with this probability
    drop_band_prob: float = 0.1  # one band removed with this probability (when more than one is seen)
    flux_noise: float = 1.0  # flux += flux_noise * flux_err * N(0, 1)
    gp_resample_prob: float = 0.0  # `native` only: a training view redrawn from the curve's 2-D GP (the t2
    # kernel, fitted once per training curve) with this probability before the cuts and drops: times moved by up
    # to gp_time_jitter days, fluxes a joint posterior draw plus each point's noise. BTS validation, seeds 0-2,
    # P = 1 against 0: macro AUC mean 0.927 (0.924), at 5 detections 0.747 (0.748), balanced accuracy 0.611
    # (0.630), ECE 0.054 (0.046); 1.35x the training time. Not the default: no gain beyond the seeds' spread
    gp_time_jitter: float = 1.0  # days

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.model not in MODELS:
            raise ValueError(f"model={self.model!r}: expected one of {list(MODELS)}")
        if self.lc_features and self.model != "native":
            raise ValueError(f"lc_features=true is an input of the native model, not of {self.model!r}")
        require_at_least(self, 1, ("d_model", "n_heads", "n_layers", "d_ff", "members", "synthetic_objects",
                                   "max_points", "gp_steps", "min_detections", "min_class_objects"))
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if not 0.0 < self.val_fraction < 0.5:
            raise ValueError(f"val_fraction={self.val_fraction} must be in (0, 0.5)")
        if self.gp_resample_prob and self.model != "native":
            raise ValueError(f"gp_resample_prob > 0 redraws the native model's training views, not {self.model!r}'s")
        for name in ("truncate_prob", "drop_point_prob", "drop_band_prob", "gp_resample_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}={getattr(self, name)} must be in [0, 1]")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing={self.label_smoothing} must be in [0, 1)")
        if self.class_weight_power is not None and not 0.0 <= self.class_weight_power <= 1.0:
            raise ValueError(f"class_weight_power={self.class_weight_power} must be in [0, 1]")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")
        for name in ("window_days", "gp_wavelength_scale", "time_scale_max"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        require_at_least(self, 0, ("flux_noise", "gp_time_jitter", "pretrain_objects"))
        require_at_least(self, 1, ("pretrain_epochs",))
        if self.grouping not in ("auto", "none", *GROUPINGS):
            raise ValueError(f"grouping={self.grouping!r}: expected auto, none or one of {list(GROUPINGS)}")


@dataclass(frozen=True)
class TransientsEvalConfig:
    """Settings of the evaluation (``python -m pipelines.evaluate transients --set key=value``)."""

    metadata: str | None = None  # labels of --data (found beside it by name when None)
    early: tuple[int, ...] = (3, 5, 10)  # each test light curve cut to its first k detections
    baseline: bool = True  # train and score the light-curve-feature gradient-boosting baseline in the same run
    ece_bins: int = 15
    seed: int = 0
    bootstrap: int = 1000  # resamples of the test objects (stratified by class) for the 95 % intervals; 0: none

    def __post_init__(self) -> None:
        require_at_least(self, 1, ("ece_bins",))
        require_at_least(self, 0, ("bootstrap",))
        if any(k < 1 for k in self.early):
            raise ValueError(f"early={list(self.early)}: every cut must be >= 1 detection")
