"""Feature trajectories: how much each cached component's output changes across the sampling steps.

BAC (block-wise adaptive caching) decides when each component recomputes from a T×T matrix of how
similar its outputs at two steps are. :func:`component_similarity` records those outputs on the
plain pipeline — forward hooks on every component module of :attr:`~difftune.models.BlockInfo.components`,
so the recorded value is the component module's own output, exactly what
:func:`~difftune.accel.apply_cache_schedule` would reuse — and returns one matrix per
(block, component slot)::

    >>> pipe = difftune.load_pipeline("embedded")
    >>> samples = CalibrationSet.for_pipeline(pipe, seeds=1)[:4]
    >>> s = component_similarity(pipe, samples, {}, 20, "cosine")
    >>> s.shape                                   # blocks × components × steps × steps
    (6, 2, 20, 20)

Similarity conventions (higher is always more similar, so one maximising DP serves every metric):

- ``"cosine"``: cosine similarity of the two outputs, in [−1, 1]; the diagonal is 1;
- ``"l1"``: minus the mean absolute difference per element, ``−mean|a − b|``; the diagonal is 0;
- ``"mse"``: minus the mean squared difference per element, ``−mean (a − b)²``; the diagonal is 0.

Maximising a sum of ``−distance`` is minimising the sum of distances, which is what BAC's reference
code does for its distance metrics (ky-ji/HAS ``BACInfer/analysis/optimal_cache_scheduler.py``).

Each metric is computed per batch row and averaged over all rows: every sample, and both halves of
a pipeline that batches classifier-free guidance (conditional and unconditional rows are averaged
alike, as difftune's cache reuses both together); a pipeline that runs the two passes as two denoiser
calls per step contributes the rows of both calls. A component whose output has more than
``max_features`` elements per row is compared on a fixed random subset of that many elements (the
same subset at every step), which bounds the memory of a large model's recording.

The matrices are cached on disk beside the reference images, under
``default_cache_dir().parent / "trajectories"``: one safetensors file per (model fingerprint, call
setting digest, samples, metric). One recording yields all three metrics, so all three files are
written at once; a later call for any of them loads its file without running the pipeline.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from difftune.errors import EvaluationError

from .calibration import Sample, check_call_kwargs, generate
from .reference import ReferenceSetting, default_cache_dir

__all__ = [
    "SIMILARITY_METRICS",
    "TRAJECTORY_FORMAT",
    "component_similarity",
    "default_trajectory_dir",
    "pairwise_similarity",
]

#: The metrics :func:`component_similarity` computes; all are "higher = more similar".
SIMILARITY_METRICS: tuple[str, ...] = ("cosine", "l1", "mse")
#: The ``format`` metadata of a cached similarity file; a different value is refused.
TRAJECTORY_FORMAT = "difftune-trajectory/1"
_EPS = 1e-12


def default_trajectory_dir() -> Path:
    """Where similarity matrices are cached: the ``trajectories`` folder beside :func:`default_cache_dir`."""
    return default_cache_dir().parent / "trajectories"


def _check_metric(metric: str) -> str:
    if metric not in SIMILARITY_METRICS:
        raise EvaluationError(f"metric={metric!r}: expected one of {', '.join(SIMILARITY_METRICS)}")
    return metric


# --------------------------------------------------------------------------------------------
# The math: T × T similarities of one component's recorded outputs
# --------------------------------------------------------------------------------------------


def pairwise_similarity(features: torch.Tensor) -> dict[str, np.ndarray]:
    """Every metric's T×T similarity of ``features`` (steps × rows × elements), averaged over rows.

    >>> x = torch.randn(3, 2, 8)
    >>> s = pairwise_similarity(x)
    >>> sorted(s), s["cosine"].shape
    (['cosine', 'l1', 'mse'], (3, 3))
    """
    sums = _pairwise_sums(features)
    rows = features.shape[1]
    return {name: value / rows for name, value in sums.items()}


def _pairwise_sums(features: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-row similarities summed over the rows (the caller divides by the total row count)."""
    if features.dim() != 3 or features.shape[0] == 0 or features.shape[1] == 0:
        raise EvaluationError(f"features: expected steps × rows × elements, got shape {tuple(features.shape)}")
    x = features.to(torch.float64)
    steps = x.shape[0]
    unit = x / x.norm(dim=-1, keepdim=True).clamp_min(_EPS)
    cosine = torch.einsum("ird,jrd->ij", unit, unit)
    cosine = (cosine + cosine.T) / 2  # the two triangles are summed in different orders
    l1 = torch.empty(steps, steps, dtype=torch.float64)
    mse = torch.empty(steps, steps, dtype=torch.float64)
    for i in range(steps):
        diff = x[i : i + 1] - x  # steps × rows × elements
        l1[i] = diff.abs().mean(dim=-1).sum(dim=-1)
        mse[i] = diff.square().mean(dim=-1).sum(dim=-1)
    return {"cosine": cosine.numpy(), "l1": 0.0 - l1.numpy(), "mse": 0.0 - mse.numpy()}


