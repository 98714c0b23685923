"""A study's settings: the model, the device and dtype it runs in, the call it is tuned for, what is measured.

Everything that makes two trials comparable lives here and is stored with the study, so that
``difftune worker``, ``fronts``, ``export`` and ``nightly`` run the same call on the same kind of device
as the ``calibrate`` that created it::

    settings = StudySettings(model="stabilityai/stable-diffusion-xl-base-1.0", device="cuda", dtype="float16",
                             prompts=("a red fox in the snow",), height=768, width=768, guidance_scale=5.0)
    pipe = settings.load_pipeline()              # on the device, in the dtype, never downloading
    kwargs = settings.call_kwargs(pipe)          # guidance_scale, height, width, negative_prompt
    cal = settings.samples_for(pipe, 20)         # prompts × calibration seeds
    held = settings.samples_for(pipe, 20, split="held_out")

The device and dtype are resolved once, when the study is created (:func:`resolve_device`): the
pipeline's own device, else CUDA when the machine has it, else the CPU. A device the machine lacks
is an error, never a silent CPU run.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from difftune.errors import DifftuneError, ModelError

__all__ = [
    "DTYPES",
    "StudySettings",
    "device_type",
    "parse_call_args",
    "parse_dtype",
    "read_prompts",
    "resolve_device",
]

#: ``--dtype`` names and their spellings.
DTYPES: dict[str, tuple[str, ...]] = {
    "float32": ("float32", "fp32", "float"),
    "float16": ("float16", "fp16", "half"),
    "bfloat16": ("bfloat16", "bf16"),
}
_DEVICE_TYPES = ("cpu", "cuda", "mps")


def parse_dtype(name: str | None) -> str | None:
    """The canonical name of ``--dtype`` (``float32``, ``float16``, ``bfloat16``), None for None."""
    if name is None:
        return None
    text = str(name).strip().lower().removeprefix("torch.")
    for canonical, spellings in DTYPES.items():
        if text in spellings:
            return canonical
    raise ModelError(f"--dtype {name!r}: expected one of {', '.join(DTYPES)}")


def torch_dtype(name: str | None) -> Any:
    """The torch dtype of a canonical ``--dtype`` name (None for None)."""
    import torch

    canonical = parse_dtype(name)
    return None if canonical is None else getattr(torch, canonical)


def device_type(device: str | None) -> str:
    """``"cuda"`` for ``"cuda:1"``, ``"cpu"`` for None."""
    return (device or "cpu").split(":", 1)[0]


def _pipeline_device(pipe: Any) -> str | None:
    device = getattr(pipe, "device", None)
    return None if device is None else str(device)


def resolve_device(requested: str | None, pipeline: Any = None) -> str:
    """The device a study runs on.

    ``requested`` (``cpu``, ``cuda``, ``cuda:N``, ``mps``) is checked against this machine; None means
    the pipeline's own device when it is not the CPU, else CUDA when present, else the CPU.

    Raises:
        ModelError: a malformed device, or one this machine does not have (never a silent CPU run).
    """
    import torch

    if requested is None:
        own = _pipeline_device(pipeline) if pipeline is not None else None
        if own is not None and device_type(own) != "cpu":
            return own
        return "cuda" if torch.cuda.is_available() else "cpu"
    text = str(requested).strip().lower()
    kind, _, index = text.partition(":")
    if kind not in _DEVICE_TYPES or (index and (not index.isdigit() or kind != "cuda")):
        raise ModelError(f"--device {requested!r}: expected cpu, cuda, cuda:N or mps")
    if kind == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            raise ModelError(
                f"--device {requested}: this machine has no usable CUDA device (torch {torch.__version__} is "
                f"{build}); run on a GPU machine, or pass --device cpu to measure CPU latency"
            )
        count = torch.cuda.device_count()
        if index and int(index) >= count:
            raise ModelError(f"--device {requested}: this machine has {count} CUDA device(s), cuda:0…cuda:{count - 1}")
    if kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ModelError(f"--device {requested}: Apple's MPS backend is not available on this machine")
    return text


def device_name(device: str) -> str:
    """A human name of ``device``: the GPU's model for CUDA, else the device type."""
    import torch

    if device_type(device) == "cuda" and torch.cuda.is_available():
        return str(torch.cuda.get_device_name(torch.device(device)))
    return device_type(device)


