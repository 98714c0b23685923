"""The search-space contract: variables, repair, decode to profile sections, encode, named baselines.

A :class:`Space` turns a point of plain parameters (``{"nfe": 6, "grid": "trailing", …}``) into the
technique configs of a profile (``{"solver": SolverSchedule(…)}``). It never imports a searcher:
the search layer maps each :class:`Variable` onto its own distributions (``to_optuna_distribution``,
``to_pymoo_variable`` — both import their library only when called) and hands the sampled
values back to :meth:`Space.decode`.

The flow of one trial, seen from a space::

    >>> import difftune, numpy as np
    >>> from difftune.spaces import SpaceContext, get_space, to_profile
    >>> pipe = difftune.load_pipeline("embedded")
    >>> context = SpaceContext.from_pipeline(pipe, num_inference_steps=20, nfe_range=(3, 12))
    >>> space = get_space("solver")
    >>> params = space.sample(context, np.random.default_rng(0))   # or a searcher's ask()
    >>> sections = space.decode(params, context)                    # repaired first: always valid
    >>> handle = difftune.apply_profile(pipe, to_profile(sections, context))
"""

from __future__ import annotations

import dataclasses
import math
import types
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeVar

import numpy as np

from difftune.errors import SpaceError
from difftune.models import ModelInfo

if TYPE_CHECKING:
    from difftune.profile import Profile

__all__ = [
    "NamedPoint",
    "Repaired",
    "Space",
    "SpaceContext",
    "Variable",
    "get_space",
    "register_space",
    "spaces",
    "to_profile",
]

VariableKind = Literal["int", "float", "categorical", "bool"]
_KINDS = ("int", "float", "categorical", "bool")
#: Searchers a space may name as its default (INTERFACE.md's ``--searcher`` values).
SEARCHERS = ("nsga2", "pymoo-nsga2", "pymoo", "tpe", "gp", "ga", "evo", "s3", "random")


