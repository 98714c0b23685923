#!/usr/bin/env python
"""Measure the embedded model: class accuracy of its samples, per-step cost, size; write a sample grid.

    python scripts/evaluate_embedded.py --grid docs/embedded_samples.png

Accuracy is the committed classifier's verdict on samples drawn at --steps steps (default 50), 20 per
digit. Per-step cost is the median wall time of one denoiser call on a batch of 8 (and on 16, what a
batch of 8 costs with classifier-free guidance), after warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import diffusers
import torch

import difftune
from difftune.cli import make_grid, save_atomically
from difftune.models.embedded import DEFAULT_CLASSIFIER_DIR, DEFAULT_PIPELINE_DIR, classify, load_classifier

SCHEDULERS = ("DPMSolverMultistepScheduler", "UniPCMultistepScheduler", "DDIMScheduler", "EulerDiscreteScheduler")


def step_cost_ms(pipe, batch: int, repeats: int = 30) -> float:
    x = torch.randn(batch, 1, 16, 16)
    t = torch.full((batch,), 500)
    y = torch.arange(batch) % 10
    times = []
    with torch.no_grad():
        for i in range(repeats + 5):
            start = time.perf_counter()
            pipe.transformer(x, timestep=t, class_labels=y)
            if i >= 5:
                times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--per-class", type=int, default=20)
    ap.add_argument("--grid", type=Path, default=None)
    ap.add_argument("--schedulers", action="store_true", help="also accuracy of 4 standard schedulers at 20 steps")
    args = ap.parse_args()

    pipe = difftune.load_pipeline("embedded")
    pipe.set_progress_bar_config(disable=True)
    classifier = load_classifier()
    labels = [d for d in range(10) for _ in range(args.per_class)]
    gen = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    images = pipe(class_labels=labels, num_inference_steps=args.steps, generator=gen, output_type="pt").images
    elapsed = time.perf_counter() - start
    acc = (classify(classifier, images) == torch.tensor(labels)).float().mean().item()
    print(
        f"accuracy at {args.steps} steps ({pipe.scheduler.__class__.__name__}, guidance default): "
        f"{acc:.3f} on {len(labels)} samples ({elapsed:.1f}s)"
    )
    if args.schedulers:
        original = pipe.scheduler
        for name in SCHEDULERS:
            pipe.scheduler = getattr(diffusers, name).from_config(original.config)
            im = pipe(
                class_labels=labels,
                num_inference_steps=20,
                generator=torch.Generator().manual_seed(0),
                output_type="pt",
            ).images
            a = (classify(classifier, im) == torch.tensor(labels)).float().mean().item()
            print(f"  {name:30s} 20 steps, default settings: accuracy {a:.3f}")
        pipe.scheduler = original
    print(
        f"one denoiser call: batch 8 {step_cost_ms(pipe, 8):.1f} ms, batch 16 (8 with CFG) "
        f"{step_cost_ms(pipe, 16):.1f} ms on {torch.get_num_threads()} threads"
    )
    weights = DEFAULT_PIPELINE_DIR / "transformer" / "diffusion_pytorch_model.safetensors"
    cls_weights = DEFAULT_CLASSIFIER_DIR / "diffusion_pytorch_model.safetensors"
    n_params = sum(p.numel() for p in pipe.transformer.parameters())
    print(
        f"denoiser {n_params / 1e6:.2f} M parameters, {weights.stat().st_size / 2**20:.1f} MiB; "
        f"classifier {cls_weights.stat().st_size / 2**20:.2f} MiB"
    )
    if args.grid:
        grid_images = pipe(
            class_labels=[d for _ in range(8) for d in range(10)],
            num_inference_steps=25,
            generator=torch.Generator().manual_seed(1),
        ).images
        save_atomically(make_grid(list(grid_images), columns=10, min_cell=48), args.grid)
        print(f"wrote {args.grid}")


if __name__ == "__main__":
    main()
