"""Stable Diffusion 3 / 3.5: MMDiT joint blocks (image and text streams share one attention)."""

from __future__ import annotations

from typing import Any

from difftune.models._info import BlockInfo
from difftune.models._registry import Adapter, register_adapter


@register_adapter
class SD3Adapter(Adapter):
    """Slots: ``attn`` (the joint attention, plus SD3.5's second image attention ``attn2`` where
    present), ``ff`` (image MLP), ``ff_context`` (text MLP; absent in the last, context-pre-only block)."""

    family = "sd3"
    denoiser_classes = ("SD3Transformer2DModel",)
    components = ("attn", "ff", "ff_context")

    @classmethod
    def blocks(cls, denoiser: Any) -> list[BlockInfo]:
        out = []
        for i, block in enumerate(denoiser.transformer_blocks):
            name = f"transformer_blocks.{i}"
            attn = (f"{name}.attn",) + ((f"{name}.attn2",) if getattr(block, "attn2", None) is not None else ())
            ff_ctx = (f"{name}.ff_context",) if getattr(block, "ff_context", None) is not None else ()
            out.append(BlockInfo(name=name, kind="joint", components=(attn, (f"{name}.ff",), ff_ctx)))
        return out
