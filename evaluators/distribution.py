"""Distribution metrics: FID in a feature space, against real images.

For the embedded model the feature space is the committed digit classifier's penultimate layer
(:meth:`DigitClassifier.features`, 64-d): torchmetrics' :class:`FrechetInceptionDistance` takes it as a
custom ``feature`` module, and the real statistics come from the real digits
(``load_split("all")``), computed once per classifier and cached for the process.

Why a distribution metric at all: PSNR/SSIM/MSE against a reference reward the average of plausible
outputs, so a search that optimizes only them drifts to blurry posterior means — an image that is
the mean of many digits is closer in L2 to each of them than any other sharp digit is. FID compares
feature *statistics* (mean and covariance) with real images: blur shrinks the covariance and moves
the mean, so it scores badly (``tests/evaluators/test_distribution.py`` shows a Gaussian-blurred set
with a much higher PSNR than real samples but a ~15× worse FID).

FID is biased upwards at small sample counts — real digits against the real statistics score ≈ 3
with 719 images, 11–13 with 300 and 35–60 with 100 — so compare values only at equal sample counts
(within one rung), and read them against the real-data floor at that count.

Other families use the standard InceptionV3 FID (:class:`InceptionFID`: torchmetrics' FID on difftune's
plain-torch copy of torch-fidelity's network, so neither torch-fidelity nor torchvision is needed, only
torch-fidelity's weights file in torch's hub cache or at ``options={"inception_weights": PATH}``), with
the reference setting's images as the "real" distribution — the FID-to-reference that caching papers
report.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

from difftune.errors import EvaluationError

from ._embedded import committed_classifier
from ._inception import INCEPTION_WEIGHTS_URL, load_inception
from .metrics import BoundMetric, EvalBatch, MetricContext, register_metric_factory

__all__ = [
    "INCEPTION_WEIGHTS_FILE",
    "ClassifierFID",
    "ClassifierFeatures",
    "FeatureStatistics",
    "InceptionFID",
    "default_inception_weights",
    "feature_statistics",
    "inception_fid_unavailable_reason",
    "real_digit_statistics",
]


class ClassifierFeatures(nn.Module):
    """The digit classifier's 64-d penultimate features of images in [0, 1] (the pipeline's ``"pt"`` output).

    ``num_features`` tells torchmetrics the dimension without a probe image. The module stays in eval mode.
    """

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier.eval()
        dim = getattr(getattr(classifier, "config", None), "feature_dim", None)
        if dim is None:
            raise EvaluationError("the FID feature network must be a DigitClassifier (it reads config.feature_dim)")
        self.num_features = int(dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # The classifier is shared per process (see committed_classifier) and may have been moved to another
        # device by another metric: the images follow it, the features come back on the images' device.
        weight = next(self.classifier.parameters())
        with torch.no_grad():
            out = self.classifier.features(images.to(device=weight.device, dtype=weight.dtype) * 2 - 1)  # type: ignore[operator]
        return out.to(images.device)

    def train(self, mode: bool = True) -> ClassifierFeatures:
        # torchmetrics may call .train() on the metric; the feature net must never leave eval mode.
        return super().train(False)


@dataclass(frozen=True)
class FeatureStatistics:
    """Sufficient statistics of a feature set, in torchmetrics FID's state layout (float64)."""

    feature_sum: torch.Tensor
    cov_sum: torch.Tensor
    num_samples: int


def feature_statistics(features: nn.Module, images: torch.Tensor, batch_size: int = 512) -> FeatureStatistics:
    """Sum and outer-product sum of ``features(images)``, batched; on the CPU (cached across devices)."""
    total: torch.Tensor | None = None
    outer: torch.Tensor | None = None
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            f = features(images[start : start + batch_size]).double().cpu()
            s, o = f.sum(0), f.t().mm(f)
            total, outer = (s, o) if total is None or outer is None else (total + s, outer + o)
    if total is None or outer is None:
        raise EvaluationError("fid: no real images to compute statistics from")
    return FeatureStatistics(total, outer, len(images))


_REAL_STATS: dict[tuple[str, str], FeatureStatistics] = {}


def real_digit_statistics(features: ClassifierFeatures, split: str = "all") -> FeatureStatistics:
    """Feature statistics of the real digits of ``split``, computed once per (classifier weights, split)."""
    from difftune.models import fingerprint
    from difftune.models.embedded.data import load_split

    key = (fingerprint(features.classifier), split)
    stats = _REAL_STATS.get(key)
    if stats is None:
        try:
            images, _ = load_split(split)
        except ValueError as exc:
            raise EvaluationError(f"fid: {exc}") from exc
        stats = feature_statistics(features, (images + 1) / 2)
        _REAL_STATS[key] = stats
    return stats


