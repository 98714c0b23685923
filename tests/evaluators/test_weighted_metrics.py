"""LPIPS, CLIP score and Inception FID through their real code paths, on tiny random-weight networks.

The numbers are meaningless (random weights); what is tested is that each metric loads its weights
the way it would load the real files — torchvision's backbone checkpoints, a ``save_pretrained`` CLIP
directory, torch-fidelity's InceptionV3 checkpoint — and computes what its definition says. Nothing
is downloaded: every file is written here.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import difftune
from difftune.evaluators import (
    LPIPS,
    CalibrationSet,
    EvalBatch,
    ImageRewardScore,
    MetricContext,
    Reference,
    ReferenceCache,
    build_metric,
    evaluate,
    image_reward_unavailable_reason,
    inception_fid_unavailable_reason,
    lpips_unavailable_reason,
)
from difftune.evaluators._inception import InceptionV3Features
from difftune.evaluators._lpips import BACKBONE_FILES, BACKBONE_URLS, backbone_features

NETS = ("alex", "vgg", "squeeze")


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models: thread hand-offs cost more than they save on the shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """A separable Gaussian blur of N×C×H×W images (reflect padding), per channel."""
    radius = math.ceil(3 * sigma)
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(x**2) / (2 * sigma**2))
    k = (k / k.sum()).to(images.dtype)
    c = images.shape[1]
    out = F.pad(images, (radius,) * 4, mode="reflect")
    out = F.conv2d(out, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(out, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def _images(n: int, size: int = 32, seed: int = 0, channels: int = 3) -> torch.Tensor:
    """Smooth random images in [0, 1]: blurred noise, so that a further blur changes them visibly but not wholly."""
    g = torch.Generator().manual_seed(seed)
    return gaussian_blur(torch.rand(n, channels, size, size, generator=g), 0.7).clamp(0, 1)


# ---- LPIPS ---------------------------------------------------------------------------------------

#: torchvision's checkpoints: parameter count and weight keys of each ``features`` stack (features.<i>.weight
#: and .bias for each convolution; SqueezeNet's Fire modules hold three convolutions each).
_TORCHVISION_FEATURES = {
    "alex": (2_469_696, [f"features.{i}" for i in (0, 3, 6, 8, 10)]),
    "vgg": (14_714_688, [f"features.{i}" for i in (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)]),
    "squeeze": (
        722_496,
        ["features.0"]
        + [f"features.{i}.{c}" for i in (3, 4, 6, 7, 9, 10, 11, 12) for c in ("squeeze", "expand1x1", "expand3x3")],
    ),
}


def _backbone_state(net: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A torchvision-style checkpoint of backbone ``net`` with random weights (and a classifier entry, which the
    real files have and LPIPS ignores)."""
    torch.manual_seed(seed)
    state = {f"features.{k}": v for k, v in backbone_features(net).state_dict().items()}
    state["classifier.1.weight"] = torch.zeros(2, 2)
    return state


@pytest.fixture(scope="module")
def backbone_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A random-weight checkpoint of each backbone, under torchvision's file name."""
    folder = tmp_path_factory.mktemp("torchvision-checkpoints")
    paths = {}
    for net in NETS:
        paths[net] = folder / BACKBONE_FILES[net]
        torch.save(_backbone_state(net), paths[net])
    return paths


def _lpips_metric(net: str, weights: Path) -> Any:
    return build_metric("lpips", MetricContext(family="sd", options={"lpips_net": net, "lpips_weights": str(weights)}))


@pytest.mark.parametrize("net", NETS)
def test_backbones_have_torchvisions_layout(net: str) -> None:
    count, convs = _TORCHVISION_FEATURES[net]
    state = {f"features.{k}": v for k, v in backbone_features(net).state_dict().items()}
    assert set(state) == {f"{c}.{p}" for c in convs for p in ("weight", "bias")}
    assert sum(v.numel() for v in state.values()) == count