# --------------------------------------------------------------------------------------------
# Variables
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variable:
    """One searched dimension of a space.

    Attributes:
        name: the parameter's key in a point (``params[name]``).
        kind: ``"int"`` and ``"float"`` (``low``/``high`` inclusive, optional ``step``, ``log``
            scale), ``"categorical"`` (``choices``: str, int, float or bool values) or ``"bool"``.
        default: the value of this dimension where nothing else is known (missing parameters,
            dimensions a point does not use); defaults to ``low`` or the first choice.
        help: what the dimension means, for CLIs and dashboards.

    A searcher maps it onto its own encoding: :meth:`to_optuna_distribution`,
    :meth:`to_pymoo_variable`, or the plain numeric genome of :meth:`bounds` /
    :meth:`to_number` / :meth:`from_number` (categoricals as their index, bools as 0/1).
    """

    name: str
    kind: VariableKind
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    choices: tuple[Any, ...] = ()
    default: Any = None
    help: str = ""

    def __post_init__(self) -> None:
        where = f"variable {self.name!r}"
        if self.kind not in _KINDS:
            raise SpaceError(f"{where}: kind {self.kind!r} is not one of {', '.join(_KINDS)}")
        if self.kind in ("int", "float"):
            if self.low is None or self.high is None or not self.low <= self.high:
                raise SpaceError(f"{where}: needs low <= high, got low={self.low!r}, high={self.high!r}")
            if self.log and self.low <= 0:
                raise SpaceError(f"{where}: a log-scale range must be positive, got low={self.low!r}")
            if self.log and self.step is not None:
                raise SpaceError(f"{where}: a log-scale range cannot have a step")
            if self.kind == "int":
                object.__setattr__(self, "low", int(self.low))
                object.__setattr__(self, "high", int(self.high))
                object.__setattr__(self, "step", None if self.step is None else int(self.step))
            else:
                object.__setattr__(self, "low", float(self.low))
                object.__setattr__(self, "high", float(self.high))
        elif self.kind == "bool":
            object.__setattr__(self, "choices", (False, True))
        else:
            if not self.choices:
                raise SpaceError(f"{where}: a categorical variable needs choices")
            object.__setattr__(self, "choices", tuple(self.choices))
        if self.default is None:
            object.__setattr__(self, "default", self.low if self.kind in ("int", "float") else self.choices[0])
        if not self.contains(self.default):
            raise SpaceError(f"{where}: default {self.default!r} is not a valid value")

    def contains(self, value: Any) -> bool:
        """Whether ``value`` is a valid value of this variable (type and range, step included)."""
        if self.kind == "bool":
            return isinstance(value, (bool, np.bool_))
        if self.kind == "categorical":
            return any(_same(value, c) for c in self.choices)
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
            return False
        if self.kind == "int" and not float(value).is_integer():
            return False
        assert self.low is not None and self.high is not None
        if not (math.isfinite(float(value)) and self.low <= value <= self.high):
            return False
        if self.step is not None:
            k = (float(value) - self.low) / self.step
            return abs(k - round(k)) < 1e-9
        return True

    def clamp(self, value: Any) -> Any:
        """The valid value nearest to ``value`` (numbers clipped and snapped; anything else → ``default``)."""
        if self.contains(value):
            return self.canonical(value)
        if self.kind in ("categorical", "bool"):
            return self.default
        try:
            x = float(value)
        except (TypeError, ValueError):
            return self.default
        if not math.isfinite(x) or isinstance(value, (bool, np.bool_)):
            return self.default
        assert self.low is not None and self.high is not None
        x = min(max(x, self.low), self.high)
        if self.step is not None:
            x = self.low + round((x - self.low) / self.step) * self.step
            x = min(x, self.high)
        return round(x) if self.kind == "int" else float(x)

    def canonical(self, value: Any) -> Any:
        """``value`` as a plain Python value of this kind (numpy scalars unwrapped; ints as int)."""
        if self.kind == "bool":
            return bool(value)
        if self.kind == "int":
            return int(value)
        if self.kind == "float":
            return float(value)
        return next(c for c in self.choices if _same(value, c))

    def sample(self, rng: np.random.Generator) -> Any:
        """A uniformly random valid value (log-uniform on a log scale); ``rng`` is injected, never global."""
        if self.kind in ("categorical", "bool"):
            return self.choices[int(rng.integers(len(self.choices)))]
        assert self.low is not None and self.high is not None
        if self.step is not None:
            count = round((self.high - self.low) / self.step)
            return self.canonical(self.low + int(rng.integers(count + 1)) * self.step)
        if self.kind == "int":
            if self.log:
                x = math.exp(rng.uniform(math.log(self.low), math.log(self.high + 1)))
                return int(min(max(math.floor(x), self.low), self.high))
            return int(rng.integers(int(self.low), int(self.high) + 1))
        if self.log:
            return float(math.exp(rng.uniform(math.log(self.low), math.log(self.high))))
        return float(rng.uniform(self.low, self.high))

    # ---- searcher encodings (the libraries are imported only here) -----------------------------

    def to_optuna_distribution(self) -> Any:
        """The Optuna distribution of this variable (imports optuna on call, never at module import)."""
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        if self.kind == "int":
            return IntDistribution(int(self.low), int(self.high), log=self.log, step=int(self.step or 1))  # type: ignore[arg-type]
        if self.kind == "float":
            return FloatDistribution(float(self.low), float(self.high), log=self.log, step=self.step)  # type: ignore[arg-type]
        return CategoricalDistribution(self.choices)

    def to_pymoo_variable(self) -> Any:
        """The pymoo mixed-variable of this variable (``Integer``, ``Real``, ``Choice`` or ``Binary``)."""
        from pymoo.core.variable import Binary, Choice, Integer, Real

        if self.kind == "int":
            return Integer(bounds=(int(self.low), int(self.high)))  # type: ignore[arg-type]
        if self.kind == "float":
            return Real(bounds=(float(self.low), float(self.high)))  # type: ignore[arg-type]
        if self.kind == "bool":
            return Binary()
        return Choice(options=list(self.choices))

    @property
    def bounds(self) -> tuple[float, float]:
        """Inclusive bounds of the numeric genome encoding (:meth:`to_number`)."""
        if self.kind in ("int", "float"):
            assert self.low is not None and self.high is not None
            return float(self.low), float(self.high)
        return 0.0, float(len(self.choices) - 1)

    @property
    def is_integer(self) -> bool:
        """Whether the genome encoding is integral (every kind but ``"float"``)."""
        return self.kind != "float"

    def to_number(self, value: Any) -> float:
        """``value`` in the numeric genome encoding: numbers as is, categoricals as their index, bools 0/1."""
        value = self.clamp(value)
        if self.kind in ("int", "float"):
            return float(value)
        return float(next(i for i, c in enumerate(self.choices) if _same(value, c)))

    def from_number(self, x: float) -> Any:
        """Inverse of :meth:`to_number` (rounded and clipped: any real number maps to a valid value)."""
        if self.kind in ("int", "float"):
            return self.clamp(x)
        index = int(min(max(round(float(x)), 0), len(self.choices) - 1))
        return self.choices[index]


