"""The domain registry: one name per domain, everywhere.

A domain is a folder ``services/<name>/`` whose ``__init__.py`` declares a :class:`Domain` subclass with the
``@register`` decorator. The class carries everything the rest of the platform needs of the domain: its
config, saved state and evaluation settings, the data it reads, its model, loss and metrics, its service and
port, the tiny settings tests and smoke runs use, the demo's jobs, an example request and a client for
``tessera predict``. Its heavy parts (torch models, data readers, the BentoML service, the client) are imported
lazily by the domain's methods, so listing domains stays cheap and a domain's own dependencies (its pip extra,
``pip install tessera[<name>]``) are only needed when it is used.

Domains are discovered in the ``services`` package and in the packages named in ``TESSERA_DOMAIN_PACKAGES``
(comma-separated), so a domain can also live outside this repository.
"""

from __future__ import annotations

import abc
import importlib
import importlib.util
import os
import pkgutil
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

if TYPE_CHECKING:
    import torch
    from matplotlib.figure import Figure
    from rich.console import RenderableType

    from shared.saved import SavedState

DOMAIN_PACKAGES_ENV = "TESSERA_DOMAIN_PACKAGES"


class SizedDataset(Protocol):
    """A map-style dataset with a length (what DataLoader and the trainer need)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Any: ...


@dataclass
class DataBundle:
    """Train/validation/test datasets plus the state saved with the model (statistics from training only)."""

    train: SizedDataset
    val: SizedDataset
    test: SizedDataset
    state: SavedState


@dataclass
class Calibration:
    """What :meth:`Domain.calibrate` fitted: the state to save with the model and figures to log."""

    state: SavedState
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class EvaluationResult:
    """What a domain's evaluation pipeline produced: JSON-ready metrics, plots and other files (GIFs, tables)."""

    metrics: dict[str, Any]  # printed as the job's last line and logged to MLflow (numbers as metrics)
    figures: dict[str, Figure] = field(default_factory=dict)  # file name -> figure
    files: dict[str, bytes] = field(default_factory=dict)  # artifact name -> content


@dataclass
class Prediction:
    """What a domain's client got from its service for ``tessera predict`` (and the demo)."""

    version: str  # the model version that answered
    summary: RenderableType  # a table for the terminal
    output: Path | None = None  # the file written, if any
    text: str | None = None  # the answer as text (printed on stdout when no output file is given)


@dataclass(frozen=True)
class DemoJob:
    """One training job of ``make demo``: a model of the domain with short settings."""

    model: str
    overrides: tuple[str, ...] = ()


