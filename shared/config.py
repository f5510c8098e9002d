"""Typed configuration: frozen dataclasses with ``key=value`` overrides.

Every domain's settings are one frozen dataclass that extends :class:`RunSettings`, the run settings the
shared trainer reads (batch, optimizer, schedule, epochs, workers, precision, failures). A domain sets its own
defaults for those in the class statement and adds its model and data fields::

    @dataclass(frozen=True)
    class WeatherConfig(RunSettings, batch_size=8, lr=1e-3, epochs=20):
        model: str = "wxformer"
        ...

Users change a setting from the command line with ``--set key=value``; :func:`apply_overrides` parses each
value to the field's declared type and rebuilds the dataclass, so validation runs again on the result.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, TypeVar

C = TypeVar("C")


def _parse_value(raw: str, annotation: Any, key: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if raw.lower() in ("none", "null", "") and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        return _parse_value(raw, non_none[0], key)
    if origin is typing.Literal:
        if raw not in args:
            raise ValueError(f"{key}={raw!r}: expected one of {list(args)}")
        return raw
    if annotation is bool:
        low = raw.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{key}={raw!r}: expected a boolean (true/false)")
    if annotation is int:
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"{key}={raw!r}: expected an integer") from None
    if annotation is float:
        try:
            return float(raw)
        except ValueError:
            raise ValueError(f"{key}={raw!r}: expected a number") from None
    if annotation is str:
        return raw
    if origin in (tuple, list):
        try:
            items = json.loads(raw) if raw.strip().startswith("[") else [s for s in raw.split(",") if s]
        except json.JSONDecodeError as exc:
            raise ValueError(f"{key}={raw!r}: expected a list: {exc}") from None
        inner = args[0] if args else str
        parsed = [_parse_value(str(v), inner, key) for v in items]
        return tuple(parsed) if origin is tuple else parsed
    raise ValueError(f"{key}: cannot parse a value of type {annotation!r} from the command line")


def require_at_least(cfg: Any, minimum: float, names: Iterable[str]) -> None:
    """``ValueError`` naming the first field of ``cfg`` among ``names`` whose value is below ``minimum``."""
    for name in names:
        value = getattr(cfg, name)
        if value < minimum:
            raise ValueError(f"{name}={value!r}: must be >= {minimum}")


def parse_overrides(pairs: Iterable[str]) -> dict[str, str]:
    """Split ``["a=1", "b=x"]`` into ``{"a": "1", "b": "x"}``; a pair without ``=`` is an error."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override {pair!r} is not of the form key=value")
        out[key.strip()] = value.strip()
    return out


def _renamed(cls: type) -> Mapping[str, str]:
    return getattr(cls, "renamed", {})


def apply_overrides(cfg: C, overrides: Mapping[str, Any] | Iterable[str]) -> C:
    """Return a copy of the dataclass ``cfg`` with overrides applied (strings parsed to field types).

    Unknown keys raise ``ValueError`` listing the valid ones (a renamed setting names its new name); the
    dataclass re-validates itself.
    """
    if not dataclasses.is_dataclass(cfg) or isinstance(cfg, type):
        raise TypeError("apply_overrides expects a dataclass instance")
    if not isinstance(overrides, Mapping):
        overrides = parse_overrides(overrides)
    hints = typing.get_type_hints(type(cfg))
    names = [f.name for f in dataclasses.fields(cfg)]
    renamed = _renamed(type(cfg))
    changes: dict[str, Any] = {}
    for key, value in overrides.items():
        if key in renamed and key not in names:
            raise ValueError(f"setting {key!r} is now called {renamed[key]!r}")
        if key not in names:
            raise ValueError(f"unknown setting {key!r} for {type(cfg).__name__}; known: {', '.join(sorted(names))}")
        changes[key] = _parse_value(value, hints[key], key) if isinstance(value, str) else value
    return dataclasses.replace(cfg, **changes)


def describe(cfg: Any) -> list[dict[str, str]]:
    """Every setting of the dataclass ``cfg``: name, type, value and the comment that documents it in the class
    (the field's trailing comment, else the comment lines above it), base classes included."""
    import inspect
    import re

    comments: dict[str, str] = {}
    for cls in reversed(type(cfg).__mro__):
        if not dataclasses.is_dataclass(cls):
            continue
        try:
            lines = inspect.getsource(cls).splitlines()
        except (OSError, TypeError):
            continue
        above: list[str] = []
        for line in lines:
            field = re.match(r"^    (\w+): [^#]*?(?:#\s*(.*))?$", line)
            note = re.match(r"^    #\s?(.*)$", line)
            if note:
                above.append(note.group(1).strip())
            elif field:
                text = field.group(2) or " ".join(above)
                if text:
                    comments[field.group(1)] = text.strip()
                above = []
            else:
                above = []
    hints = typing.get_type_hints(type(cfg))
    out = []
    for f in dataclasses.fields(cfg):
        kind = hints[f.name]
        type_name = getattr(kind, "__name__", None) if typing.get_origin(kind) is None else None
        out.append({"name": f.name, "type": type_name or str(kind).replace("typing.", ""),
                    "value": json.dumps(to_dict(cfg)[f.name]), "comment": comments.get(f.name, "")})
    return out