def _same(a: Any, b: Any) -> bool:
    """Equality that keeps ``True`` apart from ``1`` (categorical choices may mix them)."""
    if isinstance(a, (bool, np.bool_)) != isinstance(b, (bool, np.bool_)):
        return False
    try:
        return bool(a == b)
    except (TypeError, ValueError):
        return False


# --------------------------------------------------------------------------------------------
# Context, points, repair results
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpaceContext:
    """What a space needs to know about the model and the call it is searched for.

    Attributes:
        info: :func:`difftune.describe` of the pipeline (family, blocks, cache components, fingerprint).
        scheduler_config: the pipeline scheduler's config, with ``"_class_name"``: the noise
            schedule and the model's parameterisation that solver schedules are expressed in.
        num_inference_steps: the step count of spaces that keep it fixed (cache masks are
            ``num_inference_steps × blocks × components``).
        nfe_range: inclusive range of model evaluations the solver space searches.
        guidance_scale: the call's classifier-free guidance, ``None`` = the pipeline's default.
        height, width: the call's image size, ``None`` = the pipeline's default (recorded in profiles).
        spacings: measured best timestep spacings of the solver baselines, keyed by
            ``(method, nfe)`` (:func:`difftune.spaces.spacing_table`); missing entries are measured
            lazily on :attr:`pipeline` when there is one, else the scheduler's own spacing is used.
        spacing_samples: how many samples a lazy measurement uses (the solver baselines' spacings, the
            ``bac`` space's feature trajectories), or the samples themselves (a study passes its first
            calibration samples: the user's prompts).
        call_kwargs: the call's other kwargs (``negative_prompt``, pipeline-specific arguments such as
            ``max_sequence_length``) for lazy measurements, so they run the call the study tunes.
        pipeline: the pipeline itself, for lazy measurements only (not compared, not printed).
        ems: DPM-Solver-v3's empirical model statistics (:class:`difftune.accel._ems.EMS`) of the model
            under this call, computed by the study (:func:`difftune.search.ems.compute_ems`); the solver
            space offers the ``v3`` prediction when they are given.
    """

    info: ModelInfo
    scheduler_config: Mapping[str, Any]
    num_inference_steps: int = 20
    nfe_range: tuple[int, int] = (3, 12)
    guidance_scale: float | None = None
    height: int | None = None
    width: int | None = None
    spacings: Mapping[tuple[str, int], Any] = field(default_factory=dict)
    spacing_samples: int | Sequence[Any] = 4
    call_kwargs: Mapping[str, Any] = field(default_factory=dict)
    pipeline: Any = field(default=None, compare=False, repr=False)
    ems: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        steps = self.num_inference_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise SpaceError(f"num_inference_steps: expected an integer >= 1, got {steps!r}")
        try:
            lo, hi = (int(v) for v in self.nfe_range)
        except (TypeError, ValueError) as exc:
            raise SpaceError(f"nfe_range: expected (low, high) integers, got {self.nfe_range!r}") from exc
        if not 1 <= lo <= hi:
            raise SpaceError(f"nfe_range: expected 1 <= low <= high, got {self.nfe_range!r}")
        object.__setattr__(self, "nfe_range", (lo, hi))
        if "_class_name" not in self.scheduler_config:
            raise SpaceError("scheduler_config: needs '_class_name' (the scheduler class it belongs to)")
        object.__setattr__(self, "scheduler_config", types.MappingProxyType(dict(self.scheduler_config)))
        object.__setattr__(self, "spacings", types.MappingProxyType(dict(self.spacings)))
        object.__setattr__(self, "call_kwargs", types.MappingProxyType(dict(self.call_kwargs)))

    @classmethod
    def from_pipeline(
        cls,
        pipe: Any,
        *,
        num_inference_steps: int = 20,
        nfe_range: tuple[int, int] = (3, 12),
        guidance_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
        spacings: Mapping[tuple[str, int], Any] | None = None,
        spacing_samples: int | Sequence[Any] = 4,
        call_kwargs: Mapping[str, Any] | None = None,
        keep_pipeline: bool = True,
    ) -> SpaceContext:
        """The context of ``pipe``; ``keep_pipeline=False`` drops the reference (no lazy measurements)."""
        from difftune.models import describe

        scheduler = getattr(pipe, "scheduler", None)
        if scheduler is None or not hasattr(scheduler, "config"):
            raise SpaceError(f"{type(pipe).__name__} has no diffusers scheduler; the spaces need its noise schedule")
        config = dict(scheduler.config)
        config["_class_name"] = type(scheduler).__name__
        return cls(
            info=describe(pipe),
            scheduler_config=config,
            num_inference_steps=num_inference_steps,
            nfe_range=nfe_range,
            guidance_scale=guidance_scale,
            height=height,
            width=width,
            spacings=dict(spacings or {}),
            spacing_samples=spacing_samples if isinstance(spacing_samples, int) else tuple(spacing_samples),
            call_kwargs=dict(call_kwargs or {}),
            pipeline=pipe if keep_pipeline else None,
        )

    def replace(self, **changes: Any) -> SpaceContext:
        """A copy with ``changes`` (e.g. ``context.replace(num_inference_steps=10)``)."""
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class NamedPoint:
    """A hand-made setting inside (or beside) a space: drawn as a baseline, used as a seed.

    Attributes:
        name: stable id, e.g. ``"dpmsolver++_nfe5"``, ``"fora_3"``.
        sections: the profile sections it decodes to (``{"solver": …}`` or ``{"cache": …}``).
        params: the point in the space's parameters that decodes to exactly these sections, or
            ``None`` when the setting lies outside the space (a threshold policy, the identity).
        description: what it is and how it was configured (e.g. the measured spacing).
    """

    name: str
    sections: Mapping[str, Any]
    params: Mapping[str, Any] | None = None
    description: str = ""


