"""The FID InceptionV3 feature extractor in plain torch, so that it runs without torch-fidelity and torchvision.

torchmetrics' default FID network is torch-fidelity's ``FeatureExtractorInceptionV3`` (the TensorFlow
FID graph ported to PyTorch, with its TF-compatible pooling patches). torch-fidelity imports torchvision
at package import, and torchvision builds are tied to one torch release, so the network is rebuilt here
with exactly torch-fidelity's module names: its checkpoint ``weights-inception-2015-12-05-6726825d.pth``
loads with strict key matching, and the forward pass is torchmetrics' ``NoTrainInceptionV3`` path
(images quantised to uint8, resized to 299×299 with antialiased bilinear interpolation, scaled to
[-1, 1]; features = the 64/192/768/2048-d average-pooled activations).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from difftune.errors import EvaluationError

__all__ = ["INCEPTION_FEATURE_DIMS", "INCEPTION_WEIGHTS_URL", "InceptionV3Features", "load_inception"]

#: The feature layers torchmetrics' ``FrechetInceptionDistance(feature=…)`` offers (2048: the standard FID).
INCEPTION_FEATURE_DIMS = (64, 192, 768, 2048)
#: Where torch-fidelity downloads its checkpoint from (for the "fetch it once" message; difftune never downloads).
INCEPTION_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
_INPUT_SIZE = 299


class BasicConv2d(nn.Module):
    """Convolution without bias, batch norm (eps 1e-3, as in the TF graph), ReLU."""

    def __init__(self, in_channels: int, out_channels: int, **kwargs: int | tuple[int, int]) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **kwargs)  # type: ignore[arg-type]
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)), inplace=True)


def _avg_pool_tf(x: torch.Tensor) -> torch.Tensor:
    # TensorFlow's 3×3 average pool does not count the zero padding.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, in_channels: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_avg_pool_tf(x))], 1)


class InceptionB(nn.Module):
    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):
    def __init__(self, in_channels: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            d = layer(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg_pool_tf(x))], 1)


class InceptionD(nn.Module):
    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
    """Both E blocks; ``max_pool``: the TF graph's last block pools its pool branch with max, not average."""

    def __init__(self, in_channels: int, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _avg_pool_tf(x)
        return torch.cat([self.branch1x1(x), b3, d, self.branch_pool(pooled)], 1)


def _pool(x: torch.Tensor) -> torch.Tensor:
    return F.adaptive_avg_pool2d(x, output_size=(1, 1)).flatten(1)


class InceptionV3Features(nn.Module):
    """torch-fidelity's FID InceptionV3 (state-dict keys ``Conv2d_1a_3x3.conv.weight`` … ``fc.bias``).

    ``forward(images)`` takes N×3×H×W images in [0, 1] (float) or [0, 255] (uint8) and returns the
    N×``num_features`` features of layer ``num_features`` (one of :data:`INCEPTION_FEATURE_DIMS`).
    Randomly initialised; :func:`load_inception` loads the real weights. Always in eval mode (its batch
    norms must use the stored statistics), no trainable parameters.
    """

    def __init__(self, num_features: int = 2048) -> None:
        super().__init__()
        if num_features not in INCEPTION_FEATURE_DIMS:
            raise EvaluationError(
                f"InceptionV3 features: num_features must be one of {INCEPTION_FEATURE_DIMS}, got {num_features}"
            )
        #: read by torchmetrics' FID so that it needs no probe image
        self.num_features = num_features
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.MaxPool_1 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.MaxPool_2 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.AvgPool = nn.AdaptiveAvgPool2d(output_size=(1, 1))
        # Unused for FID, but part of the checkpoint: kept so that it loads strictly.
        self.fc = nn.Linear(2048, 1008)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> InceptionV3Features:
        # torchmetrics calls .train() on metrics; batch norm in training mode would use batch statistics.
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise EvaluationError(f"InceptionV3 features: expected N×3×H×W images, got {tuple(images.shape)}")
        # The network was trained on 8-bit images: quantise as torchmetrics' FID does ((x·255).byte(): truncation).
        x = images if images.dtype == torch.uint8 else (images * 255).byte()
        dtype = self.fc.weight.dtype
        x = F.interpolate(
            x.to(dtype), size=(_INPUT_SIZE, _INPUT_SIZE), mode="bilinear", align_corners=False, antialias=True
        )
        x = (x - 128) / 128
        x = self.MaxPool_1(self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x))))
        if self.num_features == 64:
            return _pool(x)
        x = self.MaxPool_2(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)))
        if self.num_features == 192:
            return _pool(x)
        blocks: tuple[nn.Module, ...] = (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b)
        for block in (*blocks, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e):
            x = block(x)
        if self.num_features == 768:
            return _pool(x)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))
        return torch.flatten(self.AvgPool(x), 1)


def load_inception(path: str | Path, num_features: int = 2048) -> InceptionV3Features:
    """:class:`InceptionV3Features` with torch-fidelity's checkpoint at ``path`` (strict keys). Never downloads."""
    model = InceptionV3Features(num_features)
    try:
        # weights_only: a checkpoint is data; never run code from a file on disk.
        state = torch.load(Path(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # missing, truncated, not a torch file, or not plain tensors
        raise EvaluationError(f"fid: cannot read the InceptionV3 weights {path}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(state, dict):
        raise EvaluationError(f"fid: {path} holds a {type(state).__name__}, not a state dict")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise EvaluationError(f"fid: {path} does not fit torch-fidelity's InceptionV3 layout: {exc}") from exc
    return model
