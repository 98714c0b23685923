"""The data the embedded model is trained on: scikit-learn's handwritten digits.

The 1,797 8×8 images ship inside scikit-learn, so nothing is downloaded. They are upsampled to
16×16 and scaled to [-1, 1]. A fixed, stratified split keeps the generator's training images apart
from the classifier's, so the classifier (the FID feature network and the class-agreement metric)
never saw the images the generator learned from.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SIZE = 16
NUM_CLASSES = 10
SPLIT_SEED = 20261122
#: Share of each class that trains the generator; the rest trains the classifier.
GENERATOR_SHARE = 0.6


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - scikit-learn is a dependency
        raise ImportError("the embedded model's data needs scikit-learn: pip install scikit-learn") from exc
    digits = load_digits()
    return digits.images.astype(np.float32), digits.target.astype(np.int64)


def to_model_space(images_8x8: np.ndarray) -> torch.Tensor:
    """8×8 images with values 0–16 → a (N, 1, 16, 16) tensor in [-1, 1]."""
    x = torch.from_numpy(np.asarray(images_8x8, dtype=np.float32))[:, None] / 16.0
    x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return (x.clamp(0.0, 1.0) * 2.0 - 1.0).contiguous()


def split_indices(n_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, seeded split of the dataset into (generator, classifier) index arrays."""
    rng = np.random.default_rng(SPLIT_SEED)
    gen, cls = [], []
    for label in range(NUM_CLASSES):
        idx = np.flatnonzero(n_labels == label)
        rng.shuffle(idx)
        cut = round(len(idx) * GENERATOR_SHARE)
        gen.append(idx[:cut])
        cls.append(idx[cut:])
    return np.sort(np.concatenate(gen)), np.sort(np.concatenate(cls))


def load_split(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images in model space and labels for ``split``: ``"generator"``, ``"classifier"`` or ``"all"``."""
    images, labels = _load_digits()
    if split == "all":
        idx = np.arange(len(labels))
    else:
        gen, cls = split_indices(labels)
        splits = {"generator": gen, "classifier": cls}
        if split not in splits:
            raise ValueError(f"unknown split {split!r}; expected one of 'generator', 'classifier', 'all'")
        idx = splits[split]
    return to_model_space(images[idx]), torch.from_numpy(labels[idx])
