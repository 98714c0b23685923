"""HarmoniCa: a learned cache router, trained with Step-Wise Denoising Training and an image-error proxy.

HarmoniCa (Huang et al., ICML 2025; code ModelTC/HarmoniCa) learns, for every sampling step, one
logit per cacheable component (the attention and MLP of each block in the paper; here every
component slot :func:`difftune.describe` reports). The router ignores the input, so what it learns
is a static schedule: at inference a component recomputes where ``sigmoid(logit) > threshold`` and
reuses its cached output elsewhere — a :class:`~difftune.accel.CacheMaskConfig`.

Training, as in the reference's ``train_router.py`` and ``models/router_models.py``:

- **blending**: every component's output becomes ``cached·(1 − w) + fresh·w`` with ``w =
  sigmoid(logit)``; the cache takes the blended output (detached) where ``w > 0.1`` (the reference's
  ``--ste-threshold``). The first step's logits are frozen at 5 (it always computes); the others
  start as standard normal draws and are clamped to [−5, 5] after every update.
- **Step-Wise Denoising Training (SDT)**: each iteration samples a whole trajectory. At every step
  the teacher (no reuse) and the student (router active, its cache built along the student's own
  trajectory) see the same ``x_t``; the loss of that step updates that step's router (AdamW, weight
  decay 0, router parameters only), and ``x_t`` advances with the student's prediction.
- **Image-Error Proxy-Guided Objective (IEPO)**: the loss of step ``t`` is
  ``λ_t·MSE(student, teacher) + l1·Σ sigmoid(logits_t)``. ``λ_t`` is the image error step ``t``'s
  router causes: starting from all-ones masks, step after step (``t = 1 … T−1``) gets its router's
  *soft* ``sigmoid(logits)``, the batch is sampled again with the same noise, and ``λ_t`` is the mean
  squared difference between this final latent and the previous one. The weights are recomputed
  every ``lambda_every`` iterations (the reference: every 500 router updates = 50 trajectories).

Here the trajectory is the pipeline's own call (its scheduler, its classifier-free guidance, the
study's call kwargs): the hooks sit on the denoiser and its components, so any pipeline
:func:`difftune.describe` knows trains the same way. The student/teacher MSE compares the denoiser's
raw outputs (both halves of a batched guidance call) — the reference compares the guided
prediction; comparing both halves needs no knowledge of how a pipeline combines them.

Settings scaled to a CPU budget: the reference trains DiT-XL/2 on 2 000 trajectories of batch 64 (32
noises, each conditional and unconditional) at lr 0.01; the defaults here are 80
trajectories of 4 samples at lr 0.1 (:data:`DEFAULT_LR` says why), which train the embedded model at
20 steps in one and a half to two minutes on one CPU core (86–121 s measured, the latter on cores
shared with other jobs; the README has the masks' figures). A trained router is cached on disk
(safetensors under ``<difftune cache>/harmonica``) per model fingerprint, scheduler, call, sample
conditions and training settings, so training the same thing twice loads it::

    >>> import difftune
    >>> from difftune.accel.cache import apply_cache_schedule
    >>> from difftune.evaluators import CalibrationSet
    >>> from difftune.search.harmonica import train_router
    >>> pipe = difftune.load_pipeline("embedded")
    >>> router = train_router(pipe, CalibrationSet.for_pipeline(pipe)[:4], num_inference_steps=20, l1=3e-7)
    >>> handle = apply_cache_schedule(pipe, router.mask(threshold=0.1))  # handle.remove() undoes it
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from difftune.accel._hooks import CompositeHandle, Handle, StepTracker, wrap_forward
from difftune.accel.cache import CacheMaskConfig
from difftune.errors import EvaluationError, SpaceError
from difftune.search._common import jsonable, positive_int, prediction_tensor, safe_name

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_ITERATIONS",
    "DEFAULT_LAMBDA_EVERY",
    "DEFAULT_LR",
    "FIRST_LOGIT",
    "FORMAT",
    "LOGIT_BOUND",
    "TRAIN_THRESHOLD",
    "RouterResult",
    "default_router_dir",
    "train_router",
]

#: ``format`` metadata of a cached router file; other values are retrained, never read.
FORMAT = "difftune-harmonica/1"
#: The first step's frozen logit (sigmoid ≈ 0.993: it always computes), as the reference's first router.
FIRST_LOGIT = 5.0
#: Logits are clamped to ±this after every update (the reference's ``param.clamp_(-5, 5)``).
LOGIT_BOUND = 5.0
#: During training the cache refreshes where ``w`` exceeds this (the reference README's ``--ste-threshold``).
TRAIN_THRESHOLD = 0.1
#: Trajectories per training: the embedded model trains in about two minutes on a CPU core.
DEFAULT_ITERATIONS = 80
#: AdamW's learning rate. The reference's 0.01 moves a logit by at most ~0.01 per update over 2 000
#: updates per router; in an 80-trajectory budget 0.01 leaves the masks at their random
#: initialisation (measured: the same masks for every l1 from 1e-4 to 1e-2), 0.1 lets a logit cross
#: its whole [−5, 5] range.
DEFAULT_LR = 0.1
#: λ is recomputed every this many trajectories (the reference: 500 updates / 10 steps = 50 trajectories
#: of 20 000 / 10 = 2 000, i.e. 40 times per training; here 8 times).
DEFAULT_LAMBDA_EVERY = 10
#: Samples per trajectory (a study passes its first four calibration samples).
DEFAULT_BATCH_SIZE = 4


def default_router_dir() -> Path:
    """``<difftune cache>/harmonica``: beside the reference images (``$DIFFTUNE_CACHE`` moves both)."""
    from difftune.evaluators import default_cache_dir

    return default_cache_dir().parent / "harmonica"


# --------------------------------------------------------------------------------------------
# The result
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class RouterResult:
    """A trained router: logits per step × block × component slot, and how training went.

    Attributes:
        components: the model's component slots (:attr:`difftune.models.ModelInfo.components`).
        logits: ``steps × blocks × components`` float32; step 0 is frozen at :data:`FIRST_LOGIT`.
        active: ``blocks × components`` bool: the slots the model has (the others' mask bits are inert).
        lambdas: the last IEPO weights, one per step (step 0, never routed, is 0).
        losses: the training loss per iteration, summed over the trajectory's steps.
        seconds: training wall time (for a result loaded from disk, that of the original training).
        from_cache: whether this result was loaded from disk instead of trained.
        path: the cache file, when there is one.
    """

    components: tuple[str, ...]
    logits: np.ndarray
    active: np.ndarray
    lambdas: np.ndarray
    losses: np.ndarray
    seconds: float
    from_cache: bool = False
    path: Path | None = field(default=None)

    @property
    def num_steps(self) -> int:
        return int(self.logits.shape[0])

    @property
    def probabilities(self) -> np.ndarray:
        """``sigmoid(logits)``: the weight of the fresh output in the training blend."""
        return 1.0 / (1.0 + np.exp(-self.logits.astype(np.float64)))

    def mask_array(self, threshold: float = TRAIN_THRESHOLD) -> np.ndarray:
        """``sigmoid(logit) > threshold`` (True = recompute); step 0 and the model's absent slots are 1."""
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 < threshold < 1.0:
            raise SpaceError(f"threshold: expected a number strictly between 0 and 1, got {threshold!r}")
        mask = self.probabilities > float(threshold)
        mask[0] = True
        mask[:, ~self.active] = True
        return mask

    def mask(self, threshold: float = TRAIN_THRESHOLD) -> CacheMaskConfig:
        """The static cache schedule at ``threshold`` (the reference's inference ``--thres``, 0.1)."""
        return CacheMaskConfig.from_array(self.components, self.mask_array(threshold))

    def recompute_fraction(self, threshold: float = TRAIN_THRESHOLD) -> float:
        """The fraction of the model's (step, block, component) cells that recompute at ``threshold``."""
        return float(self.mask_array(threshold)[:, self.active].mean())


# --------------------------------------------------------------------------------------------
# The blending hooks
# --------------------------------------------------------------------------------------------


def _mix(cached: Any, fresh: Any, w: torch.Tensor) -> Any:
    """``cached·(1 − w) + fresh·w`` over a component's output (a tensor, or a tuple of them)."""
    if isinstance(fresh, torch.Tensor) and isinstance(cached, torch.Tensor) and cached.shape == fresh.shape:
        return cached * (1 - w) + fresh * w
    if isinstance(fresh, (tuple, list)) and isinstance(cached, (tuple, list)) and len(cached) == len(fresh):
        return type(fresh)(_mix(c, f, w) for c, f in zip(cached, fresh, strict=True))
    return fresh


def _detach(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, (tuple, list)) and not hasattr(value, "keys"):
        return type(value)(_detach(v) for v in value)
    if isinstance(value, dict):  # diffusers' ModelOutput is a dict whose items are also attributes
        for key in list(value.keys()):
            value[key] = _detach(value[key])
        return value
    return value


class _Blender:
    """The state the component hooks share: the mode, the current step's weights, the student's cache."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self.tracker: StepTracker | None = None
        self.blend = False  # False: fresh outputs, cache untouched (the teacher)
        self.weights: torch.Tensor | None = None  # blocks × components, this step (may require grad)
        self.refresh: np.ndarray | None = None  # blocks × components: where the cache takes the output
        self.store: dict[tuple[str, int], Any] = {}

    def reset(self) -> None:
        self.store.clear()

    def set_weights(self, weights: torch.Tensor) -> None:
        self.blend = True
        self.weights = weights
        self.refresh = weights.detach().cpu().numpy() > self.threshold


class _BlendHook:
    """Wraps one component module: its output blended with its cached one by the step's weight."""

    def __init__(self, blender: _Blender, path: str, block: int, slot: int) -> None:
        self.blender, self.path, self.block, self.slot = blender, path, block, slot

    def __call__(self, forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        fresh = forward(*args, **kwargs)
        b = self.blender
        if not b.blend or b.weights is None or b.refresh is None or b.tracker is None:
            return fresh
        key = (self.path, b.tracker.call)
        cached = b.store.get(key)
        out = fresh if cached is None else _mix(cached, fresh, b.weights[self.block, self.slot])
        if cached is None or b.refresh[self.block, self.slot]:
            b.store[key] = _detach(out)
        return out


@dataclass
class _Trainer:
    """The SDT update of one step: teacher and student on the same input, one AdamW step on that step's router."""

    params: list[torch.nn.Parameter]  # steps − 1 routers (step 0 is frozen), blocks × components each
    optimizer: torch.optim.Optimizer
    active: torch.Tensor  # blocks × components float: 1 where the slot exists
    l1: float
    lambdas: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    loss: float = 0.0

    def step(self, blender: _Blender, forward: Callable[..., Any], step: int, args: tuple, kwargs: dict) -> Any:
        blender.blend = False
        teacher = prediction_tensor(forward(*args, **kwargs), "harmonica").detach().float()
        row = self.params[step - 1]
        with torch.enable_grad():
            w = torch.sigmoid(row)
            blender.set_weights(w)
            output = forward(*args, **kwargs)
            data = torch.nn.functional.mse_loss(prediction_tensor(output, "harmonica").float(), teacher)
            loss = self.lambdas[step] * data + self.l1 * (w * self.active).sum()
            (grad,) = torch.autograd.grad(loss, row)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise EvaluationError(f"harmonica: the router's loss at step {step} is {value}; lower lr or l1")
        self.optimizer.zero_grad(set_to_none=True)  # the other steps' routers stay as they are
        row.grad = grad
        self.optimizer.step()
        with torch.no_grad():
            row.clamp_(-LOGIT_BOUND, LOGIT_BOUND)
        self.loss += value
        return _detach(output)

    def logits(self) -> torch.Tensor:
        first = torch.full_like(self.params[0], FIRST_LOGIT) if self.params else None
        rows = [first, *(p.detach() for p in self.params)] if first is not None else []
        return torch.stack(rows)


class _Session:
    """The hooks of one training on ``pipe``: installed on construction, undone by :meth:`remove`."""

    def __init__(self, pipe: Any, info: Any, steps: int, threshold: float) -> None:
        denoiser = getattr(pipe, info.denoiser)
        self.steps = steps
        self.blender = _Blender(threshold)
        self.fixed: torch.Tensor | None = None  # steps × blocks × components: set weights, no training
        self.trainer: _Trainer | None = None
        self.first = torch.sigmoid(torch.full((len(info.blocks), len(info.components)), FIRST_LOGIT))
        self.handle = CompositeHandle()
        try:
            for b, block in enumerate(info.block_info):
                for k, paths in enumerate(block.components):
                    for path in paths:
                        module = denoiser.get_submodule(path)
                        self.handle.add(wrap_forward(module, _BlendHook(self.blender, path, b, k)))
            self.handle.add(wrap_forward(denoiser, self._on_denoise))
            # Installed last, so it runs first: it counts each pipeline call once, not teacher and student.
            tracker = StepTracker(denoiser, getattr(pipe, "scheduler", None))
            self.handle.add(Handle(tracker.remove))
            tracker.add_listener(self.blender)
            self.blender.tracker = tracker
        except BaseException:
            self.handle.remove()
            raise

    def _on_denoise(self, forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        tracker = self.blender.tracker
        step = tracker.step if tracker is not None else 0
        if step >= self.steps:
            raise SpaceError(
                f"harmonica: the pipeline ran denoiser step {step + 1} of a {self.steps}-step router; its scheduler "
                "must call the denoiser once per inference step (first-order or multistep solvers)"
            )
        if self.trainer is not None and step > 0:
            return self.trainer.step(self.blender, forward, step, args, kwargs)
        self.blender.set_weights(self.fixed[step] if self.fixed is not None else self.first)
        return forward(*args, **kwargs)

    def remove(self) -> None:
        self.handle.remove()


# --------------------------------------------------------------------------------------------
# Pipeline runs
# --------------------------------------------------------------------------------------------


class _Runner:
    """Runs the study's call on a batch and returns the final latents (via ``callback_on_step_end``)."""

    def __init__(self, pipe: Any, call: Mapping[str, Any]) -> None:
        self.pipe = pipe
        self.call = dict(call)
        try:
            params = inspect.signature(pipe.__call__).parameters
        except (TypeError, ValueError):
            params = {}  # type: ignore[assignment]
        self.callback = "callback_on_step_end" in params
        # Latent-diffusion pipelines skip the VAE decode; the embedded model samples pixels ("pt").
        self.output_type = "latent" if getattr(pipe, "vae", None) is not None else "pt"

    def __call__(self, samples: Sequence[Any]) -> torch.Tensor:
        from difftune.evaluators import batch_kwargs

        captured: dict[str, torch.Tensor] = {}

        def keep(pipe: Any, index: int, t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            if isinstance(tensors.get("latents"), torch.Tensor):
                captured["latents"] = tensors["latents"]
            return tensors

        kwargs: dict[str, Any] = {**self.call, **batch_kwargs(samples), "output_type": self.output_type}
        if self.callback:
            kwargs["callback_on_step_end"] = keep
        out = self.pipe(**kwargs)
        if "latents" in captured:
            return captured["latents"].detach().float()
        images = out.images if hasattr(out, "images") else out[0]
        return torch.as_tensor(images).detach().float()


def _iepo(session: _Session, run: _Runner, batch: Sequence[Any], probabilities: torch.Tensor) -> torch.Tensor:
    """λ_t: the change of the final latent when step t's mask becomes its router's soft weights."""
    steps = session.steps
    fixed = torch.ones_like(probabilities)
    lambdas = torch.zeros(steps)
    session.fixed = fixed
    try:
        before = run(batch)
        for t in range(1, steps):
            fixed[t] = probabilities[t]
            after = run(batch)
            lambdas[t] = float(((after - before) ** 2).mean())
            before = after
    finally:
        session.fixed = None
    return lambdas


# --------------------------------------------------------------------------------------------
# Cache on disk
# --------------------------------------------------------------------------------------------


def _load(path: Path, key: str, shape: tuple[int, int, int], components: tuple[str, ...]) -> RouterResult | None:
    """The cached router at ``path``, or None when it is missing, unreadable or for another training."""
    if not path.is_file():
        return None
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError):
        return None
    if (
        meta.get("format") != FORMAT
        or meta.get("key") != key
        or set(tensors) != {"logits", "active", "lambdas", "losses"}
    ):
        return None
    logits = tensors["logits"]
    if tuple(logits.shape) != shape or tuple(tensors["active"].shape) != shape[1:]:
        return None
    return RouterResult(
        components=components,
        logits=logits.float().numpy(),
        active=tensors["active"].bool().numpy(),
        lambdas=tensors["lambdas"].float().numpy(),
        losses=tensors["losses"].float().numpy(),
        seconds=float(meta.get("seconds", "nan")),
        from_cache=True,
        path=path,
    )


def _save(path: Path, key: str, result: RouterResult) -> Path:
    from safetensors.torch import save_file

    from difftune._atomic import atomic_write

    tensors = {
        "logits": torch.from_numpy(np.ascontiguousarray(result.logits, dtype=np.float32)),
        "active": torch.from_numpy(np.ascontiguousarray(result.active, dtype=np.uint8)),
        "lambdas": torch.from_numpy(np.ascontiguousarray(result.lambdas, dtype=np.float32)),
        "losses": torch.from_numpy(np.ascontiguousarray(result.losses, dtype=np.float32)),
    }
    metadata = {"format": FORMAT, "key": key, "seconds": repr(result.seconds)}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def _non_negative(name: str, value: Any, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SpaceError(f"{name}: expected a finite number, got {value!r}")
    if value < 0 or (positive and value == 0):
        raise SpaceError(f"{name}: expected a {'positive' if positive else 'non-negative'} number, got {value!r}")
    return float(value)


def train_router(
    pipe: Any,
    samples: Sequence[Any],
    *,
    num_inference_steps: int = 20,
    l1: float,
    lr: float = DEFAULT_LR,
    iterations: int = DEFAULT_ITERATIONS,
    lambda_every: int = DEFAULT_LAMBDA_EVERY,
    batch_size: int = DEFAULT_BATCH_SIZE,
    guidance_scale: float | None = None,
    call_kwargs: Mapping[str, Any] | None = None,
    train_threshold: float = TRAIN_THRESHOLD,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
) -> RouterResult:
    """Train a HarmoniCa router for ``pipe``'s call (or load the one trained with the same inputs).

    Args:
        pipe: the pipeline (its denoiser is hooked during training and restored after).
        samples: :class:`~difftune.evaluators.Sample` s whose conditions the trajectories draw
            (their seeds are not used: each iteration draws fresh noise from ``seed``).
        num_inference_steps: the call's step count; the router has one row per step.
        l1: the sparsity weight: larger caches more (the speed/quality knob).
        lr: AdamW learning rate (weight decay 0, router parameters only); see :data:`DEFAULT_LR`.
        iterations: trajectories walked; each updates every step's router once.
        lambda_every: IEPO's λ is recomputed every this many iterations (and before the first).
        batch_size: samples per trajectory (conditions taken in turn from ``samples``).
        guidance_scale: the call's guidance (None = the pipeline's default).
        call_kwargs: the call's other kwargs (``height``, ``negative_prompt``, …).
        train_threshold: the cache refreshes during training where ``sigmoid(logit)`` exceeds it.
        seed: router initialisation and noise.
        cache_dir: where trained routers are kept (default :func:`default_router_dir`).
        use_cache: False trains even when a cached router exists (and overwrites it).

    Returns:
        The :class:`RouterResult`; ``result.mask(threshold)`` is the cache schedule.

    Raises:
        SpaceError: a bad argument, a pipeline whose scheduler calls the denoiser more than once per
            step, or whose denoiser output holds no prediction tensor.
        EvaluationError: the loss became NaN or infinite.
    """
    from difftune.models import describe

    steps = positive_int("num_inference_steps", num_inference_steps)
    if steps < 2:
        raise SpaceError(f"num_inference_steps: a router needs at least 2 steps to reuse anything, got {steps}")
    l1 = _non_negative("l1", l1)
    lr = _non_negative("lr", lr, positive=True)
    iterations = positive_int("iterations", iterations)
    lambda_every = positive_int("lambda_every", lambda_every)
    batch_size = positive_int("batch_size", batch_size)
    train_threshold = _non_negative("train_threshold", train_threshold)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise SpaceError(f"seed: expected an integer, got {seed!r}")
    pool = list(samples)
    if not pool:
        raise SpaceError("samples: expected at least one calibration sample, got none")
    conditions = [s.condition if hasattr(s, "condition") else s for s in pool]

    info = describe(pipe)
    if not info.blocks or not info.components:
        raise SpaceError(f"harmonica: the {info.family} model reports no blocks or cache components to route")
    active = np.array([[bool(paths) for paths in block.components] for block in info.block_info], dtype=bool)
    shape = info.mask_shape(steps)
    call: dict[str, Any] = {**dict(call_kwargs or {}), "num_inference_steps": steps}
    if guidance_scale is not None:
        call["guidance_scale"] = float(guidance_scale)
    scheduler = getattr(pipe, "scheduler", None)
    key = json.dumps(
        jsonable(
            {
                "format": FORMAT,
                "fingerprint": info.fingerprint,
                "scheduler": [type(scheduler).__name__, dict(getattr(scheduler, "config", {}) or {})],
                "call": call,
                "conditions": [[type(c).__name__, c] for c in conditions],
                "settings": {
                    "l1": l1,
                    "lr": lr,
                    "iterations": iterations,
                    "lambda_every": lambda_every,
                    "batch_size": batch_size,
                    "train_threshold": train_threshold,
                    "seed": seed,
                },
            }
        ),
        sort_keys=True,
        ensure_ascii=False,
    )
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_router_dir()
    path = root / safe_name(info.fingerprint) / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.safetensors"
    if use_cache:
        cached = _load(path, key, shape, info.components)
        if cached is not None:
            return cached

    started = time.perf_counter()
    logits, lambdas, losses = _train(
        pipe, info, conditions, call, steps, active, l1, lr, iterations, lambda_every, batch_size, train_threshold, seed
    )
    result = RouterResult(
        components=info.components,
        logits=logits,
        active=active,
        lambdas=lambdas,
        losses=losses,
        seconds=time.perf_counter() - started,
        path=path,
    )
    _save(path, key, result)
    return result


def _train(
    pipe: Any,
    info: Any,
    conditions: list[Any],
    call: dict[str, Any],
    steps: int,
    active: np.ndarray,
    l1: float,
    lr: float,
    iterations: int,
    lambda_every: int,
    batch_size: int,
    threshold: float,
    seed: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from difftune.evaluators import Sample

    denoiser = getattr(pipe, info.denoiser)
    device = next((p.device for p in denoiser.parameters()), torch.device("cpu"))
    generator = torch.Generator().manual_seed(seed)  # on the CPU: the same routers on every device
    slots = torch.from_numpy(active)
    params = []
    for _ in range(steps - 1):
        init = torch.randn(slots.shape, generator=generator)
        # Absent slots have no hook and no sparsity term: their logits never move.
        params.append(torch.nn.Parameter(torch.where(slots, init, torch.tensor(FIRST_LOGIT)).to(device)))
    trainer = _Trainer(
        params=params,
        optimizer=torch.optim.AdamW(params, lr=lr, weight_decay=0.0),
        active=slots.float().to(device),
        l1=l1,
    )
    rng = np.random.default_rng(seed)
    run = _Runner(pipe, call)
    bar = getattr(pipe, "_progress_bar_config", None)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    session = _Session(pipe, info, steps, threshold)
    losses: list[float] = []
    try:
        for iteration in range(iterations):
            seeds = rng.integers(0, 1_000_000, size=batch_size)
            batch = [
                Sample(conditions[(iteration * batch_size + j) % len(conditions)], int(s)) for j, s in enumerate(seeds)
            ]
            if iteration % lambda_every == 0:
                trainer.lambdas = _iepo(session, run, batch, torch.sigmoid(trainer.logits())).to(device)
            trainer.loss = 0.0
            session.trainer = trainer
            try:
                run(batch)
            finally:
                session.trainer = None
            losses.append(trainer.loss)
    finally:
        session.remove()
        if bar is None:
            pipe.__dict__.pop("_progress_bar_config", None)
        else:
            pipe._progress_bar_config = bar
    return (
        trainer.logits().cpu().numpy().astype(np.float32),
        trainer.lambdas.cpu().numpy().astype(np.float32),
        np.asarray(losses, dtype=np.float32),
    )
