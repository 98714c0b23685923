"""Turning a model spec into a diffusers pipeline, never downloading anything.

A spec is ``"embedded"``, a local diffusers pipeline directory, a hub id in the local Hugging Face
cache (at a branch, tag or commit), or a single-file checkpoint (``.safetensors`` / ``.ckpt`` /
``.bin``) loaded with diffusers' ``from_single_file`` and the configs of a local pipeline.
"""

from __future__ import annotations

import importlib
import json
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from difftune.errors import ModelError

__all__ = [
    "CHECKPOINT_SUFFIXES",
    "KNOWN_MODELS",
    "SINGLE_FILE_PIPELINES",
    "KnownModel",
    "is_available_locally",
    "load_pipeline",
]


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

#: File suffixes :func:`load_pipeline` treats as a single-file checkpoint.
CHECKPOINT_SUFFIXES: tuple[str, ...] = (".safetensors", ".ckpt", ".bin", ".pt", ".pth")

#: diffusers' checkpoint types (``diffusers.loaders.single_file_utils.infer_diffusers_model_type``) that
#: difftune loads, without being told, as the text-to-image pipeline class named here.
SINGLE_FILE_PIPELINES: dict[str, str] = {
    "v1": "StableDiffusionPipeline",
    "v2": "StableDiffusionPipeline",
    "xl_base": "StableDiffusionXLPipeline",
    "playground-v2-5": "StableDiffusionXLPipeline",
    "sd3": "StableDiffusion3Pipeline",
    "sd35_medium": "StableDiffusion3Pipeline",
    "sd35_large": "StableDiffusion3Pipeline",
    "flux-dev": "FluxPipeline",
    "flux-schnell": "FluxPipeline",
}

#: What ``from_single_file`` reads from a pipeline's hub repo when the weights come from the checkpoint.
_CONFIG_PATTERNS = ("*.json", "*.txt", "*.model")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
#: diffusers names a component missing from a checkpoint in its error: "vae = AutoencoderKL.from_pretrained('...')".
_MISSING_COMPONENT = re.compile(r"^(\w+) = \w+\.from_pretrained\(", re.MULTILINE)
#: The UNet of an original (CompVis/LDM) Stable Diffusion checkpoint, which diffusers' inference assumes by default.
_LDM_UNET_PREFIX = "model.diffusion_model.input_blocks."


def _one_line(exc: BaseException) -> str:
    """``exc``'s message on one line (diffusers' messages span several)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def _dtype_kwargs(torch_dtype: Any) -> dict[str, Any]:
    """``torch_dtype`` as the keyword diffusers takes: ``dtype`` since it deprecated ``torch_dtype`` (0.36+)."""
    if torch_dtype is None:
        return {}
    import diffusers.utils

    return {"dtype" if hasattr(diffusers.utils, "_resolve_dtype") else "torch_dtype": torch_dtype}


def _split_revision(text: str) -> tuple[str, str | None]:
    """``"org/name@rev"`` -> ``("org/name", "rev")``; anything else -> ``(text, None)``."""
    repo_id, at, revision = text.partition("@")
    if at and revision and _HUB_ID.fullmatch(repo_id):
        return repo_id, revision
    return text, None


def _hf_download(repo_id: str, revision: str | None = None, include: tuple[str, ...] = ()) -> str:
    """The ``hf download`` command line that puts ``repo_id`` (at ``revision``) in the local cache."""
    words = ["hf", "download", repo_id]
    if revision is not None:
        words += ["--revision", revision]
    for pattern in include:
        words += ["--include", f"'{pattern}'"]
    return " ".join(words)


def _cached_snapshot(repo_id: str, revision: str | None = None) -> Path | None:
    """The local snapshot folder of hub pipeline ``repo_id`` at ``revision`` (default: main), or None (offline)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub comes with diffusers
        return None
    try:
        found = try_to_load_from_cache(repo_id, "model_index.json", revision=revision)
    except Exception:  # an ill-formed id or revision is simply "not available"
        return None
    return Path(found).parent if isinstance(found, str) else None


def is_available_locally(repo_id: str, revision: str | None = None) -> bool:
    """True when the hub pipeline ``repo_id`` is in the local Hugging Face cache (checked offline).

    Args:
        repo_id: ``"org/name"``.
        revision: a branch, tag or commit hash; ``None`` means ``main``. A branch or tag counts only
            when the cache knows which commit it points to (``refs/<revision>``), as after
            ``hf download org/name --revision <revision>``.
    """
    return _cached_snapshot(repo_id, revision) is not None


