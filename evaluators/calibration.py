"""Calibration sets: the (prompt or label, seed) samples every trial of a study is evaluated on.

A set is conditions × seeds. Calibration and held-out sets draw their seeds from disjoint ranges
(:data:`SEED_RANGES`), so a setting chosen on the calibration set is re-validated on noise it never
saw. Samples are ordered seed-major (every condition with the first seed, then with the second, …),
so any prefix — what a multi-fidelity rung evaluates — covers the conditions evenly.

Each sample gets its own ``torch.Generator`` (on the CPU, seeded with the sample's seed), so a sample's
initial noise does not depend on the batch it is drawn in, nor on the device::

    >>> cal = CalibrationSet(labels=range(10), seeds=2)
    >>> len(cal), cal[0], cal[10]
    (20, Sample(condition=0, seed=0), Sample(condition=0, seed=1))
    >>> sorted(batch_kwargs(cal[:2]))
    ['class_labels', 'generator']
"""

from __future__ import annotations

import hashlib
import json
import operator
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

import torch

from difftune.errors import EvaluationError

__all__ = [
    "BUILTIN_PROMPTS",
    "DIT_LABELS",
    "SEED_RANGES",
    "SPLITS",
    "CalibrationSet",
    "Sample",
    "batch_kwargs",
    "check_call_kwargs",
    "generate",
    "read_prompt_file",
]

SPLITS = ("calibration", "held_out")
#: Disjoint seed ranges: calibration seeds are 0 … 999 999, held-out seeds 1 000 000 … 1 999 999.
SEED_RANGES: dict[str, range] = {"calibration": range(0, 1_000_000), "held_out": range(1_000_000, 2_000_000)}

#: Varied prompts for text-to-image models: subjects, styles, text rendering, counting, composition.
BUILTIN_PROMPTS: tuple[str, ...] = (
    "a photograph of an astronaut riding a horse on the moon",
    "a red fox sitting in a snowy forest at dawn, telephoto lens",
    "a bowl of ramen with a soft-boiled egg, top-down food photography",
    "an oil painting of a lighthouse in a storm, thick brush strokes",
    "a close-up portrait of an elderly man with a white beard, studio lighting",
    "a street sign that says 'OPEN 24 HOURS' in neon letters",
    "three green apples and one red apple on a wooden table",
    "a futuristic city skyline at night with flying cars, cyberpunk",
    "a watercolor illustration of a hummingbird drinking from a flower",
    "an isometric 3D render of a tiny cozy bedroom",
    "a black-and-white pencil sketch of a cat sleeping on a windowsill",
    "a mountain lake reflecting snowy peaks, golden hour, wide angle",
    "a cube made of glass on top of a sphere made of brick",
    "a corgi wearing sunglasses on a beach, film photo",
    "an ancient library with towering bookshelves and floating candles",
    "a minimalist logo of a coffee cup, flat vector design",
)

#: Varied ImageNet classes for class-conditional hub models (DiT): the classes of DiT's own sample
#: script, then eight more (goldfish, hummingbird, flamingo, lion, llama, space shuttle, volcano, cheeseburger).
DIT_LABELS: tuple[int, ...] = (207, 360, 387, 974, 88, 979, 417, 279, 1, 94, 130, 291, 355, 812, 980, 933)


@dataclass(frozen=True)
class Sample:
    """One calibration sample: the class label (int) or prompt (str), and the seed of its initial noise."""

    condition: int | str
    seed: int

    @property
    def key(self) -> str:
        """A stable file-name-safe id of the sample (the seed, then a hash of condition and seed)."""
        blob = json.dumps([type(self.condition).__name__, self.condition, self.seed], ensure_ascii=False)
        return f"s{self.seed}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def _check_split(split: str) -> range:
    if split not in SEED_RANGES:
        raise EvaluationError(f"split={split!r}: expected one of {', '.join(SPLITS)}")
    return SEED_RANGES[split]


def _seeds_for(seeds: int | Iterable[int], split: str) -> tuple[int, ...]:
    allowed = _check_split(split)
    if isinstance(seeds, bool):
        raise EvaluationError(f"seeds={seeds!r}: expected a count or a list of seeds")
    if isinstance(seeds, int):
        if not 1 <= seeds <= len(allowed):
            raise EvaluationError(f"seeds={seeds}: expected a count between 1 and {len(allowed)}")
        return tuple(allowed[:seeds])
    out = tuple(int(s) for s in seeds)
    if not out:
        raise EvaluationError("seeds: the list is empty")
    if len(set(out)) != len(out):
        raise EvaluationError(f"seeds: {out} has duplicates")
    outside = [s for s in out if s not in allowed]
    if outside:
        raise EvaluationError(
            f"seeds {outside[:5]} are outside the {split} range {allowed.start}…{allowed.stop - 1}; "
            "calibration and held-out seeds must not overlap"
        )
    return out


