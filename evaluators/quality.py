"""Quality against the reference: PSNR, SSIM, MSE (torchmetrics) and LPIPS (when its backbone weights are here).

Each metric compares a trial's image with the reference setting's image of the same sample (same
label or prompt, same seed). Images are N×C×H×W in [0, 1]. The metrics accumulate over batches
(``update`` / ``compute`` / ``reset``) and report the mean over images of the per-image value — the
figure caching and solver papers report. The per-image math is in pure functions beside them.

Why these are not enough on their own: PSNR, SSIM and MSE reward being *close on average*, so a
search that optimizes only them drifts towards blurry posterior means (an average of plausible
outputs is nearer, in L2, to any one of them than another sharp sample is). The distribution and
conditioning metrics (:mod:`~difftune.evaluators.distribution`, :mod:`~difftune.evaluators.conditioning`)
catch that; studies should carry one of them as an objective or a constraint.

LPIPS runs in plain torch (:mod:`~difftune.evaluators._lpips`; torchvision builds are tied to one torch
release, so it is not used) but needs torchvision's pretrained backbone checkpoint (AlexNet / VGG16 /
SqueezeNet1.1, in torch's hub cache or at ``options={"lpips_weights": PATH}``). difftune never downloads
it at run time: without it :func:`build_metric` raises :class:`~difftune.EvaluationError` saying where
to put the file and how to fetch it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics import Metric
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from difftune.errors import EvaluationError

from ._lpips import BACKBONE_FILES, BACKBONE_URLS, LPIPSNet, default_backbone_path, heads_path, load_lpips_net
from .metrics import BoundMetric, EvalBatch, MetricContext, register_metric_factory

__all__ = [
    "LPIPS",
    "LPIPS_WEIGHT_FILES",
    "MSE",
    "PSNR",
    "PSNR_MAX_DB",
    "SSIM",
    "lpips_input",
    "lpips_per_image",
    "lpips_unavailable_reason",
    "mse_per_image",
    "psnr_per_image",
    "ssim_per_image",
]

#: PSNR of identical images is infinite; it is reported as this many dB so that stored values stay
#: finite and sort correctly (float32 rounding alone already gives ~140 dB).
PSNR_MAX_DB = 100.0


# ---- pure functions ------------------------------------------------------------------------------


def _check_pair(preds: torch.Tensor, target: torch.Tensor, metric: str) -> None:
    if preds.shape != target.shape:
        raise EvaluationError(
            f"{metric}: images {tuple(preds.shape)} and reference {tuple(target.shape)} differ in shape"
        )
    if preds.dim() != 4:
        raise EvaluationError(f"{metric}: expected N×C×H×W images, got shape {tuple(preds.shape)}")


def mse_per_image(preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error of each image pair: (N,) for N×C×H×W inputs."""
    _check_pair(preds, target, "mse")
    return (preds.float() - target.float()).square().flatten(1).mean(1)


def psnr_per_image(
    preds: torch.Tensor, target: torch.Tensor, data_range: float = 1.0, max_db: float = PSNR_MAX_DB
) -> torch.Tensor:
    """PSNR in dB of each image pair, ``10·log10(data_range² / mse)``, capped at ``max_db`` (identical → cap)."""
    _check_pair(preds, target, "psnr")
    values = peak_signal_noise_ratio(
        preds.float(), target.float(), data_range=data_range, reduction="none", dim=(1, 2, 3)
    )
    return values.clamp(max=max_db)


def ssim_per_image(
    preds: torch.Tensor,
    target: torch.Tensor,
    data_range: float = 1.0,
    kernel_size: int = 11,
    sigma: float = 1.5,
) -> torch.Tensor:
    """SSIM of each image pair (Gaussian window ``kernel_size`` / ``sigma``, as in Wang et al. 2004)."""
    _check_pair(preds, target, "ssim")
    if min(preds.shape[-2:]) <= kernel_size // 2:
        raise EvaluationError(
            f"ssim: images of {tuple(preds.shape[-2:])} pixels are too small for an {kernel_size}-pixel window; "
            "pass a smaller kernel_size"
        )
    values = structural_similarity_index_measure(
        preds.float(),
        target.float(),
        data_range=data_range,
        kernel_size=kernel_size,
        sigma=sigma,
        reduction="none",
    )
    if isinstance(values, tuple):  # only with return_full_image / return_contrast_sensitivity, which are off
        values = values[0]
    return values.reshape(-1)