def _pipeline_class(model_index: dict) -> Any:
    from diffusers import DiffusionPipeline

    if model_index.get("_class_name") == "DigitsDiTPipeline":
        from difftune.models.embedded import DigitsDiTPipeline

        return DigitsDiTPipeline
    return DiffusionPipeline


# ---- single-file checkpoints --------------------------------------------------------------------


class _SafetensorsCheckpoint(Mapping[str, Any]):
    """The tensors of a ``.safetensors`` file, each read only when asked for.

    Enough for diffusers' checkpoint inspection (key look-ups and a few shapes) without reading a
    multi-gigabyte file twice; ``from_single_file`` then reads it for real.
    """

    def __init__(self, path: Path) -> None:
        from safetensors import safe_open

        self._path = path
        with safe_open(str(path), framework="pt") as f:
            self._keys: tuple[str, ...] = tuple(f.keys())
        self._key_set = frozenset(self._keys)

    def __getitem__(self, key: str) -> Any:
        if key not in self._key_set:
            raise KeyError(key)
        from safetensors import safe_open

        with safe_open(str(self._path), framework="pt") as f:
            return f.get_tensor(key)

    def __contains__(self, key: object) -> bool:
        return key in self._key_set

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def _open_checkpoint(path: Path) -> Mapping[str, Any]:
    """The state dict of a single-file checkpoint: lazily for ``.safetensors``, memory-mapped where torch can."""
    try:
        if path.suffix.lower() == ".safetensors":
            return _SafetensorsCheckpoint(path)
        from diffusers.loaders.single_file_utils import load_single_file_checkpoint

        return load_single_file_checkpoint(str(path), local_files_only=True)
    except Exception as exc:
        raise ModelError(f"cannot read the checkpoint {path}: {_one_line(exc)}") from exc


def _checkpoint_type(checkpoint: Mapping[str, Any]) -> str | None:
    """diffusers' name for what ``checkpoint`` holds (``"v1"``, ``"xl_base"``, ``"flux-dev"``, …), or None.

    diffusers' inference answers ``"v1"`` for anything it does not recognise; that answer counts
    only for a checkpoint that really holds an original Stable Diffusion UNet.
    """
    try:
        from diffusers.loaders.single_file_utils import infer_diffusers_model_type
    except ImportError:  # pragma: no cover - older or newer diffusers: the caller must say
        return None
    try:
        model_type = infer_diffusers_model_type(checkpoint)
    except Exception:  # a half-recognised checkpoint (diffusers indexes keys it assumed present)
        return None
    if not isinstance(model_type, str):
        return None
    if model_type == "v1" and not any(key.startswith(_LDM_UNET_PREFIX) for key in checkpoint):
        return None
    return model_type


def _single_file_class(pipeline_class: str | type | None, model_type: str | None, path: Path) -> Any:
    """The diffusers pipeline class to call ``from_single_file`` on: the one asked for, or the inferred one."""
    import diffusers
    from diffusers import DiffusionPipeline
    from diffusers.loaders import FromSingleFileMixin

    examples = "'StableDiffusionPipeline', 'StableDiffusionXLPipeline', 'StableDiffusion3Pipeline', 'FluxPipeline'"
    if pipeline_class is None:
        if model_type is None:
            raise ModelError(
                f"cannot tell which pipeline the checkpoint {path} is for: pass pipeline_class= "
                f"(a diffusers pipeline class name such as {examples}) and config= (a pipeline directory)"
            )
        name = SINGLE_FILE_PIPELINES.get(model_type)
        if name is None:
            raise ModelError(
                f"diffusers identifies {path} as a {model_type!r} checkpoint, which difftune knows no "
                f"text-to-image pipeline for: pass pipeline_class= (e.g. {examples})"
            )
        cls: Any = getattr(diffusers, name)
    elif isinstance(pipeline_class, str):
        name = pipeline_class
        cls = getattr(diffusers, name, None) if name.isidentifier() else None
    else:
        cls, name = pipeline_class, getattr(pipeline_class, "__name__", repr(pipeline_class))
    if not (isinstance(cls, type) and issubclass(cls, DiffusionPipeline)):
        raise ModelError(f"unknown pipeline class {name!r}: pass a diffusers pipeline class name such as {examples}")
    if not issubclass(cls, FromSingleFileMixin):
        raise ModelError(
            f"diffusers cannot load a {name} from a single-file checkpoint (it has no from_single_file): "
            f"convert {path} to a diffusers pipeline directory and pass that directory"
        )
    return cls


