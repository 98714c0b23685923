"""Turning a model spec into a diffusers pipeline, never downloading anything."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from difftune.errors import ModelError

__all__ = ["KNOWN_MODELS", "KnownModel", "is_available_locally", "load_pipeline"]


@dataclass(frozen=True)
class KnownModel:
    """A model difftune knows by name: the embedded default, or a public pipeline on the Hugging Face hub."""

    name: str
    family: str
    source: str
    note: str


KNOWN_MODELS: tuple[KnownModel, ...] = (
    KnownModel("embedded", "embedded", "ships with difftune", "class-conditional digits DiT, 16×16 (default)"),
    KnownModel("facebook/DiT-XL-2-256", "dit", "hub", "DiT-XL/2, ImageNet 256×256"),
    KnownModel("PixArt-alpha/PixArt-XL-2-512x512", "pixart", "hub", "PixArt-α 512×512"),
    KnownModel("PixArt-alpha/PixArt-Sigma-XL-2-1024-MS", "pixart", "hub", "PixArt-Σ 1024×1024"),
    KnownModel("stable-diffusion-v1-5/stable-diffusion-v1-5", "sd", "hub", "Stable Diffusion 1.5"),
    KnownModel("stabilityai/stable-diffusion-2-1", "sd", "hub", "Stable Diffusion 2.1 (v-prediction)"),
    KnownModel("stabilityai/stable-diffusion-xl-base-1.0", "sdxl", "hub", "SDXL base 1.0"),
    KnownModel("stabilityai/stable-diffusion-3-medium-diffusers", "sd3", "hub", "SD3 medium"),
    KnownModel("black-forest-labs/FLUX.1-schnell", "flux", "hub", "FLUX.1 [schnell]"),
    KnownModel("black-forest-labs/FLUX.1-dev", "flux", "hub", "FLUX.1 [dev]"),
)


def is_available_locally(repo_id: str) -> bool:
    """True when the hub pipeline ``repo_id`` is in the local Hugging Face cache (checked offline)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub comes with diffusers
        return False
    try:
        found = try_to_load_from_cache(repo_id, "model_index.json")
    except Exception:  # an ill-formed id is simply "not available"
        return False
    return isinstance(found, str)


def _pipeline_class(model_index: dict) -> Any:
    from diffusers import DiffusionPipeline

    if model_index.get("_class_name") == "DigitsDiTPipeline":
        from difftune.models.embedded import DigitsDiTPipeline

        return DigitsDiTPipeline
    return DiffusionPipeline


def load_pipeline(spec: Any = "embedded", *, torch_dtype: Any = None, device: str | None = None) -> Any:
    """Load a diffusers pipeline from a spec, without ever downloading.

    Args:
        spec: ``"embedded"`` (difftune's own model), a local diffusers pipeline directory (one with a
            ``model_index.json``), a Hugging Face hub id whose files are already in the local cache,
            or a pipeline object (returned as is).
        torch_dtype: passed to ``from_pretrained``.
        device: move the pipeline there after loading.

    Raises:
        ModelError: the spec names nothing loadable; the message says how to get it.

    Example::

        >>> pipe = load_pipeline("embedded")
        >>> pipe(prompt="digit 7", num_inference_steps=10).images[0].size
        (16, 16)
    """
    if not isinstance(spec, (str, os.PathLike)):
        if hasattr(spec, "components") and callable(spec):
            return spec.to(device) if device else spec
        raise ModelError(f"cannot load a pipeline from a {type(spec).__name__}; pass 'embedded', a path or a hub id")
    text = os.fspath(spec)
    kwargs: dict[str, Any] = {}
    if torch_dtype is not None:
        kwargs["torch_dtype"] = torch_dtype
    if text == "embedded":
        from difftune.models.embedded import DEFAULT_PIPELINE_DIR

        path = DEFAULT_PIPELINE_DIR
    else:
        path = Path(text).expanduser()
    if path.exists():
        index = path / "model_index.json"
        if not index.is_file():
            raise ModelError(f"{path} is not a diffusers pipeline directory: it has no model_index.json")
        try:
            model_index = json.loads(index.read_text())
            cls = _pipeline_class(model_index)
            pipe = cls.from_pretrained(path, local_files_only=True, **kwargs)
        except ModelError:
            raise
        except Exception as exc:
            raise ModelError(f"could not load the pipeline in {path}: {exc}") from exc
    elif text.count("/") == 1 and not text.startswith((".", "/", "~")):
        if not is_available_locally(text):
            raise ModelError(
                f"{text!r} is not in the local Hugging Face cache and difftune never downloads weights on its own: "
                f"fetch it first (`hf download {text}`), or pass the path of a local copy"
            )
        try:
            from diffusers import DiffusionPipeline

            pipe = DiffusionPipeline.from_pretrained(text, local_files_only=True, **kwargs)
        except Exception as exc:
            raise ModelError(f"could not load {text!r} from the local Hugging Face cache: {exc}") from exc
    else:
        known = ", ".join(m.name for m in KNOWN_MODELS)
        raise ModelError(f"no model {text!r}: not a local path, not a hub id (org/name); known models: {known}")
    return pipe.to(device) if device else pipe