def to_dict(cfg: Any) -> dict[str, Any]:
    """JSON-ready dict of a config dataclass (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def _as_tuples(value: Any, annotation: Any) -> Any:
    """JSON lists back to the (possibly nested) tuples the annotation declares."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _as_tuples(value, inner[0]) if value is not None and len(inner) == 1 else value
    if typing.get_origin(annotation) is tuple and isinstance(value, list):
        args = typing.get_args(annotation)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_as_tuples(v, args[0]) for v in value)
        if args and len(args) == len(value):
            return tuple(_as_tuples(v, a) for v, a in zip(value, args, strict=True))
        return tuple(_as_tuples(v, args[0]) if args else v for v in value)
    if typing.get_origin(annotation) is dict and isinstance(value, dict):
        args = typing.get_args(annotation)
        return {k: _as_tuples(v, args[1]) for k, v in value.items()} if args else value
    return value


def from_dict(cls: type[C], data: Mapping[str, Any], *, what: str = "config") -> C:
    """Rebuild a dataclass from :func:`to_dict` output (a saved model's config or state).

    Fields the saved dict lacks take their defaults (a model saved before they existed); a renamed field is
    read under its new name; a field this class does not know (a model saved by a newer Tessera) is an error
    naming it, never silently dropped.
    """
    hints = typing.get_type_hints(cls)
    renamed = _renamed(cls)
    data = {renamed.get(k, k): v for k, v in data.items()}
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"the saved {what} has fields {unknown} that {cls.__name__} does not know: it was written by "
                         f"a newer version of Tessera; upgrade to load it")
    return cls(**{k: _as_tuples(v, hints[k]) for k, v in data.items()})


@dataclass(frozen=True)
class RunSettings:
    """The run settings of every domain, read by the shared trainer. Domains set their defaults as keyword
    arguments of the class statement (``class MyConfig(RunSettings, lr=3e-4, epochs=60)``)."""

    batch_size: int = 32  # global batch per optimizer step, split across Ray workers and accumulation steps
    lr: float = 1e-4  # peak learning rate
    lr_schedule: Literal["halve", "constant", "cosine"] = "cosine"  # per epoch; halve: two epochs at lr, then halved
    warmup_steps: int = 0  # optimizer steps of linear warm-up from 0 before the schedule (0: none)
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    decay_1d: bool = False  # also decay parameters with fewer than 2 dimensions (norms, biases); nanoGPT: no
    grad_clip: float = 0.0  # clip the global gradient norm to this (0: no clipping)
    grad_accum: int = 1  # micro-batches accumulated per optimizer step (each worker: batch / workers / accum)
    epochs: int = 10  # passes over the training data
    patience: int = 0  # stop after this many epochs without a better validation metric (0: never)
    keep: Literal["best", "last"] = "best"  # weights registered: the best validation epoch's, or the last's
    max_steps_per_epoch: int = 0  # 0: full epochs; >0 caps optimizer steps per epoch (quick demos and tests)
    max_eval_batches: int = 0  # 0: the whole validation and test splits; >0 scores only that many batches (smoke runs)
    seed: int = 0  # seeds torch (initialisation, shuffling) and the domain's splits and synthetic data
    ray_workers: int = 1  # Ray Train workers (data-parallel processes)
    cpus_per_worker: int = 2  # CPU threads per Ray worker
    use_gpu: bool = False  # one GPU per Ray worker
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # training autocast; auto: bf16 on GPU, fp32 on CPU
    max_failures: int = 2  # worker failures survived by resuming from the last epoch checkpoint
    loader_workers: int = 0  # DataLoader worker processes per Ray worker (0: load in the training process)
    ema_decay: float = 0.0  # > 0: validate, keep and register an exponential moving average of the weights,
    # updated after every optimizer step with decay min(ema_decay, (1 + step) / (10 + step)) (0: off)
    ema_power: float = 0.0  # > 0: the decay warms up as min(ema_decay, 1 - (1 + step) ** -ema_power) instead
    # (Diffusion Policy's and LeRobot's EMAModel with power 0.75)

    # settings saved by earlier versions under another name: read under the new one, refused on --set
    renamed: ClassVar[Mapping[str, str]] = {"num_workers": "ray_workers"}

    def __init_subclass__(cls, **defaults: Any) -> None:
        """Domain defaults for the run settings: each keyword becomes the subclass's default for that field."""
        super().__init_subclass__()
        if not defaults:
            return
        hints = typing.get_type_hints(RunSettings)
        unknown = sorted(set(defaults) - {f.name for f in dataclasses.fields(RunSettings)})
        if unknown:
            raise TypeError(f"{cls.__name__}: {unknown} are not run settings")
        annotations = cls.__dict__.get("__annotations__", {})
        for name, value in defaults.items():
            annotations[name] = hints[name]
            setattr(cls, name, value)
        cls.__annotations__ = annotations

    def __post_init__(self) -> None:
        require_at_least(self, 1, ("batch_size", "epochs", "grad_accum", "ray_workers", "cpus_per_worker"))
        require_at_least(self, 0, ("warmup_steps", "weight_decay", "grad_clip", "patience", "max_steps_per_epoch",
                                   "max_eval_batches", "max_failures", "loader_workers"))
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr} must be > 0")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay={self.ema_decay} must be in [0, 1)")
        if self.ema_power < 0:
            raise ValueError(f"ema_power={self.ema_power} must be >= 0")
        if self.batch_size % (self.ray_workers * self.grad_accum):
            raise ValueError(f"batch_size={self.batch_size} must be divisible by ray_workers x grad_accum "
                             f"({self.ray_workers} x {self.grad_accum}): it is the global batch")

    @property
    def micro_batch(self) -> int:
        """Samples per forward pass on one worker."""
        return self.batch_size // (self.ray_workers * self.grad_accum)

    def replace(self: C, **changes: Any) -> C:
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]
