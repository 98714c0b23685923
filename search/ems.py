"""DPM-Solver-v3's empirical model statistics (EMS), computed on a model's own trajectories and cached.

The statistics are what DPM-Solver-v3 (Zheng et al., NeurIPS 2023, Appendix C.1.1) needs of a model —
per element of a sample, on a λ-uniform grid from the noisiest trained point to the cleanest:

- ``l_λ = E[diag(σ·∇ₓε̂)]``: the minimiser of E‖σ·∇ₓε̂ − diag(l)‖²_F, estimated with Hutchinson's
  trick, E_v[v ⊙ (J·v)] for Rademacher v, the Jacobian-vector product J·v by a central difference
  of the guided model output (ε̂(x + δv) − ε̂(x − δv)) / 2δ — two extra denoiser calls per grid
  point and probe, no autograd (any pipeline's denoiser works);
- ``s_λ, b_λ``: the least-squares fit f′ ≈ s·f + b over samples of f = (σ·ε̂ − l·x)/α and its total
  λ-derivative along the trajectory (f′ by second-order finite differences along each sample's
  trajectory on the fine grid).

The trajectories are the model's own: the pipeline runs from each sample's noise with
DPM-Solver++(2M) evaluating at every grid point (so the statistics are those of the model's marginals,
with the call's guidance: statistics depend on the guidance scale). Second moments are accumulated
per batch, so memory stays at a few arrays of (grid points × sample size) whatever the number of
samples. ``l = 1, s = b = 0`` would be DPM-Solver++; a model whose statistics differ from those gains.

Results are cached as safetensors under ``<difftune cache>/ems/<fingerprint>/``, keyed by the model
fingerprint, scheduler config, call, samples and settings::

    >>> import difftune
    >>> from difftune.search.ems import compute_ems
    >>> pipe = difftune.load_pipeline("embedded")
    >>> samples = difftune.evaluators.CalibrationSet.for_pipeline(pipe)[:64]
    >>> ems = compute_ems(pipe, samples)          # l, s, b on 121 λ points, per pixel
    >>> ems.table(lambdas)                        # what a schedule with points at λ needs (solver.ems)
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from difftune.accel._ems import EMS
from difftune.accel._hooks import CompositeHandle, wrap_forward
from difftune.accel.solver import SolverSchedule, USFScheduler, _default_steps
from difftune.errors import EvaluationError, SpaceError
from difftune.search._common import jsonable, positive_int, safe_name

__all__ = ["DEFAULT_GRID_STEPS", "DEFAULT_SAMPLES", "FORMAT", "compute_ems", "default_ems_dir", "ems_samples"]

FORMAT = "difftune-ems/1"
#: Intervals of the λ grid (the reference's statistics use a few hundred; 120 keeps a grid cell at ~0.08 in λ).
DEFAULT_GRID_STEPS = 120
#: Trajectories the statistics average over (the reference: 1024 for Stable Diffusion, 4096 for CIFAR-10).
DEFAULT_SAMPLES = 64
#: Relative step of the Jacobian-vector product's central difference.
DEFAULT_DELTA = 5e-3
_SEED0 = 700_000  # seeds of the statistics' samples: apart from calibration (0…) and held-out (900 000…) ones
_MOMENTS = ("u", "w", "du", "dw", "uu", "uw", "ww", "duu", "duw", "dwu", "dww")


def default_ems_dir() -> Path:
    """``<difftune cache>/ems``, beside the reference images."""
    from difftune.evaluators import default_cache_dir

    return default_cache_dir().parent / "ems"


def ems_samples(samples: Sequence[Any], count: int = DEFAULT_SAMPLES) -> list[Any]:
    """``count`` samples cycling through the conditions of ``samples`` with seeds of their own."""
    from difftune.evaluators import Sample

    pool = list(samples)
    if not pool:
        raise SpaceError("ems: expected at least one sample to take conditions from, got none")
    return [Sample(pool[i % len(pool)].condition, _SEED0 + i) for i in range(positive_int("count", count))]


class _Recorder(USFScheduler):
    """DPM-Solver++(2M) on the statistics grid that records, at every evaluation, the moments of u = σε̂/α,
    w = x/α and the Hutchinson products σ·v⊙(J·v) through a model function of the current denoiser call."""

    def _reset_state(self) -> None:
        super()._reset_state()
        self.on_step: Callable[[int, torch.Tensor, torch.Tensor], None] | None = getattr(self, "on_step", None)

    def step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if self._step_index is None:
            self._init_step_index(timestep)
        i = self._step_index
        assert i is not None
        if self.on_step is not None:
            self.on_step(i, model_output, sample)
        return super().step(model_output, timestep, sample, *args, **kwargs)


class _Accumulator:
    def __init__(self, scheduler: _Recorder, model: Any, probes: int, delta: float, seed: int) -> None:
        self.scheduler = scheduler
        self.model = model
        self.probes = probes
        self.delta = delta
        self.generator = torch.Generator().manual_seed(seed)
        self.n = 0
        self.sums: dict[str, np.ndarray] = {}
        self.hutchinson: np.ndarray | None = None
        self.count = 0  # samples × probes in the Hutchinson sums
        self._u: list[np.ndarray] = []
        self._w: list[np.ndarray] = []
        self.x0_sum: np.ndarray | None = None

    def on_step(self, i: int, model_output: torch.Tensor, sample: torch.Tensor) -> None:
        s = self.scheduler
        a, sig = float(s._alpha[i]), float(s._sig[i])
        x = sample.detach().double()
        _, eps = s._convert(model_output.detach().double(), x, i)
        self._u.append((sig / a * eps).cpu().numpy())
        self._w.append((x / a).cpu().numpy())
        if i == 0:
            self.model.identify(sample, model_output)
        products = []
        scale = self.delta * max(float(x.abs().mean()), 1e-3)
        for _ in range(self.probes):
            v = torch.randint(0, 2, tuple(x.shape), generator=self.generator).to(x) * 2 - 1
            plus = s._convert(self.model((x + scale * v).to(sample.dtype)).double(), x + scale * v, i)[1]
            minus = s._convert(self.model((x - scale * v).to(sample.dtype)).double(), x - scale * v, i)[1]
            products.append((sig * v * (plus - minus) / (2 * scale)).cpu().numpy())
        row = np.sum(np.stack(products), axis=(0, 1))
        if self.hutchinson is None:
            self.hutchinson = np.zeros((len(s._t), *row.shape))
        self.hutchinson[i] += row
        if i == 0:
            self.count += len(products) * products[0].shape[0]

    def finish_batch(self, lambdas: np.ndarray) -> None:
        """Turn one batch's trajectories into moment sums (f′ by finite differences along each trajectory)."""
        if len(self._u) != len(lambdas):
            raise EvaluationError(
                f"ems: the pipeline stepped {len(self._u)} times on a {len(lambdas)}-point grid; it must call its "
                "scheduler once per step"
            )
        u, w = np.stack(self._u), np.stack(self._w)  # (points, batch, *shape)
        self._u, self._w = [], []
        # x̂₀ = (x − σε̂)/α = w − u at the cleanest point: USF's average_x0 is their mean
        x0 = (w[-1] - u[-1]).sum(axis=0)
        self.x0_sum = x0 if self.x0_sum is None else self.x0_sum + x0
        du = np.gradient(u, lambdas, axis=0, edge_order=2)
        dw = np.gradient(w, lambdas, axis=0, edge_order=2)
        terms = {
            "u": u,
            "w": w,
            "du": du,
            "dw": dw,
            "uu": u * u,
            "uw": u * w,
            "ww": w * w,
            "duu": du * u,
            "duw": du * w,
            "dwu": dw * u,
            "dww": dw * w,
        }
        for name in _MOMENTS:
            total = terms[name].sum(axis=1)
            self.sums[name] = self.sums[name] + total if name in self.sums else total
        self.n += u.shape[1]

    def statistics(self, lambdas: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        assert self.hutchinson is not None and self.n
        e = {k: v / self.n for k, v in self.sums.items()}
        l = self.hutchinson / self.count  # noqa: E741 - the paper's name
        dl = np.gradient(l, lambdas, axis=0, edge_order=2)
        mean_f = e["u"] - l * e["w"]
        mean_df = e["du"] - dl * e["w"] - l * e["dw"]
        var_f = e["uu"] - 2 * l * e["uw"] + l * l * e["ww"] - mean_f**2
        e_dff = e["duu"] - l * e["duw"] - dl * e["uw"] + l * dl * e["ww"] - l * e["dwu"] + l * l * e["dww"]
        cov = e_dff - mean_df * mean_f
        # Where f hardly varies over samples (its variance is rounding noise next to the moments it is computed
        # from) the slope is undetermined: s = 0 there, and b carries the mean derivative.
        floor = 1e-9 * (e["uu"] + l * l * e["ww"]) + 1e-30
        s = np.where(var_f > floor, cov / np.maximum(var_f, floor), 0.0)
        b = mean_df - s * mean_f
        return l, s, b


def _grid(scheduler: USFScheduler, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """λ-uniform grid from the noisiest trained timestep to the cleanest (λ increasing) and its timesteps."""
    config = scheduler.config
    n_train = int(config.num_train_timesteps)
    ends = np.array([n_train - 1.0, 1.0 if config.use_flow_sigmas else 0.0])
    alpha, sigma = scheduler._alpha_sigma(scheduler._timestep_to_sigma(ends))
    lo, hi = (float(v) for v in np.log(alpha) - np.log(sigma))
    lambdas = np.linspace(lo, hi, steps + 1)
    if config.use_flow_sigmas:
        sig = 1.0 / (1.0 + np.exp(lambdas))  # α = 1 − σ: λ = log((1 − σ)/σ)
    else:
        sig = np.exp(-lambdas)  # diffusers' σ = √((1 − ᾱ)/ᾱ) = e^{−λ}
    t = scheduler._sigma_to_timestep(sig)
    t[0], t[-1] = ends  # exact ends (the inverse interpolation rounds)
    return lambdas, t


def compute_ems(
    pipe: Any,
    samples: Sequence[Any],
    *,
    guidance_scale: float | None = None,
    call_kwargs: Mapping[str, Any] | None = None,
    grid_steps: int = DEFAULT_GRID_STEPS,
    probes: int = 1,
    delta: float = DEFAULT_DELTA,
    batch_size: int = 16,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    progress: Callable[[str], None] | None = None,
) -> EMS:
    """l, s, b of ``pipe``'s model on a ``grid_steps``-interval λ grid, from ``samples``' trajectories.

    Args:
        pipe: the pipeline (its scheduler is swapped and its denoiser wrapped during the run, then restored).
        samples: :class:`~difftune.evaluators.Sample` s (conditions and noise seeds; see :func:`ems_samples`).
        guidance_scale: the call's guidance (None = the pipeline's default); the statistics depend on it.
        call_kwargs: the call's other kwargs (``height``, ``negative_prompt``, …).
        grid_steps: λ intervals of the grid (the pipeline runs ``grid_steps + 1`` steps per batch).
        probes: Rademacher vectors per grid point and sample for l (each costs two denoiser calls).
        delta: the central difference's step, relative to the sample's mean magnitude.
        batch_size: samples per pipeline call.
        cache_dir: where statistics are kept (default :func:`default_ems_dir`); use_cache: False recomputes.

    Raises:
        SpaceError: a bad argument, or a pipeline whose model output cannot be reproduced from its denoiser.
        EvaluationError: the pipeline did not step once per grid point, or the statistics are not finite.
    """
    from difftune.evaluators import batch_kwargs
    from difftune.models import describe

    grid_steps = positive_int("grid_steps", grid_steps)
    if grid_steps < 4:
        raise SpaceError(f"grid_steps: expected at least 4, got {grid_steps}")
    probes = positive_int("probes", probes)
    batch_size = positive_int("batch_size", batch_size)
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 < delta < 1:
        raise SpaceError(f"delta: expected a number in (0, 1), got {delta!r}")
    pool = list(samples)
    if len(pool) < 2:
        raise SpaceError("samples: the statistics are regressions over samples; give at least 2 (64 or more is better)")
    info = describe(pipe)
    call: dict[str, Any] = {**dict(call_kwargs or {}), "num_inference_steps": grid_steps + 1}
    if guidance_scale is not None:
        call["guidance_scale"] = float(guidance_scale)
    scheduler_config = dict(getattr(pipe.scheduler, "config", {}) or {})
    settings = {"grid_steps": grid_steps, "probes": probes, "delta": float(delta)}
    key = json.dumps(
        jsonable(
            {
                "format": FORMAT,
                "fingerprint": info.fingerprint,
                "scheduler": [type(pipe.scheduler).__name__, scheduler_config],
                "call": call,
                "samples": [[type(s.condition).__name__, s.condition, s.seed] for s in pool],
                "settings": settings,
            }
        ),
        sort_keys=True,
        ensure_ascii=False,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:24]
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_ems_dir()
    path = root / safe_name(info.fingerprint) / f"ems-{digest}.safetensors"
    source = {
        "fingerprint": info.fingerprint,
        "guidance_scale": call.get("guidance_scale"),
        "samples": len(pool),
        "digest": digest,
        **settings,
    }
    if use_cache and path.is_file():
        cached = _load(path, key, source)
        if cached is not None:
            return cached

    started = time.perf_counter()
    scheduler = _Recorder.from_schedule(None, pipe.scheduler, final_sigmas_type="zero")
    lambdas, timesteps = _grid(scheduler, grid_steps)
    steps = _default_steps(len(timesteps), 2, "data", False, lower_order_final=True, final_zero=True)
    schedule = SolverSchedule(tuple(float(t) for t in timesteps), steps)
    scheduler = _Recorder.from_schedule(schedule, pipe.scheduler, final_sigmas_type="zero")
    from difftune.search.dc import _ModelFunction

    model = _ModelFunction()
    acc = _Accumulator(scheduler, model, probes, float(delta), seed=int(digest[:8], 16))
    scheduler.on_step = acc.on_step

    def on_denoise(forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        out = forward(*args, **kwargs)
        model.calls_this_step = 0
        model.record(forward, args, kwargs, out)
        return out

    denoiser = getattr(pipe, info.denoiser)
    original = pipe.scheduler
    bar = getattr(pipe, "_progress_bar_config", None)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    output_type = "latent" if getattr(pipe, "vae", None) is not None else "pt"
    handle = CompositeHandle([wrap_forward(denoiser, on_denoise)])
    try:
        pipe.scheduler = scheduler
        with torch.no_grad():
            for start in range(0, len(pool), batch_size):
                batch = pool[start : start + batch_size]
                pipe(**{**call, **batch_kwargs(batch), "output_type": output_type})
                acc.finish_batch(lambdas)
                if progress is not None:
                    progress(f"ems: {min(start + batch_size, len(pool))}/{len(pool)} trajectories")
    finally:
        handle.remove()
        pipe.scheduler = original
        if bar is None:
            pipe.__dict__.pop("_progress_bar_config", None)
        else:
            pipe._progress_bar_config = bar
    l, s, b = acc.statistics(lambdas)  # noqa: E741 - the paper's name
    if not all(np.all(np.isfinite(v)) for v in (l, s, b)):
        raise EvaluationError("ems: the statistics came out NaN or infinite (a NaN from the model?)")
    source["grid_step"] = float(lambdas[1] - lambdas[0])
    source["seconds"] = round(time.perf_counter() - started, 2)
    assert acc.x0_sum is not None
    ems = EMS(lambdas, l, s, b, source, x0_mean=acc.x0_sum / acc.n)
    _save(path, key, ems)
    return ems


def _save(path: Path, key: str, ems: EMS) -> None:
    from safetensors.numpy import save_file

    from difftune._atomic import atomic_write

    tensors = {name: np.ascontiguousarray(getattr(ems, name)) for name in ("lambdas", "l", "s", "b", "x0_mean")}
    metadata = {"format": FORMAT, "key": key, "source": json.dumps(jsonable(dict(ems.source)), sort_keys=True)}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def _load(path: Path, key: str, source: Mapping[str, Any]) -> EMS | None:
    """The cached statistics, or None when the file is another setting's or unreadable (recomputed then)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as handle:
            meta = handle.metadata() or {}
            if meta.get("format") != FORMAT or meta.get("key") != key:
                return None
            arrays = {name: handle.get_tensor(name) for name in ("lambdas", "l", "s", "b", "x0_mean")}
            stored = json.loads(meta.get("source", "{}"))
        return EMS(
            arrays["lambdas"], arrays["l"], arrays["s"], arrays["b"], {**dict(source), **stored}, arrays["x0_mean"]
        )
    except Exception:  # a damaged cache file is recomputed, never trusted
        return None
