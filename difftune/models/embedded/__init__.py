"""difftune's embedded default model: a small class-conditional DiT on handwritten digits, with a
digit classifier that serves as the FID feature network and the class-agreement metric."""

from __future__ import annotations

from pathlib import Path

import torch

from difftune.models.embedded.classifier import DigitClassifier
from difftune.models.embedded.pipeline import NUM_CLASSES, DigitsDiTPipeline, parse_label

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DEFAULT_PIPELINE_DIR = WEIGHTS_DIR / "pipeline"
DEFAULT_CLASSIFIER_DIR = WEIGHTS_DIR / "classifier"

#: The denoiser's architecture (diffusers' DiTTransformer2DModel): 16×16×1 pixels, 4×4 patches
#: (16 tokens), 6 adaLN-Zero blocks of width 128; 10 classes + the null class for guidance.
TRANSFORMER_CONFIG = {
    "num_attention_heads": 4,
    "attention_head_dim": 32,
    "in_channels": 1,
    "out_channels": 1,
    "num_layers": 6,
    "sample_size": 16,
    "patch_size": 4,
    "num_embeds_ada_norm": NUM_CLASSES,
    "norm_type": "ada_norm_zero",
}

__all__ = [
    "DEFAULT_CLASSIFIER_DIR",
    "DEFAULT_PIPELINE_DIR",
    "NUM_CLASSES",
    "TRANSFORMER_CONFIG",
    "DigitClassifier",
    "DigitsDiTPipeline",
    "classify",
    "load_classifier",
    "parse_label",
]


def load_classifier(path: str | Path | None = None) -> DigitClassifier:
    """The committed digit classifier (eval mode), or one saved at ``path``."""
    model = DigitClassifier.from_pretrained(path or DEFAULT_CLASSIFIER_DIR)
    return model.eval()


def classify(classifier: DigitClassifier, images: torch.Tensor) -> torch.Tensor:
    """Predicted digits for images in [0, 1] as the pipeline's ``output_type="pt"`` returns them."""
    weight = next(classifier.parameters())
    with torch.no_grad():
        return classifier(images.to(device=weight.device, dtype=weight.dtype) * 2 - 1).argmax(1)
