"""Reference outputs: what every trial is compared with, computed once and cached on disk.

The reference is the study's baseline *setting* (e.g. the plain pipeline at 50 steps): its images
are the targets of PSNR/SSIM/MSE/LPIPS, its latency the denominator of ``speedup`` and its FLOPs that
of ``flops_ratio``. Images are cached per (model fingerprint, reference-setting digest, sample) as one
safetensors file each — never pickle — under :func:`default_cache_dir`, so a study that grows from 8
to 32 samples (multi-fidelity rungs) or a nightly run the day after only computes what is missing.

Layout: ``<root>/<fingerprint>/<setting digest>/<sample key>.safetensors``, each holding one C×H×W
float32 tensor ``"image"`` and metadata naming its fingerprint, setting and sample; loading checks
all of them, and the shape and dtype.

The :class:`Reference` runs its own pipeline object: trials apply their acceleration settings to
the pipeline being evaluated, while the reference must keep running the plain setting (for the A/B
latency measurement in the same process). :meth:`Reference.from_pipeline` therefore copies the
pipeline by default — but only its module *objects*: every parameter and buffer of the copy shares
its storage with the original (:func:`shared_weights_copy`), so a reference for SD-XL or Flux on a
GPU costs no second copy of the weights. Techniques replace forwards, schedulers and whole
parameters (quantization assigns ``weight.data``), never write into a weight tensor in place, so
the reference stays plain.
"""

from __future__ import annotations

import copy as _copy
import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from difftune.errors import EvaluationError

from .calibration import Sample, check_call_kwargs, generate

__all__ = ["FORMAT", "Reference", "ReferenceCache", "ReferenceSetting", "default_cache_dir", "shared_weights_copy"]

#: The ``format`` metadata of a cached reference file; a different value is refused.
FORMAT = "difftune-reference/1"


def default_cache_dir() -> Path:
    """``$DIFFTUNE_CACHE/references`` when ``DIFFTUNE_CACHE`` is set, else ``~/.cache/difftune/references``."""
    root = os.environ.get("DIFFTUNE_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "difftune"
    return base / "references"


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        return value.tolist()
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=repr)
    return repr(value)


@dataclass(frozen=True)
class ReferenceSetting:
    """What produces the reference images: call kwargs, the scheduler, and any acceleration applied.

    Attributes:
        call_kwargs: the pipeline call's own kwargs (``num_inference_steps``, ``guidance_scale``, …);
            prompts, labels and generators come from the samples.
        scheduler: the scheduler's class name.
        scheduler_config: its config (private ``_…`` keys are ignored).
        accel: profile-section dicts of techniques applied to the reference pipeline (usually empty).
        device: the device type the images are drawn on (``"cpu"``, ``"cuda"``, …): kernels differ by
            device, so images drawn on a GPU are cached apart from the CPU's.
    """

    call_kwargs: Mapping[str, Any] = field(default_factory=dict)
    scheduler: str = ""
    scheduler_config: Mapping[str, Any] = field(default_factory=dict)
    accel: Mapping[str, Any] = field(default_factory=dict)
    device: str = "cpu"

    def __post_init__(self) -> None:
        object.__setattr__(self, "call_kwargs", check_call_kwargs(self.call_kwargs))
        object.__setattr__(self, "scheduler_config", dict(self.scheduler_config))
        object.__setattr__(self, "accel", dict(self.accel))

    @classmethod
    def from_pipeline(
        cls, pipe: Any, *, accel: Mapping[str, Any] | None = None, **call_kwargs: Any
    ) -> ReferenceSetting:
        """The setting of ``pipe`` as it is (its scheduler) called with ``call_kwargs``."""
        scheduler = getattr(pipe, "scheduler", None)
        config = dict(getattr(scheduler, "config", {}) or {})
        device = getattr(pipe, "device", None)
        return cls(
            call_kwargs=call_kwargs,
            scheduler=type(scheduler).__name__ if scheduler is not None else "",
            scheduler_config={k: v for k, v in config.items() if not str(k).startswith("_")},
            accel=dict(accel or {}),
            device=str(getattr(device, "type", device or "cpu")),
        )

    def to_dict(self) -> dict[str, Any]:
        out = {
            "call_kwargs": dict(self.call_kwargs),
            "scheduler": self.scheduler,
            "scheduler_config": {k: v for k, v in self.scheduler_config.items() if not str(k).startswith("_")},
            "accel": dict(self.accel),
        }
        if self.device != "cpu":  # CPU settings keep the digest (and the cached images) they always had
            out["device"] = self.device
        return out

    def digest(self) -> str:
        """A stable hash of the setting: the cache key of its images."""
        blob = json.dumps(self.to_dict(), sort_keys=True, default=_jsonable)
        return hashlib.sha256(blob.encode()).hexdigest()[:20]


