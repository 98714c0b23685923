#!/usr/bin/env python
"""Train difftune's embedded default model: a class-conditional DiT on scikit-learn's digits.

Deterministic for a given --seed and thread count (CPU). Prints its loss and elapsed time, and
writes a standard diffusers pipeline folder (model_index.json, transformer/, scheduler/) with the
EMA weights in safetensors.

    python scripts/train_embedded.py --out difftune/models/embedded/weights/pipeline
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from pathlib import Path

import torch
from diffusers import DDPMScheduler, DiTTransformer2DModel, DPMSolverMultistepScheduler

from difftune.models.embedded import DEFAULT_PIPELINE_DIR, TRANSFORMER_CONFIG, DigitsDiTPipeline
from difftune.models.embedded.data import load_split

#: DDPM's linear schedule: SNR at t=999 is ~4e-5, so sampling from pure noise matches training,
#: and every standard diffusers scheduler works with its usual settings (unlike a cosine schedule,
#: whose zero terminal SNR breaks data-prediction solvers at t=999).
NOISE_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_schedule": "linear",
    "beta_start": 1e-4,
    "beta_end": 0.02,
    "prediction_type": "epsilon",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_PIPELINE_DIR)
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--ema", type=float, default=0.9995)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--checkpoint-every", type=int, default=1000)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    gen = torch.Generator().manual_seed(args.seed)

    images, labels = load_split("generator")
    print(f"training on {len(images)} digits, {tuple(images.shape[1:])}", flush=True)
    model = DiTTransformer2DModel(**TRANSFORMER_CONFIG)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    print(f"transformer: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters", flush=True)
    noise_sched = DDPMScheduler(**NOISE_SCHEDULE)
    alphas_cumprod = noise_sched.alphas_cumprod
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, betas=(0.9, 0.99))
    warmup = 200

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))

    def save(path: Path) -> None:
        scheduler = DPMSolverMultistepScheduler(**NOISE_SCHEDULE)
        DigitsDiTPipeline(transformer=ema, scheduler=scheduler).save_pretrained(path, safe_serialization=True)

    model.train()
    start = time.perf_counter()
    running = 0.0
    for step in range(args.steps):
        idx = torch.randint(0, len(images), (args.batch_size,), generator=gen)
        x0, y = images[idx], labels[idx]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, 1000, (args.batch_size,), generator=gen)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        # Label dropout (p=0.1, to the null class 10) happens inside diffusers' LabelEmbedding in train
        # mode; it draws from the global generator, seeded above.
        pred = model(xt, timestep=t, class_labels=y).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
                pe.lerp_(pm, 1 - decay)
        running += loss.item()
        if (step + 1) % 100 == 0:
            print(
                f"step {step + 1:6d}  loss {running / 100:.4f}  lr {lr_at(step):.2e}  "
                f"elapsed {time.perf_counter() - start:7.1f}s",
                flush=True,
            )
            running = 0.0
        if args.checkpoint_every and (step + 1) % args.checkpoint_every == 0 and step + 1 < args.steps:
            save(args.out.with_name(args.out.name + f"-step{step + 1}"))
    save(args.out)
    print(f"done: {args.steps} steps in {time.perf_counter() - start:.1f}s -> {args.out}", flush=True)


if __name__ == "__main__":
    main()
