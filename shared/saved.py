"""Typed saved state: what a model needs besides its weights and config, written beside the weights.

A domain's state is one frozen dataclass extending :class:`SavedState`. Fields annotated as tensors
(``Tensor``, ``Tensor | None``, ``dict[str, Tensor]``) are arrays (normalisation statistics, a climatology,
static fields, calibration factors) and go into ``state.safetensors``; every other field is small metadata
(columns, grid description, class names, units) and goes into ``state.json``. Nothing is pickled, and a
0.25-degree climatology stays a binary array instead of hundreds of MB of JSON.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from shared.config import from_dict

S = TypeVar("S", bound="SavedState")

STATE_JSON = "state.json"
STATE_ARRAYS = "state.safetensors"
FORMAT = 2  # 1: everything in stats.json (models saved before typed state)


def _kind(annotation: Any) -> str:
    """'tensor', 'tensors' (a dict of tensors) or 'json' for a field annotation."""
    if annotation is Tensor:
        return "tensor"
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType) and Tensor in args:
        return "tensor"
    if origin is dict and len(args) == 2 and args[1] is Tensor:
        return "tensors"
    return "json"


@dataclasses.dataclass(frozen=True)
class SavedState:
    """Base of a domain's saved state (metadata as JSON, arrays as safetensors)."""

    # the field kinds, computed once per class
    _kinds: ClassVar[dict[type, dict[str, str]]] = {}

    @classmethod
    def field_kinds(cls) -> dict[str, str]:
        if cls not in SavedState._kinds:
            hints = typing.get_type_hints(cls)
            SavedState._kinds[cls] = {f.name: _kind(hints[f.name]) for f in dataclasses.fields(cls)}
        return SavedState._kinds[cls]

    def arrays(self) -> dict[str, Tensor]:
        """The tensor fields, flat (``name`` or ``name.key`` for a dict of tensors), contiguous, on the CPU."""
        out: dict[str, Tensor] = {}
        for name, kind in self.field_kinds().items():
            value = getattr(self, name)
            if kind == "tensor" and value is not None:
                out[name] = value.detach().cpu().contiguous()
            elif kind == "tensors":
                out.update({f"{name}.{key}": t.detach().cpu().contiguous() for key, t in value.items()})
        return out

    def metadata(self) -> dict[str, Any]:
        """The JSON fields (tuples become lists)."""
        meta = {name: getattr(self, name) for name, kind in self.field_kinds().items() if kind == "json"}
        return json.loads(json.dumps(meta))

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / STATE_JSON).write_text(json.dumps({"format": FORMAT, **self.metadata()}, indent=1))
        save_file(self.arrays(), str(folder / STATE_ARRAYS))

    @classmethod
    def from_parts(cls: type[S], meta: Mapping[str, Any], arrays: Mapping[str, Tensor]) -> S:
        """Rebuild from JSON metadata and flat arrays; unknown fields (a newer model) are an error."""
        kinds = cls.field_kinds()
        values: dict[str, Any] = {k: v for k, v in meta.items() if k != "format"}
        for key, tensor in arrays.items():
            name, _, sub = key.partition(".")
            if kinds.get(name) == "tensors":
                values.setdefault(name, {})[sub] = tensor
            else:
                values[name] = tensor
        for name, kind in kinds.items():
            if kind == "tensors":
                values.setdefault(name, {})
            elif kind == "tensor" and name not in values:
                values[name] = None
        return from_dict(cls, values, what="model state")

    @classmethod
    def load(cls: type[S], folder: Path) -> S:
        if not (folder / STATE_JSON).exists() and (folder / "stats.json").exists():
            return cls.from_legacy(json.loads((folder / "stats.json").read_text()))
        meta = json.loads((folder / STATE_JSON).read_text())
        if int(meta.get("format", FORMAT)) > FORMAT:
            raise ValueError(f"{folder / STATE_JSON} has format {meta['format']}; this Tessera reads up to {FORMAT}: "
                             f"upgrade to load it")
        arrays = load_file(str(folder / STATE_ARRAYS)) if (folder / STATE_ARRAYS).exists() else {}
        return cls.from_parts(meta, arrays)

    def same_as(self, other: SavedState) -> bool:
        """Equal metadata and equal arrays (dataclass ``==`` cannot compare tensors)."""
        mine, theirs = self.arrays(), other.arrays()
        return (type(self) is type(other) and self.metadata() == other.metadata() and mine.keys() == theirs.keys()
                and all(torch.equal(mine[k], theirs[k]) for k in mine))

    @classmethod
    def from_legacy(cls: type[S], info: Mapping[str, Any]) -> S:
        """The state of a model saved before typed state (one ``stats.json`` of lists and numbers)."""
        raise ValueError(f"{cls.__name__} cannot read a stats.json from an earlier version")


def tensor(values: Any, dtype: torch.dtype = torch.float32) -> Tensor:
    """A CPU tensor of ``values`` (lists, numpy arrays, tensors) in ``dtype``."""
    if isinstance(values, Tensor):
        return values.detach().cpu().to(dtype)
    return torch.as_tensor(values, dtype=dtype)