def _single_file_config(config: str | os.PathLike[str] | None, model_type: str | None, path: Path) -> Path:
    """The local directory holding the pipeline's configs: ``config``, or the cached hub repo diffusers would use."""
    if config is not None:
        text = os.fspath(config)
        local = Path(text).expanduser()
        if local.is_dir():
            if not (local / "model_index.json").is_file():
                raise ModelError(f"config {local} is not a diffusers pipeline directory: it has no model_index.json")
            return local
        repo_id, revision = _split_revision(text)
        if not _HUB_ID.fullmatch(repo_id):
            raise ModelError(f"config {text!r} is neither a local pipeline directory nor a hub id (org/name)")
        snapshot = _cached_snapshot(repo_id, revision)
        if snapshot is None:
            raise ModelError(
                f"config {text!r} is not in the local Hugging Face cache and difftune never downloads: fetch its "
                f"configs first (`{_hf_download(repo_id, revision, _CONFIG_PATTERNS)}`), or pass config= a local "
                "pipeline directory"
            )
        return snapshot
    if model_type is None:
        raise ModelError(
            f"the checkpoint {path} needs its pipeline's configs: pass config= a local pipeline directory "
            "or a cached hub id"
        )
    from diffusers.loaders.single_file_utils import DIFFUSERS_DEFAULT_PIPELINE_PATHS

    repo_id = DIFFUSERS_DEFAULT_PIPELINE_PATHS[model_type]["pretrained_model_name_or_path"]
    snapshot = _cached_snapshot(repo_id)
    if snapshot is None:
        raise ModelError(
            f"the {model_type!r} checkpoint {path} takes its pipeline's configs from {repo_id!r}, which is not in "
            f"the local Hugging Face cache, and difftune never downloads: fetch them "
            f"(`{_hf_download(repo_id, None, _CONFIG_PATTERNS)}`), or pass config= a local pipeline directory"
        )
    return snapshot


def _has_weights(folder: Path) -> bool:
    return folder.is_dir() and any(p.suffix in (".safetensors", ".bin") for p in folder.iterdir())


def _load_component(config_dir: Path, name: str, entry: Any, torch_dtype: Any, path: Path) -> Any:
    """Component ``name`` of the pipeline in ``config_dir``, with its weights from there (the checkpoint lacks it)."""
    if not _has_weights(config_dir / name):
        raise ModelError(
            f"the checkpoint {path} holds no weights for the pipeline's {name!r} and the config {config_dir} has "
            f"none either: pass config= a pipeline directory (or cached hub id) whose {name}/ folder holds them"
        )
    library, class_name = entry
    cls = getattr(importlib.import_module(library), class_name)
    kwargs: dict[str, Any] = {"subfolder": name, "local_files_only": True}
    if torch_dtype is not None:
        import transformers
        from packaging.version import Version

        if not issubclass(cls, transformers.PreTrainedModel):
            kwargs.update(_dtype_kwargs(torch_dtype))
        elif Version(transformers.__version__).release >= (4, 56):
            kwargs["dtype"] = torch_dtype
        else:
            kwargs["torch_dtype"] = torch_dtype
    try:
        return cls.from_pretrained(config_dir, **kwargs)
    except Exception as exc:
        raise ModelError(f"could not load the {name!r} of {config_dir}: {_one_line(exc)}") from exc


def _text_encoders_from_config(
    cls: Any, checkpoint: Mapping[str, Any], config_dir: Path, index: dict[str, Any], torch_dtype: Any, path: Path
) -> dict[str, Any]:
    """The pipeline's transformers models that ``checkpoint`` lacks, loaded from ``config_dir``.

    ``from_single_file`` takes a CLIP or T5 text encoder from the checkpoint when diffusers finds one
    there (the same tests are used here); otherwise it looks for diffusers-named weight files in the
    config folder, which transformers models never have, and fails. So those are loaded here and
    passed in.
    """
    from diffusers.loaders.single_file_utils import is_clip_model_in_single_file, is_t5_in_single_file
    from transformers import PreTrainedModel

    expected, _ = cls._get_signature_keys(cls)
    found: dict[str, Any] = {}
    for name in sorted(expected):
        entry = index.get(name)
        if name == "safety_checker" or not (isinstance(entry, list) and len(entry) == 2 and entry[0] == "transformers"):
            continue
        component_cls = getattr(importlib.import_module("transformers"), str(entry[1]), None)
        if not (isinstance(component_cls, type) and issubclass(component_cls, PreTrainedModel)):
            continue
        if is_clip_model_in_single_file(component_cls, checkpoint) or is_t5_in_single_file(checkpoint):
            continue
        found[name] = _load_component(config_dir, name, entry, torch_dtype, path)
    return found


