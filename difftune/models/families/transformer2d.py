"""DiT-style denoisers built from diffusers' BasicTransformerBlock: the embedded model, DiT, PixArt-α/Σ."""

from __future__ import annotations

from typing import Any

from difftune.models._info import BlockInfo
from difftune.models._registry import Adapter, register_adapter


class _BasicBlocks(Adapter):
    @classmethod
    def blocks(cls, denoiser: Any) -> list[BlockInfo]:
        out = []
        for i, block in enumerate(denoiser.transformer_blocks):
            name = f"transformer_blocks.{i}"
            slots = tuple(
                (f"{name}.{slot}",) if getattr(block, slot, None) is not None else () for slot in cls.components
            )
            out.append(BlockInfo(name=name, kind="transformer", components=slots))
        return out


@register_adapter
class EmbeddedAdapter(_BasicBlocks):
    """difftune's embedded digits DiT (class-conditional, self-attention + MLP blocks)."""

    family = "embedded"
    denoiser_classes = ("DiTTransformer2DModel",)
    components = ("attn1", "ff")
    conditioning = "class"

    @classmethod
    def matches(cls, pipe: Any) -> bool:
        from difftune.models.embedded import DigitsDiTPipeline

        return isinstance(pipe, DigitsDiTPipeline)


@register_adapter
class DiTAdapter(_BasicBlocks):
    """DiT (class-conditional; adaLN-Zero blocks with self-attention and MLP, no cross-attention)."""

    family = "dit"
    denoiser_classes = ("DiTTransformer2DModel",)
    components = ("attn1", "ff")
    conditioning = "class"


@register_adapter
class PixArtAdapter(_BasicBlocks):
    """PixArt-α and PixArt-Σ (self-attention, cross-attention to T5 text, MLP)."""

    family = "pixart"
    denoiser_classes = ("PixArtTransformer2DModel",)
    components = ("attn1", "attn2", "ff")
