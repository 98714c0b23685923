"""The short GPU check: calibrate → export → apply on a CUDA device, and the figures it measured.

Run it whenever a GPU is at hand (≤ 5 minutes on one GPU) and paste its output into your note::

    python scripts/gpu_check.py                 # cuda; embedded model (float32) + a tiny random SD (float16)
    python scripts/gpu_check.py --device cpu    # the same path on the CPU (what the tests run)

For each model it runs a cache study (``run_study``: baselines first, CUDA-event timing after a
warm-up, peak memory per trial), exports the fastest point that keeps PSNR ≥ --psnr on held-out
seeds (``export_point``), applies the exported profile to a freshly loaded pipeline and times it
against the plain pipeline (alternating, CUDA events), and checks that ``handle.remove()`` restores
the output bit for bit. It ends with one JSON line of every figure (``--json`` writes it to a file).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _tiny_sd(folder: Path) -> Path:
    """A tiny random Stable Diffusion pipeline written with save_pretrained (the tests' builder)."""
    sys.path.insert(0, str(ROOT))
    from tests.models import tiny_pipelines

    pipe, _ = tiny_pipelines.build("sd")
    pipe.save_pretrained(folder)
    return folder


def check_model(
    name: str,
    model: str,
    *,
    device: str,
    dtype: str | None,
    budget: int,
    samples: int,
    steps: int,
    psnr: float,
    storage: str,
    extra: dict[str, Any],
) -> dict[str, Any]:
    import torch

    import difftune
    from difftune.evaluators import measure_ab
    from difftune.search.export import export_point
    from difftune.search.runner import run_study

    started = time.perf_counter()
    result = run_study(
        model,
        "cache",
        budget=budget,
        study=name,
        storage=storage,
        device=device,
        dtype=dtype,
        samples=samples,
        num_inference_steps=steps,
        **extra,
    )
    study_s = time.perf_counter() - started
    front = [
        {
            "trial": t.number,
            "baseline": (t.config or {}).get("baseline"),
            **{
                k: round(v, 4)
                for k, v in t.values().items()
                if k in ("speedup", "psnr", "sharpness", "class_accuracy", "latency_ms", "peak_memory_mb", "nfe")
            },
        }
        for t in result.front
    ]
    out = Path(tempfile.mkdtemp(prefix=f"gpu-check-{name}-")) / "profile.json"
    started = time.perf_counter()
    try:
        exported = export_point(storage, name, f"fastest where psnr>={psnr:g}", out)
    except difftune.DifftuneError:
        exported = export_point(storage, name, "best psnr", out)
    export_s = time.perf_counter() - started

    # Fresh pipelines, as a serving stack would load them: one plain, one with the profile, timed alternately.
    def load() -> Any:
        pipe = difftune.load_pipeline(model, device=device, torch_dtype=getattr(torch, dtype) if dtype else None)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    plain_pipe, tuned_pipe = load(), load()
    profile = difftune.load_profile(out)
    settings = exported.study.reference or {}
    call: dict[str, Any] = {"num_inference_steps": profile.context.num_inference_steps, "output_type": "pt"}
    if settings.get("height"):
        call.update(height=settings["height"], width=settings["width"])
    call.update(settings.get("call_args") or {})
    condition = {"class_labels": [3] * 4} if name.startswith("embedded") else {"prompt": ["a photo of a cat"] * 4}

    def runner(pipe: Any) -> Any:
        return lambda: pipe(generator=[torch.Generator().manual_seed(k) for k in range(4)], **condition, **call).images

    before = runner(tuned_pipe)()
    handle = difftune.apply_profile(tuned_pipe, profile)
    tuned_images = runner(tuned_pipe)()
    ab = measure_ab(runner(plain_pipe), runner(tuned_pipe), warmup=2, repeats=7, device=device)
    handle.remove()
    restored = bool(torch.equal(runner(tuned_pipe)(), before))
    return {
        "model": name,
        "device": device,
        "device_name": torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else "cpu",
        "dtype": dtype or "float32",
        "study_s": round(study_s, 1),
        "trials": result.finished,
        "failed": result.failed,
        "front": front,
        "exported": {
            "trial": exported.trial.number,
            "select": exported.profile.provenance.get("select"),
            "held_out": {k: round(v, 4) for k, v in exported.held_out.items()},
        },
        "export_s": round(export_s, 1),
        "apply": {
            "plain_ms": round(ab.a.median_ms, 3),
            "profiled_ms": round(ab.b.median_ms, 3),
            "speedup": round(ab.speedup, 3),
            "finite": bool(torch.isfinite(tuned_images).all()),
            "restored_bit_for_bit": restored,
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu to try the path here (default cuda)")
    parser.add_argument("--budget", type=int, default=8, help="trials per study (default 8: the cache baselines)")
    parser.add_argument("--samples", type=int, default=8, help="calibration and held-out samples (default 8)")
    parser.add_argument("--steps", type=int, default=20, help="num_inference_steps of the reference (default 20)")
    parser.add_argument("--psnr", type=float, default=30.0, help="export: fastest point with held-out PSNR ≥ this")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)

    import torch

    from difftune.search.settings import resolve_device

    device = resolve_device(args.device)
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, device {device}", flush=True)
    if device.startswith("cuda"):
        print(f"GPU: {torch.cuda.get_device_name(torch.device(device))}", flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="difftune-gpu-check-") as tmp:
        storage = f"sqlite:///{Path(tmp) / 'gpu_check.db'}"
        sd = _tiny_sd(Path(tmp) / "tiny-sd")
        models = [
            ("embedded", "embedded", None, {}),
            # float16 on a GPU (the serving dtype); the CPU keeps float32
            (
                "tiny-sd",
                str(sd),
                "float16" if device.startswith("cuda") else None,
                {"prompts": ["a photo of a cat", "a painting of a dog"], "height": 32, "width": 32},
            ),
        ]
        for name, model, dtype, extra in models:
            started = time.perf_counter()
            figures = check_model(
                name,
                model,
                device=device,
                dtype=dtype,
                budget=args.budget,
                samples=args.samples,
                steps=args.steps,
                psnr=args.psnr,
                storage=storage,
                extra=extra,
            )
            figures["total_s"] = round(time.perf_counter() - started, 1)
            results.append(figures)
            print(json.dumps(figures, indent=1), flush=True)
    line = json.dumps({"gpu_check": results})
    print(line)
    if args.json is not None:
        args.json.write_text(line + "\n", encoding="utf-8")
    ok = all(r["apply"]["finite"] and r["apply"]["restored_bit_for_bit"] and not r["failed"] for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
