"""A database for the dashboard's tests, written with the store's API alone (no pipeline runs: fast).

- ``embedded-cache`` (the study ``difftune calibrate`` makes by default), finished: the cache space's
  baselines (identity, FORA 2/3/4 as masks, FirstBlockCache 0.05/0.1/0.2 as policies), searched
  masks, a retry and a failed trial, figures like the embedded model's at 20 steps, thumbnails and
  reference images. Its front is :data:`CACHE_FRONT`.
- ``dit-joint``, running, on a second model: a solver schedule with DC ratios and a cache mask, a
  hand-made seed, SADA, per-layer bits, a policy with held-out figures, and a running trial.
"""

from __future__ import annotations

import io
import random
from typing import Any

from difftune.store import Store

CACHE_STUDY = "embedded-cache"
JOINT_STUDY = "dit-joint"
OBJECTIVES = (("speedup", "maximize"), ("psnr", "maximize"), ("class_accuracy", "maximize"))
STEPS = 20
BLOCKS = 6
COMPONENTS = ("attn1", "ff")

# (number, kind, name, reused fraction or policy threshold, speedup, psnr, class accuracy)
CACHE_TRIALS: tuple[tuple[int, str, str, float, float, float, float], ...] = (
    (0, "baseline", "identity", 0.0, 1.0, 100.0, 1.0),
    (1, "baseline", "fora_2", 0.5, 1.35, 43.5, 1.0),
    (2, "baseline", "fora_3", 0.65, 1.62, 33.1, 1.0),
    (3, "baseline", "fora_4", 0.75, 1.83, 27.4, 0.95),
    (4, "baseline", "first_block_cache_0.05", 0.05, 1.04, 58.0, 1.0),
    (5, "baseline", "first_block_cache_0.1", 0.1, 1.12, 47.2, 1.0),
    (6, "baseline", "first_block_cache_0.2", 0.2, 1.27, 36.0, 1.0),
    (7, "searched", "", 0.22, 1.21, 51.2, 1.0),
    (8, "searched", "", 0.4, 1.31, 38.0, 1.0),  # dominated by fora_2
    (9, "searched", "", 0.55, 1.48, 41.3, 1.0),
    (10, "searched", "", 0.6, 1.55, 30.2, 0.95),  # dominated by trial 9
    (11, "searched", "", 0.68, 1.71, 35.4, 1.0),
    (12, "searched", "", 0.8, 2.05, 29.6, 1.0),
    (13, "searched", "", 0.85, 2.31, 24.8, 0.95),
    (14, "searched", "", 0.3, 1.18, 44.0, 1.0),  # dominated by trial 7
    (15, "searched", "", 0.9, 2.52, 19.5, 0.85),
    (16, "searched", "", 0.45, 1.4, 39.9, 1.0),  # dominated by trial 9
    (18, "retry", "", 0.58, 1.58, 38.7, 1.0),
    (19, "searched", "", 0.7, 1.93, 31.8, 1.0),
)
#: Trial numbers on embedded-cache's front (speedup ↑, PSNR ↑, class accuracy ↑), fastest first.
CACHE_FRONT = (15, 13, 12, 19, 11, 18, 9, 1, 7, 4, 0)
FAILED_TRIAL = 17