# ---- metrics -------------------------------------------------------------------------------------


class _MeanOverImages(Metric):
    """Accumulates a per-image value over batches; ``compute`` is its mean over all images seen."""

    is_differentiable = False
    full_state_update = False
    name = "metric"
    value_sum: torch.Tensor
    total: torch.Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("value_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def _per_image(self, preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch of images and their references (N×C×H×W, [0, 1])."""
        values = self._per_image(preds, target)
        self.value_sum += values.double().sum()
        self.total += values.numel()

    def compute(self) -> torch.Tensor:
        if int(self.total) == 0:
            raise EvaluationError(f"{self.name}: compute() before any update(): no images were given")
        return (self.value_sum / self.total).float()


class PSNR(_MeanOverImages):
    """Mean per-image PSNR (dB) against the reference, capped at ``max_db``.

    Example::

        >>> m = PSNR()
        >>> m.update(torch.full((1, 1, 4, 4), 0.5), torch.full((1, 1, 4, 4), 0.6))
        >>> round(float(m.compute()), 3)  # 10·log10(1 / 0.01)
        20.0
    """

    higher_is_better = True
    name = "psnr"

    def __init__(self, data_range: float = 1.0, max_db: float = PSNR_MAX_DB, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.data_range = data_range
        self.max_db = max_db

    def _per_image(self, preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return psnr_per_image(preds, target, self.data_range, self.max_db)


class SSIM(_MeanOverImages):
    """Mean per-image SSIM against the reference (1 = identical)."""

    higher_is_better = True
    name = "ssim"

    def __init__(self, data_range: float = 1.0, kernel_size: int = 11, sigma: float = 1.5, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.data_range = data_range
        self.kernel_size = kernel_size
        self.sigma = sigma

    def _per_image(self, preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return ssim_per_image(preds, target, self.data_range, self.kernel_size, self.sigma)


class MSE(_MeanOverImages):
    """Mean squared error against the reference (images in [0, 1])."""

    higher_is_better = False
    name = "mse"

    def _per_image(self, preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return mse_per_image(preds, target)


def _paired(metric: Metric, name: str) -> BoundMetric:
    def feed(batch: EvalBatch) -> None:
        metric.update(batch.images, batch.require_reference(name))

    return BoundMetric(metric, feed, needs_reference=True)


@register_metric_factory("psnr")
def _build_psnr(context: MetricContext) -> BoundMetric:
    return _paired(PSNR().to(context.device), "psnr")


@register_metric_factory("ssim")
def _build_ssim(context: MetricContext) -> BoundMetric:
    """Options: ``ssim_kernel_size`` (default 11; the embedded 16×16 images fit it), ``ssim_sigma`` (1.5)."""
    kernel = int(context.options.get("ssim_kernel_size", 11))
    sigma = float(context.options.get("ssim_sigma", 1.5))
    return _paired(SSIM(kernel_size=kernel, sigma=sigma).to(context.device), "ssim")


@register_metric_factory("mse")
def _build_mse(context: MetricContext) -> BoundMetric:
    return _paired(MSE().to(context.device), "mse")


# ---- LPIPS ---------------------------------------------------------------------------------------

#: The torchvision backbone checkpoint each LPIPS net loads (torchmetrics ships the linear heads).
LPIPS_WEIGHT_FILES = BACKBONE_FILES


def lpips_unavailable_reason(net: str = "alex", weights: str | Path | None = None) -> str | None:
    """None when LPIPS with backbone ``net`` can run here without downloading, else what is missing and how
    to get it. ``weights``: an explicit backbone checkpoint (default: torch's hub cache)."""
    if net not in BACKBONE_FILES:
        return f"unknown LPIPS net {net!r}; choose one of {', '.join(BACKBONE_FILES)}"
    path = Path(weights) if weights is not None else default_backbone_path(net)
    if not path.is_file():
        default = default_backbone_path(net)
        return (
            f"lpips needs torchvision's pretrained {net} backbone checkpoint {BACKBONE_FILES[net]} at {path} "
            "(difftune never downloads at run time; torchvision itself is not needed); fetch it once on a machine "
            f'with internet: curl -L -o {BACKBONE_FILES[net]} {BACKBONE_URLS[net]} (or python -c "import '
            f"torchvision; torchvision.models.{_TV_MODEL[net]}(weights='DEFAULT')\", which saves it under "
            f"torch.hub.get_dir()/checkpoints), then copy the file to {default} or pass "
            "options={'lpips_weights': PATH}"
        )
    heads = heads_path(net)
    if not heads.is_file():
        return f"lpips needs the LPIPS linear heads {heads}, which torchmetrics ships; reinstall torchmetrics"
    return None


_TV_MODEL = {"alex": "alexnet", "vgg": "vgg16", "squeeze": "squeezenet1_1"}


def lpips_input(images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] as the LPIPS backbones want them: RGB, at least 64 pixels a side, in [-1, 1]."""
    # Grey 16×16 digits would vanish in the backbones' strided stems: repeat the channel and upsample.
    x = images.float()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[1] != 3:
        raise EvaluationError(f"lpips: expected grey or RGB images, got {x.shape[1]} channels")
    if min(x.shape[-2:]) < 64:
        x = F.interpolate(x, scale_factor=64 / min(x.shape[-2:]), mode="bilinear", align_corners=False)
    return x.clamp(0, 1) * 2 - 1


def lpips_per_image(net: LPIPSNet, preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """LPIPS distance of each image pair (N×C×H×W in [0, 1]) under ``net``: (N,), 0 for identical images."""
    _check_pair(preds, target, "lpips")
    dtype = next(net.parameters()).dtype
    with torch.no_grad():
        return net(lpips_input(preds).to(dtype), lpips_input(target).to(dtype)).float()


class LPIPS(_MeanOverImages):
    """Mean per-image LPIPS distance against the reference (0 = identical; lower is better).

    Plain-torch LPIPS (:mod:`difftune.evaluators._lpips`): torchvision's AlexNet / VGG16 / SqueezeNet1.1
    feature stack loaded from torchvision's checkpoint file, torchmetrics' LPIPS linear heads, the
    reference's math (scaling layer, channel-normalised features, squared differences weighed by the
    heads, spatial mean, sum over layers). Grey images are repeated to RGB and images under 64 pixels
    a side are upsampled first.

    Args:
        net: ``"alex"`` (default), ``"vgg"`` or ``"squeeze"``.
        weights: the backbone checkpoint (default ``torch.hub.get_dir()/checkpoints/<torchvision file>``).
            Nothing is downloaded: a missing file raises :class:`~difftune.EvaluationError`.
    """

    higher_is_better = False
    name = "lpips"

    def __init__(self, net: str = "alex", weights: str | Path | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        reason = lpips_unavailable_reason(net, weights)
        if reason is not None:
            raise EvaluationError(reason)
        self.net = load_lpips_net(net, weights)

    def _per_image(self, preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return lpips_per_image(self.net, preds, target)


@register_metric_factory("lpips")
def _build_lpips(context: MetricContext) -> BoundMetric:
    """Options: ``lpips_net`` (``"alex"`` default, ``"vgg"``, ``"squeeze"``), ``lpips_weights`` (the backbone's
    torchvision checkpoint; default: torch's hub cache)."""
    net = str(context.options.get("lpips_net", "alex"))
    weights = context.options.get("lpips_weights")
    return _paired(LPIPS(net, str(weights) if weights else None).to(context.device), "lpips")
