#!/usr/bin/env python
"""Train the embedded model's digit classifier on the split the generator never saw.

The classifier is trained on the "classifier" split of scikit-learn's digits (with ±1 pixel shifts
and light noise, so it is robust to generated images) and its accuracy is reported on the
"generator" split, which it never saw. Deterministic for a given --seed; prints loss, accuracy and
time, and saves config.json + safetensors.

    python scripts/train_classifier.py --out difftune/models/embedded/weights/classifier
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from difftune.models.embedded import DEFAULT_CLASSIFIER_DIR
from difftune.models.embedded.classifier import DigitClassifier
from difftune.models.embedded.data import load_split


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    shifts = torch.randint(-1, 2, (n, 2), generator=gen)
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    out = torch.stack([padded[i, :, 1 + dy : 17 + dy, 1 + dx : 17 + dx] for i, (dy, dx) in enumerate(shifts.tolist())])
    return (out + 0.1 * torch.randn(out.shape, generator=gen)).clamp(-1, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_CLASSIFIER_DIR)
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    gen = torch.Generator().manual_seed(args.seed)

    x_train, y_train = load_split("classifier")
    x_test, y_test = load_split("generator")
    model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs)
    start = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(x_train), generator=gen)
        total = 0.0
        for i in range(0, len(perm), 64):
            idx = perm[i : i + 64]
            loss = F.cross_entropy(model(augment(x_train[idx], gen)), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        sched.step()
        if (epoch + 1) % 10 == 0:
            model.eval()
            with torch.no_grad():
                acc = (model(x_test).argmax(1) == y_test).float().mean().item()
            print(
                f"epoch {epoch + 1:3d}  loss {total / len(x_train):.4f}  held-out accuracy {acc:.4f}  "
                f"elapsed {time.perf_counter() - start:.1f}s",
                flush=True,
            )
    model.eval()
    model.save_pretrained(args.out, safe_serialization=True)
    print(f"done in {time.perf_counter() - start:.1f}s -> {args.out}", flush=True)


if __name__ == "__main__":
    main()
