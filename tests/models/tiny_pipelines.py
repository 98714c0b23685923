"""Tiny random-weight diffusers pipelines built entirely from config, for offline CPU tests.

Mirrors the ``get_dummy_components`` fixtures of diffusers' own fast tests, but builds the CLIP and T5
tokenizers from in-memory vocabularies so nothing is fetched from the Hugging Face hub. Every pipeline
decodes 32x32 RGB images and runs a real text-conditioned (or class-conditioned) call with guidance.
"""

from __future__ import annotations

import json
import string
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiTTransformer2DModel,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxTransformer2DModel,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
)
from diffusers.pipelines.dit.pipeline_dit import DiTPipeline
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import PixArtAlphaPipeline
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import StableDiffusion3Pipeline
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import StableDiffusionXLPipeline
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

FAMILIES = ("sd", "sdxl", "sd3", "flux", "pixart", "dit")

IMAGE_SIZE = 32
PROMPT = "a photo of a cat"
CLIP_MAX_LENGTH = 77
T5_MAX_LENGTH = 32
_P = TypeVar("_P", bound=DiffusionPipeline)
_T = TypeVar("_T")

_WORDS = ("a", "photo", "of", "cat", "dog", "painting", "the", "in", "on", "with", "and", "high", "quality")


@contextmanager
def torch_threads(n: int = 1) -> Iterator[None]:
    """Temporarily cap torch's intra-op threads.

    These models are so small that thread hand-offs dominate: on a busy 2-core box an SD call takes
    ~6 s with 2 threads and ~0.2 s with 1.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _assemble(pipeline_cls: type[_P], **components: Any) -> _P:
    """Instantiate a pipeline in eval mode, as ``from_pretrained`` leaves it (no dropout, e.g. DiT's label
    dropout); diffusers annotates optional components as non-None and schedulers as an Enum."""
    for component in components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    return pipeline_cls(**components)


def _seeded(seed: int, make: Callable[[], _T]) -> _T:
    """Call ``make`` right after seeding torch, so each component is reproducible on its own."""
    torch.manual_seed(seed)
    return make()


def clip_tokenizer() -> CLIPTokenizer:
    """A byte-level BPE CLIP tokenizer over a-z/0-9 plus a few whole words; other symbols map to unk."""
    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    merges: list[str] = []
    for char in string.ascii_lowercase + string.digits:
        vocab.setdefault(char, len(vocab))
        vocab.setdefault(char + "</w>", len(vocab))
    for word in _WORDS:
        pieces = [*word[:-1], word[-1] + "</w>"]
        merged = pieces[0]
        for piece in pieces[1:]:
            if f"{merged} {piece}" not in merges:
                merges.append(f"{merged} {piece}")
            merged += piece
            vocab.setdefault(merged, len(vocab))
    with tempfile.TemporaryDirectory(prefix="tiny-clip-tok-") as tmp:
        vocab_file, merges_file = Path(tmp, "vocab.json"), Path(tmp, "merges.txt")
        vocab_file.write_text(json.dumps(vocab), encoding="utf-8")
        merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        return CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=CLIP_MAX_LENGTH)


def t5_tokenizer() -> T5Tokenizer:
    """A Unigram T5 tokenizer over a few whole words and single characters; other symbols map to <unk>."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + word, -1.0) for word in _WORDS]
    pieces += [(char, -3.0) for char in string.ascii_letters + string.digits]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=T5_MAX_LENGTH)


def _clip_config(tokenizer: CLIPTokenizer, hidden_size: int = 32, projection_dim: int = 32) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        projection_dim=projection_dim,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=CLIP_MAX_LENGTH,
        hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _t5_encoder(tokenizer: T5Tokenizer, d_model: int) -> T5EncoderModel:
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return T5EncoderModel(config)


