"""Flux: double-stream blocks, then single-stream blocks."""

from __future__ import annotations

from typing import Any

from difftune.models._info import BlockInfo
from difftune.models._registry import Adapter, register_adapter


@register_adapter
class FluxAdapter(Adapter):
    """Slots (as in ECAD's Flux genome): double blocks ``attn``, ``ff``, ``ff_context``; single blocks
    ``attn``, ``proj_mlp``, ``proj_out`` occupy the same three slots in that order."""

    family = "flux"
    denoiser_classes = ("FluxTransformer2DModel",)
    components = ("attn", "ff", "ff_context")

    @classmethod
    def blocks(cls, denoiser: Any) -> list[BlockInfo]:
        out = []
        for i, _ in enumerate(denoiser.transformer_blocks):
            name = f"transformer_blocks.{i}"
            slots = ((f"{name}.attn",), (f"{name}.ff",), (f"{name}.ff_context",))
            out.append(BlockInfo(name=name, kind="double", components=slots))
        for i, _ in enumerate(denoiser.single_transformer_blocks):
            name = f"single_transformer_blocks.{i}"
            slots = ((f"{name}.attn",), (f"{name}.proj_mlp",), (f"{name}.proj_out",))
            out.append(BlockInfo(name=name, kind="single", components=slots))
        return out