def _load_single_file(
    path: Path,
    *,
    pipeline_class: str | type | None,
    config: str | os.PathLike[str] | None,
    torch_dtype: Any,
) -> Any:
    """``from_single_file`` of the fitting pipeline class, with every config read from a local directory."""
    from diffusers.loaders.single_file_utils import SingleFileComponentError

    checkpoint = _open_checkpoint(path)
    model_type = _checkpoint_type(checkpoint) if pipeline_class is None or config is None else None
    cls = _single_file_class(pipeline_class, model_type, path)
    config_dir = _single_file_config(config, model_type, path)
    try:
        index = json.loads((config_dir / "model_index.json").read_text())
        extra = _text_encoders_from_config(cls, checkpoint, config_dir, index, torch_dtype, path)
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(f"could not read the pipeline configs in {config_dir}: {_one_line(exc)}") from exc
    del checkpoint
    kwargs: dict[str, Any] = {"config": str(config_dir), "local_files_only": True, **_dtype_kwargs(torch_dtype)}
    # A config directory makes diffusers read every config from it and never fall back to the hub.
    for _ in range(len(index) + 1):
        try:
            return cls.from_single_file(str(path), **kwargs, **extra)
        except SingleFileComponentError as exc:
            # A diffusers model (e.g. the VAE) the checkpoint lacks: take it from the config directory.
            match = _MISSING_COMPONENT.search(str(exc))
            name = match.group(1) if match else None
            if name is None or name in extra or not isinstance(index.get(name), list):
                raise ModelError(f"could not load {path} as a {cls.__name__}: {_one_line(exc)}") from exc
            extra[name] = _load_component(config_dir, name, index[name], torch_dtype, path)
        except Exception as exc:
            raise ModelError(
                f"could not load {path} as a {cls.__name__} with the configs in {config_dir}: {_one_line(exc)}"
            ) from exc
    raise ModelError(f"could not load {path} as a {cls.__name__}: too many components missing")  # pragma: no cover


# ---- the entry point ----------------------------------------------------------------------------