def _vae(latent_channels: int = 4, **kwargs: Any) -> AutoencoderKL:
    """A two-level VAE: 32 px images <-> 16 px latents (vae_scale_factor 2)."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=IMAGE_SIZE,
        **kwargs,
    )


def _call_kwargs(seed: int, **kwargs: Any) -> dict[str, Any]:
    return {
        "num_inference_steps": 2,
        "output_type": "np",
        "generator": torch.Generator("cpu").manual_seed(seed),
        **kwargs,
    }


def _build_sd(seed: int) -> tuple[DiffusionPipeline, dict[str, Any]]:
    tokenizer = clip_tokenizer()
    unet = _seeded(
        seed,
        lambda: UNet2DConditionModel(
            sample_size=IMAGE_SIZE // 2,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            mid_block_type="UNetMidBlock2DCrossAttn",
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(8, 16, 32),
            layers_per_block=2,
            norm_num_groups=4,
            attention_head_dim=2,
            cross_attention_dim=32,
        ),
    )
    pipe = _assemble(
        StableDiffusionPipeline,
        vae=_seeded(seed, _vae),
        text_encoder=_seeded(seed, lambda: CLIPTextModel(_clip_config(tokenizer))),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
        ),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    kwargs = _call_kwargs(seed, prompt=PROMPT, height=IMAGE_SIZE, width=IMAGE_SIZE, guidance_scale=6.0)
    return pipe, kwargs


def _build_sdxl(seed: int) -> tuple[DiffusionPipeline, dict[str, Any]]:
    tokenizer = clip_tokenizer()
    time_embed_dim, pooled_dim = 8, 32
    unet = _seeded(
        seed,
        lambda: UNet2DConditionModel(
            sample_size=IMAGE_SIZE // 2,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            mid_block_type="UNetMidBlock2DCrossAttn",
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(8, 16, 32),
            layers_per_block=2,
            transformer_layers_per_block=(1, 1, 2),
            norm_num_groups=4,
            attention_head_dim=(1, 2, 4),
            use_linear_projection=True,
            cross_attention_dim=64,
            addition_embed_type="text_time",
            addition_time_embed_dim=time_embed_dim,
            projection_class_embeddings_input_dim=6 * time_embed_dim + pooled_dim,
        ),
    )
    pipe = _assemble(
        StableDiffusionXLPipeline,
        vae=_seeded(seed, _vae),
        text_encoder=_seeded(seed, lambda: CLIPTextModel(_clip_config(tokenizer))),
        text_encoder_2=_seeded(
            seed, lambda: CLIPTextModelWithProjection(_clip_config(tokenizer, projection_dim=pooled_dim))
        ),
        tokenizer=tokenizer,
        tokenizer_2=clip_tokenizer(),
        unet=unet,
        scheduler=EulerDiscreteScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            steps_offset=1,
            timestep_spacing="leading",
        ),
        image_encoder=None,
        feature_extractor=None,
        add_watermarker=False,
    )
    kwargs = _call_kwargs(seed, prompt=PROMPT, height=IMAGE_SIZE, width=IMAGE_SIZE, guidance_scale=5.0)
    return pipe, kwargs


def _build_sd3(seed: int) -> tuple[DiffusionPipeline, dict[str, Any]]:
    clip_dim, t5_dim = 32, 64
    transformer = _seeded(
        seed,
        lambda: SD3Transformer2DModel(
            sample_size=IMAGE_SIZE // 2,
            patch_size=2,
            in_channels=16,
            out_channels=16,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=4,
            joint_attention_dim=t5_dim,
            caption_projection_dim=32,
            pooled_projection_dim=2 * clip_dim,
            pos_embed_max_size=16,
        ),
    )
    tokenizer, tokenizer_2, tokenizer_3 = clip_tokenizer(), clip_tokenizer(), t5_tokenizer()
    pipe = _assemble(
        StableDiffusion3Pipeline,
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_seeded(
            seed,
            lambda: _vae(
                latent_channels=16,
                shift_factor=0.0609,
                scaling_factor=1.5035,
                use_quant_conv=False,
                use_post_quant_conv=False,
            ),
        ),
        text_encoder=_seeded(seed, lambda: CLIPTextModelWithProjection(_clip_config(tokenizer, clip_dim, clip_dim))),
        tokenizer=tokenizer,
        # seed + 1: the two CLIP encoders share a config, so distinct seeds keep their weights distinct.
        text_encoder_2=_seeded(
            seed + 1, lambda: CLIPTextModelWithProjection(_clip_config(tokenizer_2, clip_dim, clip_dim))
        ),
        tokenizer_2=tokenizer_2,
        text_encoder_3=_seeded(seed, lambda: _t5_encoder(tokenizer_3, t5_dim)),
        tokenizer_3=tokenizer_3,
        image_encoder=None,
        feature_extractor=None,
    )
    kwargs = _call_kwargs(
        seed,
        prompt=PROMPT,
        height=IMAGE_SIZE,
        width=IMAGE_SIZE,
        guidance_scale=5.0,
        max_sequence_length=T5_MAX_LENGTH,
    )
    return pipe, kwargs


def _build_flux(seed: int) -> tuple[DiffusionPipeline, dict[str, Any]]:
    clip_dim, t5_dim = 32, 32
    transformer = _seeded(
        seed,
        lambda: FluxTransformer2DModel(
            patch_size=1,
            in_channels=64,
            num_layers=2,
            num_single_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=t5_dim,
            pooled_projection_dim=clip_dim,
            guidance_embeds=True,
            axes_dims_rope=(4, 6, 6),
        ),
    )
    tokenizer, tokenizer_2 = clip_tokenizer(), t5_tokenizer()
    pipe = _assemble(
        FluxPipeline,
        scheduler=FlowMatchEulerDiscreteScheduler(
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        ),
        vae=_seeded(
            seed,
            lambda: _vae(
                latent_channels=16,
                shift_factor=0.1159,
                scaling_factor=0.3611,
                use_quant_conv=False,
                use_post_quant_conv=False,
            ),
        ),
        text_encoder=_seeded(seed, lambda: CLIPTextModel(_clip_config(tokenizer, clip_dim))),
        tokenizer=tokenizer,
        text_encoder_2=_seeded(seed, lambda: _t5_encoder(tokenizer_2, t5_dim)),
        tokenizer_2=tokenizer_2,
        transformer=transformer,
        image_encoder=None,
        feature_extractor=None,
    )
    kwargs = _call_kwargs(
        seed,
        prompt=PROMPT,
        negative_prompt="",
        height=IMAGE_SIZE,
        width=IMAGE_SIZE,
        guidance_scale=3.5,
        true_cfg_scale=2.0,
        max_sequence_length=T5_MAX_LENGTH,
    )
    return pipe, kwargs


def _build_pixart(seed: int) -> tuple[DiffusionPipeline, dict[str, Any]]:
    t5_dim = 32
    transformer = _seeded(
        seed,
        lambda: PixArtTransformer2DModel(
            sample_size=IMAGE_SIZE // 2,
            patch_size=2,
            in_channels=4,
            out_channels=8,
            num_layers=2,
            num_attention_heads=2,
            attention_head_dim=16,
            cross_attention_dim=32,
            caption_channels=t5_dim,
            norm_type="ada_norm_single",
            norm_elementwise_affine=False,
            norm_eps=1e-6,
            num_embeds_ada_norm=1000,
        ),
    )
    tokenizer = t5_tokenizer()
    pipe = _assemble(
        PixArtAlphaPipeline,
        tokenizer=tokenizer,
        text_encoder=_seeded(seed, lambda: _t5_encoder(tokenizer, t5_dim)),
        vae=_seeded(seed, _vae),
        transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(),
    )
    kwargs = _call_kwargs(
        seed,
        prompt=PROMPT,
        height=IMAGE_SIZE,
        width=IMAGE_SIZE,
        guidance_scale=4.5,
        max_sequence_length=T5_MAX_LENGTH,
        clean_caption=False,
        use_resolution_binning=False,
    )
    return pipe, kwargs


def _build_dit(seed: int) -> tuple[DiffusionPipeline, dict[str, Any]]:
    transformer = _seeded(
        seed,
        lambda: DiTTransformer2DModel(
            sample_size=IMAGE_SIZE // 2,
            patch_size=2,
            in_channels=4,
            out_channels=8,
            num_layers=2,
            num_attention_heads=2,
            attention_head_dim=16,
            norm_type="ada_norm_zero",
            norm_elementwise_affine=False,
            num_embeds_ada_norm=1000,
        ),
    )
    pipe = _assemble(
        DiTPipeline,
        transformer=transformer,
        vae=_seeded(seed, _vae),
        scheduler=DDIMScheduler(),
        id2label={0: "tench, Tinca tinca", 1: "goldfish, Carassius auratus", 281: "tabby, tabby cat"},
    )
    return pipe, _call_kwargs(seed, class_labels=[281], guidance_scale=4.0)


_BUILDERS: dict[str, Callable[[int], tuple[DiffusionPipeline, dict[str, Any]]]] = {
    "sd": _build_sd,
    "sdxl": _build_sdxl,
    "sd3": _build_sd3,
    "flux": _build_flux,
    "pixart": _build_pixart,
    "dit": _build_dit,
}


def build(family: str, seed: int = 0) -> tuple[DiffusionPipeline, dict[str, Any]]:
    """A tiny random pipeline and the kwargs for one real end-to-end call (num_inference_steps=2,
    output_type='np', a seeded torch.Generator, guidance on where the pipeline supports it),
    so that ``pipe(**kwargs).images`` works and is a float array of shape (1, 32, 32, 3)."""
    try:
        builder = _BUILDERS[family]
    except KeyError:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}") from None
    pipe, kwargs = builder(seed)
    pipe.to("cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe, kwargs
