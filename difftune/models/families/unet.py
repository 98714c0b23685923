"""Stable Diffusion 1.x/2.x and SDXL: UNet2DConditionModel (down, mid and up blocks)."""

from __future__ import annotations

from typing import Any

import torch

from difftune.models._info import BlockInfo
from difftune.models._registry import Adapter, register_adapter


class _UNet(Adapter):
    """Blocks are the UNet's down blocks, mid block and up blocks in execution order. Slots:
    ``resnets`` (every ResNet layer of the block) and ``attentions`` (every transformer of the block;
    absent in blocks without cross-attention). DeepCache's skip branches pair each down block with
    the up block that receives its skip connection."""

    denoiser_attr = "unet"
    denoiser_classes = ("UNet2DConditionModel",)
    components = ("resnets", "attentions")

    @classmethod
    def blocks(cls, denoiser: Any) -> list[BlockInfo]:
        named: list[tuple[str, str, torch.nn.Module]] = []
        named += [(f"down_blocks.{i}", "down", b) for i, b in enumerate(denoiser.down_blocks)]
        if getattr(denoiser, "mid_block", None) is not None:
            named.append(("mid_block", "mid", denoiser.mid_block))
        named += [(f"up_blocks.{i}", "up", b) for i, b in enumerate(denoiser.up_blocks)]
        out = []
        for name, kind, block in named:
            slots = tuple(
                tuple(f"{name}.{slot}.{j}" for j in range(len(getattr(block, slot, None) or ())))
                for slot in cls.components
            )
            out.append(BlockInfo(name=name, kind=kind, components=slots))
        return out

    @classmethod
    def branches(cls, denoiser: Any) -> tuple[tuple[str, str], ...]:
        n = len(denoiser.down_blocks)
        return tuple((f"down_blocks.{i}", f"up_blocks.{n - 1 - i}") for i in range(n))


@register_adapter
class SDXLAdapter(_UNet):
    __doc__ = "SDXL. " + (_UNet.__doc__ or "")
    family = "sdxl"

    @classmethod
    def matches(cls, pipe: Any) -> bool:
        if not super().matches(pipe):
            return False
        return pipe.unet.config.get("addition_embed_type") == "text_time"


@register_adapter
class SDAdapter(_UNet):
    __doc__ = "Stable Diffusion 1.x / 2.x. " + (_UNet.__doc__ or "")
    family = "sd"
