"""Serving-stack formats of an exported profile: cache-dit, SGLang-diffusion and vLLM-Omni.

:func:`serving_pieces` maps a profile onto what each serving stack reads, where the stack can run
the setting, and lists every other section with the reason (the ``*_usage.json`` file, the same
shape as the diffusers format's ``diffusers_usage.json`` plus ``differences`` for the mappings that
hold with a stated semantic difference):

- ``"cache-dit"``: ``cache_dit.yaml``, read by ``cache_dit.load_configs`` (cache-dit 1.5.3,
  ``cache_dit/caching/load_configs.py``: a top-level ``cache_config`` mapping of ``DBCacheConfig``
  fields plus ``enable_taylorseer`` / ``taylorseer_order`` for the TaylorSeer calibrator), and, for a
  solver schedule diffusers runs exactly, the diffusers format's ``scheduler/`` and ``call_kwargs.json``.
- ``"sglang"``: the same ``cache_dit.yaml`` (``--cache-dit-config``, diffusers backend) and
  ``sglang.env``, the ``SGLANG_CACHE_DIT_*`` variables SGLang-diffusion's native pipelines read
  (``python/sglang/multimodal_gen/envs.py``; the denoising stage turns the SCM bins into the step mask
  with ``cache_dit.steps_mask(compute_bins, cache_bins)``).
- ``"vllm-omni"``: ``vllm_omni_cache_config.json``, ``{"cache_backend": "cache_dit", "cache_config":
  {...}}`` in vLLM-Omni's ``DiffusionCacheConfig`` keys (``vllm_omni/diffusion/data.py``).

What maps (cache-dit's DBCache: the first ``Fn`` blocks always run; on a cached step the residual the
remaining blocks added at the last computed step is added instead of running them):

- FirstBlockCache → ``Fn=1, Bn=0, residual_diff_threshold=threshold``, no warm-up, no limits: the
  same probe (first block's output − input), the same relative L1 change against the last fully
  computed step, the same ``<`` test and the same cached residual; cache-dit gives bit-identical
  images (tests/test_serving_formats.py). Thresholds ≥ 1 differ: cache-dit then caches every step
  without computing the change.
- a cache mask whose every step reuses all blocks or none, FORA, and TaylorSeer → a per-step
  ``steps_computation_mask`` (1 = compute) with ``steps_computation_policy: static`` (cache-dit caches
  a 0-step unconditionally, before any threshold or limit), TaylorSeer adding cache-dit's TaylorSeer
  calibrator of the same order. The steps agree exactly; what a skipped step reuses differs (see
  :data:`STEP_MASK_DIFFERENCE`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from difftune.search.export import CALL_KWARGS_FILE, PROFILE_FILE, SCHEDULER_DIR, DiffusersExport, diffusers_pieces

__all__ = [
    "CACHE_DIT_FILE",
    "CACHE_DIT_VERSION",
    "SERVING_FORMATS",
    "SGLANG_ENV_FILE",
    "USAGE_FILES",
    "VLLM_OMNI_FILE",
    "CacheDitPlan",
    "ServingExport",
    "cache_dit_plan",
    "cache_dit_yaml",
    "serving_pieces",
    "sglang_env",
    "step_mask",
    "vllm_omni_config",
]

SERVING_FORMATS = ("cache-dit", "sglang", "vllm-omni")
#: The cache-dit release whose config loader these files were checked against.
CACHE_DIT_VERSION = "1.5.3"
CACHE_DIT_FILE = "cache_dit.yaml"
SGLANG_ENV_FILE = "sglang.env"
VLLM_OMNI_FILE = "vllm_omni_cache_config.json"
USAGE_FILES = {"cache-dit": "cache_dit_usage.json", "sglang": "sglang_usage.json", "vllm-omni": "vllm_omni_usage.json"}
_STACK_NAMES = {"cache-dit": "cache-dit", "sglang": "SGLang-diffusion", "vllm-omni": "vLLM-Omni"}
#: Families whose pipeline (or transformer class) cache-dit 1.5.3 has a registered block adapter for.
_CACHE_DIT_FAMILIES = ("embedded", "dit", "pixart", "sd3", "flux")

STEP_MASK_DIFFERENCE = (
    "the steps that compute and the steps that reuse are the same; what a reused step runs differs: "
    "cache-dit still runs the first block (Fn_compute_blocks >= 1 is required) and adds the residual the "
    "other blocks added at the last computed step, while difftune reuses every block's cached attention / MLP "
    "outputs and applies them with this step's gates (adaLN modulation) to this step's residual stream; "
    "the images differ"
)
TAYLORSEER_DIFFERENCE = (
    "cache-dit's TaylorSeer calibrator forecasts one tensor per stream, the residual of the blocks after the "
    "first, where difftune forecasts each attention / MLP output; and it adds a derivative only once its "
    "step counter is past 1 (TaylorSeerState.derivative), so its forecast reaches the full order one or two "
    "full steps later than difftune's"
)


@dataclass(frozen=True)
class ServingExport(DiffusersExport):
    """What a serving-format export holds (files relative to the directory: ``str`` = text, else JSON)."""

    format: str = "cache-dit"
    #: section -> how the serving stack's behaviour differs from difftune's (mapped sections only)
    differences: dict[str, str] = field(default_factory=dict)

    def note(self) -> str | None:
        if not self.not_expressible:
            return None
        parts = "; ".join(f"{k}: {v}" for k, v in self.not_expressible.items())
        return (
            f"no {_STACK_NAMES.get(self.format, self.format)} equivalent for {', '.join(self.not_expressible)} "
            f"({parts}); apply {PROFILE_FILE} with difftune.apply_profile(pipe, difftune.load_profile(...)) instead"
        )


@dataclass(frozen=True)
class CacheDitPlan:
    """A profile's cache section as cache-dit's DBCache runs it, or why it cannot.

    ``cache_config`` holds ``DBCacheConfig`` fields (and the ``enable_taylorseer`` / ``taylorseer_order``
    keys of cache-dit's loader); ``None`` with ``reason`` set when cache-dit has no equivalent.
    """

    cache_config: dict[str, Any] | None = None
    what: str = ""
    difference: str = ""
    reason: str = ""
    step_masked: bool = False


# --------------------------------------------------------------------------------------------
# The mapping
# --------------------------------------------------------------------------------------------


def step_mask(cache: Any, num_steps: int, info: Any = None) -> tuple[list[int] | None, str]:
    """The per-step compute mask (1 = compute, 0 = reuse) of a whole-step cache schedule, or why there is none.

    A :class:`~difftune.accel.cache.CacheMaskConfig` qualifies when each step recomputes every present
    component of every block or none (``info``'s inert slots are ignored); FORA and TaylorSeer always do.
    Step 0 computes in both libraries (nothing is cached yet), so it is 1 whatever the mask says.
    """
    from difftune.accel.cache import CacheMaskConfig, FORAConfig
    from difftune.accel.taylorseer import TaylorSeerConfig

    if isinstance(cache, FORAConfig):
        mask = [int(s % cache.interval == 0) for s in range(num_steps)]
    elif isinstance(cache, TaylorSeerConfig):
        mask = [int(cache.is_full_step(s)) for s in range(num_steps)]
    elif isinstance(cache, CacheMaskConfig):
        array = cache.array  # steps × blocks × components, True = recompute
        if info is not None and len(info.block_info) == array.shape[1]:
            present = [[bool(paths) for paths in block.components] for block in info.block_info]
        else:
            present = [[True] * array.shape[2] for _ in range(array.shape[1])]
        mask = []
        for s, step in enumerate(array):
            bits = {bool(step[b][k]) for b, row in enumerate(present) for k, here in enumerate(row) if here}
            if len(bits) > 1:
                return None, (
                    f"a per-block cache mask (step {s} reuses some blocks or components and recomputes others): "
                    "cache-dit's steps_computation_mask is per step, a step computes the whole block stack or "
                    "reuses it after the first block"
                )
            mask.append(int(bits != {False}))
    else:
        return None, f"the {getattr(cache, 'policy', type(cache).__name__)} cache policy"
    if mask:
        mask[0] = 1
    return mask, ""


def _db_cache(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "Fn_compute_blocks": 1,
        "Bn_compute_blocks": 0,
        "residual_diff_threshold": 0.0,
        "max_warmup_steps": 0,
        "warmup_interval": 1,
        "max_cached_steps": -1,
        "max_continuous_cached_steps": -1,
    }
    return {**base, **fields}


def cache_dit_plan(profile: Any, info: Any = None) -> CacheDitPlan:
    """How cache-dit's DBCache runs ``profile``'s cache section (``info``: :func:`difftune.describe` of the model)."""
    cache = profile.cache
    steps = int(profile.context.num_inference_steps)
    family = profile.model.family
    if cache is None:
        return CacheDitPlan()
    policy = getattr(cache, "policy", None)
    if family not in _CACHE_DIT_FAMILIES:
        return CacheDitPlan(
            reason=f"cache-dit caches the transformer blocks of DiT pipelines; this {family} model is a UNet"
        )
    if policy == "first_block_cache":
        threshold = float(cache.threshold)
        difference = (
            f"threshold {threshold:g} >= 1: cache-dit caches every step after the first without computing the "
            "change, difftune still compares the change with the threshold"
            if threshold >= 1.0
            else ""
        )
        return CacheDitPlan(
            cache_config=_db_cache(residual_diff_threshold=threshold, num_inference_steps=steps),
            what=(
                "DBCache Fn=1 Bn=0 (First Block Cache): the first block's residual, its relative L1 change against "
                "the last fully computed step, skipped when below residual_diff_threshold; no warm-up, no limits"
            ),
            difference=difference,
        )
    if policy == "deepcache":
        return CacheDitPlan(
            reason="DeepCache reuses a UNet's deep branch; cache-dit caches the transformer blocks of DiTs"
        )
    if policy == "delta_dit":
        return CacheDitPlan(
            reason=(
                "Δ-DiT switches the block range it skips (rear before its switch step, front after); cache-dit "
                "keeps one Fn/Bn split for a run and always runs at least the first block"
            )
        )
    mask, why = step_mask(cache, steps, info)
    if mask is None:
        return CacheDitPlan(reason=why)
    fields: dict[str, Any] = {
        "num_inference_steps": steps,
        "steps_computation_mask": mask,
        "steps_computation_policy": "static",
    }
    if policy == "taylorseer" and cache.order >= 1:
        fields.update(enable_taylorseer=True, taylorseer_order=int(cache.order))
        what = (
            f"steps_computation_mask (static) of TaylorSeer's full steps (interval {cache.interval}, warm-up "
            f"{cache.warmup}) with cache-dit's TaylorSeer calibrator, order {cache.order}"
        )
        difference = f"{STEP_MASK_DIFFERENCE}; {TAYLORSEER_DIFFERENCE}"
    else:
        if policy == "taylorseer":
            what = "steps_computation_mask (static) of TaylorSeer's full steps (order 0: plain reuse)"
        elif policy == "fora":
            what = f"steps_computation_mask (static): FORA interval {cache.interval} over {steps} steps"
        else:
            what = "steps_computation_mask (static): the cache mask's whole-step pattern"
        difference = STEP_MASK_DIFFERENCE
    return CacheDitPlan(cache_config=_db_cache(**fields), what=what, difference=difference, step_masked=True)


# --------------------------------------------------------------------------------------------
# The files
# --------------------------------------------------------------------------------------------


def _yaml_scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        text = repr(value)
        if "e" in text and "." not in text.split("e")[0]:  # YAML 1.1 (PyYAML) reads "1e-05" as a string
            mantissa, exponent = text.split("e")
            text = f"{mantissa}.0e{exponent}"
        return text
    if isinstance(value, str):
        return json.dumps(value)  # a double-quoted YAML scalar
    if isinstance(value, Sequence):
        return "[" + ", ".join(_yaml_scalar(v) for v in value) + "]"
    raise TypeError(f"no YAML form for {type(value).__name__}")


def cache_dit_yaml(cache_config: Mapping[str, Any], comment: Sequence[str] = ()) -> str:
    """``cache_dit.yaml``: ``cache_config:`` and its fields, in the nested form ``cache_dit.load_configs`` reads."""
    lines = [f"# {line}" for text in comment for line in str(text).splitlines()]
    lines.append("cache_config:")
    lines.extend(f"  {key}: {_yaml_scalar(value)}" for key, value in cache_config.items())
    return "\n".join(lines) + "\n"


def _bins(mask: Sequence[int]) -> tuple[list[int], list[int]]:
    """Run lengths of a mask starting with 1: ``(compute_bins, cache_bins)``, as ``cache_dit.steps_mask`` reads them."""
    compute: list[int] = []
    cache: list[int] = []
    previous = None
    for bit in mask:
        runs = compute if bit else cache
        if bit == previous:
            runs[-1] += 1
        else:
            runs.append(1)
        previous = bit
    return compute, cache


def sglang_env(cache_config: Mapping[str, Any]) -> dict[str, str]:
    """The ``SGLANG_CACHE_DIT_*`` variables holding ``cache_config`` (values as SGLang's envs.py parses them)."""
    env = {
        "SGLANG_CACHE_DIT_ENABLED": "true",
        "SGLANG_CACHE_DIT_FN": str(int(cache_config["Fn_compute_blocks"])),
        "SGLANG_CACHE_DIT_BN": str(int(cache_config["Bn_compute_blocks"])),
        "SGLANG_CACHE_DIT_WARMUP": str(int(cache_config["max_warmup_steps"])),
        "SGLANG_CACHE_DIT_RDT": repr(float(cache_config["residual_diff_threshold"])),
        "SGLANG_CACHE_DIT_MC": str(int(cache_config["max_continuous_cached_steps"])),
        "SGLANG_CACHE_DIT_TAYLORSEER": "true" if cache_config.get("enable_taylorseer") else "false",
        "SGLANG_CACHE_DIT_TS_ORDER": str(int(cache_config.get("taylorseer_order", 1))),
        "SGLANG_CACHE_DIT_SCM_PRESET": "none",
        "SGLANG_CACHE_DIT_SCM_POLICY": str(cache_config.get("steps_computation_policy", "dynamic")),
    }
    mask = cache_config.get("steps_computation_mask")
    if mask and not all(mask):
        compute, cache = _bins(mask)
        env["SGLANG_CACHE_DIT_SCM_COMPUTE_BINS"] = ",".join(map(str, compute))
        env["SGLANG_CACHE_DIT_SCM_CACHE_BINS"] = ",".join(map(str, cache))
    return env


def vllm_omni_config(cache_config: Mapping[str, Any]) -> dict[str, Any]:
    """``{"cache_backend": "cache_dit", "cache_config": {...}}`` in vLLM-Omni's DiffusionCacheConfig keys."""
    keys = (
        "Fn_compute_blocks",
        "Bn_compute_blocks",
        "max_warmup_steps",
        "max_cached_steps",
        "residual_diff_threshold",
        "max_continuous_cached_steps",
    )
    config: dict[str, Any] = {key: cache_config[key] for key in keys}
    config["enable_taylorseer"] = bool(cache_config.get("enable_taylorseer", False))
    config["taylorseer_order"] = int(cache_config.get("taylorseer_order", 1))
    return {"cache_backend": "cache_dit", "cache_config": config}


def _other_sections(profile: Any, stack: str) -> dict[str, str]:
    missing: dict[str, str] = {}
    if profile.sparsity is not None:
        missing["sparsity"] = f"SADA step skipping and token pruning have no {stack} setting"
    if profile.quantization is not None:
        missing["quantization"] = (
            "per-layer bit-widths: cache-dit's quantize_config sets one quant_type for every quantized layer"
            if stack == "cache-dit"
            else f"per-layer bit-widths have no {stack} setting"
        )
    return missing


def serving_pieces(profile: Any, pipe: Any, format: str) -> ServingExport:
    """The files of a ``format`` export (one of :data:`SERVING_FORMATS`) of ``profile`` for ``pipe``'s model."""
    from difftune.models import describe

    if format not in SERVING_FORMATS:
        raise ValueError(f"format {format!r}: expected one of {', '.join(SERVING_FORMATS)}")
    stack = _STACK_NAMES[format]
    steps = int(profile.context.num_inference_steps)
    info = describe(pipe) if pipe is not None else None
    plan = cache_dit_plan(profile, info)
    files: dict[str, Any] = {}
    expressible: dict[str, str] = {}
    missing: dict[str, str] = {}
    differences: dict[str, str] = {}
    usage: list[str] = []

    # --- solver: only a diffusers pipeline takes a scheduler config and timesteps -------------------
    if profile.solver is None:
        expressible["solver"] = "none: the pipeline's own scheduler"
    elif format == "cache-dit" and pipe is not None:
        diffusers = diffusers_pieces(profile, pipe)
        if "solver" in diffusers.expressible:
            expressible["solver"] = diffusers.expressible["solver"]
            for rel, content in diffusers.files.items():
                if rel.startswith(f"{SCHEDULER_DIR}/") or rel == CALL_KWARGS_FILE:
                    files[rel] = content
        else:
            missing["solver"] = diffusers.not_expressible["solver"]
    else:
        missing["solver"] = f"{stack} takes no scheduler config or timesteps from a config file"

    # --- cache ---------------------------------------------------------------------------------------
    config = plan.cache_config
    if profile.cache is None:
        pass
    elif config is None:
        missing["cache"] = plan.reason
    elif format == "vllm-omni" and plan.step_masked:
        config = None
        missing["cache"] = (
            "vLLM-Omni sets a step mask only from cache-dit's presets (scm_steps_mask_policy slow / medium / fast "
            "/ ultra), not a given mask"
        )
    else:
        expressible["cache"] = plan.what
        if plan.difference:
            differences["cache"] = plan.difference
    missing.update(_other_sections(profile, stack))

    header = [
        f"cache-dit {CACHE_DIT_VERSION} config written by `difftune export --format {format}`",
        f"for {profile.model.name} ({profile.model.family}) at num_inference_steps={steps}",
    ]
    if config is not None and format in ("cache-dit", "sglang"):
        files[CACHE_DIT_FILE] = cache_dit_yaml(config, header)
    if config is not None and format == "sglang":
        env = sglang_env(config)
        lines = [
            f"# SGLang-diffusion cache-dit settings written by `difftune export --format sglang` "
            f"(num_inference_steps={steps})",
            *(f"{k}={v}" for k, v in env.items()),
        ]
        files[SGLANG_ENV_FILE] = "\n".join(lines) + "\n"
    if config is not None and format == "vllm-omni":
        files[VLLM_OMNI_FILE] = vllm_omni_config(config)

    if format == "cache-dit":
        usage.append("pipe = DiffusionPipeline.from_pretrained(<the model this profile was tuned on>)")
        if f"{SCHEDULER_DIR}/scheduler_config.json" in files:
            usage.append(
                f"pipe.scheduler = DPMSolverMultistepScheduler.from_pretrained(<this dir>, subfolder='{SCHEDULER_DIR}')"
            )
        if CACHE_DIT_FILE in files:
            usage.append(
                f"cache_dit.enable_cache(pipe, **cache_dit.load_configs('{CACHE_DIT_FILE}')) for a pipeline cache-dit "
                "registers (cache_dit.supported_pipelines()); else pass pipe.transformer (e.g. a "
                "DiTTransformer2DModel, as in difftune's embedded model) or a cache_dit.BlockAdapter"
            )
        usage.append(
            f"pipe(..., **{CALL_KWARGS_FILE})"
            if CALL_KWARGS_FILE in files
            else f"pipe(..., num_inference_steps={steps})"
        )
    elif format == "sglang" and CACHE_DIT_FILE in files:
        usage += [
            f"native pipelines: set -a; . ./{SGLANG_ENV_FILE}; set +a; sglang generate --model-path <model> "
            f"--num-inference-steps {steps} ...",
            f"diffusers backend: sglang generate --backend diffusers --cache-dit-config {CACHE_DIT_FILE} ...",
            "SGLang has no variable for max_cached_steps or warmup_interval: it leaves them at cache-dit's "
            "defaults (-1, 1), the values this profile needs",
        ]
        if config is not None and config.get("enable_taylorseer"):
            usage.append(
                "the env path builds TaylorSeerCalibratorConfig(taylorseer_order=…), which also forecasts the text "
                "stream (enable_encoder_calibrator defaults to true there, false in cache-dit's YAML loader)"
            )
    elif format == "vllm-omni" and VLLM_OMNI_FILE in files:
        usage += [
            f"Omni(model=<model>, **json.load(open('{VLLM_OMNI_FILE}')))",
            f"vllm serve <model> --omni --cache-backend cache_dit --cache-config '<the cache_config object of "
            f"{VLLM_OMNI_FILE}>'",
            f"call with num_inference_steps={steps} (vLLM-Omni refreshes cache-dit's context with the request's "
            "step count)",
        ]
    if format != "cache-dit" and CACHE_DIT_FILE not in files and VLLM_OMNI_FILE not in files:
        usage.append(f"nothing for {stack} to run: no cache section it can express")
    if missing:
        usage.append(
            f"difftune.apply_profile(pipe, difftune.load_profile('{PROFILE_FILE}')): sections {sorted(missing)} need it"
        )
    files[USAGE_FILES[format]] = {
        "profile": PROFILE_FILE,
        "written_for": {"cache-dit": CACHE_DIT_VERSION},
        "expressible": expressible,
        "not_expressible": missing,
        "differences": differences,
        "usage": usage,
    }
    return ServingExport(
        files=files,
        expressible=expressible,
        not_expressible=missing,
        format=format,
        differences=differences,
    )