class CalibrationSet(Sequence[Sample]):
    """Samples ``conditions × seeds``, seed-major, for one split.

    Args:
        prompts: text prompts (text-to-image models) — or
        labels: class labels (the embedded model, DiT); exactly one of the two.
        seeds: a count (the first ``seeds`` seeds of the split's range) or explicit seeds within it.
        split: ``"calibration"`` (searched on) or ``"held_out"`` (re-validation); their seeds never overlap.
    """

    def __init__(
        self,
        *,
        prompts: Iterable[str] | None = None,
        labels: Iterable[int] | None = None,
        seeds: int | Iterable[int] = 4,
        split: str = "calibration",
    ) -> None:
        conditions: tuple[int | str, ...]
        if prompts is not None and labels is None:
            if isinstance(prompts, str):
                raise EvaluationError("CalibrationSet: prompts= must be a list of prompts, not one string")
            texts = tuple(str(p) for p in prompts)
            if any(not p.strip() for p in texts):
                raise EvaluationError("CalibrationSet: a prompt is empty")
            conditions = texts
        elif labels is not None and prompts is None:
            conditions = tuple(_label(v) for v in labels)
        else:
            raise EvaluationError("CalibrationSet: pass exactly one of prompts= or labels=")
        if not conditions:
            raise EvaluationError("CalibrationSet: no prompts or labels given")
        self.conditions = conditions
        self.seeds = _seeds_for(seeds, split)
        self.split = split
        self._samples = tuple(Sample(c, s) for s in self.seeds for c in self.conditions)

    @classmethod
    def for_pipeline(cls, pipe: Any, *, seeds: int | Iterable[int] = 4, split: str = "calibration") -> CalibrationSet:
        """The default set for ``pipe``: digits 0–9 (embedded), :data:`DIT_LABELS` (other class-conditional
        models) or :data:`BUILTIN_PROMPTS` (text-to-image models)."""
        from difftune.models import describe

        info = describe(pipe)
        if info.family == "embedded":
            return cls(labels=range(10), seeds=seeds, split=split)
        if info.conditioning == "class":
            return cls(labels=DIT_LABELS, seeds=seeds, split=split)
        return cls(prompts=BUILTIN_PROMPTS, seeds=seeds, split=split)

    @classmethod
    def from_prompt_file(
        cls, path: str | Path, *, seeds: int | Iterable[int] = 4, split: str = "calibration"
    ) -> CalibrationSet:
        """Prompts from a text file: one per line; blank lines and ``#`` comment lines are skipped."""
        return cls(prompts=read_prompt_file(path), seeds=seeds, split=split)

    @property
    def samples(self) -> tuple[Sample, ...]:
        return self._samples

    def __len__(self) -> int:
        return len(self._samples)

    @overload
    def __getitem__(self, index: int) -> Sample: ...

    @overload
    def __getitem__(self, index: slice) -> list[Sample]: ...

    def __getitem__(self, index: int | slice) -> Sample | list[Sample]:
        if isinstance(index, slice):
            return list(self._samples[index])
        return self._samples[index]

    def __iter__(self) -> Iterator[Sample]:
        return iter(self._samples)

    def __repr__(self) -> str:
        kind = "prompts" if isinstance(self.conditions[0], str) else "labels"
        return f"CalibrationSet({len(self.conditions)} {kind} × {len(self.seeds)} seeds, split={self.split!r})"


def _label(value: Any) -> int:
    try:
        if isinstance(value, bool):
            raise TypeError
        label = operator.index(value)  # ints, numpy ints, 0-d integer tensors; not floats or strings
    except TypeError as exc:
        raise EvaluationError(f"CalibrationSet: label {value!r} is not an integer class id") from exc
    if label < 0:
        raise EvaluationError(f"CalibrationSet: label {label} is negative")
    return label


def read_prompt_file(path: str | Path) -> list[str]:
    """Prompts from a UTF-8 text file, one per line; ``#`` starts a comment line; blank lines are skipped."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise EvaluationError(f"prompt file {p} does not exist") from exc
    except UnicodeDecodeError as exc:
        raise EvaluationError(f"prompt file {p} is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except OSError as exc:
        raise EvaluationError(f"prompt file {p} cannot be read: {exc.strerror or exc}") from exc
    prompts = [line.strip() for line in text.splitlines()]
    prompts = [line for line in prompts if line and not line.startswith("#")]
    if not prompts:
        raise EvaluationError(f"prompt file {p} holds no prompts (one per line; lines starting with # are comments)")
    return prompts


def batch_kwargs(samples: Sequence[Sample]) -> dict[str, Any]:
    """The pipeline call kwargs for one batch: ``class_labels`` or ``prompt``, and one seeded generator per sample.

    Generators are CPU generators: diffusers draws the noise on the CPU and moves it, so a sample's
    noise is the same on every device.
    """
    if not samples:
        raise EvaluationError("batch_kwargs: the batch is empty")
    conditions = [s.condition for s in samples]
    generators = [torch.Generator(device="cpu").manual_seed(s.seed) for s in samples]
    if all(isinstance(c, str) for c in conditions):
        return {"prompt": conditions, "generator": generators}
    if all(isinstance(c, int) for c in conditions):
        return {"class_labels": conditions, "generator": generators}
    raise EvaluationError("batch_kwargs: a batch mixes prompts and class labels")


_RESERVED = ("prompt", "class_labels", "generator", "output_type", "latents", "return_dict", "num_images_per_prompt")


def check_call_kwargs(call_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """A setting's own call kwargs (steps, guidance, size…): those the samples or difftune set are refused."""
    clash = sorted(set(call_kwargs) & set(_RESERVED))
    if clash:
        raise EvaluationError(
            f"call kwargs {clash} are set per sample or by difftune; a setting may pass e.g. num_inference_steps, "
            "guidance_scale, height, width"
        )
    return dict(call_kwargs)


def generate(pipe: Any, samples: Sequence[Sample], call_kwargs: Mapping[str, Any] | None = None) -> torch.Tensor:
    """Run ``pipe`` once on ``samples`` (one batch): N×C×H×W float32 images in [0, 1], on the pipeline's device."""
    kwargs = {**check_call_kwargs(call_kwargs or {}), **batch_kwargs(samples), "output_type": "pt"}
    out = pipe(**kwargs)
    images = out.images if hasattr(out, "images") else out[0]
    if isinstance(images, (list, tuple)):
        images = torch.stack([torch.as_tensor(i) for i in images])
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or len(images) != len(samples):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise EvaluationError(
            f"the pipeline returned {shape} for output_type='pt'; expected {len(samples)}×C×H×W images"
        )
    return images.float()