@pytest.mark.parametrize("net", NETS)
def test_lpips_matches_torchmetrics_on_the_same_backbone(
    net: str, backbone_files: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """torchmetrics' own LPIPS module (its reference code, with torchmetrics' heads) on our backbone gives the
    same per-image distances as the ``lpips`` metric; torchvision is only needed to build that backbone, so it
    is handed ours."""
    import torchmetrics.functional.image.lpips as tm_lpips

    metric = LPIPS(net, backbone_files[net])
    monkeypatch.setattr(tm_lpips, "_get_tv_model_features", lambda name, pretrained=False: metric.net.features)
    reference = tm_lpips._LPIPS(pretrained=True, net=net).eval()  # type: ignore[arg-type]
    a, b = _images(3, 64, seed=1), _images(3, 64, seed=2)
    with torch.no_grad():
        expected = reference(a, b, normalize=True).flatten()
    metric.update(a, b)
    per_image = torch.stack([LPIPS(net, backbone_files[net])._per_image(a[i : i + 1], b[i : i + 1]) for i in range(3)])
    assert torch.allclose(per_image.flatten(), expected, rtol=1e-5, atol=1e-7)
    assert float(metric.compute()) == pytest.approx(float(expected.mean()), rel=1e-5)


@pytest.mark.parametrize("net", NETS)
def test_lpips_metric_zero_symmetric_and_larger_for_blur(net: str, backbone_files: dict[str, Path]) -> None:
    x = _images(2, seed=3)
    blurred = gaussian_blur(x, 1.5)

    def distance(a: torch.Tensor, b: torch.Tensor) -> float:
        bound = _lpips_metric(net, backbone_files[net])
        bound.update(EvalBatch(a, b, ["a photo of a cat"] * len(a)))
        return bound.compute()

    assert distance(x, x) == pytest.approx(0.0, abs=1e-6)
    forward, backward = distance(x, blurred), distance(blurred, x)
    assert math.isfinite(forward) and forward > 1e-4
    assert forward == pytest.approx(backward, rel=1e-5)
    assert distance(x, gaussian_blur(x, 3.0)) > forward


def test_lpips_takes_grey_and_small_images(backbone_files: dict[str, Path]) -> None:
    digits = _images(3, size=16, channels=1, seed=4)
    bound = _lpips_metric("squeeze", backbone_files["squeeze"])
    bound.update(EvalBatch(digits, gaussian_blur(digits, 1.0), [1, 2, 3]))
    assert bound.needs_reference and math.isfinite(bound.compute()) and bound.compute() > 0


def test_lpips_reads_torch_hub_cache_and_says_how_to_fetch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    cached = tmp_path / "checkpoints" / BACKBONE_FILES["alex"]
    reason = lpips_unavailable_reason("alex")
    assert reason is not None and str(cached) in reason and BACKBONE_URLS["alex"] in reason
    assert "never downloads" in reason and "lpips_weights" in reason
    with pytest.raises(difftune.EvaluationError, match="curl"):
        build_metric("lpips", MetricContext(family="sd"))
    cached.parent.mkdir()
    torch.save(_backbone_state("alex"), cached)
    assert lpips_unavailable_reason("alex") is None
    bound = build_metric("lpips", MetricContext(family="sd"))
    x = _images(1, seed=5)
    bound.update(EvalBatch(x, x, ["p"]))
    assert bound.compute() == pytest.approx(0.0, abs=1e-6)


def test_lpips_refuses_a_checkpoint_of_another_backbone(backbone_files: dict[str, Path]) -> None:
    with pytest.raises(difftune.EvaluationError, match="does not fit torchvision's vgg feature layout"):
        _lpips_metric("vgg", backbone_files["alex"])
    with pytest.raises(difftune.EvaluationError, match="unknown LPIPS net 'resnet'"):
        _lpips_metric("resnet", backbone_files["alex"])


# ---- CLIP score ----------------------------------------------------------------------------------

PROMPTS = ["a photo of a cat", "a painting of a dog"]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random CLIP model and processor (32×32 crops, the tiny pipelines' tokenizer), saved with
    ``save_pretrained`` as a real checkpoint directory is."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from tests.models.tiny_pipelines import CLIP_MAX_LENGTH, clip_tokenizer

    tokenizer = clip_tokenizer()
    tower = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
    config = CLIPConfig(
        text_config={
            **tower,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": CLIP_MAX_LENGTH,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={**tower, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    # A seed whose random towers give positive cosines for the test images and prompts: the score clamps
    # negative cosines to 0, and a 0 would hide whether the prompt changes anything.
    torch.manual_seed(4)
    model = CLIPModel(config).eval()
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    folder = tmp_path_factory.mktemp("tiny-clip")
    model.save_pretrained(folder)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def _clip_by_hand(folder: Path, images: torch.Tensor, prompts: list[str]) -> float:
    """torchmetrics' documented CLIP score from the model's own towers: mean over images of
    max(100 · cos(image embedding, text embedding), 0)."""
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(folder, local_files_only=True).eval()
    processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)
    pixels = processor(images=list((images * 255).round().to(torch.uint8)), return_tensors="pt")["pixel_values"]
    text = processor(text=prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        image_embeds = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        text_embeds = model.text_projection(
            model.text_model(input_ids=text["input_ids"], attention_mask=text["attention_mask"]).pooler_output
        )
    cosine = F.cosine_similarity(image_embeds, text_embeds, dim=-1)
    return float((100 * cosine).clamp(min=0).mean())


@pytest.mark.filterwarnings("ignore:The ``compute`` method of metric")
def test_clip_score_equals_the_hand_computed_score(tiny_clip: Path) -> None:
    images = _images(2, seed=6)
    bound = build_metric("clip_score", MetricContext(family="sd", options={"clip_model": str(tiny_clip)}))
    assert not bound.needs_reference
    bound.update(EvalBatch(images[:1], None, PROMPTS[:1]))
    bound.update(EvalBatch(images[1:], None, PROMPTS[1:]))  # accumulates over batches
    value = bound.compute()
    assert math.isfinite(value) and value > 0
    assert value == pytest.approx(_clip_by_hand(tiny_clip, images, PROMPTS), rel=1e-4, abs=1e-4)

    other = build_metric("clip_score", MetricContext(family="sd", options={"clip_model": str(tiny_clip)}))
    swapped = PROMPTS[::-1]
    other.update(EvalBatch(images, None, swapped))
    assert other.compute() == pytest.approx(_clip_by_hand(tiny_clip, images, swapped), rel=1e-4, abs=1e-4)
    assert other.compute() != pytest.approx(value, abs=1e-3)  # the prompt matters
    bound.reset()
    with pytest.raises(difftune.EvaluationError, match="no images"):
        bound.compute()


def test_clip_score_of_digits_and_long_prompts(tiny_clip: Path) -> None:
    bound = build_metric("clip_score", MetricContext(family="embedded", options={"clip_model": str(tiny_clip)}))
    bound.update(EvalBatch(_images(2, size=16, channels=1, seed=7), None, [3, 8]))  # grey digits, class labels
    bound.update(EvalBatch(_images(1, seed=8), None, ["a photo of a cat " * 40]))  # > 77 tokens: truncated
    assert math.isfinite(bound.compute())
    sd = build_metric("clip_score", MetricContext(family="sd", options={"clip_model": str(tiny_clip)}))
    with pytest.raises(difftune.EvaluationError, match="needs text prompts"):
        sd.update(EvalBatch(_images(1), None, [3]))


# ---- Inception FID -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight checkpoint with torch-fidelity's InceptionV3 keys. He-initialised convolutions: with
    PyTorch's default init the activations fade to nothing through the ~100 layers and every FID is ~0."""
    torch.manual_seed(0)
    network = InceptionV3Features()
    for module in network.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("inception") / "weights-inception-random.pth"
    torch.save(network.state_dict(), path)
    return path


def test_inception_has_torch_fidelitys_layout(inception_weights: Path) -> None:
    # torch-fidelity 0.4.0's FeatureExtractorInceptionV3: 566 state-dict entries, 23,885,486 numbers; the
    # features of all four layers were checked equal to its forward pass on the same random weights.
    state = torch.load(inception_weights, weights_only=True)
    assert len(state) == 566 and sum(v.numel() for v in state.values()) == 23_885_486
    assert {"Conv2d_1a_3x3.conv.weight", "Mixed_7c.branch_pool.bn.running_var", "fc.weight"} <= set(state)


def _fid(weights: Path, fake: torch.Tensor, real: torch.Tensor, **options: Any) -> float:
    bound = build_metric("fid", MetricContext(family="sd", options={"inception_weights": str(weights), **options}))
    assert bound.needs_reference
    bound.update(EvalBatch(fake, real, ["p"] * len(fake)))
    return bound.compute()


def test_inception_fid_2048_on_random_weights(inception_weights: Path) -> None:
    value = _fid(inception_weights, _images(2, seed=9), _images(2, seed=10) * 0.5)
    assert math.isfinite(value) and value > 0


def test_inception_fid_is_zero_for_identical_sets(inception_weights: Path) -> None:
    images, other = _images(3, seed=11), _images(3, seed=12) * 0.5 + 0.25
    same = _fid(inception_weights, images, images, inception_features=768)
    different = _fid(inception_weights, images, other, inception_features=768)
    assert math.isfinite(same) and math.isfinite(different)
    assert 0 <= same < 1e-3 < different
    grey = _fid(inception_weights, images[:, :1], other[:, :1], inception_features=64)  # grey: repeated to RGB
    assert math.isfinite(grey) and grey > 0


def test_inception_fid_without_weights_says_how_to_fetch(tmp_path: Path, backbone_files: dict[str, Path]) -> None:
    missing = tmp_path / "nowhere.pth"
    reason = inception_fid_unavailable_reason(missing)
    assert reason is not None and str(missing) in reason and "curl" in reason and "never downloads" in reason
    with pytest.raises(difftune.EvaluationError, match="inception_weights"):
        build_metric("fid", MetricContext(family="sd", options={"inception_weights": str(missing)}))
    with pytest.raises(difftune.EvaluationError, match="does not fit torch-fidelity's InceptionV3"):
        build_metric("fid", MetricContext(family="sd", options={"inception_weights": str(backbone_files["alex"])}))
    with pytest.raises(difftune.EvaluationError, match="num_features must be one of"):
        InceptionV3Features(1000)


# ---- all three through evaluate() ----------------------------------------------------------------


def test_evaluate_runs_lpips_clip_and_fid_on_a_tiny_sd_pipeline(
    tmp_path: Path, tiny_clip: Path, backbone_files: dict[str, Path], inception_weights: Path
) -> None:
    from tests.models.tiny_pipelines import build

    pipe, _ = build("sd")
    samples = list(CalibrationSet(prompts=PROMPTS, seeds=1))
    reference = Reference.from_pipeline(
        pipe, cache=ReferenceCache(tmp_path / "refs"), batch_size=2, num_inference_steps=2
    )
    options = {
        "clip_model": str(tiny_clip),
        "lpips_net": "squeeze",
        "lpips_weights": str(backbone_files["squeeze"]),
        "inception_weights": str(inception_weights),
        "inception_features": 64,
    }
    metrics = ["psnr", "lpips", "clip_score", "fid"]
    m = evaluate(pipe, samples, reference, metrics=metrics, options=options)
    assert list(m) == metrics and all(v is not None and math.isfinite(v) for v in m.values())
    # The trial is the reference setting itself: no perceptual or distribution distance.
    assert m["psnr"] >= 60 and m["lpips"] == pytest.approx(0.0, abs=1e-6) and m["fid"] == pytest.approx(0, abs=1e-3)
    assert m["clip_score"] >= 0


# ---- ImageReward ---------------------------------------------------------------------------------


def test_image_reward_without_package_or_weights_names_what_is_missing(tmp_path: Path) -> None:
    options = {"image_reward_model": str(tmp_path)}  # an empty folder: the weights are missing whatever is installed
    with pytest.raises(difftune.EvaluationError) as info:
        build_metric("image_reward", MetricContext(family="sd", options=options))
    message = str(info.value)
    assert "THUDM/ImageReward" in message and "hf download THUDM/ImageReward" in message
    assert "never downloads" in message and "ImageReward.pt" in message
    import importlib.util

    if importlib.util.find_spec("ImageReward") is None:
        assert "pip install image-reward" in message
    assert image_reward_unavailable_reason(str(tmp_path)) == message
    assert difftune.evaluators.metric_spec("image_reward").direction == "maximize"


class _FakeReward:
    """ImageReward's ``score(prompt, pil_images)`` contract: a float for one image, a list for several."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[tuple[int, int]]]] = []

    def score(self, prompt: str, images: list[Any]) -> float | list[float]:
        self.calls.append((prompt, [image.size for image in images]))
        values = [len(prompt) + image.getpixel((0, 0))[0] / 255 for image in images]
        return values[0] if len(values) == 1 else values


def test_image_reward_score_feeds_pil_images_per_prompt() -> None:
    fake = _FakeReward()
    metric = ImageRewardScore(fake)
    images = torch.zeros(3, 1, 16, 16)
    images[1] = 1.0
    metric.update(images, ["ab", "abcd", "ab"])
    assert sorted(fake.calls) == [("ab", [(16, 16), (16, 16)]), ("abcd", [(16, 16)])]
    assert float(metric.compute()) == pytest.approx((2 + 5 + 2) / 3)