def png(value: int, size: int = 16) -> bytes:
    """A small grey PNG with a lighter disc, like a thumbnail."""
    from PIL import Image, ImageDraw

    image = Image.new("L", (size, size), color=value // 3)
    ImageDraw.Draw(image).ellipse((3, 3, size - 4, size - 4), fill=value)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def settings(**extra: Any) -> dict[str, Any]:
    """What ``calibrate`` stores as a study's settings (the embedded model on the CPU)."""
    return {
        "model": "embedded",
        "device": "cpu",
        "dtype": "float32",
        "num_inference_steps": STEPS,
        "samples": 20,
        "constraints": [],
        "metrics": ["speedup", "psnr", "class_accuracy", "latency_ms", "nfe", "speedup_spread"],
        **extra,
    }


def mask(reused: float, seed: int, steps: int = STEPS) -> dict[str, Any]:
    """A cache mask section reusing about ``reused`` of the block components (never at step 0)."""
    rng = random.Random(seed)
    grid = [
        [[1 if s == 0 or rng.random() >= reused else 0 for _ in COMPONENTS] for _ in range(BLOCKS)]
        for s in range(steps)
    ]
    return {"kind": "mask", "components": list(COMPONENTS), "mask": grid}


def profile(name: str, steps: int = STEPS, **sections: Any) -> dict[str, Any]:
    """A profile's JSON, as the runner stores it in ``trial.config["profile"]``."""
    return {
        "schema_version": 1,
        "name": name,
        "model": {"name": "embedded", "family": "embedded", "fingerprint": "sha256:seed"},
        "context": {"num_inference_steps": steps, "guidance_scale": None, "height": None, "width": None},
        "solver": sections.get("solver"),
        "cache": sections.get("cache"),
        "sparsity": sections.get("sparsity"),
        "quantization": sections.get("quantization"),
        "metrics": {},
        "provenance": {"study": "seed"},
    }


def _cache_section(name: str, reused: float, number: int) -> dict[str, Any]:
    if name.startswith("first_block_cache_"):
        return {"kind": "policy", "policy": "first_block_cache", "threshold": float(name.rsplit("_", 1)[1])}
    return mask(reused, seed=number)


def _complete(
    store: Store, study: int, number: int, kind: str, config: dict[str, Any], metrics: dict[str, float]
) -> int:
    trial = store.add_trial(study, {"n": number}, number=number, config=config, kind=kind)
    store.set_trial_state(trial.id, "complete", metrics=metrics)
    return trial.id


def seed(url: str) -> None:
    """Write the two studies into the (new) database at ``url``."""
    with Store(url) as store:
        model = store.create_model("embedded", "embedded", "sha256:seed")
        study = store.create_study(
            CACHE_STUDY,
            model_id=model.id,
            space="cache",
            searcher="nsga2",
            objectives=OBJECTIVES,
            reference=settings(),
            optuna_study_name=f"difftune:{CACHE_STUDY}",
        )
        store.set_study_budget(study.id, 20)
        for number, kind, name, reused, speedup, psnr, accuracy in CACHE_TRIALS:
            config: dict[str, Any] = {
                "profile": profile(name or f"trial {number}", cache=_cache_section(name, reused, number))
            }
            if kind == "baseline":
                config["baseline"] = name
            elif kind == "retry":
                config["retry_of"] = FAILED_TRIAL
            metrics = {
                "speedup": speedup,
                "speedup_spread": 0.01,
                "psnr": psnr,
                "class_accuracy": accuracy,
                "latency_ms": 460.0 / speedup,
                "nfe": float(STEPS),
            }
            trial_id = _complete(store, study.id, number, kind, config, metrics)
            store.add_images(trial_id, [png(90 + 7 * number), png(250 - 6 * number)])
        failed = store.add_trial(
            study.id, {"n": FAILED_TRIAL}, number=FAILED_TRIAL, config={"profile": profile("t", cache=mask(0.6, 17))}
        )
        store.set_trial_state(failed.id, "interrupted", error="worker vm:1234 is no longer running")
        store.add_reference_images(study.id, [png(90), png(250)])
        store.record_front(study.id, [t.id for t in store.pareto_front(study.id)])
        store.set_study_status(study.id, "finished")

        other = store.create_model("facebook/DiT-XL-2-256", "dit", "sha256:dit")
        joint = store.create_study(
            JOINT_STUDY,
            model_id=other.id,
            space="joint",
            searcher="tpe",
            objectives=OBJECTIVES,
            reference=settings(model="facebook/DiT-XL-2-256", device="cuda", dtype="float16", num_inference_steps=50),
        )
        store.set_study_budget(joint.id, 10)
        solver = {
            "kind": "usf",
            "timesteps": [999.0, 749.0, 499.0, 249.0],
            "steps": [
                {"order": 1, "prediction": "data", "corrector": True, "dc_ratio": 1.0},
                {"order": 2, "prediction": "data", "corrector": True, "dc_ratio": 1.05},
                {"order": 3, "prediction": "noise", "corrector": False, "dc_ratio": 0.97},
                {"order": 1, "prediction": "data", "corrector": False, "dc_ratio": 1.15},
            ],
        }
        sada = {
            "kind": "sada",
            "threshold": 0.0,
            "acc_range": [10, 47],
            "max_interval": 4,
            "lagrange_term": 4,
            "lagrange_step": 24,
            "lagrange_int": 4,
            "sx": 3,
            "sy": 3,
            "max_downsample": 1,
            "max_fix": 5120,
        }
        quant = {
            "kind": "bits",
            "backend": "simulated",
            "default": {"weight_bits": 8, "activation_bits": 16},
            "layers": {"transformer_blocks.0.ff": {"weight_bits": 4}, "proj_out": {"weight_bits": 16}},
        }
        points = (  # kind, profile, speedup, psnr
            ("baseline", profile("unipc_nfe4", steps=4, solver=solver, cache=mask(0.25, 1, steps=4)), 9.1, 31.0),
            ("seed", profile("sada_default", steps=50, sparsity=sada), 1.9, 40.5),
            ("searched", profile("w8", steps=50, quantization=quant), 1.1, 38.0),
            (
                "searched",
                profile("fbc", steps=50, cache={"kind": "policy", "policy": "fora", "interval": 3}),
                2.6,
                33.5,
            ),
        )
        for number, (kind, section, speedup, psnr) in enumerate(points):
            config = {"profile": section, **({"baseline": section["name"]} if kind == "baseline" else {})}
            if kind == "seed":
                config["seed"] = section["name"]
            metrics = {"speedup": speedup, "psnr": psnr, "class_accuracy": 1.0, "nfe": 4.0, "latency_ms": 900 / speedup}
            last = _complete(store, joint.id, number, kind, config, metrics)
        store.record_metrics(last, {"psnr": 32.0, "speedup": 2.5}, split="held_out")
        store.add_trial(joint.id, {"n": 4}, number=4)  # running
