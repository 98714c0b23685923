"""What difftune knows about a model: its family, fingerprint, blocks and cache components."""

from __future__ import annotations

import hashlib
import weakref
from dataclasses import dataclass, field

import torch

__all__ = ["BlockInfo", "ModelInfo", "fingerprint"]


@dataclass(frozen=True)
class BlockInfo:
    """One block of a denoiser, in execution order.

    Attributes:
        name: the block's module path inside the denoiser, e.g. ``"transformer_blocks.3"``.
        kind: ``"transformer"``, ``"joint"`` (SD3), ``"double"`` / ``"single"`` (Flux),
            ``"down"`` / ``"mid"`` / ``"up"`` (UNets).
        components: for each of the model's component slots (:attr:`ModelInfo.components`), the module
            paths (inside the denoiser) whose outputs that slot caches; ``()`` where this block has no
            such component (the mask bit is then inert).
    """

    name: str
    kind: str
    components: tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class ModelInfo:
    """What :func:`difftune.describe` reports for a pipeline.

    A cache mask for this model is ``num_inference_steps × len(blocks) × len(components)``.
    """

    family: str
    name: str
    fingerprint: str
    denoiser: str
    denoiser_class: str
    blocks: tuple[str, ...]
    components: tuple[str, ...]
    block_info: tuple[BlockInfo, ...]
    conditioning: str
    scheduler: str
    num_train_timesteps: int | None = None
    prediction_type: str | None = None
    #: UNets only: DeepCache's skip branches, shallow to deep, as (down block, up block) pairs.
    branches: tuple[tuple[str, str], ...] = field(default=())

    def mask_shape(self, num_inference_steps: int) -> tuple[int, int, int]:
        return (num_inference_steps, len(self.blocks), len(self.components))


_cache: weakref.WeakKeyDictionary[torch.nn.Module, tuple[tuple, str]] = weakref.WeakKeyDictionary()


def _state_key(module: torch.nn.Module) -> tuple:
    # Recompute the hash whenever a tensor is replaced (data_ptr) or changed in place (_version).
    return tuple((t.data_ptr(), t._version) for t in module.state_dict(keep_vars=True).values())


def _tensor_bytes(t: torch.Tensor) -> bytes:
    try:
        return t.contiguous().reshape(-1).view(torch.uint8).cpu().numpy().tobytes()
    except (NotImplementedError, RuntimeError, TypeError):
        # Tensor subclasses (torchao's quantized weights) have no raw byte view: hash their values.
        dequantize = getattr(t, "dequantize", None)
        plain = dequantize() if callable(dequantize) else t
        return plain.to(torch.float32).contiguous().reshape(-1).cpu().numpy().tobytes()


def fingerprint(module: torch.nn.Module) -> str:
    """A hash of a denoiser's weights: names, shapes, dtypes and bytes of every tensor in its state dict.

    Two pipelines with the same denoiser weights have the same fingerprint whatever their scheduler,
    device or wrapper; any changed weight changes it.
    """
    key = _state_key(module)
    cached = _cache.get(module)
    if cached is not None and cached[0] == key:
        return cached[1]
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach()
        digest.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        digest.update(_tensor_bytes(t))
    value = "sha256:" + digest.hexdigest()[:32]
    _cache[module] = (key, value)
    return value
