"""A small digit classifier: the embedded model's FID feature network and class-agreement metric."""

from __future__ import annotations

import torch
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from torch import nn


class DigitClassifier(ModelMixin, ConfigMixin):
    """A 3-layer CNN on 16×16 images in [-1, 1] (the generator's output space).

    :meth:`features` returns the penultimate ``feature_dim`` activations, used as the feature space
    for FID on the embedded model; :meth:`forward` returns the 10 class logits.
    """

    @register_to_config
    def __init__(self, num_classes: int = 10, width: int = 32, feature_dim: int = 64):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.GELU(),
            nn.MaxPool2d(2),  # 8×8
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.GELU(),
            nn.MaxPool2d(2),  # 4×4
            nn.Flatten(),
            nn.Linear(2 * width * 16, feature_dim),
            nn.GELU(),
        )
        self.dropout = nn.Dropout(0.2)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 1, 16, 16) images in [-1, 1] → (N, feature_dim) features."""
        return self.body(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(images)))
