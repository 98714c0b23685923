"""difftune's acceleration runtime: what a profile applies to a diffusers pipeline.

One file per technique (``solver``, ``cache``, …); each config is a frozen dataclass that
round-trips through JSON and whose ``apply(pipe)`` returns a handle that undoes it exactly.
"""

from difftune.accel._hooks import CompositeHandle, Handle
from difftune.accel._registry import config_from_dict, register_technique, techniques
from difftune.accel.cache import POLICIES, CacheMaskConfig, CachePolicy, FORAConfig, apply_cache_schedule
from difftune.accel.deepcache import DeepCacheConfig
from difftune.accel.delta_dit import DeltaDiTConfig
from difftune.accel.first_block_cache import FirstBlockCacheConfig
from difftune.accel.flops import ComponentFlops, component_flops, count_flops
from difftune.accel.placements import (
    GITS_REFERENCE,
    ays_schedule,
    ays_timesteps,
    gits_dp,
    gits_schedule,
    gits_timesteps,
)
from difftune.accel.quant import (
    QuantConfig,
    QuantHandle,
    QuantSpec,
    WeightMemory,
    apply_quantization,
    quantization_report,
    weight_memory_bytes,
)
from difftune.accel.sada import SADAConfig, apply_sada
from difftune.accel.solver import SolverSchedule, SolverStep, USFScheduler, dynamic_compensation
from difftune.accel.taylorseer import TaylorSeerConfig

__all__ = [
    "GITS_REFERENCE",
    "POLICIES",
    "CacheMaskConfig",
    "CachePolicy",
    "ComponentFlops",
    "CompositeHandle",
    "DeepCacheConfig",
    "DeltaDiTConfig",
    "FORAConfig",
    "FirstBlockCacheConfig",
    "Handle",
    "QuantConfig",
    "QuantHandle",
    "QuantSpec",
    "SADAConfig",
    "SolverSchedule",
    "SolverStep",
    "TaylorSeerConfig",
    "USFScheduler",
    "WeightMemory",
    "apply_cache_schedule",
    "apply_quantization",
    "apply_sada",
    "ays_schedule",
    "ays_timesteps",
    "component_flops",
    "config_from_dict",
    "count_flops",
    "dynamic_compensation",
    "gits_dp",
    "gits_schedule",
    "gits_timesteps",
    "quantization_report",
    "register_technique",
    "techniques",
    "weight_memory_bytes",
]
