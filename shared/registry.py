"""The domain registry: one name per domain, everywhere.

A domain is a folder ``services/<name>/`` whose ``__init__.py`` declares a :class:`Domain` subclass with the
``@register`` decorator. Its heavy parts (torch models, data readers, the BentoML service) are imported
lazily by the domain's methods, so listing domains stays cheap. The single trainer in ``pipelines/`` only
talks to domains through this interface.
"""

from __future__ import annotations

import abc
import importlib
import pkgutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

if TYPE_CHECKING:
    import torch
    from matplotlib.figure import Figure


class SizedDataset(Protocol):
    """A map-style dataset with a length (what DataLoader and the trainer need)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Any: ...


@dataclass
class DataBundle:
    """Train/validation/test datasets plus the JSON-ready statistics saved with the model."""

    train: SizedDataset
    val: SizedDataset
    test: SizedDataset
    info: dict[str, Any] = field(default_factory=dict)  # scalers, columns, frequency, ... (saved as stats.json)


@dataclass
class EvaluationResult:
    """What a domain's evaluation pipeline produced: JSON-ready metrics, plots and other files (GIFs, tables)."""

    metrics: dict[str, Any]  # printed as the job's last line and logged to MLflow (numbers as metrics)
    figures: dict[str, Figure] = field(default_factory=dict)  # file name -> figure
    files: dict[str, bytes] = field(default_factory=dict)  # artifact name -> content


class Domain(abc.ABC):
    """What a domain supplies to the shared trainer, tracker and services."""

    name: ClassVar[str]  # registry key, services/<name>, compose service, MLflow model, Bento
    models: ClassVar[tuple[str, ...]]  # model names accepted by --model (the first is the default)
    port: ClassVar[int]  # BentoML service port
    endpoint: ClassVar[str]  # the prediction route, e.g. "/forecast"
    service: ClassVar[str]  # "module:Class" of the BentoML service, for `bentoml serve`
    config_cls: ClassVar[type]
    val_metric: ClassVar[str]  # metric compared for promotion (lower is better)

    @abc.abstractmethod
    def make_config(self, model: str | None = None, data: str | None = None,
                    overrides: Mapping[str, Any] | None = None) -> Any:
        """The validated config for ``model`` (published defaults when data is a known benchmark)."""

    @abc.abstractmethod
    def load_data(self, cfg: Any) -> DataBundle:
        """Read (or synthesize) the data and split it; statistics come from the training split only."""

    @abc.abstractmethod
    def build_model(self, cfg: Any, info: Mapping[str, Any]) -> torch.nn.Module:
        """A fresh model for ``cfg`` and the data statistics ``info``."""

    @abc.abstractmethod
    def training_loss(self, model: torch.nn.Module, batch: Any, device: torch.device) -> torch.Tensor:
        """The loss of one batch (the trainer owns the loop, optimizer and schedule)."""

    @abc.abstractmethod
    def evaluate(self, model: torch.nn.Module, batches: Any, device: torch.device) -> dict[str, float]:
        """Metrics over an iterable of batches; must include ``val_metric``."""

    def supports_ddp(self, cfg: Any) -> bool:
        """Whether DistributedDataParallel can wrap the model. Losses that differentiate through a gradient
        (``create_graph=True``) cannot run under DDP; the trainer then averages gradients itself."""
        return True

    def eval_signature(self, cfg: Any, info: Mapping[str, Any]) -> str:
        """Identifies the validation data: scores are compared for promotion only when signatures match."""
        return str(info.get("fingerprint"))

    def calibrate(self, model: torch.nn.Module, val_batches: Any, info: dict[str, Any], cfg: Any,
                  device: torch.device) -> dict[str, float]:
        """Post-training settings fitted on the validation batches (the trainer's loader), after the kept weights
        are loaded and before the test metrics (rank 0). They update ``model`` and ``info`` (saved with the
        model); the return is logged as metrics. Default: none."""
        return {}

    def figures(self, model: torch.nn.Module, data: DataBundle, cfg: Any) -> dict[str, Figure]:
        """Plots logged to MLflow after training (file name -> figure)."""
        return {}

    # Evaluation pipeline (``python -m pipelines.evaluate <domain>``): settings the domain accepts with their
    # defaults; each also gets a command-line flag of the same name (``--episodes 10``) besides ``--set``.
    eval_settings: ClassVar[dict[str, Any]] = {}
    # The evaluation metric that ranks models, and whether higher is better: `pipelines.evaluate --promote`
    # moves @production on it (for domains whose validation metric is only a proxy). None: no such metric.
    eval_score: ClassVar[tuple[str, bool] | None] = None

    def evaluation(self, model: torch.nn.Module, cfg: Any, info: Mapping[str, Any], data: str | None,
                   settings: Mapping[str, Any]) -> EvaluationResult:
        """Evaluate a trained model beyond the trainer's test metrics (closed loop, rollouts, baselines)."""
        raise NotImplementedError(f"domain {self.name!r} has no evaluation pipeline")


_REGISTRY: dict[str, type[Domain]] = {}
_discovered = False


def register(cls: type[Domain]) -> type[Domain]:
    """Class decorator: make a domain known under ``cls.name``."""
    existing = _REGISTRY.get(cls.name)
    if existing is not None and existing is not cls and existing.__qualname__ != cls.__qualname__:
        raise ValueError(f"domain {cls.name!r} is registered twice ({existing.__module__}, {cls.__module__})")
    _REGISTRY[cls.name] = cls
    return cls


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    import services

    for module in pkgutil.iter_modules(services.__path__):
        if module.ispkg:
            importlib.import_module(f"services.{module.name}")
    _discovered = True


def names() -> list[str]:
    """Names of all registered domains, sorted."""
    _discover()
    return sorted(_REGISTRY)


def get(name: str) -> Domain:
    """The domain called ``name``; unknown names raise ``KeyError`` listing the known ones."""
    _discover()
    try:
        return _REGISTRY[name]()
    except KeyError:
        raise KeyError(f"unknown domain {name!r}; known domains: {', '.join(sorted(_REGISTRY)) or '(none)'}") from None


def domains() -> Iterator[Domain]:
    for name in names():
        yield get(name)
