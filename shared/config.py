"""Typed configuration: frozen dataclasses with ``key=value`` overrides.

Every domain's settings are one frozen dataclass that validates itself in ``__post_init__``. Users change
a setting from the command line with ``--set key=value``; :func:`apply_overrides` parses each value to the
field's declared type and rebuilds the dataclass, so validation runs again on the result.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

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


def apply_overrides(cfg: C, overrides: Mapping[str, Any] | Iterable[str]) -> C:
    """Return a copy of the dataclass ``cfg`` with overrides applied (strings parsed to field types).

    Unknown keys raise ``ValueError`` listing the valid ones; the dataclass re-validates itself.
    """
    if not dataclasses.is_dataclass(cfg) or isinstance(cfg, type):
        raise TypeError("apply_overrides expects a dataclass instance")
    if not isinstance(overrides, Mapping):
        overrides = parse_overrides(overrides)
    hints = typing.get_type_hints(type(cfg))
    names = [f.name for f in dataclasses.fields(cfg)]
    changes: dict[str, Any] = {}
    for key, value in overrides.items():
        if key not in names:
            raise ValueError(f"unknown setting {key!r} for {type(cfg).__name__}; known: {', '.join(sorted(names))}")
        changes[key] = _parse_value(value, hints[key], key) if isinstance(value, str) else value
    return dataclasses.replace(cfg, **changes)


def to_dict(cfg: Any) -> dict[str, Any]:
    """JSON-ready dict of a config dataclass (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def _as_tuples(value: Any, annotation: Any) -> Any:
    """JSON lists back to the (possibly nested) tuples the annotation declares."""
    if typing.get_origin(annotation) is tuple and isinstance(value, list):
        inner = typing.get_args(annotation)
        return tuple(_as_tuples(v, inner[0]) if inner else v for v in value)
    return value


def from_dict(cls: type[C], data: Mapping[str, Any]) -> C:
    """Rebuild a config from :func:`to_dict` output; keys the class no longer has are ignored."""
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name in data:
            value = data[f.name]
            kwargs[f.name] = _as_tuples(value, hints[f.name])
    return cls(**kwargs)
