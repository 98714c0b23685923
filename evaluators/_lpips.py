"""LPIPS (Zhang et al. 2018) in plain torch, so that it runs without torchvision.

The reference implementation (richzhang/PerceptualSimilarity, ``lpips/pretrained_networks.py`` and
``lpips/lpips.py``; torchmetrics' ``functional/image/lpips.py`` copies it) takes torchvision's
ImageNet AlexNet / VGG16 / SqueezeNet1.1 ``features`` stacks and cuts them into slices after chosen
ReLUs. For each slice output of the two images it unit-normalises the features over channels,
squares their difference, weighs the channels with a learned 1×1 convolution (the "linear head"),
averages over space and sums over layers.

torchvision's own builds cannot be imported beside every torch (its C ops are tied to one torch
release), so the ``features`` stacks are rebuilt here with exactly torchvision's module layout:
torchvision's checkpoint files (``alexnet-owt-7be5be79.pth`` …) load into them with strict key
matching for their ``features.*`` part. The linear heads are the files torchmetrics ships
(``torchmetrics/functional/image/lpips_models/{alex,vgg,squeeze}.pth``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from difftune.errors import EvaluationError

__all__ = [
    "BACKBONE_FILES",
    "BACKBONE_URLS",
    "LPIPS_CHANNELS",
    "LPIPSNet",
    "backbone_features",
    "default_backbone_path",
    "heads_path",
    "load_lpips_net",
]

#: torchvision's ImageNet checkpoint of each LPIPS backbone (torch's hub cache names them so).
BACKBONE_FILES: Mapping[str, str] = {
    "alex": "alexnet-owt-7be5be79.pth",
    "vgg": "vgg16-397923af.pth",
    "squeeze": "squeezenet1_1-b8a52dc0.pth",
}
#: Where torchvision downloads them from (for the "fetch it once" message; difftune never downloads).
BACKBONE_URLS: Mapping[str, str] = {
    net: f"https://download.pytorch.org/models/{f}" for net, f in BACKBONE_FILES.items()
}
#: Channels of each LPIPS layer (the slice outputs), as in the reference.
LPIPS_CHANNELS: Mapping[str, tuple[int, ...]] = {
    "alex": (64, 192, 384, 256, 256),
    "vgg": (64, 128, 256, 512, 512),
    "squeeze": (64, 128, 256, 384, 384, 512, 512),
}
# Where each LPIPS slice of ``features`` ends (exclusive index): the reference's ``range(…)`` slices,
# i.e. right after relu1…relu5 (AlexNet), relu1_2…relu5_3 (VGG16) or the 7 stages of SqueezeNet1.1.
_SLICE_ENDS: Mapping[str, tuple[int, ...]] = {
    "alex": (2, 5, 8, 10, 12),
    "vgg": (4, 9, 16, 23, 30),
    "squeeze": (2, 5, 8, 10, 11, 12, 13),
}
# The reference's input scaling layer: images in [-1, 1] are shifted and scaled to ImageNet statistics.
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)
# torchmetrics' eps in the channel normalisation (sqrt(eps + Σx²)); the original adds 1e-10 after the sqrt.
_NORM_EPS = 1e-8


# ---- torchvision's feature stacks ----------------------------------------------------------------


def _alexnet_features() -> nn.Sequential:
    # torchvision.models.AlexNet().features
    return nn.Sequential(
        nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(64, 192, kernel_size=5, padding=2),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(192, 384, kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(384, 256, kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(256, 256, kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2),
    )


# torchvision's VGG configuration "D" (VGG16): convolution widths, None for a 2×2 max-pool.
_VGG16_CONFIG: tuple[int | None, ...] = (64, 64, None, 128, 128, None, 256, 256, 256, None)
_VGG16_CONFIG += (512, 512, 512, None, 512, 512, 512, None)


def _vgg16_features() -> nn.Sequential:
    # torchvision.models.vgg16().features (no batch norm)
    layers: list[nn.Module] = []
    channels = 3
    for width in _VGG16_CONFIG:
        if width is None:
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(channels, width, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            channels = width
    return nn.Sequential(*layers)


class Fire(nn.Module):
    """SqueezeNet's Fire module, with torchvision's attribute names (they are the checkpoint's keys)."""

    def __init__(self, inplanes: int, squeeze_planes: int, expand1x1_planes: int, expand3x3_planes: int) -> None:
        super().__init__()
        self.inplanes = inplanes
        self.squeeze = nn.Conv2d(inplanes, squeeze_planes, kernel_size=1)
        self.squeeze_activation = nn.ReLU(inplace=True)
        self.expand1x1 = nn.Conv2d(squeeze_planes, expand1x1_planes, kernel_size=1)
        self.expand1x1_activation = nn.ReLU(inplace=True)
        self.expand3x3 = nn.Conv2d(squeeze_planes, expand3x3_planes, kernel_size=3, padding=1)
        self.expand3x3_activation = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.squeeze_activation(self.squeeze(x))
        return torch.cat(
            [self.expand1x1_activation(self.expand1x1(x)), self.expand3x3_activation(self.expand3x3(x))], 1
        )


def _squeezenet1_1_features() -> nn.Sequential:
    # torchvision.models.squeezenet1_1().features
    return nn.Sequential(
        nn.Conv2d(3, 64, kernel_size=3, stride=2),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True),
        Fire(64, 16, 64, 64),
        Fire(128, 16, 64, 64),
        nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True),
        Fire(128, 32, 128, 128),
        Fire(256, 32, 128, 128),
        nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True),
        Fire(256, 48, 192, 192),
        Fire(384, 48, 192, 192),
        Fire(384, 64, 256, 256),
        Fire(512, 64, 256, 256),
    )


