"""difftune.evaluators: latency, memory, FLOPs and quality metrics, calibration sets, reference cache.

The flow of one trial's evaluation::

    from difftune.evaluators import CalibrationSet, Reference, evaluate, make_rungs

    cal = CalibrationSet.for_pipeline(pipe, seeds=4)              # (label or prompt, seed) samples
    ref = Reference.from_pipeline(pipe, num_inference_steps=50)   # the baseline setting, cached on disk
    handle = config.apply(pipe)                                   # the trial's acceleration setting
    try:
        metrics = evaluate(pipe, make_rungs(8, 32)[0].select(cal), ref)
    finally:
        handle.remove()

Every metric's direction and unit is in :func:`metric_spec`.
"""

from .calibration import (
    BUILTIN_PROMPTS,
    DIT_LABELS,
    SEED_RANGES,
    SPLITS,
    CalibrationSet,
    Sample,
    batch_kwargs,
    generate,
    read_prompt_file,
)
from .conditioning import (
    ClassAccuracy,
    CLIPScore,
    ImageRewardScore,
    class_agreement,
    clip_model_path,
    clip_scores,
    image_reward_unavailable_reason,
    load_clip,
)
from .distribution import (
    ClassifierFeatures,
    ClassifierFID,
    FeatureStatistics,
    InceptionFID,
    default_inception_weights,
    feature_statistics,
    inception_fid_unavailable_reason,
    real_digit_statistics,
)
from .evaluate import DEFAULT_METRICS, DenoiserCalls, LatencyOptions, default_metrics, evaluate
from .latency import ABResult, Latency, measure, measure_ab, peak_memory_mb
from .metrics import (
    METRIC_KINDS,
    BoundMetric,
    EvalBatch,
    MetricContext,
    MetricSpec,
    build_metric,
    metric_spec,
    metric_specs,
    register_metric,
    register_metric_factory,
)
from .quality import (
    LPIPS,
    MSE,
    PSNR,
    PSNR_MAX_DB,
    SSIM,
    lpips_per_image,
    lpips_unavailable_reason,
    mse_per_image,
    psnr_per_image,
    ssim_per_image,
)
from .reference import Reference, ReferenceCache, ReferenceSetting, default_cache_dir, shared_weights_copy
from .rungs import DEFAULT_RUNGS, Rung, check_rungs, make_rungs
from .trajectory import SIMILARITY_METRICS, component_similarity, default_trajectory_dir, pairwise_similarity

__all__ = [
    "BUILTIN_PROMPTS",
    "DEFAULT_METRICS",
    "DEFAULT_RUNGS",
    "DIT_LABELS",
    "LPIPS",
    "METRIC_KINDS",
    "MSE",
    "PSNR",
    "PSNR_MAX_DB",
    "SEED_RANGES",
    "SIMILARITY_METRICS",
    "SPLITS",
    "SSIM",
    "ABResult",
    "BoundMetric",
    "CLIPScore",
    "CalibrationSet",
    "ClassAccuracy",
    "ClassifierFID",
    "ClassifierFeatures",
    "DenoiserCalls",
    "EvalBatch",
    "FeatureStatistics",
    "ImageRewardScore",
    "InceptionFID",
    "Latency",
    "LatencyOptions",
    "MetricContext",
    "MetricSpec",
    "Reference",
    "ReferenceCache",
    "ReferenceSetting",
    "Rung",
    "Sample",
    "batch_kwargs",
    "build_metric",
    "check_rungs",
    "class_agreement",
    "clip_model_path",
    "clip_scores",
    "component_similarity",
    "default_cache_dir",
    "default_inception_weights",
    "default_metrics",
    "default_trajectory_dir",
    "evaluate",
    "feature_statistics",
    "generate",
    "image_reward_unavailable_reason",
    "inception_fid_unavailable_reason",
    "load_clip",
    "lpips_per_image",
    "lpips_unavailable_reason",
    "make_rungs",
    "measure",
    "measure_ab",
    "metric_spec",
    "metric_specs",
    "mse_per_image",
    "pairwise_similarity",
    "peak_memory_mb",
    "psnr_per_image",
    "read_prompt_file",
    "real_digit_statistics",
    "register_metric",
    "register_metric_factory",
    "shared_weights_copy",
    "ssim_per_image",
]
