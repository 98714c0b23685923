"""The embedded default pipeline: a class-conditional digits DiT, as a real diffusers pipeline."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline, DiTTransformer2DModel, ImagePipelineOutput
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils.torch_utils import randn_tensor

from difftune.errors import ModelError

NUM_CLASSES = 10
_LABEL_RE = re.compile(r"^\s*(?:digit\s+)?([0-9])\s*$", re.IGNORECASE)


def parse_label(text: str | int) -> int:
    """``"digit 3"``, ``"3"`` or ``3`` → 3; anything else raises :class:`ModelError`."""
    if isinstance(text, (int, np.integer)) and not isinstance(text, bool):
        label = int(text)
        if 0 <= label < NUM_CLASSES:
            return label
        raise ModelError(f"class label {label} is out of range: the embedded model draws digits 0-9")
    match = _LABEL_RE.match(str(text))
    if not match:
        raise ModelError(
            f"prompt {text!r} is not a class of the embedded model: use 'digit 0' … 'digit 9' or '0' … '9'"
        )
    return int(match.group(1))


class DigitsDiTPipeline(DiffusionPipeline):
    r"""Class-conditional pixel-space diffusion on 16×16 handwritten digits.

    The denoiser is diffusers' own :class:`~diffusers.DiTTransformer2DModel` (adaLN-Zero blocks,
    label dropout during training, so classifier-free guidance works: the null class is index 10).
    The pipeline uses whatever scheduler it holds, so swapping schedulers works as in any diffusers
    pipeline::

        >>> import difftune
        >>> pipe = difftune.load_pipeline("embedded")
        >>> images = pipe(prompt=["digit 3", "7"], num_inference_steps=20).images
    """

    model_cpu_offload_seq = "transformer"

    def __init__(self, transformer: DiTTransformer2DModel, scheduler: KarrasDiffusionSchedulers):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler)
        self.labels = {f"digit {i}": i for i in range(NUM_CLASSES)}

    @property
    def null_class(self) -> int:
        return int(self.transformer.config.num_embeds_ada_norm)

    def get_label_ids(self, prompt: str | Sequence[str]) -> list[int]:
        """Class ids for prompts such as ``"digit 3"`` or ``"3"``."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        return [parse_label(p) for p in prompts]

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str] | None = None,
        class_labels: int | Sequence[int] | torch.Tensor | None = None,
        num_inference_steps: int = 25,
        guidance_scale: float = 1.5,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        timesteps: Sequence[int] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[[DiffusionPipeline, int, Any, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        height: int | None = None,
        width: int | None = None,
    ) -> ImagePipelineOutput | tuple:
        """Draw digits.

        Args:
            prompt: class names, ``"digit 3"`` or ``"3"`` (one or a list).
            class_labels: class ids 0–9 instead of ``prompt``.
            num_inference_steps: denoiser calls (one per scheduler step for first-order schedulers).
            guidance_scale: classifier-free guidance; ``<= 1`` runs the conditional branch only.
            generator: a torch generator (or one per image) for reproducible noise.
            latents: start from these noise tensors instead of drawing them.
            timesteps: custom timesteps, passed to the scheduler's ``set_timesteps`` when it accepts them.
            output_type: ``"pil"``, ``"np"`` (N×16×16×1 in [0, 1]) or ``"pt"`` (N×1×16×16 in [0, 1]).
            callback_on_step_end: called after every step as in diffusers pipelines.
            height, width: accepted for interface parity; must equal the model's size (16) if given.
        """
        if (prompt is None) == (class_labels is None):
            raise ModelError("pass exactly one of `prompt` (class names) or `class_labels` (ints 0-9)")
        if prompt is not None:
            labels = self.get_label_ids(prompt)
        elif isinstance(class_labels, torch.Tensor):
            labels = [parse_label(int(v)) for v in class_labels.reshape(-1).tolist()]
        elif isinstance(class_labels, (int, np.integer)):
            labels = [parse_label(int(class_labels))]
        else:
            labels = [parse_label(v) for v in class_labels]  # type: ignore[union-attr]
        if output_type not in ("pil", "np", "pt"):
            raise ModelError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")
        size = int(self.transformer.config.sample_size)
        for name, value in (("height", height), ("width", width)):
            if value is not None and int(value) != size:
                raise ModelError(f"{name}={value}: the embedded model draws {size}×{size} images only")
        if num_inference_steps < 1:
            raise ModelError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        labels = [lab for lab in labels for _ in range(num_images_per_prompt)]
        batch = len(labels)
        device = self._execution_device
        dtype = self.transformer.dtype
        channels = int(self.transformer.config.in_channels)

        if latents is None:
            latents = randn_tensor((batch, channels, size, size), generator=generator, device=device, dtype=dtype)
        else:
            latents = latents.to(device=device, dtype=dtype)
        latents = latents * self.scheduler.init_noise_sigma

        do_cfg = guidance_scale > 1.0
        class_ids = torch.tensor(labels, device=device)
        if do_cfg:
            class_ids = torch.cat([class_ids, torch.full_like(class_ids, self.null_class)])

        if timesteps is not None:
            self.scheduler.set_timesteps(timesteps=list(timesteps), device=device)
        else:
            self.scheduler.set_timesteps(num_inference_steps, device=device)
        self._num_timesteps = len(self.scheduler.timesteps)

        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            model_input = torch.cat([latents, latents]) if do_cfg else latents
            model_input = self.scheduler.scale_model_input(model_input, t)
            t_batch = (
                t.reshape(1).to(device).expand(model_input.shape[0])
                if torch.is_tensor(t)
                else (torch.full((model_input.shape[0],), float(t), device=device))
            )
            noise_pred = self.transformer(model_input, timestep=t_batch, class_labels=class_ids).sample
            if do_cfg:
                cond, uncond = noise_pred.chunk(2)
                noise_pred = uncond + guidance_scale * (cond - uncond)
            latents = self.scheduler.step(noise_pred, t, latents).prev_sample
            if callback_on_step_end is not None:
                local = {"latents": latents}
                out = callback_on_step_end(
                    self, i, t, {k: local[k] for k in callback_on_step_end_tensor_inputs if k in local}
                )
                latents = (out or {}).get("latents", latents)

        images = (latents / 2 + 0.5).clamp(0, 1)
        if output_type != "pt":
            images = images.cpu().permute(0, 2, 3, 1).float().numpy()
            if output_type == "pil":
                images = self.numpy_to_pil(images)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