# --------------------------------------------------------------------------------------------
# Recording
# --------------------------------------------------------------------------------------------


def _leaves(output: Any) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in _leaves(item)]
    if isinstance(output, Mapping):
        return [t for item in output.values() for t in _leaves(item)]
    sample = getattr(output, "sample", None)  # diffusers output dataclasses
    return [sample] if isinstance(sample, torch.Tensor) else []


class _Recorder:
    """Forward hooks on every component module that keep, per step, each call's output rows."""

    def __init__(self, denoiser: torch.nn.Module, scheduler: Any, info: Any, max_features: int) -> None:
        from difftune.accel._hooks import CompositeHandle, Handle, StepTracker

        # The cache's own step tracker: the recorder's step and call indices are those a mask is indexed by.
        self.tracker = StepTracker(denoiser, scheduler)
        self.handle = CompositeHandle([Handle(self.tracker.remove)])
        self.max_features = max_features
        self.subsets: dict[int, torch.Tensor] = {}
        #: (block, slot) → step → (call, part) → rows × elements (float32, CPU)
        self.store: dict[tuple[int, int], dict[int, dict[tuple[int, int], torch.Tensor]]] = {}
        self.parts: dict[tuple[int, int], int] = {}
        for b, block in enumerate(info.block_info):
            for k, paths in enumerate(block.components):
                if not paths:
                    continue  # an inert slot: no module, nothing to record
                self.store[(b, k)] = {}
                self.parts[(b, k)] = len(paths)
                for part, path in enumerate(paths):
                    module = denoiser.get_submodule(path)
                    hook = module.register_forward_hook(self._hook((b, k), part, path))
                    self.handle.add(Handle(hook.remove))

    def _subset(self, size: int, device: torch.device) -> torch.Tensor:
        if size not in self.subsets:
            generator = torch.Generator().manual_seed(0)
            self.subsets[size] = torch.randperm(size, generator=generator)[: self.max_features].sort().values
        return self.subsets[size].to(device)

    def _hook(self, unit: tuple[int, int], part: int, path: str) -> Any:
        def record(module: torch.nn.Module, args: Any, output: Any) -> None:
            leaves = _leaves(output)
            if not leaves:
                raise EvaluationError(f"component {path} returned {type(output).__name__}, which holds no tensor")
            batch = leaves[0].shape[0] if leaves[0].dim() else 1
            if any(t.dim() == 0 or t.shape[0] != batch for t in leaves):
                rows = torch.cat([t.detach().reshape(1, -1).float() for t in leaves], dim=1)
            else:
                rows = torch.cat([t.detach().reshape(batch, -1).float() for t in leaves], dim=1)
            if rows.shape[1] > self.max_features:
                rows = rows.index_select(1, self._subset(rows.shape[1], rows.device))
            step = self.tracker.step
            self.store[unit].setdefault(step, {})[(self.tracker.call, part)] = rows.cpu()

        return record

    def features(self, unit: tuple[int, int], steps: int, where: str) -> torch.Tensor:
        """steps × rows × elements of one unit; every step and call must hold every part."""
        recorded = self.store[unit]
        if sorted(recorded) != list(range(steps)):
            raise EvaluationError(
                f"{where}: recorded steps {sorted(recorded)} but the call runs {steps}; is a technique already "
                "applied to the pipeline (record on the plain pipeline), or does it run another number of steps?"
            )
        per_step = []
        for step in range(steps):
            calls = sorted({call for call, _ in recorded[step]})
            try:
                blocks = [
                    torch.cat([recorded[step][(call, part)] for part in range(self.parts[unit])], dim=1)
                    for call in calls
                ]
            except KeyError as exc:
                raise EvaluationError(f"{where}: a module of the slot did not run at step {step}") from exc
            per_step.append(torch.cat(blocks, dim=0))
        shapes = {tuple(x.shape) for x in per_step}
        if len(shapes) != 1:
            raise EvaluationError(f"{where}: the output shape changes between steps ({sorted(shapes)})")
        return torch.stack(per_step)

    def remove(self) -> None:
        self.handle.remove()