_BUILDERS = {"alex": _alexnet_features, "vgg": _vgg16_features, "squeeze": _squeezenet1_1_features}


def _check_net(net: str) -> None:
    if net not in _BUILDERS:
        raise EvaluationError(f"unknown LPIPS net {net!r}; choose one of {', '.join(_BUILDERS)}")


def backbone_features(net: str) -> nn.Sequential:
    """torchvision's ``features`` stack of LPIPS backbone ``net`` (``"alex"``, ``"vgg"``, ``"squeeze"``),
    randomly initialised (PyTorch's default init; load a checkpoint for real use)."""
    _check_net(net)
    return _BUILDERS[net]()


def default_backbone_path(net: str) -> Path:
    """Where torchvision keeps backbone ``net``'s checkpoint: ``torch.hub.get_dir()/checkpoints/<file>``."""
    _check_net(net)
    return Path(torch.hub.get_dir()) / "checkpoints" / BACKBONE_FILES[net]


def heads_path(net: str) -> Path:
    """The LPIPS linear-head weights of ``net`` that torchmetrics ships."""
    import torchmetrics

    _check_net(net)
    return Path(torchmetrics.__file__).parent / "functional" / "image" / "lpips_models" / f"{net}.pth"


def _load(path: Path, what: str) -> Mapping[str, Any]:
    try:
        # weights_only: a checkpoint is data; never run code from a file on disk.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # missing, truncated, not a torch file, or not plain tensors
        raise EvaluationError(f"lpips: cannot read {what} {path}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(state, Mapping):
        raise EvaluationError(f"lpips: {what} {path} holds a {type(state).__name__}, not a state dict")
    return state


# ---- the LPIPS network ---------------------------------------------------------------------------


class LPIPSNet(nn.Module):
    """LPIPS distance with backbone ``net``: ``forward(a, b)`` → (N,) for images in [-1, 1].

    ``features`` is torchvision's stack (its state-dict keys are ``features.*``, as in torchvision's
    checkpoints); ``lins`` are the 1×1 linear heads, one per layer, without bias. The network is
    always in eval mode and has no trainable parameters.
    """

    shift: torch.Tensor
    scale: torch.Tensor

    def __init__(self, net: str = "alex", features: nn.Sequential | None = None) -> None:
        super().__init__()
        _check_net(net)
        self.net = net
        self.features = features if features is not None else backbone_features(net)
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1, bias=False) for c in LPIPS_CHANNELS[net])
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> LPIPSNet:
        # Metric containers call .train(); LPIPS is a fixed distance and must stay in eval mode.
        return super().train(False)

    def layer_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The backbone's activations at the LPIPS layers of images ``x`` in [-1, 1] (after the scaling layer)."""
        ends = _SLICE_ENDS[self.net]
        h = (x - self.shift) / self.scale
        outs: list[torch.Tensor] = []
        for index, layer in enumerate(self.features):
            if index >= ends[-1]:
                break  # the layers after the last LPIPS slice (a final max-pool) do not contribute
            h = layer(h)
            if index + 1 in ends:
                outs.append(h)
        return outs

    def forward(self, in0: torch.Tensor, in1: torch.Tensor) -> torch.Tensor:
        # One backbone pass over both image sets: half the Python overhead, same numbers.
        feats = self.layer_features(torch.cat([in0, in1]))
        n = in0.shape[0]
        total = torch.zeros(n, dtype=in0.dtype, device=in0.device)
        for f, lin in zip(feats, self.lins, strict=True):
            f = f / torch.sqrt(_NORM_EPS + f.square().sum(dim=1, keepdim=True))
            diff = (f[:n] - f[n:]).square()
            total = total + lin(diff).mean(dim=(1, 2, 3))
        return total

    def load_backbone(self, state: Mapping[str, Any], source: str = "the backbone checkpoint") -> None:
        """Load torchvision's checkpoint of the backbone: its ``features.*`` entries, strictly (the
        classifier's are ignored: LPIPS does not use them)."""
        features = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
        try:
            self.features.load_state_dict(features, strict=True)
        except RuntimeError as exc:
            raise EvaluationError(
                f"lpips: {source} does not fit torchvision's {self.net} feature layout: {exc}"
            ) from exc

    def load_heads(self, state: Mapping[str, Any], source: str = "the LPIPS heads") -> None:
        """Load the reference's linear heads (keys ``lin{k}.model.1.weight``: index 0 of each is its dropout)."""
        expected = {f"lin{k}.model.1.weight" for k in range(len(self.lins))}
        if set(state) != expected:
            raise EvaluationError(
                f"lpips: {source} has keys {sorted(state)}, expected {sorted(expected)} for net {self.net!r}"
            )
        for k, lin in enumerate(self.lins):
            target = lin.get_parameter("weight")
            weight = state[f"lin{k}.model.1.weight"]
            if not isinstance(weight, torch.Tensor) or weight.shape != target.shape:
                raise EvaluationError(f"lpips: {source}: head {k} is not a tensor of shape {tuple(target.shape)}")
            target.copy_(weight)


def load_lpips_net(net: str = "alex", weights: str | Path | None = None) -> LPIPSNet:
    """The LPIPS network ``net`` with torchvision's backbone checkpoint ``weights`` (default: torch's hub
    cache, :func:`default_backbone_path`) and torchmetrics' linear heads. Never downloads."""
    path = Path(weights) if weights is not None else default_backbone_path(net)
    model = LPIPSNet(net)
    with torch.no_grad():
        model.load_backbone(_load(path, "backbone checkpoint"), str(path))
        heads = heads_path(net)
        model.load_heads(_load(heads, "LPIPS heads"), str(heads))
    return model