class Domain(abc.ABC):
    """What a domain supplies to the shared trainer, tracker, services, demo, CLI and tests."""

    name: ClassVar[str]  # registry key, services/<name>, compose service, MLflow model, Bento, pip extra
    models: ClassVar[tuple[str, ...]]  # model names accepted by --model (the first is the default)
    port: ClassVar[int]  # BentoML service port
    endpoint: ClassVar[str]  # the prediction route, e.g. "/forecast"
    example_route: ClassVar[str | None] = None  # the route example_request() is for (None: endpoint)
    service: ClassVar[str]  # "module:Class" of the BentoML service, for `bentoml serve`
    config_cls: ClassVar[type]  # a shared.config.RunSettings subclass
    saved_state: ClassVar[str]  # "module:Class" of its shared.saved.SavedState (imported when first needed)
    eval_config_cls: ClassVar[type | None] = None  # settings of the evaluation pipeline (None: no pipeline)
    val_metric: ClassVar[str]  # metric compared for promotion (lower is better)
    # The evaluation metric that ranks models, and whether higher is better: `pipelines.evaluate --promote`
    # moves @production on it (for domains whose validation metric is only a proxy). None: no such metric.
    eval_score: ClassVar[tuple[str, bool] | None] = None
    requires: ClassVar[tuple[str, ...]] = ()  # modules of the domain's pip extra, checked before use
    tiny: ClassVar[Mapping[str, Any]] = {}  # the smallest settings that train end to end (tests, smoke runs)
    demo_jobs: ClassVar[tuple[DemoJob, ...]] = ()  # what `make demo` trains, in order
    data_suffixes: ClassVar[tuple[str, ...]] = ()  # file kinds the domain reads (TESSERA_DATA in the demo)
    max_body_bytes: ClassVar[int] = 8 * 1024 * 1024  # request bodies above this get a 413
    # requests on its endpoints a service works on at once; more get a 429 with Retry-After
    # (TESSERA_<DOMAIN>_MAX_IN_FLIGHT overrides it)
    max_in_flight: ClassVar[int] = 256

    @property
    def state_cls(self) -> type[SavedState]:
        """The saved state: what load_data fits on the training data and the model needs at inference."""
        module, _, cls = self.saved_state.partition(":")
        state: type[SavedState] = getattr(importlib.import_module(module), cls)
        return state

    # --- training -----------------------------------------------------------------------------------------

    def make_config(self, model: str | None = None, data: str | None = None,
                    overrides: Mapping[str, Any] | None = None) -> Any:
        """The validated config for ``model`` (the domain's defaults), ``data`` and ``--set`` overrides."""
        from shared.config import apply_overrides

        overrides = dict(overrides or {})
        model = model or overrides.pop("model", None) or self.models[0]
        from shared import datapath

        cfg = self.config_cls(model=str(model), data=datapath.normalize(data) if data else None)
        return apply_overrides(cfg, overrides)

    @abc.abstractmethod
    def load_data(self, cfg: Any) -> DataBundle:
        """Read (or synthesize) the data and split it; statistics come from the training split only."""

    @abc.abstractmethod
    def build_model(self, cfg: Any, state: Any) -> torch.nn.Module:
        """A fresh model for ``cfg`` and the saved state ``state``."""

    @abc.abstractmethod
    def training_loss(self, model: torch.nn.Module, batch: Any, device: torch.device) -> torch.Tensor:
        """The loss of one batch (the trainer owns the loop, optimizer and schedule)."""

    @abc.abstractmethod
    def metric_sums(self, model: torch.nn.Module, batches: Iterable[Any], device: torch.device) -> dict[str, float]:
        """Additive statistics over ``batches`` (sums and counts): the trainer adds them up across workers."""

    @abc.abstractmethod
    def metrics_from(self, sums: Mapping[str, float]) -> dict[str, float]:
        """Metrics from :meth:`metric_sums` (added over workers); must include ``val_metric``."""

    def evaluate(self, model: torch.nn.Module, batches: Iterable[Any], device: torch.device) -> dict[str, float]:
        """Metrics over an iterable of batches."""
        return self.metrics_from(self.metric_sums(model, batches, device))

    def data_match(self, path: str) -> int:
        """How well ``path`` fits as this domain's training data (``TESSERA_DATA`` in the demo, which goes to the
        domains that match it best): 0 not at all, 1 by its kind (by default: a file of one of the
        ``data_suffixes``), 2 recognised by its content or companion files."""
        return int(bool(self.data_suffixes) and path.rstrip("/").lower().endswith(self.data_suffixes))

    def collate(self, cfg: Any) -> Callable[[list[Any]], Any] | None:
        """How the trainer's loaders batch samples (a picklable function; None: torch's default collate, for
        samples of one shape). Variable-length samples (light curves) pack or pad here."""
        return None

    def pretraining(self, cfg: Any, state: Any) -> Any | None:
        """Settings of a run on other data (for example simulated examples) that goes before a new run of
        ``cfg`` on ``state``'s data: the trainer runs it first, untracked, and starts from its network. None
        (the default): the network starts from its own initialisation. Not asked when a run resumes from a
        checkpoint or starts from given weights (``--init-from``); the settings it returns must ask for none."""
        return None

    def supports_ddp(self, cfg: Any) -> bool:
        """Whether DistributedDataParallel can wrap the model. Losses that differentiate through a gradient
        (``create_graph=True``) cannot run under DDP; the trainer then averages gradients itself."""
        return True

    def eval_signature(self, cfg: Any, state: Any) -> str:
        """Identifies the validation data: scores are compared for promotion only when signatures match."""
        return str(getattr(state, "fingerprint", ""))

    def calibrate(self, model: torch.nn.Module, val_batches: Any, state: Any, cfg: Any,
                  device: torch.device) -> Calibration | None:
        """Post-training settings fitted on the validation batches (the trainer's loader), after the kept weights
        are loaded and before the test metrics (rank 0). Returns the state to save (with what was fitted, which
        the model now applies) and metrics to log; None: nothing to fit."""
        return None

    def figures(self, model: torch.nn.Module, data: DataBundle, cfg: Any) -> dict[str, Figure]:
        """Plots logged to MLflow after training (file name -> figure)."""
        return {}

    # --- evaluation pipeline (``python -m pipelines.evaluate <domain>``) ------------------------------------

    def evaluation(self, model: torch.nn.Module, cfg: Any, state: Any, data: str | None,
                   settings: Any) -> EvaluationResult:
        """Evaluate a trained model beyond the trainer's test metrics (closed loop, rollouts, baselines)."""
        raise NotImplementedError(f"domain {self.name!r} has no evaluation pipeline")

    # --- serving and clients ------------------------------------------------------------------------------

    def describe(self, cfg: Any, state: Any) -> dict[str, Any]:
        """What ``/model`` reports besides name, version, run and architecture (inputs the model expects)."""
        return {}

    # --- the MLflow pyfunc model (``mlflow.pyfunc.load_model("models:/<name>@production")``) ------------------

    @abc.abstractmethod
    def pyfunc_example(self, loaded: Any) -> tuple[Any, dict[str, Any]]:
        """An input the pyfunc model of ``loaded`` (a ``shared.tracking.LoadedModel``) accepts (a DataFrame or
        a dict of arrays, built from the model itself), and its default params (empty: none): the logged
        signature and input example."""

    @abc.abstractmethod
    def pyfunc_predict(self, loaded: Any, model_input: Any, params: dict[str, Any]) -> Any:
        """The pyfunc model's answer to ``model_input`` (ValueError for input that does not fit the model)."""

    @abc.abstractmethod
    def example_request(self) -> dict[str, Any]:
        """A JSON body for ``endpoint`` that a model trained with the demo or tiny settings answers (the
        Swagger example)."""

    @property
    def example_path(self) -> str:
        """The route :meth:`example_request` is a body for: ``example_route``, else ``endpoint``."""
        return self.example_route or self.endpoint

    def example_input(self, folder: Path, data: str | None = None) -> Path:
        """A file :meth:`predict` accepts, written under ``folder`` (from ``data`` when given, else synthetic):
        by default the example request as JSON."""
        import json

        path = folder / f"{self.name}-request.json"
        path.write_text(json.dumps(self.example_request()))
        return path

    def predict(self, url: str, path: Path, *, horizon: int | None = None, output: Path | None = None,
                timeout: float = 120.0) -> Prediction:
        """Send the input file ``path`` to the service at ``url`` (``tessera predict``); by default its content
        is the JSON body of ``endpoint``."""
        import json

        from shared.client import post_json

        answer = post_json(f"{url.rstrip('/')}{self.endpoint}", json.loads(path.read_text()), timeout=timeout)
        return _json_prediction(answer, output)

    # --- dependencies -------------------------------------------------------------------------------------

    def missing_dependencies(self) -> list[str]:
        """The modules of the domain's pip extra that are not installed."""
        return [m for m in self.requires if importlib.util.find_spec(m) is None]

    def check_dependencies(self) -> None:
        """ImportError naming the pip extra when a module the domain needs is not installed."""
        missing = self.missing_dependencies()
        if missing:
            raise ImportError(f"domain {self.name!r} needs {', '.join(missing)}: pip install 'tessera[{self.name}]'")