@dataclass(frozen=True)
class Repaired:
    """A point after :meth:`Space.repair`: valid parameters and what was changed, one sentence each."""

    params: Mapping[str, Any]
    changes: tuple[str, ...] = ()

    @property
    def changed(self) -> bool:
        return bool(self.changes)


# --------------------------------------------------------------------------------------------
# The space base class
# --------------------------------------------------------------------------------------------


class Space(ABC):
    """A search space: variables, validity repair, decoding to profile sections, baselines.

    Subclasses set :attr:`name` (via :func:`register_space`), :attr:`default_searcher` and
    :attr:`sections`, and implement :meth:`variables` and :meth:`_decode`; they may refine
    :meth:`_repair` (combinations the variables' bounds cannot express), :meth:`encode` and
    :meth:`baselines`. ``decode`` always repairs first, so any point a searcher proposes decodes
    to a config that applies.
    """

    name: ClassVar[str] = ""
    #: The searcher ``difftune calibrate`` uses unless ``--searcher`` overrides it.
    default_searcher: ClassVar[str] = "tpe"
    #: finished trials a study of this space holds when no budget is asked for
    default_budget: ClassVar[int] = 24
    #: calibration samples a new study screens candidates on when ``--screen`` is not given (0: no
    #: screening; also 0 when the study's samples are this few or fewer)
    default_screen: ClassVar[int] = 0
    #: The profile sections this space's points fill.
    sections: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def variables(self, context: SpaceContext) -> list[Variable]:
        """The searched dimensions for ``context`` (names unique; their count may depend on the model)."""

    def default_objectives(self, family: str) -> tuple[tuple[str, str], ...] | None:
        """The objectives of a study of this space that names none; None: the runner's (speed, fidelity, guard)."""
        return None

    def default_params(self, context: SpaceContext) -> dict[str, Any]:
        """Every variable at its default."""
        return {v.name: v.default for v in self.variables(context)}

    def sample(self, context: SpaceContext, rng: np.random.Generator) -> dict[str, Any]:
        """A uniformly random point within the variables' bounds (not yet repaired)."""
        return {v.name: v.sample(rng) for v in self.variables(context)}

    def repair(self, params: Mapping[str, Any], context: SpaceContext) -> Repaired:
        """Make ``params`` valid: fill missing values, clamp to bounds, fix invalid combinations.

        Unknown parameter names raise :class:`SpaceError` (a typo would otherwise be silently
        ignored); everything else is fixed, and every fix is reported in :attr:`Repaired.changes`.
        """
        variables = self.variables(context)
        known = {v.name for v in variables}
        unknown = sorted(set(params) - known)
        if unknown:
            raise SpaceError(
                f"space {self.name!r}: unknown parameter(s) {', '.join(map(repr, unknown))}; "
                f"known: {', '.join(sorted(known))}"
            )
        out: dict[str, Any] = {}
        changes: list[str] = []
        for v in variables:
            if v.name not in params:
                out[v.name] = v.default
                changes.append(f"{v.name}: missing, set to its default {v.default!r}")
                continue
            value = params[v.name]
            fixed = v.clamp(value)
            if not v.contains(value):
                changes.append(f"{v.name}: {value!r} is not a valid value, set to {fixed!r}")
            out[v.name] = fixed
        changes.extend(self._repair(out, context))
        return Repaired(types.MappingProxyType(out), tuple(changes))

    def _repair(self, params: dict[str, Any], context: SpaceContext) -> list[str]:
        """Fix combinations in place (``params`` are already within bounds); return what changed."""
        return []

    def decode(self, params: Mapping[str, Any], context: SpaceContext) -> dict[str, Any]:
        """The profile sections of the point ``params`` (repaired first; see :meth:`repair`)."""
        return self._decode(self.repair(params, context).params, context)

    @abstractmethod
    def _decode(self, params: Mapping[str, Any], context: SpaceContext) -> dict[str, Any]:
        """Decode valid, repaired ``params``."""

    def encode(self, sections: Mapping[str, Any], context: SpaceContext) -> dict[str, Any]:
        """Parameters that decode to ``sections``; :class:`SpaceError` when the setting is not in the space."""
        raise SpaceError(f"space {self.name!r} cannot encode settings into its parameters")

    def baselines(self, context: SpaceContext) -> list[NamedPoint]:
        """The hand-made settings of this space's anchors, at their best-configured settings."""
        return []

    def seeds(self, context: SpaceContext) -> list[NamedPoint]:
        """Starting points of the search that are not baselines (points of the space, ``params`` set):
        the study runner evaluates them after the baselines, as searched points, and the searcher
        builds on them. None by default."""
        return []


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

