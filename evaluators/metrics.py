"""The metric registry: every metric difftune stores, with its direction and unit.

A :class:`MetricSpec` is the record a study, the store and the dashboard read (name, ``"maximize"`` or
``"minimize"``, unit, description). Image metrics (those computed from a trial's output images) also
register a *factory* with :func:`register_metric_factory`; :func:`build_metric` turns a name into a
:class:`BoundMetric` — a torchmetrics ``Metric`` plus the function that feeds it one
:class:`EvalBatch` — so :func:`~difftune.evaluators.evaluate` never dispatches over metric classes.
Cost metrics (``nfe``, ``latency_ms``, …) are measured by ``evaluate`` itself and have no factory.

Names are used only at the edges; an unknown name raises :class:`~difftune.EvaluationError` that
lists the known ones::

    >>> metric_spec("psnr").direction
    'maximize'
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torchmetrics import Metric

from difftune.errors import EvaluationError
from difftune.metric_table import METRIC_TABLE

__all__ = [
    "METRIC_KINDS",
    "BoundMetric",
    "Direction",
    "EvalBatch",
    "MetricContext",
    "MetricSpec",
    "build_metric",
    "metric_spec",
    "metric_specs",
    "register_metric",
    "register_metric_factory",
]

Direction = Literal["maximize", "minimize"]
#: ``cost``: measured from running the pipeline (time, memory, FLOPs, calls); ``reference``: compares each
#: image with the reference setting's image of the same sample; ``distribution``: compares the set of
#: images with a real-image distribution; ``conditioning``: agreement of each image with its prompt/label.
METRIC_KINDS = ("cost", "reference", "distribution", "conditioning")


@dataclass(frozen=True)
class MetricSpec:
    """What a stored metric means.

    Attributes:
        name: the metric's name in the store, the CLI and profiles (``"psnr"``).
        direction: ``"maximize"`` or ``"minimize"``: which way is better.
        unit: the unit the value is in (``"dB"``, ``"ms"``, ``"ratio"``, …; ``""`` when unitless).
        description: one line for tables and the dashboard.
        kind: one of :data:`METRIC_KINDS`.
    """

    name: str
    direction: Direction
    unit: str
    description: str
    kind: str = "reference"

    def __post_init__(self) -> None:
        if self.direction not in ("maximize", "minimize"):
            raise ValueError(f"{self.name}: direction must be 'maximize' or 'minimize', got {self.direction!r}")
        if self.kind not in METRIC_KINDS:
            raise ValueError(f"{self.name}: kind must be one of {', '.join(METRIC_KINDS)}, got {self.kind!r}")

    @property
    def higher_is_better(self) -> bool:
        """torchmetrics' spelling of :attr:`direction`."""
        return self.direction == "maximize"

    def better(self, a: float, b: float) -> bool:
        """True when value ``a`` is strictly better than ``b`` for this metric."""
        return a > b if self.higher_is_better else a < b


_SPECS: dict[str, MetricSpec] = {}


def register_metric(spec: MetricSpec) -> MetricSpec:
    """Add ``spec`` to the registry (a name registered twice is a programming error)."""
    if spec.name in _SPECS:
        raise ValueError(f"metric {spec.name!r} is already registered")
    _SPECS[spec.name] = spec
    return spec


def metric_specs() -> tuple[MetricSpec, ...]:
    """Every registered metric, in registration order (INTERFACE.md's order for the built-in ones)."""
    return tuple(_SPECS.values())


def metric_spec(name: str) -> MetricSpec:
    """The spec of metric ``name``; an unknown name raises :class:`EvaluationError` listing the known ones."""
    spec = _SPECS.get(name)
    if spec is None:
        raise EvaluationError(f"unknown metric {name!r}; known metrics: {', '.join(_SPECS)}")
    return spec


for _row in METRIC_TABLE:  # the one table the store reads too
    register_metric(MetricSpec(_row.name, _row.direction, _row.unit, _row.description, _row.kind))  # type: ignore[arg-type]


@dataclass(frozen=True)
class MetricContext:
    """What a metric factory may need to build its metric.

    Attributes:
        family: the model family (``describe(pipe).family``): the embedded model has its own feature net.
        device: where the images are and the metric runs.
        options: per-metric options, e.g. ``{"lpips_net": "vgg", "clip_model": "openai/clip-vit-base-patch16",
            "classifier_path": "…"}``; factories document the keys they read.
    """

    family: str
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EvalBatch:
    """One batch of a trial's output images and what metrics compare them with.

    Attributes:
        images: N×C×H×W in [0, 1], float32.
        reference: the reference setting's images of the same samples (same shape), or None when no
            requested metric needs them.
        conditions: the class label (int) or prompt (str) each image was drawn for.
    """

    images: torch.Tensor
    reference: torch.Tensor | None
    conditions: Sequence[int | str]

    def require_reference(self, metric: str) -> torch.Tensor:
        if self.reference is None:
            raise EvaluationError(f"{metric} compares with reference images, but none were given")
        return self.reference


@dataclass
class BoundMetric:
    """A torchmetrics metric with the function that feeds it a batch.

    ``needs_reference`` tells :func:`evaluate` whether reference images must be computed (or loaded)
    for this metric.
    """

    metric: Metric
    feed: Callable[[EvalBatch], None]
    needs_reference: bool

    def update(self, batch: EvalBatch) -> None:
        self.feed(batch)

    def compute(self) -> float:
        return float(self.metric.compute())

    def reset(self) -> None:
        self.metric.reset()


MetricFactory = Callable[[MetricContext], BoundMetric]
_FACTORIES: dict[str, MetricFactory] = {}


def register_metric_factory(name: str) -> Callable[[MetricFactory], MetricFactory]:
    """Decorator: the function that builds the image metric ``name`` (which must have a spec)."""
    metric_spec(name)

    def decorate(factory: MetricFactory) -> MetricFactory:
        if name in _FACTORIES:
            raise ValueError(f"a factory for metric {name!r} is already registered")
        _FACTORIES[name] = factory
        return factory

    return decorate


def build_metric(name: str, context: MetricContext) -> BoundMetric:
    """Build image metric ``name`` for ``context``.

    Raises:
        EvaluationError: ``name`` is unknown, is a cost metric (measured by ``evaluate``), or needs
            weights / packages that are not available here (the message says how to get them).
    """
    spec = metric_spec(name)
    _load_factories()
    factory = _FACTORIES.get(name)
    if factory is None:
        image_metrics = ", ".join(sorted(_FACTORIES))
        raise EvaluationError(
            f"{name} is a {spec.kind} metric measured by evaluate(), not computed from images; "
            f"image metrics: {image_metrics}"
        )
    return factory(context)


def _load_factories() -> None:
    # The factories live beside their metrics; importing the modules registers them.
    from . import conditioning, distribution, quality, sharpness  # noqa: F401