def _record(
    pipe: Any, info: Any, samples: Sequence[Sample], kwargs: dict[str, Any], batch_size: int, max_features: int
) -> dict[str, np.ndarray]:
    """Run the plain pipeline on ``samples`` in batches; every metric's blocks × components × T × T."""
    from difftune.models import adapter_for

    steps = int(kwargs["num_inference_steps"])
    shape = (len(info.blocks), len(info.components), steps, steps)
    sums = {m: np.zeros(shape) for m in SIMILARITY_METRICS}
    inert = np.ones((len(info.blocks), len(info.components)), dtype=bool)
    rows = 0
    denoiser = adapter_for(pipe).denoiser(pipe)
    for start in range(0, len(samples), batch_size):
        batch = list(samples[start : start + batch_size])
        recorder = _Recorder(denoiser, getattr(pipe, "scheduler", None), info, max_features)
        try:
            generate(pipe, batch, kwargs)
        finally:
            recorder.remove()
        batch_rows = None
        for (b, k), _ in recorder.parts.items():
            where = f"{info.block_info[b].name} slot {info.components[k]!r}"
            features = recorder.features((b, k), steps, where)
            if batch_rows is None:
                batch_rows = features.shape[1]
            elif features.shape[1] != batch_rows:
                raise EvaluationError(f"{where}: {features.shape[1]} rows per step, other components {batch_rows}")
            for metric, value in _pairwise_sums(features).items():
                sums[metric][b, k] += value
            inert[b, k] = False
        rows += batch_rows or 0
    if rows == 0:
        raise EvaluationError(f"the {info.family} model reports no component modules to record")
    out = {m: value / rows for m, value in sums.items()}
    # Inert slots (a block without that component) read as "never changes": their mask bit does nothing.
    out["cosine"][inert] = 1.0
    return out


# --------------------------------------------------------------------------------------------
# The cache on disk and the public entry point
# --------------------------------------------------------------------------------------------