def read_prompts(path: str | Path) -> tuple[str, ...]:
    """Prompts from a file: a JSON list of strings, or one prompt per line (``#`` starts a comment line).

    Raises:
        DifftuneError: the file is missing, unreadable, empty or a JSON value that is not a list of
            non-empty strings.
    """
    from difftune.evaluators import read_prompt_file

    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return tuple(read_prompt_file(p))  # its errors name the problem
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DifftuneError(f"prompt file {p}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc
        if not isinstance(data, list) or not all(isinstance(d, str) and d.strip() for d in data) or not data:
            raise DifftuneError(f"prompt file {p}: a JSON prompt file must be a non-empty list of non-empty strings")
        return tuple(d.strip() for d in data)
    return tuple(read_prompt_file(p))


def _positive_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise DifftuneError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return value


@dataclass(frozen=True)
class StudySettings:
    """What a study's trials are measured on; stored with the study (:meth:`to_dict`).

    Attributes:
        model: ``"embedded"``, a pipeline directory, a single-file checkpoint or a cached hub id.
        revision: the hub revision (branch, tag or commit) of a hub id.
        pipeline_class, config: for a single-file checkpoint, the diffusers pipeline class it holds and a
            local directory (or cached hub id) with the pipeline's configs (see :func:`difftune.load_pipeline`).
        device: where the pipeline runs (resolved: ``cpu``, ``cuda``, ``cuda:N``, ``mps``).
        dtype: ``float32``, ``float16`` or ``bfloat16``; None keeps the weights' own dtype.
        prompts: the calibration prompts (class names for class-conditional models); None: the
            family's built-in set.
        negative_prompt: passed to every call of pipelines that take one.
        height, width: the images' size; None: the pipeline's default.
        guidance_scale: the call's classifier-free guidance; None: the pipeline's default.
        call_args: more keyword arguments of the pipeline call (``max_sequence_length``,
            ``use_resolution_binning``, ``true_cfg_scale``, …), JSON values.
        num_inference_steps: steps of the reference setting (the plain pipeline), and of cache masks.
        samples: calibration samples per trial (prompts × seeds, seed-major).
        batch_size: images per pipeline call (and in the timed call); None: all samples in one call.
            Large models at high resolution need a few per call to fit in GPU memory.
        metrics: what every trial measures (the objectives, the constraints' metrics and extras).
        constraints: ``"lpips<=0.1"``-style bounds; a trial that misses one is infeasible and kept off
            the front.
        nfe_range: the model evaluations the solver and joint spaces search.
        latency_repeats: timed calls per side for ``speedup``.
        population: individuals per generation of a generation-based searcher (NSGA-II); None: the
            searcher's own default. Chosen when the study is created and kept when it resumes.
        screen: multi-fidelity: every candidate is first measured on this many calibration samples
            (its quality objectives, and its speed from one timed call against the reference's), and
            only those in the top ``1/screen_eta`` by Pareto rank among the study's screened points
            are measured in full; 0 (default): every candidate is measured in full.
        screen_eta: successive halving's reduction factor: one screened candidate in ``screen_eta``
            goes on to the full evaluation.
        reference_steps: the quality reference: trials' images are compared with the plain pipeline at this
            many steps (e.g. 200, a near-exact ODE solution) instead of at :attr:`num_inference_steps`; speed
            and FLOPs stay relative to the plain pipeline at :attr:`num_inference_steps`. None: the same.
        ems: trajectories DPM-Solver-v3's empirical model statistics are computed from (on the study's
            call and conditions, seeds of their own; cached per model); 0 (default): the solver space
            does not offer the ``v3`` prediction.
    """

    model: str = "embedded"
    revision: str | None = None
    pipeline_class: str | None = None
    config: str | None = None
    device: str | None = None
    dtype: str | None = None
    prompts: tuple[str, ...] | None = None
    negative_prompt: str | None = None
    height: int | None = None
    width: int | None = None
    guidance_scale: float | None = None
    call_args: Mapping[str, Any] = field(default_factory=dict)
    num_inference_steps: int = 20
    samples: int = 20
    batch_size: int | None = None
    metrics: tuple[str, ...] = ()
    constraints: tuple[str, ...] = ()
    nfe_range: tuple[int, int] = (3, 12)
    latency_repeats: int = 3
    population: int | None = None
    screen: int = 0
    screen_eta: int = 3
    reference_steps: int | None = None
    ems: int = 0
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _positive_int("num_inference_steps", self.num_inference_steps, 1)
        _positive_int("samples", self.samples, 2)
        _positive_int("latency_repeats", self.latency_repeats, 1)
        if self.population is not None:
            _positive_int("--population", self.population, 2)
        _positive_int("--screen", self.screen, 0)
        _positive_int("--screen-eta", self.screen_eta, 2)
        _positive_int("--ems", self.ems, 0)
        if self.reference_steps is not None:
            _positive_int("--reference-steps", self.reference_steps, 1)
        if self.ems == 1:
            raise DifftuneError(
                "--ems 1: the statistics are regressions over trajectories; use 0 (off) or >= 2 (64 is good)"
            )
        if self.screen >= self.samples:
            raise DifftuneError(
                f"--screen {self.screen}: screening must use fewer samples than the full evaluation "
                f"(--samples {self.samples}); 0 turns screening off"
            )
        if self.batch_size is not None:
            _positive_int("--batch-size", self.batch_size, 1)
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None:
                _positive_int(f"--{name}", value, 8)
        if self.guidance_scale is not None and (
            isinstance(self.guidance_scale, bool) or not math.isfinite(float(self.guidance_scale))
        ):
            raise DifftuneError(f"--guidance-scale: expected a finite number, got {self.guidance_scale!r}")
        if self.guidance_scale is not None:
            object.__setattr__(self, "guidance_scale", float(self.guidance_scale))
        object.__setattr__(self, "dtype", parse_dtype(self.dtype))
        if self.prompts is not None:
            prompts = (self.prompts,) if isinstance(self.prompts, str) else tuple(self.prompts)
            if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
                raise DifftuneError("prompts: expected a non-empty list of non-empty strings")
            object.__setattr__(self, "prompts", tuple(p.strip() for p in prompts))
        lo, hi = (int(v) for v in self.nfe_range)
        if not 1 <= lo <= hi:
            raise DifftuneError(f"--nfe: expected 1 <= LOW <= HIGH, got {lo}:{hi}")
        object.__setattr__(self, "nfe_range", (lo, hi))
        object.__setattr__(self, "metrics", tuple(dict.fromkeys(self.metrics)))
        object.__setattr__(self, "constraints", tuple(self.constraints))
        object.__setattr__(self, "extra", dict(self.extra))
        from difftune.evaluators.calibration import check_call_kwargs

        args = dict(self.call_args)
        clash = sorted(set(args) & {"num_inference_steps", "guidance_scale", "height", "width", "negative_prompt"})
        if clash:
            raise DifftuneError(f"--call-arg {clash}: these have options of their own (--steps, --guidance-scale, …)")
        try:
            json.dumps(args)
        except (TypeError, ValueError) as exc:
            raise DifftuneError(f"--call-arg: values must be JSON values ({exc})") from exc
        object.__setattr__(self, "call_args", check_call_kwargs(args))

    # ---- storage --------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (the study's stored settings)."""
        out = dataclasses.asdict(self)
        extra = out.pop("extra")
        out["call_args"] = dict(self.call_args)
        out["prompts"] = None if self.prompts is None else list(self.prompts)
        out["metrics"] = list(self.metrics)
        out["constraints"] = list(self.constraints)
        out["nfe_range"] = list(self.nfe_range)
        return {**extra, **out}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StudySettings:
        """The inverse of :meth:`to_dict`; studies made before a setting existed get its default."""
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        if known.get("prompts") is not None:
            known["prompts"] = tuple(known["prompts"])
        for key in ("metrics", "constraints"):
            if key in known:
                known[key] = tuple(known[key] or ())
        if "nfe_range" in known:
            known["nfe_range"] = tuple(known["nfe_range"])
        return cls(**known, extra={k: v for k, v in data.items() if k not in names})

    #: Settings that make timings or images differ: a resumed study must keep them.
    COMPARED = (
        "model",
        "revision",
        "pipeline_class",
        "config",
        "dtype",
        "prompts",
        "negative_prompt",
        "height",
        "width",
        "guidance_scale",
        "call_args",
        "num_inference_steps",
        "samples",
        "batch_size",
        "constraints",
        "nfe_range",
        "reference_steps",
        "ems",
    )

    def differences(self, other: StudySettings) -> dict[str, tuple[Any, Any]]:
        """``{name: (self's, other's)}`` for the compared settings that differ, and a different device type."""
        out = {k: (getattr(self, k), getattr(other, k)) for k in self.COMPARED if getattr(self, k) != getattr(other, k)}
        if device_type(self.device) != device_type(other.device):
            out["device"] = (self.device, other.device)
        return out

    # ---- the pipeline and its call --------------------------------------------------------------

    def load_pipeline(self, pipeline: Any = None) -> Any:
        """The study's pipeline on :attr:`device` in :attr:`dtype` (``pipeline``, when given, is moved there)."""
        from difftune.models import load_pipeline

        dtype = torch_dtype(self.dtype)
        if pipeline is None:
            kwargs: dict[str, Any] = {"torch_dtype": dtype, "device": self.device}
            for key in ("revision", "pipeline_class", "config"):
                if getattr(self, key) is not None:
                    kwargs[key] = getattr(self, key)
            pipe = load_pipeline(self.model, **kwargs)
        else:
            pipe = pipeline
            if self.device is not None and _pipeline_device(pipe) != str(self.device):
                pipe = pipe.to(self.device)
            if dtype is not None and getattr(pipe, "dtype", dtype) != dtype:
                pipe = pipe.to(dtype=dtype)
        if hasattr(pipe, "set_progress_bar_config"):
            pipe.set_progress_bar_config(disable=True)
        return pipe

    def call_kwargs(self, pipe: Any) -> dict[str, Any]:
        """The call's own kwargs beside the steps (guidance, size, negative prompt), checked against ``pipe``.

        Raises:
            ModelError: the pipeline's ``__call__`` takes no such argument (e.g. ``--height`` on the
                embedded digits model, ``--negative-prompt`` on a class-conditional one).
        """
        wanted = {
            "guidance_scale": self.guidance_scale,
            "height": self.height,
            "width": self.width,
            "negative_prompt": self.negative_prompt,
        }
        wanted = {**{k: v for k, v in wanted.items() if v is not None}, **self.call_args}
        try:
            params = inspect.signature(pipe.__call__).parameters
        except (TypeError, ValueError):
            return wanted
        # Named parameters only: diffusers pipelines' **kwargs take deprecated arguments and drop the rest silently.
        refused = [k for k in wanted if k not in params]
        if refused:
            flags = ", ".join(f"--call-arg {k}" if k in self.call_args else "--" + k.replace("_", "-") for k in refused)
            them = "it" if len(refused) == 1 else "them"
            raise ModelError(f"{flags}: {type(pipe).__name__} takes no {', '.join(refused)}; leave {them} out")
        return wanted

    def conditions(self, pipe: Any) -> tuple[int | str, ...] | None:
        """The calibration conditions for ``pipe``: the prompts (text-to-image), the prompts' class ids
        (class-conditional models, via the pipeline's ``get_label_ids``), or None for the family's default."""
        if self.prompts is None:
            return None
        from difftune.models import describe

        if describe(pipe).conditioning != "class":
            return self.prompts
        to_ids = getattr(pipe, "get_label_ids", None)
        if to_ids is None:
            raise ModelError(f"{type(pipe).__name__} is class-conditional and cannot turn prompts into class ids")
        try:
            return tuple(int(i) for i in to_ids(list(self.prompts)))
        except (DifftuneError, KeyError, ValueError, TypeError) as exc:
            detail = str(exc.args[0] if isinstance(exc, KeyError) and exc.args else exc)
            raise ModelError(f"--prompts: {detail} (a class-conditional model takes class names as prompts)") from exc

    def samples_for(self, pipe: Any, n: int | None = None, *, split: str = "calibration") -> list[Any]:
        """The first ``n`` (default :attr:`samples`) samples of ``split``: conditions × seeds, seed-major."""
        from difftune.evaluators import CalibrationSet

        n = self.samples if n is None else n
        conditions = self.conditions(pipe)
        if conditions is None:
            count = len(CalibrationSet.for_pipeline(pipe, seeds=1, split=split))
            seeds = max(1, math.ceil(n / count))
            return list(CalibrationSet.for_pipeline(pipe, seeds=seeds, split=split))[:n]
        seeds = max(1, math.ceil(n / len(conditions)))
        if all(isinstance(c, int) for c in conditions):
            cal = CalibrationSet(labels=[int(c) for c in conditions], seeds=seeds, split=split)
        else:
            cal = CalibrationSet(prompts=[str(c) for c in conditions], seeds=seeds, split=split)
        return list(cal)[:n]

    def images_per_call(self) -> int:
        """Images per pipeline call: :attr:`batch_size`, at most :attr:`samples`."""
        return min(self.batch_size or self.samples, self.samples)

    def describe_call(self) -> str:
        """One line for the start of a run: device, dtype, size, guidance, steps."""
        parts = [f"device {self.device or 'cpu'}", f"dtype {self.dtype or 'as stored'}"]
        if self.height or self.width:
            parts.append(f"{self.height or '?'}×{self.width or '?'}")
        if self.guidance_scale is not None:
            parts.append(f"guidance {self.guidance_scale:g}")
        parts.append(f"{self.num_inference_steps} steps")
        parts.append(f"{self.samples} samples, {self.images_per_call()} per call")
        return ", ".join(parts)


def parse_call_args(items: Sequence[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings as a dict; a VALUE that parses as JSON (``32``, ``false``, ``[1, 2]``) is that
    value, anything else the string itself."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = str(item).partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise DifftuneError(f"--call-arg {item!r}: expected KEY=VALUE, e.g. max_sequence_length=256")
        try:
            out[key] = json.loads(text)
        except json.JSONDecodeError:
            out[key] = text
    return out


def merge_objectives(objectives: Sequence[Any]) -> list[Any]:
    """``"speedup,psnr:max"``-style objective strings as names or ``(name, direction)`` pairs."""
    out: list[Any] = []
    for item in objectives:
        if isinstance(item, str):
            for part in item.split(","):
                part = part.strip()
                if not part:
                    continue
                name, sep, direction = part.partition(":")
                out.append((name.strip(), direction.strip()) if sep else name.strip())
        else:
            out.append(item)
    return out