class ReferenceCache:
    """Reference images on disk, one safetensors file per (fingerprint, setting digest, sample)."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root).expanduser() if root is not None else default_cache_dir()

    def path(self, fingerprint: str, setting: str, sample: Sample) -> Path:
        safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in fingerprint)
        return self.root / safe / setting / f"{sample.key}.safetensors"

    def _metadata(self, fingerprint: str, setting: str, sample: Sample) -> dict[str, str]:
        return {
            "format": FORMAT,
            "fingerprint": fingerprint,
            "setting": setting,
            "condition": json.dumps(sample.condition, ensure_ascii=False),
            "seed": str(sample.seed),
        }

    def load(
        self, fingerprint: str, setting: str, sample: Sample, shape: tuple[int, ...] | None = None
    ) -> torch.Tensor | None:
        """The cached image of ``sample`` (C×H×W float32), or None when it is not cached.

        Raises:
            EvaluationError: the file is unreadable, describes another sample/setting/model, or holds a
                tensor of the wrong dtype or shape (``shape`` when given); delete it to recompute.
        """
        path = self.path(fingerprint, setting, sample)
        if not path.is_file():
            return None
        from safetensors import SafetensorError
        from safetensors.torch import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                keys = list(f.keys())
                image = f.get_tensor("image") if "image" in keys else None
        except (SafetensorError, OSError) as exc:
            raise EvaluationError(f"cached reference {path} is unreadable ({exc}); delete it to recompute") from exc
        expected = self._metadata(fingerprint, setting, sample)
        wrong = sorted(k for k, v in expected.items() if meta.get(k) != v)
        problem = None
        if wrong:
            problem = f"its metadata {wrong} do not match the request"
        elif image is None:
            problem = f"it holds {keys} instead of one 'image' tensor"
        elif image.dtype != torch.float32 or image.dim() != 3:
            problem = f"it holds a {image.dtype} tensor of shape {tuple(image.shape)}, expected float32 C×H×W"
        elif shape is not None and tuple(image.shape) != tuple(shape):
            problem = f"its image is {tuple(image.shape)}, expected {tuple(shape)}"
        if problem is not None or image is None:
            raise EvaluationError(f"cached reference {path} is not usable: {problem}; delete it to recompute")
        return image

    def save(self, fingerprint: str, setting: str, sample: Sample, image: torch.Tensor) -> Path:
        """Write ``image`` (C×H×W) atomically: a crash never leaves a half-written file behind."""
        from safetensors.torch import save_file

        if image.dim() != 3:
            raise EvaluationError(f"a reference image must be C×H×W, got shape {tuple(image.shape)}")
        path = self.path(fingerprint, setting, sample)
        from difftune._atomic import atomic_write

        tensor = image.detach().to("cpu", torch.float32).contiguous()
        metadata = self._metadata(fingerprint, setting, sample)
        return atomic_write(path, lambda tmp: save_file({"image": tensor}, str(tmp), metadata=metadata))


def shared_weights_copy(obj: Any) -> Any:
    """A deep copy of ``obj`` (a pipeline or module) whose parameters and buffers share storage with the
    originals: new module, scheduler and parameter *objects*, no second copy of the weights.

    A technique that swaps a parameter's data (``weight.data = fake``), replaces a module's forward or
    the scheduler on one side leaves the other side untouched; writing into a weight in place
    (``weight.copy_(…)``) would show on both.
    """
    import torch

    memo: dict[int, Any] = {}
    modules = (
        [v for v in vars(obj).values() if isinstance(v, torch.nn.Module)]
        if not isinstance(obj, torch.nn.Module)
        else [obj]
    )
    for module in modules:
        for param in module.parameters():
            if id(param) not in memo:
                memo[id(param)] = torch.nn.Parameter(param.data, requires_grad=param.requires_grad)
        for buffer in module.buffers():
            memo.setdefault(id(buffer), buffer)
    return _copy.deepcopy(obj, memo)


class Reference:
    """The study's reference setting on its own pipeline: cached images, FLOPs, and a runner for latency.

    Args:
        pipe: the pipeline that runs the reference setting; keep it free of trial settings.
        setting: what produces the reference images (see :meth:`ReferenceSetting.from_pipeline`).
        cache: where the images are cached (default :class:`ReferenceCache` at :func:`default_cache_dir`).
        batch_size: samples per pipeline call when images are computed.
        image_steps: draw the reference *images* with this many steps instead of the setting's (e.g. 200: a
            near-exact ODE solution to measure fidelity against), while FLOPs and latency stay those of the
            setting itself (the plain pipeline as served, what speedups are relative to). None: the setting's.

    Example::

        ref = Reference.from_pipeline(load_pipeline("embedded"), num_inference_steps=50)
        images = ref.images(CalibrationSet(labels=range(10), seeds=1))  # computed once, then cached
    """

    def __init__(
        self,
        pipe: Any,
        setting: ReferenceSetting,
        *,
        cache: ReferenceCache | None = None,
        batch_size: int = 16,
        image_steps: int | None = None,
    ) -> None:
        from difftune.models import describe

        if batch_size < 1:
            raise EvaluationError(f"batch_size must be >= 1, got {batch_size}")
        if image_steps is not None and (isinstance(image_steps, bool) or not isinstance(image_steps, int)):
            raise EvaluationError(f"image_steps must be an integer >= 1, got {image_steps!r}")
        if image_steps is not None and image_steps < 1:
            raise EvaluationError(f"image_steps must be an integer >= 1, got {image_steps!r}")
        info = describe(pipe)
        self.pipe = pipe
        self.setting = setting
        self.cache = cache if cache is not None else ReferenceCache()
        self.batch_size = batch_size
        self.family = info.family
        self.fingerprint = info.fingerprint
        #: What draws the reference images: the setting itself, or the setting at ``image_steps`` steps.
        self.image_setting = (
            setting
            if image_steps is None
            else dataclasses.replace(setting, call_kwargs={**setting.call_kwargs, "num_inference_steps": image_steps})
        )
        self.digest = self.image_setting.digest()
        #: Pipeline calls this reference has made (images computed, FLOPs counted, latency runs).
        self.pipeline_calls = 0
        self._flops: dict[tuple[str, ...], int] = {}
        self._latency: dict[tuple[Any, ...], list[float]] = {}

    @classmethod
    def from_pipeline(
        cls,
        pipe: Any,
        *,
        copy: bool = True,
        accel: Mapping[str, Any] | None = None,
        cache: ReferenceCache | None = None,
        batch_size: int = 16,
        image_steps: int | None = None,
        **call_kwargs: Any,
    ) -> Reference:
        """The reference setting ``pipe`` (as it is now) called with ``call_kwargs``.

        With ``copy`` (the default) the reference runs on a copy whose modules are its own but whose
        weights are shared (:func:`shared_weights_copy`), so that trial settings applied to ``pipe``
        afterwards never touch it and no second copy of the weights is made. ``accel`` records
        acceleration already applied to ``pipe`` (profile-section dicts) in the setting's cache key.
        """
        ref_pipe = shared_weights_copy(pipe) if copy else pipe
        setting = ReferenceSetting.from_pipeline(ref_pipe, accel=accel, **call_kwargs)
        return cls(ref_pipe, setting, cache=cache, batch_size=batch_size, image_steps=image_steps)

    def run(self, samples: Sequence[Sample]) -> torch.Tensor:
        """Run the reference setting on ``samples`` now, in batches (no cache): N×C×H×W on the CPU."""
        out = []
        for start in range(0, len(samples), self.batch_size):
            self.pipeline_calls += 1
            batch = samples[start : start + self.batch_size]
            out.append(generate(self.pipe, batch, self.image_setting.call_kwargs).cpu())
        return torch.cat(out)

    def images(self, samples: Sequence[Sample]) -> torch.Tensor:
        """The reference images of ``samples`` (N×C×H×W float32, CPU), computing only those not cached yet."""
        found: dict[Sample, torch.Tensor] = {}
        shape: tuple[int, ...] | None = None
        for sample in dict.fromkeys(samples):
            image = self.cache.load(self.fingerprint, self.digest, sample, shape)
            if image is not None:
                found[sample] = image
                shape = tuple(image.shape)
        missing = [s for s in dict.fromkeys(samples) if s not in found]
        if missing:
            computed = self.run(missing)
            if not torch.isfinite(computed).all():
                raise EvaluationError("the reference setting produced NaN images; it cannot serve as a reference")
            if shape is not None and tuple(computed.shape[1:]) != shape:
                raise EvaluationError(
                    f"the reference pipeline now draws {tuple(computed.shape[1:])} images but the cache holds {shape}"
                )
            for sample, image in zip(missing, computed, strict=True):
                self.cache.save(self.fingerprint, self.digest, sample, image)
                found[sample] = image
        return torch.stack([found[s] for s in samples])

    def flops(self, samples: Sequence[Sample]) -> int:
        """FLOPs of one reference pipeline call on ``samples`` (counted once per batch, kept in memory)."""
        from difftune.accel.flops import count_flops

        key = tuple(s.key for s in samples)
        if key not in self._flops:
            self.pipeline_calls += 1
            self._flops[key] = count_flops(lambda: generate(self.pipe, samples, self.setting.call_kwargs))
        return self._flops[key]

    def latency(self, samples: Sequence[Sample], *, warmup: int, repeats: int, device: Any = "cpu") -> Any:
        """:class:`~difftune.evaluators.latency.Latency` of the reference on ``samples``, over every timing
        of this batch so far: the first call warms up and times ``repeats`` runs, each later call adds
        one run. A study calls it once per trial, so the reference is re-timed alongside the trials
        (its fastest time tracks the machine) at the cost of one reference run per trial instead of
        ``repeats`` alternating ones."""
        from .latency import Latency, _timer

        dev = torch.device(device)
        key = (tuple(s.key for s in samples), str(dev))
        run = self.runner(samples)
        timer = _timer(dev)
        times = self._latency.get(key)
        if times is None:
            for _ in range(warmup):
                run()
            times = self._latency[key] = [timer(run) for _ in range(max(1, repeats))]
        else:
            times.append(timer(run))
        return Latency.from_samples(list(times), str(dev))

    def runner(self, samples: Sequence[Sample]) -> Callable[[], Any]:
        """A zero-argument callable running the reference on ``samples`` (for latency measurements)."""
        batch = list(samples)

        def run() -> None:
            self.pipeline_calls += 1
            generate(self.pipe, batch, self.setting.call_kwargs)

        return run
