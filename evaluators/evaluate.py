"""Evaluate one setting: run the pipeline on the samples and measure cost and quality.

The caller applies the trial's acceleration setting to ``pipe`` (and removes it afterwards);
:func:`evaluate` runs the pipeline on the samples, batch by batch, and returns ``{metric name: value}``:

- ``nfe``: denoiser calls per pipeline call that actually ran the network — counted with forward
  hooks, so a call a technique answers from its cache without running any sub-module (SADA's
  skipped steps) does not count, while a call that reuses some blocks (FORA, DeepCache) does;
- ``flops_ratio``: FLOPs of the first batch (``torch.utils.flop_counter``) over the reference's on
  the same samples;
- ``latency_ms`` / ``speedup``: this setting and the reference timed alternately
  (:func:`~difftune.evaluators.latency.measure_ab`) on the same batch in this process — the reference
  runs on ``reference.pipe``, which must not carry the trial's setting (``Reference.from_pipeline``
  copies the pipeline for that reason);
- ``peak_memory_mb``: on CUDA only (the peak allocated over the trial's own image-generating calls,
  reset before them), None on the CPU;
- ``weight_memory_mb``: the denoiser's weights as they would be served with the quantization active
  on it (:func:`~difftune.accel.quant.served_weight_memory`), the plain weights without one;
- image metrics (``psnr``, ``ssim``, ``mse``, ``lpips``, ``fid``, ``class_accuracy``, ``clip_score``)
  from :mod:`~difftune.evaluators.metrics`' registry.

A trial that cannot be measured raises :class:`~difftune.EvaluationError` with the reason — NaN in
the images or a metric, out of memory, missing metric weights — so the study records it as failed.

Example::

    cal = CalibrationSet(labels=range(10), seeds=1)
    ref = Reference.from_pipeline(pipe, num_inference_steps=20)   # before any trial setting is applied
    handle = SADAConfig(acc_range=(3, 18)).apply(pipe)
    try:
        m = evaluate(pipe, cal, ref, metrics=["nfe", "psnr", "fid", "speedup"])
    finally:
        handle.remove()
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from difftune.errors import EvaluationError

from .calibration import Sample, check_call_kwargs, generate
from .latency import ABResult, measure, measure_ab
from .metrics import BoundMetric, EvalBatch, MetricContext, build_metric, metric_spec
from .reference import Reference

__all__ = ["DEFAULT_METRICS", "DenoiserCalls", "LatencyOptions", "default_metrics", "evaluate"]

#: What :func:`evaluate` measures when ``metrics`` is not given (the embedded model adds ``fid`` and
#: ``class_accuracy``; LPIPS, CLIP score and other FIDs need weights and are opt-in).
DEFAULT_METRICS: tuple[str, ...] = (
    "nfe",
    "flops_ratio",
    "latency_ms",
    "speedup",
    "peak_memory_mb",
    "psnr",
    "ssim",
    "mse",
)
_COST_METRICS = ("nfe", "flops_ratio", "latency_ms", "speedup", "speedup_spread", "peak_memory_mb", "weight_memory_mb")
_OOM_ERRORS: tuple[type[BaseException], ...] = (
    getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError),
    MemoryError,
)


def default_metrics(family: str) -> tuple[str, ...]:
    """The default metrics for a model family."""
    return (*DEFAULT_METRICS, "fid", "class_accuracy") if family == "embedded" else DEFAULT_METRICS


@dataclass(frozen=True)
class LatencyOptions:
    """How ``latency_ms`` / ``speedup`` are timed.

    Attributes:
        warmup: untimed calls of each side first.
        repeats: timed calls of each side, alternated (a, b, b, a, …); the median is reported.
        batch_size: samples in the timed call (the first ones); None: the evaluation batch size.
        statistic: ``speedup`` as the ratio of the sides' ``"median"`` (default) or ``"min"`` repeat,
            or ``"paired"``: the median ratio of runs taken back to back, which resists other
            processes sharing the CPU (``latency_ms`` is then the fastest repeat).
        reuse_reference: time the reference with one run per evaluation and take its statistic over
            every run so far (:meth:`Reference.latency`), instead of ``repeats`` runs alternating with
            the trial's — a study's trials then cost a fraction of a long reference setting's time.
            Use it with ``statistic="min"``.
    """

    warmup: int = 1
    repeats: int = 5
    batch_size: int | None = None
    statistic: str = "median"
    reuse_reference: bool = False

    def __post_init__(self) -> None:
        if self.warmup < 0 or self.repeats < 1:
            raise EvaluationError(f"LatencyOptions: warmup >= 0 and repeats >= 1, got {self.warmup}, {self.repeats}")
        if self.batch_size is not None and self.batch_size < 1:
            raise EvaluationError(f"LatencyOptions.batch_size must be >= 1, got {self.batch_size}")
        if self.statistic not in ("median", "min", "paired"):
            raise EvaluationError(
                f"LatencyOptions.statistic must be 'median', 'min' or 'paired', got {self.statistic!r}"
            )


class DenoiserCalls:
    """Counts calls of ``denoiser`` that ran the network (at least one of its sub-modules).

    Use as a context manager; :attr:`calls` are the real evaluations, :attr:`skipped` the calls a
    technique answered without running any sub-module.
    """

    def __init__(self, denoiser: torch.nn.Module) -> None:
        self.calls = 0
        self.skipped = 0
        self._depth = 0
        self._ran = False
        children = list(denoiser.children())
        self._has_children = bool(children)
        self._handles = [
            denoiser.register_forward_pre_hook(self._enter),
            denoiser.register_forward_hook(self._exit, always_call=True),
            *(child.register_forward_pre_hook(self._child) for child in children),
        ]

    def _enter(self, module: torch.nn.Module, args: Any) -> None:
        self._depth += 1
        if self._depth == 1:
            self._ran = False

    def _child(self, module: torch.nn.Module, args: Any) -> None:
        if self._depth:
            self._ran = True

    def _exit(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        self._depth -= 1
        if self._depth == 0:
            if self._ran or not self._has_children:
                self.calls += 1
            else:
                self.skipped += 1

    def remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    def __enter__(self) -> DenoiserCalls:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _resolve_metrics(metrics: Iterable[str] | None, family: str) -> list[str]:
    names = list(dict.fromkeys(metrics if metrics is not None else default_metrics(family)))
    if not names:
        raise EvaluationError("evaluate: no metrics requested")
    for name in names:
        metric_spec(name)  # unknown names raise, listing the known ones
    return names


def _check_images(images: torch.Tensor, what: str) -> None:
    finite = torch.isfinite(images)
    if bool(finite.all()):
        return
    bad = ~finite.flatten(1).all(1)
    kind = "NaN" if bool(torch.isnan(images).any()) else "inf"
    raise EvaluationError(f"{what} produced {kind} in {int(bad.sum())} of {len(images)} images")


def _check_value(name: str, value: float) -> float:
    if math.isnan(value):
        raise EvaluationError(f"metric {name} produced NaN")
    if math.isinf(value):
        raise EvaluationError(f"metric {name} produced inf")
    return value


def _device_of(pipe: Any, device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    found = getattr(pipe, "device", None)
    return found if isinstance(found, torch.device) else torch.device("cpu")


def evaluate(
    pipe: Any,
    samples: Sequence[Sample],
    reference: Reference,
    *,
    metrics: Iterable[str] | None = None,
    latency: LatencyOptions | None = None,
    device: str | torch.device | None = None,
    call_kwargs: Mapping[str, Any] | None = None,
    batch_size: int | None = None,
    options: Mapping[str, Any] | None = None,
    on_images: Callable[[torch.Tensor], None] | None = None,
) -> dict[str, float | None]:
    """Measure one setting (already applied to ``pipe`` by the caller) on ``samples``.

    Args:
        pipe: the pipeline with the trial's setting applied.
        samples: the samples to evaluate — a calibration set or a subset (a rung's prefix).
        reference: the study's reference setting (its own pipeline, cached images).
        metrics: metric names (default :func:`default_metrics` of the model family).
        latency: timing options for ``latency_ms`` / ``speedup`` (default :class:`LatencyOptions`).
        device: where the pipeline runs (default: the pipeline's device); CUDA enables event timing
            and ``peak_memory_mb``.
        call_kwargs: this setting's call kwargs, over the reference's (e.g. ``num_inference_steps``
            for a solver schedule with fewer steps).
        batch_size: samples per pipeline call (default: the reference's).
        options: per-metric options passed to the factories (:class:`~difftune.evaluators.metrics.MetricContext`).
        on_images: called once with the first batch's images (N×C×H×W in [0, 1], on the pipeline's device,
            checked finite) — to keep a few samples (the study runner's thumbnails) without a second run.

    Returns:
        ``{name: value}`` for every requested metric; ``peak_memory_mb`` is None off CUDA.

    Raises:
        EvaluationError: NaN/inf in the images or a metric, out of memory, an unknown metric, or a
            metric whose weights are not available here.
    """
    samples = list(samples)
    if not samples:
        raise EvaluationError("evaluate: no samples given")
    names = _resolve_metrics(metrics, reference.family)
    dev = _device_of(pipe, device)
    kwargs = {**reference.setting.call_kwargs, **check_call_kwargs(call_kwargs or {})}
    size = batch_size or reference.batch_size
    if size < 1:
        raise EvaluationError(f"batch_size must be >= 1, got {size}")
    try:
        return _evaluate(
            pipe, samples, reference, names, latency or LatencyOptions(), dev, kwargs, size, options, on_images
        )
    except _OOM_ERRORS as exc:
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        raise EvaluationError(f"out of memory while evaluating ({type(exc).__name__}: {exc})".strip()) from exc


def _generate_counting_flops(pipe: Any, batch: list[Sample], kwargs: dict[str, Any]) -> tuple[torch.Tensor, int]:
    from difftune.accel.flops import count_flops

    out: list[torch.Tensor] = []
    flops = count_flops(lambda: out.append(generate(pipe, batch, kwargs)))
    return out[0], flops


def _evaluate(
    pipe: Any,
    samples: list[Sample],
    reference: Reference,
    names: list[str],
    latency: LatencyOptions,
    device: torch.device,
    kwargs: dict[str, Any],
    batch_size: int,
    options: Mapping[str, Any] | None,
    on_images: Callable[[torch.Tensor], None] | None = None,
) -> dict[str, float | None]:
    from difftune.models import adapter_for

    context = MetricContext(family=reference.family, device=device, options=dict(options or {}))
    bound: dict[str, BoundMetric] = {n: build_metric(n, context) for n in names if n not in _COST_METRICS}
    need_reference = any(b.needs_reference for b in bound.values())
    batches = [samples[i : i + batch_size] for i in range(0, len(samples), batch_size)]
    denoiser = adapter_for(pipe).denoiser(pipe)
    results: dict[str, float | None] = {}
    flops: int | None = None

    if device.type == "cuda" and "peak_memory_mb" in names:
        # The trial's own calls give its peak: no extra pipeline run just to read the memory.
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    with DenoiserCalls(denoiser) as counter:
        for index, batch in enumerate(batches):
            if index == 0 and "flops_ratio" in names:
                # Count the first batch while computing it: no extra pipeline run for the FLOPs.
                images, flops = _generate_counting_flops(pipe, batch, kwargs)
            else:
                images = generate(pipe, batch, kwargs)
            _check_images(images, "the pipeline")
            if index == 0 and on_images is not None:
                on_images(images)
            ref_images = reference.images(batch).to(images.device) if need_reference else None
            item = EvalBatch(images, ref_images, [s.condition for s in batch])
            for metric in bound.values():
                metric.update(item)
    if device.type == "cuda" and "peak_memory_mb" in names:
        torch.cuda.synchronize(device)
        results["peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    for name, metric in bound.items():
        results[name] = _check_value(name, metric.compute())
    if "nfe" in names:
        results["nfe"] = counter.calls / len(batches)
    if "weight_memory_mb" in names:
        from difftune.accel.quant import served_weight_memory

        results["weight_memory_mb"] = served_weight_memory(denoiser).quantized_bytes / 2**20
    if flops is not None:
        ref_flops = reference.flops(batches[0])
        if ref_flops <= 0:
            raise EvaluationError("flops_ratio: the reference setting counted no FLOPs")
        results["flops_ratio"] = _check_value("flops_ratio", flops / ref_flops)

    timed = samples[: latency.batch_size or batch_size]
    ab: ABResult | None = None
    if {"latency_ms", "speedup", "speedup_spread"} & set(names) and latency.reuse_reference:
        ref_latency = reference.latency(timed, warmup=latency.warmup, repeats=latency.repeats, device=device)
        own = measure(
            lambda: generate(pipe, timed, kwargs), warmup=latency.warmup, repeats=latency.repeats, device=device
        )
        ab = ABResult(ref_latency, own)
    elif {"latency_ms", "speedup", "speedup_spread"} & set(names):
        ab = measure_ab(
            reference.runner(timed),
            lambda: generate(pipe, timed, kwargs),
            warmup=latency.warmup,
            repeats=latency.repeats,
            device=device,
        )
    if ab is not None and "latency_ms" in names:
        results["latency_ms"] = _check_value("latency_ms", ab.b.statistic(latency.statistic))
    if ab is not None and "speedup" in names:
        results["speedup"] = _check_value("speedup", ab.speedup_by(latency.statistic))
    if ab is not None and "speedup_spread" in names:
        results["speedup_spread"] = _check_value("speedup_spread", ab.speedup_spread(latency.statistic))
    if "peak_memory_mb" in names and device.type != "cuda":
        results["peak_memory_mb"] = None  # the CPU has no per-call peak to read
    return {name: results[name] for name in names}