_SPACES: dict[str, type[Space]] = {}
S = TypeVar("S", bound=type[Space])


def register_space(name: str) -> Callable[[S], S]:
    """Class decorator: make ``cls`` the space ``get_space(name)`` returns (``--space name``)."""

    def decorate(cls: S) -> S:
        if name in _SPACES and _SPACES[name] is not cls:
            raise SpaceError(f"a space named {name!r} is already registered ({_SPACES[name].__qualname__})")
        if cls.default_searcher not in SEARCHERS:
            raise SpaceError(
                f"space {name!r}: default_searcher {cls.default_searcher!r} is not one of {', '.join(SEARCHERS)}"
            )
        cls.name = name
        _SPACES[name] = cls
        return cls

    return decorate


def spaces() -> tuple[str, ...]:
    """The names of the registered spaces, sorted."""
    return tuple(sorted(_SPACES))


def get_space(name: str, **options: Any) -> Space:
    """A new instance of the space registered as ``name`` (``options`` go to its constructor).

    Raises:
        SpaceError: no space has that name; the message lists the known ones.
    """
    cls = _SPACES.get(name)
    if cls is None:
        raise SpaceError(f"unknown space {name!r}; known spaces: {', '.join(spaces()) or 'none'}")
    return cls(**options)


# --------------------------------------------------------------------------------------------
# Sections → profile
# --------------------------------------------------------------------------------------------


def to_profile(
    sections: Mapping[str, Any],
    context: SpaceContext,
    *,
    name: str = "",
    metrics: Mapping[str, Mapping[str, Any]] | None = None,
    provenance: Mapping[str, Any] | None = None,
) -> Profile:
    """A :class:`~difftune.Profile` holding ``sections`` for the model and call of ``context``.

    The profile's ``num_inference_steps`` is the sections' own step count where they have one (a
    solver schedule's NFE, a mask's steps), else the context's.
    """
    from difftune.profile import ModelRef, Profile, ProfileContext

    unknown = sorted(set(sections) - {"solver", "cache", "sparsity", "quantization"})
    if unknown:
        raise SpaceError(f"sections: unknown section(s) {unknown}; known: solver, cache, sparsity, quantization")
    counts: set[int] = {
        int(c.num_steps) for c in sections.values() if c is not None and getattr(c, "num_steps", None) is not None
    }
    if len(counts) > 1:
        raise SpaceError(f"sections: disagree on the number of steps ({sorted(counts)})")
    steps = counts.pop() if counts else context.num_inference_steps
    info = context.info
    return Profile(
        name=name,
        model=ModelRef(name=info.name, family=info.family, fingerprint=info.fingerprint),
        context=ProfileContext(
            num_inference_steps=steps, guidance_scale=context.guidance_scale, height=context.height, width=context.width
        ),
        metrics=dict(metrics or {}),
        provenance=dict(provenance or {}),
        **dict(sections),
    )