def load_pipeline(
    spec: Any = "embedded",
    *,
    torch_dtype: Any = None,
    device: str | None = None,
    revision: str | None = None,
    pipeline_class: str | type | None = None,
    config: str | os.PathLike[str] | None = None,
) -> Any:
    """Load a diffusers pipeline from a spec, without ever downloading.

    Args:
        spec: one of

            - ``"embedded"``: difftune's own model;
            - a local diffusers pipeline directory (one with a ``model_index.json``);
            - a Hugging Face hub id ``"org/name"`` whose files are already in the local cache
              (``$HF_HUB_CACHE``, by default ``~/.cache/huggingface/hub``); ``"org/name@revision"``
              is the same as passing ``revision``;
            - a single-file checkpoint (``.safetensors``, ``.ckpt``, ``.bin``, ``.pt``, ``.pth``), as
              saved by the original Stable Diffusion / SDXL / SD3 / Flux code bases and most fine-tunes,
              loaded with diffusers' ``from_single_file`` (see ``pipeline_class`` and ``config``);
            - a pipeline object (returned as is).
        torch_dtype: the weights' dtype, passed to ``from_pretrained`` / ``from_single_file``. The
            weights' dtype is part of :func:`difftune.describe`'s fingerprint: a pipeline loaded in
            ``torch.bfloat16`` reports the same blocks as in float32 but a different fingerprint, so
            tuning results are never mixed up between dtypes.
        device: move the pipeline there after loading.
        revision: for a hub id, the branch, tag or commit hash to load (default ``main``); it must be
            in the local cache too. Revisions apply to hub ids only: with a local path it is an error.
        pipeline_class: single-file checkpoints only: the diffusers pipeline class (or its name, e.g.
            ``"StableDiffusionXLPipeline"``) to load it as. By default diffusers' own checkpoint-type
            inference decides (SD 1.x/2.x, SDXL, SD3, Flux); a checkpoint it does not recognise (a
            diffusers-layout transformer, a tiny or unusual model) needs this.
        config: single-file checkpoints only: where the pipeline's configs (and tokenizers, scheduler)
            come from: a local pipeline directory or a hub id (``"org/name"`` or ``"org/name@rev"``)
            in the local cache. By default the hub repo diffusers associates with the checkpoint's
            type (e.g. ``stable-diffusion-v1-5/stable-diffusion-v1-5``), if it is cached. Weights come
            from the checkpoint; the components it lacks (e.g. the text encoders and VAE next to a
            transformer-only Flux or SD3 file) are loaded from ``config`` when it holds their weights.

    Raises:
        ModelError: the spec names nothing loadable, or needs something missing from the local disk;
            the message says what to fetch or pass.

    Example::

        >>> pipe = load_pipeline("embedded")
        >>> pipe(prompt="digit 7", num_inference_steps=10).images[0].size
        (16, 16)
        >>> pipe = load_pipeline("my-sd15-finetune.safetensors", config="./sd15-pipeline")  # doctest: +SKIP
        >>> pipe = load_pipeline("org/name", revision="v1.1")  # doctest: +SKIP
    """
    single_file_options = pipeline_class is not None or config is not None
    if not isinstance(spec, (str, os.PathLike)):
        if hasattr(spec, "components") and callable(spec):
            if revision is not None or single_file_options:
                raise ModelError("revision=, pipeline_class= and config= do not apply to a pipeline object: drop them")
            return spec.to(device) if device else spec
        raise ModelError(f"cannot load a pipeline from a {type(spec).__name__}; pass 'embedded', a path or a hub id")
    text = os.fspath(spec)
    kwargs: dict[str, Any] = _dtype_kwargs(torch_dtype)
    if text == "embedded":
        from difftune.models.embedded import DEFAULT_PIPELINE_DIR

        path = DEFAULT_PIPELINE_DIR
    else:
        path = Path(text).expanduser()
    single_file = path.suffix.lower() in CHECKPOINT_SUFFIXES and not path.is_dir()
    if single_file_options and not single_file:
        raise ModelError(
            f"pipeline_class= and config= apply to single-file checkpoints ({', '.join(CHECKPOINT_SUFFIXES)}), "
            f"not to {text!r}: drop them"
        )
    if path.exists() and revision is not None:
        raise ModelError(
            f"revision={revision!r} applies to hub ids, and {text!r} is a local path: drop the revision, "
            "or pass the hub id (org/name) to load that revision from the local Hugging Face cache"
        )
    if path.is_file():
        if not single_file:
            raise ModelError(
                f"{path} is a file but not a single-file checkpoint ({', '.join(CHECKPOINT_SUFFIXES)}): pass a "
                "checkpoint, a diffusers pipeline directory or a hub id"
            )
        pipe = _load_single_file(path, pipeline_class=pipeline_class, config=config, torch_dtype=torch_dtype)
    elif path.exists():
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
            raise ModelError(f"could not load the pipeline in {path}: {_one_line(exc)}") from exc
    elif single_file:
        raise ModelError(f"no checkpoint file {path}: check the path")
    elif "://" in text:
        raise ModelError(
            f"{text!r} is a URL and difftune never downloads: fetch the file first and pass its local path"
        )
    else:
        repo_id, at_revision = _split_revision(text)
        if not _HUB_ID.fullmatch(repo_id):
            known = ", ".join(m.name for m in KNOWN_MODELS)
            raise ModelError(f"no model {text!r}: not a local path, not a hub id (org/name); known models: {known}")
        if at_revision is not None and revision is not None and at_revision != revision:
            raise ModelError(f"{text!r} names revision {at_revision!r} but revision={revision!r}: pass one of them")
        revision = revision if revision is not None else at_revision
        available = (
            is_available_locally(repo_id) if revision is None else is_available_locally(repo_id, revision=revision)
        )
        if not available:
            what = repr(repo_id) if revision is None else f"{repo_id!r} at revision {revision!r}"
            raise ModelError(
                f"{what} is not in the local Hugging Face cache and difftune never downloads weights on its own: "
                f"fetch it first (`{_hf_download(repo_id, revision)}`), or pass the path of a local copy"
            )
        if revision is not None:
            kwargs["revision"] = revision
        try:
            from diffusers import DiffusionPipeline

            pipe = DiffusionPipeline.from_pretrained(repo_id, local_files_only=True, **kwargs)
        except Exception as exc:
            what = repr(repo_id) if revision is None else f"{repo_id!r} at revision {revision!r}"
            raise ModelError(f"could not load {what} from the local Hugging Face cache: {_one_line(exc)}") from exc
    return pipe.to(device) if device else pipe