def _json_prediction(answer: dict[str, Any], output: Path | None) -> Prediction:
    import json

    from rich.pretty import Pretty

    text = json.dumps(answer, indent=1)
    if output is not None:
        output.write_text(text)
    return Prediction(version=str(answer.get("model", {}).get("version")), summary=Pretty(answer, max_length=8),
                      output=output, text=None if output else text)


# Every registered class by (module, name): a domain is active while its package is listed in packages().
_DECLARED: dict[tuple[str, str], type[Domain]] = {}
_searched: set[str] = set()


def register(cls: type[Domain]) -> type[Domain]:
    """Class decorator: make a domain known under ``cls.name`` (while its package is listed)."""
    _DECLARED[(cls.__module__, cls.name)] = cls
    return cls


def packages() -> list[str]:
    """Packages whose sub-packages are domains: ``services`` and those in ``TESSERA_DOMAIN_PACKAGES``."""
    extra = [p.strip() for p in os.environ.get(DOMAIN_PACKAGES_ENV, "").split(",") if p.strip()]
    return ["services", *extra]


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(f"{package}.")


def discover(package: str) -> None:
    """Import every sub-package of ``package`` (each registers its domain)."""
    module = importlib.import_module(package)
    for info in pkgutil.iter_modules(module.__path__):
        if info.ispkg:
            importlib.import_module(f"{package}.{info.name}")
    _searched.add(package)


def forget(package: str) -> None:
    """Drop the domains of ``package`` and its modules, so that it is imported afresh when next listed (tests
    that install a throw-away domain package)."""
    import sys

    for key in [k for k in _DECLARED if _within(k[0], package)]:
        del _DECLARED[key]
    for name in [m for m in sys.modules if _within(m, package)]:
        del sys.modules[name]
    _searched.discard(package)


def _active() -> dict[str, type[Domain]]:
    """The registered domains of the packages in :func:`packages` (imported on first use), by name."""
    chosen = packages()
    for package in chosen:
        if package not in _searched:
            discover(package)
    active: dict[str, type[Domain]] = {}
    for (module, name), cls in _DECLARED.items():
        if any(_within(module, p) for p in chosen):
            if name in active:
                raise ValueError(f"domain {name!r} is registered twice ({active[name].__module__}, {module})")
            active[name] = cls
    return active


def names() -> list[str]:
    """Names of all registered domains, sorted."""
    return sorted(_active())


def get(name: str) -> Domain:
    """The domain called ``name``; unknown names raise ``KeyError`` listing the known ones."""
    active = _active()
    try:
        return active[name]()
    except KeyError:
        raise KeyError(f"unknown domain {name!r}; known domains: {', '.join(sorted(active)) or '(none)'}") from None


def domains() -> Iterator[Domain]:
    for name in names():
        yield get(name)


def installed() -> list[str]:
    """Names of the registered domains whose pip extra is installed (what a local stack can serve)."""
    return [d.name for d in domains() if not d.missing_dependencies()]