def _samples_digest(samples: Sequence[Sample], max_features: int) -> str:
    blob = json.dumps({"samples": [s.key for s in samples], "max_features": max_features}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


class _SimilarityCache:
    """``<root>/<fingerprint>/<setting digest>/<samples digest>-<metric>.safetensors``, one tensor each."""

    def __init__(self, root: Path, fingerprint: str, setting: str, samples: str, info: Any, steps: int) -> None:
        safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in fingerprint)
        self.folder = root / safe / setting
        self.samples = samples
        self.shape = (len(info.blocks), len(info.components), steps, steps)
        self.expected = {
            "format": TRAJECTORY_FORMAT,
            "fingerprint": fingerprint,
            "setting": setting,
            "samples": samples,
            "blocks": json.dumps(list(info.blocks)),
            "components": json.dumps(list(info.components)),
        }

    def path(self, metric: str) -> Path:
        return self.folder / f"{self.samples}-{metric}.safetensors"

    def load(self, metric: str) -> np.ndarray | None:
        path = self.path(metric)
        if not path.is_file():
            return None
        from safetensors import SafetensorError
        from safetensors.torch import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                value = f.get_tensor("similarity") if "similarity" in f.keys() else None
        except (SafetensorError, OSError) as exc:
            raise EvaluationError(f"cached similarities {path} are unreadable ({exc}); delete the file") from exc
        wrong = sorted(k for k, v in {**self.expected, "metric": metric}.items() if meta.get(k) != v)
        if wrong or value is None or tuple(value.shape) != self.shape:
            found = "no 'similarity' tensor" if value is None else f"shape {tuple(value.shape)}"
            raise EvaluationError(
                f"cached similarities {path} do not match the request (metadata {wrong}, {found}, expected shape "
                f"{self.shape}); delete the file to record again"
            )
        return value.to(torch.float64).numpy()

    def save(self, metric: str, value: np.ndarray) -> Path:
        from safetensors.torch import save_file

        from difftune._atomic import atomic_write

        tensor = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float64))
        metadata = {**self.expected, "metric": metric}
        return atomic_write(
            self.path(metric), lambda tmp: save_file({"similarity": tensor}, str(tmp), metadata=metadata)
        )


def component_similarity(
    pipe: Any,
    samples: Sequence[Sample],
    call_kwargs: Mapping[str, Any] | None,
    num_inference_steps: int,
    metric: str = "cosine",
    *,
    cache_dir: str | Path | None = None,
    batch_size: int = 8,
    max_features: int = 65_536,
) -> np.ndarray:
    """T×T step similarities of every (block, component slot)'s output on the plain pipeline.

    Args:
        pipe: the plain pipeline (no technique applied: the recording must see every component run).
        samples: the samples whose trajectories are recorded (a study passes its first calibration samples).
        call_kwargs: the call's own kwargs (``guidance_scale``, ``height``, …), without ``num_inference_steps``
            (or equal to it).
        num_inference_steps: T, the steps of the schedule the matrices serve.
        metric: ``"cosine"``, ``"l1"`` or ``"mse"``; see the module docstring (higher = more similar).
        cache_dir: root of the on-disk cache (default :func:`default_trajectory_dir`).
        batch_size: samples per pipeline call while recording.
        max_features: elements per row compared at most (a fixed random subset beyond that).

    Returns:
        ``blocks × components × T × T`` float64, in :func:`difftune.describe`'s block and slot order.
        Slots a block lacks read as constant (cosine 1, distances 0).

    Raises:
        EvaluationError: an unknown metric, no samples, a cached file that does not match, or a
            pipeline that did not run every component at every step.
    """
    from difftune.models import describe

    _check_metric(metric)
    steps = num_inference_steps
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise EvaluationError(f"num_inference_steps: expected an integer >= 1, got {steps!r}")
    if batch_size < 1 or max_features < 1:
        raise EvaluationError(f"batch_size and max_features must be >= 1, got {batch_size}, {max_features}")
    samples = list(samples)
    if not samples:
        raise EvaluationError("component_similarity: no samples given")
    kwargs = check_call_kwargs(call_kwargs or {})
    if kwargs.get("num_inference_steps", steps) != steps:
        raise EvaluationError(
            f"call_kwargs: num_inference_steps={kwargs['num_inference_steps']!r} disagrees with {steps}"
        )
    kwargs["num_inference_steps"] = steps
    info = describe(pipe)
    setting = ReferenceSetting.from_pipeline(pipe, **kwargs).digest()
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_trajectory_dir()
    cache = _SimilarityCache(root, info.fingerprint, setting, _samples_digest(samples, max_features), info, steps)
    found = cache.load(metric)
    if found is not None:
        return found
    recorded = _record(pipe, info, samples, kwargs, batch_size, max_features)
    for name, value in recorded.items():
        cache.save(name, value)
    return recorded[metric]