class ClassifierFID(FrechetInceptionDistance):
    """FID in the digit classifier's feature space, against real digits.

    Args:
        classifier: the feature network (default: the committed classifier).
        real: ``"all"`` (default), ``"generator"`` or ``"classifier"`` — a split of the real digits,
            whose statistics are cached — or a tensor of real images in [0, 1].

    ``update(images)`` adds generated images (N×1×16×16 in [0, 1]); the real statistics survive
    ``reset()``. ``compute()`` is clamped at 0 (round-off can make a tiny FID negative).

    Example::

        >>> from difftune.models.embedded.data import load_split
        >>> fid = ClassifierFID(real="generator")
        >>> fid.update((load_split("classifier")[0] + 1) / 2)
        >>> float(fid.compute()) < 20
        True
    """

    def __init__(self, classifier: nn.Module | None = None, *, real: str | torch.Tensor = "all", **kwargs: Any) -> None:
        features = ClassifierFeatures(classifier if classifier is not None else committed_classifier())
        super().__init__(feature=features, reset_real_features=False, normalize=True, **kwargs)
        if isinstance(real, torch.Tensor):
            stats = feature_statistics(features, real)
        else:
            stats = real_digit_statistics(features, real)
        self.real_features_sum = stats.feature_sum.clone()
        self.real_features_cov_sum = stats.cov_sum.clone()
        self.real_features_num_samples = torch.tensor(stats.num_samples, dtype=torch.long)

    def update(self, imgs: torch.Tensor, real: bool = False) -> None:
        """Add generated images (``real=False``, the default) or more real ones."""
        super().update(imgs, real=real)

    def compute(self) -> torch.Tensor:
        if int(self.fake_features_num_samples) < 2:
            raise EvaluationError("fid needs at least 2 generated images")
        return super().compute().clamp(min=0)


# ---- InceptionV3 FID for other families ----------------------------------------------------------

#: torch-fidelity's InceptionV3 checkpoint, looked up in ``torch.hub.get_dir()/checkpoints``.
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"


def default_inception_weights() -> Path:
    """Where torch-fidelity keeps its InceptionV3 checkpoint: ``torch.hub.get_dir()/checkpoints/<file>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE


def inception_fid_unavailable_reason(weights: str | Path | None = None) -> str | None:
    """None when InceptionV3 FID can run without downloading, else what is missing and how to get it.

    Only the weights file is needed: the network is difftune's own copy of torch-fidelity's
    (:mod:`~difftune.evaluators._inception`), so neither torch-fidelity nor torchvision is.
    """
    path = Path(weights) if weights else default_inception_weights()
    if not path.is_file():
        return (
            f"fid on this model family uses InceptionV3 features and needs torch-fidelity's InceptionV3 weights "
            f"{INCEPTION_WEIGHTS_FILE} at {path} (difftune never downloads at run time); fetch the file once on a "
            f"machine with internet: curl -L -o {INCEPTION_WEIGHTS_FILE} {INCEPTION_WEIGHTS_URL} , then copy it to "
            f"{default_inception_weights()} or pass options={{'inception_weights': PATH}}"
        )
    return None


class InceptionFID(FrechetInceptionDistance):
    """FID in torch-fidelity's InceptionV3 feature space (the standard FID network), without torch-fidelity.

    Args:
        weights: torch-fidelity's checkpoint (default :func:`default_inception_weights`); never downloaded.
        num_features: the feature layer, 64 / 192 / 768 / 2048 (default: 2048, the standard FID).

    ``update(images, real=…)`` takes N×3×H×W images in [0, 1] (or uint8). ``compute()`` is clamped at 0
    (round-off can make a tiny FID negative) and needs at least 2 images of each side.
    """

    def __init__(self, weights: str | Path | None = None, num_features: int = 2048, **kwargs: Any) -> None:
        reason = inception_fid_unavailable_reason(weights)
        if reason is not None:
            raise EvaluationError(reason)
        network = load_inception(Path(weights) if weights else default_inception_weights(), num_features)
        super().__init__(feature=network, normalize=True, **kwargs)

    def compute(self) -> torch.Tensor:
        if int(self.real_features_num_samples) < 2 or int(self.fake_features_num_samples) < 2:
            raise EvaluationError("fid needs at least 2 images and 2 reference images")
        return super().compute().clamp(min=0)


@register_metric_factory("fid")
def _build_fid(context: MetricContext) -> BoundMetric:
    """Embedded: :class:`ClassifierFID` (options ``classifier_path``, ``fid_real`` split). Others:
    :class:`InceptionFID` to the reference images (options ``inception_weights``, ``inception_features``)."""
    if context.family == "embedded":
        path = context.options.get("classifier_path")
        classifier = committed_classifier(str(path) if path else None)
        fid = ClassifierFID(classifier, real=str(context.options.get("fid_real", "all"))).to(context.device)

        def feed_fake(batch: EvalBatch) -> None:
            fid.update(batch.images)

        return BoundMetric(fid, feed_fake, needs_reference=False)

    weights = context.options.get("inception_weights")
    dims = int(context.options.get("inception_features", 2048))
    metric = InceptionFID(str(weights) if weights else None, dims).to(context.device)

    def feed(batch: EvalBatch) -> None:
        images, reference = _rgb(batch.images), _rgb(batch.require_reference("fid"))
        metric.update(reference, real=True)
        metric.update(images, real=False)

    return BoundMetric(metric, feed, needs_reference=True)


def _rgb(images: torch.Tensor) -> torch.Tensor:
    return images.float().expand(-1, 3, -1, -1) if images.shape[1] == 1 else images.float()
