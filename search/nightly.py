"""``difftune nightly``: the cron entry point — per model, each night, calibrate, re-validate, export, report.

A night runs every model of a TOML configuration (:func:`load_config`) in turn:

1. **Re-validate** every profile the nights exported for the model (``<output>/profiles/<model>/``) on the
   held-out samples it was exported with: a profile whose quality or speed measures worse than its recorded
   held-out figures by more than the configuration's ``[tolerance]``, whose model's weights changed, or that
   no longer applies, is a *regression*.
2. **Search** each configured space in tonight's study ``<model>-<space>-<night>``: last night's front (the
   points its search found; the space's baselines and seeds run anyway) is re-measured first as trials of
   kind ``warm`` and given to the searcher, then the search spends the rest of the budget, within the
   model's time limit. A changed model fingerprint starts the study without warm start and says so.
3. **Export** each configured profile (``--select``) from tonight's study, re-measured on held-out samples
   (:func:`~difftune.search.export.export_point`), and put it in place of last night's; a selection no
   point keeps tonight is a regression (last night's profile stays in place).
4. **Report** (``<output>/nights/<night>/report.md`` and a front plot per model): what changed since the
   previous night — fingerprint, library versions, fronts and hypervolume, the warm points' drift, each
   profile's figures — and which profiles regressed.

:func:`run_nightly` returns exit code 0 (all well), 1 (a regression) or 2 (a configuration or model error);
a lock file keeps two nights from overlapping, and a night that was interrupted (its state says
``running``) is resumed by the next invocation: finished steps are kept, studies resume where they stopped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import socket
import time
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from difftune.errors import DifftuneError

__all__ = [
    "EXIT_ERROR",
    "EXIT_OK",
    "EXIT_REGRESSION",
    "ConfigError",
    "ModelJob",
    "NightlyConfig",
    "NightlyLocked",
    "NightlyResult",
    "ProfileJob",
    "SpaceJob",
    "load_config",
    "run_nightly",
]

EXIT_OK, EXIT_REGRESSION, EXIT_ERROR = 0, 1, 2
#: How much worse a re-validated profile may measure than its recorded held-out figures before it is a
#: regression: ``speedup`` relative (0.1 = 10 % slower), every other metric absolute in its unit.
DEFAULT_TOLERANCE: dict[str, float] = {"speedup": 0.10, "psnr": 1.0, "ssim": 0.02, "class_accuracy": 0.05}
#: Formats a nightly profile may be written in (each holds the difftune profile the next night re-validates).
NIGHTLY_FORMATS = ("difftune", "diffusers")
LOCK_FILE = "nightly.lock"
STATE_FILE = "state.json"
REPORT_FILE = "report.md"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class ConfigError(DifftuneError):
    """A nightly configuration that cannot run: the message names the file, the key and what is expected."""


class NightlyLocked(DifftuneError):
    """Another night holds the output folder's lock."""


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpaceJob:
    """One space searched each night for a model."""

    space: str
    budget: int
    searcher: str | None = None
    objectives: tuple[str, ...] | None = None
    constraints: tuple[str, ...] = ()
    nfe_range: tuple[int, int] | None = None
    ems: int = 0


@dataclass(frozen=True)
class ProfileJob:
    """A profile exported each night from a space's study by a ``--select`` expression."""

    name: str
    space: str
    select: str
    format: str = "difftune"
    #: CMA-ES runs fitting a solver schedule's timesteps, relaxations and DC ratios before the held-out
    #: re-measure (``export --fit``); 0 = off.
    fit: int = 0


@dataclass(frozen=True)
class ModelJob:
    """One model of the configuration: how to load and call it, what to search, what to export."""

    name: str
    model: str
    spaces: tuple[SpaceJob, ...]
    profiles: tuple[ProfileJob, ...] = ()
    device: str | None = None
    dtype: str | None = None
    prompts: tuple[str, ...] | None = None
    negative_prompt: str | None = None
    steps: int = 20
    samples: int = 20
    held_out_samples: int | None = None
    guidance_scale: float | None = None
    height: int | None = None
    width: int | None = None
    batch_size: int | None = None
    latency_repeats: int = 3
    time_limit_s: float | None = None

    def call_options(self) -> dict[str, Any]:
        """How the model is loaded and called: what a study's settings and :func:`run_study` take alike."""
        names = ("device", "dtype", "prompts", "negative_prompt", "height", "width", "guidance_scale", "batch_size")
        return {name: getattr(self, name) for name in names}


@dataclass(frozen=True)
class NightlyConfig:
    """A parsed ``difftune nightly`` configuration (:func:`load_config`)."""

    path: Path
    output: Path
    storage: str
    models: tuple[ModelJob, ...]
    tolerance: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_TOLERANCE))
    seed: int = 0


def _expect(value: Any, kind: Any, where: str, what: str) -> Any:
    ok = isinstance(value, kind) and not (
        isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,))
    )
    if not ok:
        raise ConfigError(f"{where}: expected {what}, got {value!r}")
    return value


def _keys(table: Mapping[str, Any], allowed: set[str], where: str, required: Sequence[str] = ()) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(allowed))}")
    missing = [k for k in required if k not in table]
    if missing:
        raise ConfigError(f"{where}: missing {', '.join(missing)}")


def _strings(value: Any, where: str) -> tuple[str, ...]:
    _expect(value, list, where, "a list of strings")
    for item in value:
        _expect(item, str, where, "a list of strings")
    return tuple(value)


def _positive(value: Any, where: str, kind: Any = int) -> Any:
    _expect(value, kind, where, "a positive number" if kind is not int else "a positive integer")
    if not value > 0 or (isinstance(value, float) and not math.isfinite(value)):
        raise ConfigError(f"{where}: expected a positive number, got {value!r}")
    return value


_SPACE_KEYS = {"space", "budget", "searcher", "objectives", "constraints", "nfe_range", "ems"}
_PROFILE_KEYS = {"name", "space", "select", "format", "fit"}
_MODEL_KEYS = {
    "name",
    "model",
    "device",
    "dtype",
    "prompts",
    "negative_prompt",
    "steps",
    "samples",
    "held_out_samples",
    "guidance_scale",
    "height",
    "width",
    "batch_size",
    "latency_repeats",
    "time_limit_minutes",
    "spaces",
    "profiles",
}


def _space_job(table: Any, where: str) -> SpaceJob:
    from difftune.search.runner import _check_searcher
    from difftune.spaces import get_space

    _expect(table, dict, where, "a table")
    _keys(table, _SPACE_KEYS, where, ("space", "budget"))
    name = _expect(table["space"], str, f"{where}.space", "a space name")
    try:
        get_space(name)
    except DifftuneError as exc:
        raise ConfigError(f"{where}.space: {exc}") from None
    searcher = table.get("searcher")
    if searcher is not None:
        _expect(searcher, str, f"{where}.searcher", "a searcher name")
        try:
            _check_searcher(searcher)
        except DifftuneError as exc:
            raise ConfigError(f"{where}.searcher: {exc}") from None
    nfe = table.get("nfe_range")
    if nfe is not None:
        if not (isinstance(nfe, list) and len(nfe) == 2 and all(type(n) is int for n in nfe) and 1 <= nfe[0] <= nfe[1]):
            raise ConfigError(f"{where}.nfe_range: expected [low, high] integers with 1 <= low <= high, got {nfe!r}")
    constraints = _strings(table.get("constraints", []), f"{where}.constraints")
    from difftune.store import parse_constraint

    for text in constraints:
        try:
            parse_constraint(text)
        except DifftuneError as exc:
            raise ConfigError(f"{where}.constraints: {exc}") from None
    objectives = table.get("objectives")
    ems = table.get("ems", 0)
    if type(ems) is not int or ems < 0 or ems == 1 or (ems and not getattr(get_space(name), "uses_ems", False)):
        raise ConfigError(
            f"{where}.ems: expected 0 (off) or the number (>= 2) of trajectories for DPM-Solver-v3's statistics, on "
            f"the solver space; got {ems!r} for space {name!r}"
        )
    return SpaceJob(
        space=name,
        budget=_positive(table["budget"], f"{where}.budget"),
        searcher=searcher,
        objectives=None if objectives is None else _strings(objectives, f"{where}.objectives"),
        constraints=constraints,
        nfe_range=None if nfe is None else (nfe[0], nfe[1]),
        ems=ems,
    )


def _profile_job(table: Any, where: str, spaces: Sequence[str]) -> ProfileJob:
    from difftune.store import parse_select

    _expect(table, dict, where, "a table")
    _keys(table, _PROFILE_KEYS, where, ("name", "space", "select"))
    name = _expect(table["name"], str, f"{where}.name", "a name")
    if not _NAME.match(name):
        raise ConfigError(f"{where}.name: {name!r} — use letters, digits, '-', '_' and '.' (it names a file)")
    space = _expect(table["space"], str, f"{where}.space", "a space name")
    if space not in spaces:
        raise ConfigError(f"{where}.space: {space!r} is not searched for this model (its spaces: {', '.join(spaces)})")
    select = _expect(table["select"], str, f"{where}.select", "a --select expression")
    try:
        parse_select(select)
    except DifftuneError as exc:
        raise ConfigError(f"{where}.select: {exc}") from None
    fmt = _expect(table.get("format", "difftune"), str, f"{where}.format", "a format name")
    if fmt not in NIGHTLY_FORMATS:
        raise ConfigError(
            f"{where}.format: {fmt!r}; a nightly profile is written as one of {', '.join(NIGHTLY_FORMATS)}"
        )
    fit = table.get("fit", 0)
    if type(fit) is not int or fit < 0:
        raise ConfigError(f"{where}.fit: expected the number (>= 0, 0 = off) of CMA-ES runs of the fit, got {fit!r}")
    return ProfileJob(name=name, space=space, select=select, format=fmt, fit=fit)


def _model_job(table: Any, where: str, base: Path) -> ModelJob:
    _expect(table, dict, where, "a table")
    _keys(table, _MODEL_KEYS, where, ("name", "model", "spaces"))
    name = _expect(table["name"], str, f"{where}.name", "a name")
    if not _NAME.match(name):
        raise ConfigError(
            f"{where}.name: {name!r} — use letters, digits, '-', '_' and '.' (it names studies and files)"
        )
    model = _expect(table["model"], str, f"{where}.model", '"embedded", a pipeline directory or a hub id')
    if model != "embedded" and (model.startswith((".", "~", "/")) or (base / model).exists()):
        path = (base / Path(model).expanduser()).resolve()
        if not path.exists():
            raise ConfigError(f"{where}.model: {path} does not exist")
        model = str(path)
    spaces_table = _expect(table["spaces"], list, f"{where}.spaces", "a list of [[models.spaces]] tables")
    if not spaces_table:
        raise ConfigError(f"{where}.spaces: give at least one [[models.spaces]] table")
    spaces = tuple(_space_job(s, f"{where}.spaces[{i}]") for i, s in enumerate(spaces_table))
    names = [s.space for s in spaces]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}.spaces: a space appears twice ({', '.join(names)})")
    profiles = tuple(
        _profile_job(p, f"{where}.profiles[{i}]", names)
        for i, p in enumerate(_expect(table.get("profiles", []), list, f"{where}.profiles", "a list of tables"))
    )
    if len({p.name for p in profiles}) != len(profiles):
        raise ConfigError(f"{where}.profiles: two profiles share a name")
    optional_str = {}
    for key in ("device", "dtype", "negative_prompt"):
        if key in table:
            optional_str[key] = _expect(table[key], str, f"{where}.{key}", "a string")
    if optional_str.get("dtype") not in (None, "float32", "float16", "bfloat16"):
        raise ConfigError(f"{where}.dtype: expected float32, float16 or bfloat16, got {optional_str['dtype']!r}")
    ints = {
        key: _positive(table[key], f"{where}.{key}")
        for key in ("steps", "samples", "held_out_samples", "height", "width", "batch_size", "latency_repeats")
        if key in table
    }
    for key in ("samples", "held_out_samples"):
        if ints.get(key, 2) < 2:
            raise ConfigError(f"{where}.{key}: expected at least 2, got {ints[key]}")
    guidance = table.get("guidance_scale")
    if guidance is not None:
        _expect(guidance, (int, float), f"{where}.guidance_scale", "a number")
    limit = table.get("time_limit_minutes")
    if limit is not None:
        limit = 60.0 * _positive(limit, f"{where}.time_limit_minutes", (int, float))
    prompts = table.get("prompts")
    return ModelJob(
        name=name,
        model=model,
        spaces=spaces,
        profiles=profiles,
        prompts=None if prompts is None else _strings(prompts, f"{where}.prompts"),
        guidance_scale=None if guidance is None else float(guidance),
        time_limit_s=limit,
        **optional_str,
        **ints,
    )


def load_config(path: str | os.PathLike[str]) -> NightlyConfig:
    """Read and check a nightly configuration; relative paths in it are relative to the file.

    Raises:
        ConfigError: an unreadable file, malformed TOML, an unknown key (a typo), a value of the wrong type,
            an unknown space or searcher, a malformed selection — naming the file and the key.
    """
    file = Path(path).expanduser()
    try:
        data = tomllib.loads(file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read the configuration ({exc.strerror or exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{file}: not valid TOML ({exc})") from None
    base = file.resolve().parent
    try:
        _keys(data, {"output", "storage", "seed", "tolerance", "models"}, "top level", ("models",))
        output = base / Path(_expect(data.get("output", "nightly"), str, "output", "a folder")).expanduser()
        storage = data.get("storage")
        if storage is None:
            storage = f"sqlite:///{output.resolve() / 'difftune.db'}"
        _expect(storage, str, "storage", "a database URL")
        tolerance = dict(DEFAULT_TOLERANCE)
        table = _expect(data.get("tolerance", {}), dict, "tolerance", "a table of metric = allowed worsening")
        from difftune.evaluators import metric_spec

        for metric, value in table.items():
            try:
                metric_spec(metric)
            except DifftuneError as exc:
                raise ConfigError(f"tolerance.{metric}: {exc}") from None
            _expect(value, (int, float), f"tolerance.{metric}", "a number >= 0")
            if value < 0:
                raise ConfigError(f"tolerance.{metric}: expected a number >= 0, got {value!r}")
            tolerance[metric] = float(value)
        models_table = _expect(data["models"], list, "models", "a list of [[models]] tables")
        if not models_table:
            raise ConfigError("models: give at least one [[models]] table")
        models = tuple(_model_job(m, f"models[{i}]", base) for i, m in enumerate(models_table))
        if len({m.name for m in models}) != len(models):
            raise ConfigError("models: two models share a name")
        seed = data.get("seed", 0)
        _expect(seed, int, "seed", "an integer")
    except ConfigError as exc:
        raise ConfigError(f"{file}: {exc}") from None
    return NightlyConfig(
        path=file.resolve(), output=output.resolve(), storage=storage, models=models, tolerance=tolerance, seed=seed
    )


# --------------------------------------------------------------------------------------------
# The lock and the night's state
# --------------------------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Lock:
    """``<output>/nightly.lock``, created exclusively; a lock whose process is gone (same host) is taken over."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / LOCK_FILE
        self.stale: str | None = None

    def __enter__(self) -> _Lock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        mine = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": _now()})
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is not None:
                    raise NightlyLocked(
                        f"another night is running (pid {holder.get('pid')} on {holder.get('host')}, started "
                        f"{holder.get('started')}; lock {self.path}); delete the lock only if that process is gone"
                    ) from None
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(mine)
            return self
        raise NightlyLocked(f"could not take the lock {self.path}; another night took it first")

    def _holder(self) -> dict[str, Any] | None:
        """The live holder of an existing lock, or None after removing a stale one."""
        try:
            holder = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            holder = None
        if isinstance(holder, dict) and holder.get("host") != socket.gethostname():
            return holder  # another machine's: it cannot be checked from here
        if isinstance(holder, dict) and isinstance(holder.get("pid"), int) and _pid_alive(holder["pid"]):
            return holder
        self.stale = f"took over a stale lock ({holder if isinstance(holder, dict) else 'unreadable'})"
        self.path.unlink(missing_ok=True)
        return None

    def __exit__(self, *exc: object) -> None:
        self.path.unlink(missing_ok=True)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _write_json(path: Path, data: Any) -> None:
    from difftune._atomic import atomic_write

    text = json.dumps(data, indent=2, sort_keys=False, default=str) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _read_state(folder: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _nights(output: Path) -> list[tuple[str, dict[str, Any]]]:
    """Every night with a state in ``output``, oldest first (by start time)."""
    root = output / "nights"
    found = []
    for folder in root.iterdir() if root.is_dir() else ():
        state = _read_state(folder)
        if state is not None and folder.is_dir():
            found.append((folder.name, state))
    return sorted(found, key=lambda item: (str(item[1].get("started", "")), item[0]))


def _choose_night(output: Path, asked: str | None, today: date) -> tuple[str, dict[str, Any] | None]:
    """Tonight's id and its state when resuming: ``asked``; else an interrupted night; else today's date
    (``.2``, ``.3``, … when that night is done)."""
    nights = _nights(output)
    if asked is not None:
        if not _NAME.match(asked):
            raise ConfigError(f"--night {asked!r}: use letters, digits, '-', '_' and '.'")
        return asked, dict(nights).get(asked)
    for name, state in reversed(nights):
        if state.get("status") == "running":
            return name, state
    taken = {name for name, _ in nights}
    name, n = today.isoformat(), 1
    while name in taken:
        n += 1
        name = f"{today.isoformat()}.{n}"
    return name, None


# --------------------------------------------------------------------------------------------
# The night
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NightlyResult:
    """What a night did: its id, report, exit code, regressions and errors (one line each)."""

    night: str
    report: Path
    exit_code: int
    regressions: tuple[str, ...] = ()
    errors: tuple[str, ...] = ()
    resumed: bool = False
    state: Mapping[str, Any] = field(default_factory=dict)


def run_nightly(
    config: NightlyConfig | str | os.PathLike[str],
    *,
    night: str | None = None,
    progress: Callable[[str], None] | None = None,
    pipelines: Mapping[str, Any] | None = None,
    today: date | None = None,
) -> NightlyResult:
    """Run (or resume) one night of ``config`` and write its report.

    Args:
        config: a :class:`NightlyConfig` or the path of its TOML file.
        night: the night's id (default: an interrupted night's, else today's date, ``.2`` … when taken).
        progress: called with one line per step.
        pipelines: already loaded pipelines by model name (tests); the others are loaded.
        today: the date naming a new night (default: today).

    Raises:
        ConfigError: the configuration cannot run (before anything is written).
        NightlyLocked: another night holds the lock.
    """
    cfg = config if isinstance(config, NightlyConfig) else load_config(config)
    say = progress or (lambda _: None)
    with _Lock(cfg.output) as lock:
        name, state = _choose_night(cfg.output, night, today or date.today())
        resumed = state is not None and state.get("status") == "running"
        folder = cfg.output / "nights" / name
        previous = _previous_night(cfg.output, name)
        if state is None or state.get("status") == "done":
            state = {
                "night": name,
                "status": "running",
                "started": _now(),
                "config": str(cfg.path),
                "storage": _mask(cfg.storage),
                "previous": previous[0] if previous else None,
                "versions": _versions(),
                "models": {},
                "notes": [],
            }
        state["status"] = "running"
        if resumed:
            state.setdefault("notes", []).append(f"resumed at {_now()} after an interruption")
        if lock.stale:
            state.setdefault("notes", []).append(lock.stale)
        _write_json(folder / STATE_FILE, state)
        say(f"night {name}{' (resumed)' if resumed else ''}: {len(cfg.models)} model(s); report in {folder}")
        for job in cfg.models:
            entry = state["models"].setdefault(job.name, {"status": "running"})
            if entry.get("status") == "done":
                say(f"{job.name}: done earlier tonight")
                continue
            try:
                _run_model(cfg, job, name, entry, previous[1] if previous else None, folder, state, say, pipelines)
                entry["status"] = "done"
            except DifftuneError as exc:
                entry["status"] = "error"
                entry["error"] = str(exc)
                say(f"{job.name}: error: {exc}")
            _write_json(folder / STATE_FILE, state)
        state["status"] = "done"
        state["finished"] = _now()
        regressions, errors = _findings(state)
        state["exit_code"] = EXIT_ERROR if errors else EXIT_REGRESSION if regressions else EXIT_OK
        report = _write_report(cfg, state, previous, folder)
        _write_json(folder / STATE_FILE, state)
    return NightlyResult(
        night=name,
        report=report,
        exit_code=int(state["exit_code"]),
        regressions=tuple(regressions),
        errors=tuple(errors),
        resumed=resumed,
        state=state,
    )


def _mask(url: str) -> str:
    from difftune.store import mask_url

    return mask_url(url)


def _versions() -> dict[str, str]:
    from difftune.search.runner import _versions as runner_versions

    return runner_versions()


def _previous_night(output: Path, tonight: str) -> tuple[str, dict[str, Any]] | None:
    """The latest finished night before ``tonight``."""
    done = [(n, s) for n, s in _nights(output) if n != tonight and s.get("status") == "done"]
    return done[-1] if done else None


def _findings(state: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    regressions, errors = [], []
    for model, entry in state.get("models", {}).items():
        if entry.get("status") == "error":
            errors.append(f"{model}: {entry.get('error')}")
        for profile, check in entry.get("revalidated", {}).items():
            if check.get("status") != "ok":
                regressions.append(f"{model}/{profile}: {check.get('reason')}")
        for profile, exported in entry.get("exported", {}).items():
            if exported.get("status") != "ok":
                regressions.append(f"{model}/{profile}: {exported.get('reason')}")
    return regressions, errors


def _settings(cfg: NightlyConfig, job: ModelJob) -> Any:
    from difftune.search.settings import StudySettings

    return StudySettings(
        model=job.model,
        num_inference_steps=job.steps,
        samples=job.samples,
        latency_repeats=job.latency_repeats,
        **job.call_options(),
    )


def _load(cfg: NightlyConfig, job: ModelJob, pipelines: Mapping[str, Any] | None) -> Any:
    from difftune.search.settings import resolve_device

    given = (pipelines or {}).get(job.name)
    settings = dataclasses.replace(_settings(cfg, job), device=resolve_device(job.device, given))
    return settings.load_pipeline(given)


def _run_model(
    cfg: NightlyConfig,
    job: ModelJob,
    night: str,
    entry: dict[str, Any],
    previous: Mapping[str, Any] | None,
    folder: Path,
    state: dict[str, Any],
    say: Callable[[str], None],
    pipelines: Mapping[str, Any] | None,
) -> None:
    from difftune.models import describe

    save = lambda: _write_json(folder / STATE_FILE, state)  # noqa: E731
    say(f"{job.name}: loading {job.model} …")
    pipe = _load(cfg, job, pipelines)
    info = describe(pipe)
    before = (previous or {}).get("models", {}).get(job.name, {})
    entry.setdefault("fingerprint", info.fingerprint)
    entry.setdefault("family", info.family)
    if entry["fingerprint"] != info.fingerprint:  # the weights changed during an interrupted night
        raise DifftuneError(
            f"the weights of {job.model} changed while night {night} was interrupted "
            f"({entry['fingerprint'][:12]}… then, {info.fingerprint[:12]}… now); start a new night with --night"
        )
    changed = before.get("fingerprint") not in (None, info.fingerprint)
    if changed:
        entry["fresh"] = (
            f"the model's fingerprint changed ({before['fingerprint'][:12]}… → {info.fingerprint[:12]}…): fresh "
            "studies, no warm start"
        )
        say(f"{job.name}: {entry['fresh']}")
    save()

    # 1. re-validate what earlier nights exported, before tonight's exports replace it
    checks = entry.setdefault("revalidated", {})
    for profile_job in job.profiles:
        if profile_job.name in checks:
            continue
        deployed = _deployed(cfg, job, profile_job)
        if deployed is None:
            continue
        say(f"{job.name}/{profile_job.name}: re-validating {deployed} on held-out samples …")
        checks[profile_job.name] = revalidate(cfg, job, pipe, info.fingerprint, deployed)
        save()

    # 2. search, warm-started from last night's fronts
    deadline = None if job.time_limit_s is None else time.monotonic() + job.time_limit_s
    spaces = entry.setdefault("spaces", {})
    for index, space_job in enumerate(job.spaces):
        done = spaces.setdefault(space_job.space, {})
        if done.get("status") == "done":
            continue
        limit = None
        if deadline is not None:
            limit = max(1.0, (deadline - time.monotonic()) / (len(job.spaces) - index))
        _search(cfg, job, space_job, pipe, night, done, before, changed, limit, say)
        done["status"] = "done"
        save()

    # 3. export tonight's profiles in place of last night's
    exported = entry.setdefault("exported", {})
    for profile_job in job.profiles:
        if profile_job.name in exported:
            continue
        exported[profile_job.name] = _export(cfg, job, profile_job, pipe, spaces[profile_job.space], folder, say)
        save()

    # 4. the front plot
    entry["plot"] = _plot(cfg, job, spaces, before, folder)


def _study_name(job: ModelJob, space: str, night: str) -> str:
    return f"{job.name}-{space}-{night}"


def _warm_points(store: Any, study: str, budget: int) -> list[Any]:
    """Last night's front in ``study``, without the space's own baselines and seeds (they run anyway), at
    most half of ``budget`` (spread over the front)."""
    from difftune.search.runner import WarmPoint, study_settings

    record = store.get_study(study)
    front = store.pareto_front(record.id, constraints=study_settings(record).constraints)
    carried = [t for t in front if t.kind in ("searched", "retry", "warm") and t.params]
    keep = max(1, budget // 2)
    if len(carried) > keep:
        step = (len(carried) - 1) / max(1, keep - 1)
        carried = [carried[round(i * step)] for i in range(keep)]
    out = []
    for t in carried:
        config = t.config or {}
        origin = config.get("origin") or config.get("warm")
        out.append(WarmPoint(f"{record.name}#{t.number}", dict(t.params), str(origin) if origin else None))
    return out


def _search(
    cfg: NightlyConfig,
    job: ModelJob,
    space_job: SpaceJob,
    pipe: Any,
    night: str,
    done: dict[str, Any],
    before: Mapping[str, Any],
    changed: bool,
    limit: float | None,
    say: Callable[[str], None],
) -> None:
    from difftune.search.runner import DEFAULT_NFE_RANGE, run_study
    from difftune.store import get_store

    study = _study_name(job, space_job.space, night)
    done["study"] = study
    last = before.get("spaces", {}).get(space_job.space, {}).get("study")
    warm: list[Any] = []
    if last and not changed and "warm_from" not in done:
        store = get_store(cfg.storage)
        try:
            warm = _warm_points(store, last, space_job.budget)
        except DifftuneError as exc:
            done["warm_note"] = f"no warm start from {last}: {exc}"
            say(f"{job.name}/{space_job.space}: {done['warm_note']}")
        finally:
            store.close()
        done["warm_from"] = last
        done["warm"] = [p.name for p in warm]
    elif "warm_from" in done:  # resuming: the claimed warm points keep their keys and run once
        warm = _rebuild_warm(cfg, done)
    say(
        f"{job.name}/{space_job.space}: study {study}, budget {space_job.budget}"
        + (f", {len(warm)} warm point(s) from {last}" if warm else "")
        + (f", time limit {limit:.0f} s" if limit else "")
    )

    def on_trial(event: Any) -> None:
        say(f"  {event.label}: trial {event.finished}/{event.budget}, front {event.front_size}")

    result = run_study(
        job.model,
        space_job.space,
        budget=space_job.budget,
        study=study,
        storage=cfg.storage,
        searcher=space_job.searcher,
        seed=cfg.seed,
        num_inference_steps=job.steps,
        samples=job.samples,
        objectives=space_job.objectives,
        constraints=space_job.constraints,
        latency_repeats=job.latency_repeats,
        progress=on_trial,
        pipeline=pipe,
        **job.call_options(),
        nfe_range=space_job.nfe_range or DEFAULT_NFE_RANGE,
        ems=space_job.ems,
        warm_start=warm,
        time_limit_s=limit,
        memo=False,  # tonight's figures, not last night's copied: drift is what a night watches for
    )
    done["finished"] = result.finished
    done["failed"] = result.failed
    done["notes"] = list(result.notes)


def _rebuild_warm(cfg: NightlyConfig, done: Mapping[str, Any]) -> list[Any]:
    from difftune.store import get_store

    store = get_store(cfg.storage)
    try:
        wanted = set(done.get("warm", []))
        return [p for p in _warm_points(store, str(done["warm_from"]), 10**9) if p.name in wanted]
    except DifftuneError:
        return []
    finally:
        store.close()


# --------------------------------------------------------------------------------------------
# Profiles: re-validation and export
# --------------------------------------------------------------------------------------------


def _profiles_dir(cfg: NightlyConfig, job: ModelJob) -> Path:
    return cfg.output / "profiles" / job.name


def _deployed(cfg: NightlyConfig, job: ModelJob, profile_job: ProfileJob) -> Path | None:
    """The profile file the nights keep for ``profile_job`` (inside the directory of a directory format)."""
    base = _profiles_dir(cfg, job)
    for path in (base / f"{profile_job.name}.json", base / profile_job.name / "profile.json"):
        if path.is_file():
            return path
    return None


def revalidate(cfg: NightlyConfig, job: ModelJob, pipe: Any, fingerprint: str, path: Path) -> dict[str, Any]:
    """Re-measure the profile at ``path`` on the held-out samples it was exported with and compare with its
    recorded held-out figures under ``cfg.tolerance``.

    Returns ``{"status": "ok" | "regressed" | "model_changed" | "broken", "reason", "recorded", "measured", …}``.
    """
    from difftune.profile import load_profile
    from difftune.search.export import _measure, _settings_of, held_out_samples
    from difftune.store import get_store

    try:
        profile = load_profile(path)
    except DifftuneError as exc:
        return {"status": "broken", "reason": f"{path} cannot be read: {exc}", "path": str(path)}
    recorded = {k: float(v["value"]) for k, v in profile.metrics.items() if isinstance(v.get("value"), (int, float))}
    out: dict[str, Any] = {"path": str(path), "recorded": recorded, "trial": profile.provenance.get("trial")}
    out["study"] = profile.provenance.get("study")
    if profile.model.fingerprint != fingerprint:
        return {
            **out,
            "status": "model_changed",
            "reason": (
                f"exported for weights {profile.model.fingerprint[:12]}…, the model now has {fingerprint[:12]}…: "
                "tonight's export replaces it"
            ),
        }
    settings = _settings(cfg, job)
    store = get_store(cfg.storage)
    try:
        settings = _settings_of(store.get_study(str(out["study"])))
    except DifftuneError:
        pass  # the study is gone from the store: the model's own settings
    finally:
        store.close()
    n = int(profile.provenance.get("held_out_samples") or job.held_out_samples or job.samples)
    try:
        measured = _measure(pipe, profile, held_out_samples(pipe, n, settings), settings, recorded, job.latency_repeats)
    except DifftuneError as exc:
        return {**out, "status": "broken", "reason": f"it no longer applies: {exc}"}
    out["measured"] = measured
    worse = _worse(recorded, measured, cfg.tolerance)
    out["worse"] = worse
    if worse:
        return {**out, "status": "regressed", "reason": "; ".join(worse)}
    return {**out, "status": "ok", "reason": "within tolerance"}


def _worse(recorded: Mapping[str, float], measured: Mapping[str, float], tolerance: Mapping[str, float]) -> list[str]:
    """What measures worse than recorded by more than its tolerance (speedup relative, the rest absolute)."""
    from difftune.evaluators import metric_spec

    out = []
    for name, allowed in tolerance.items():
        if name not in recorded or name not in measured:
            continue
        old, new = recorded[name], measured[name]
        sign = 1.0 if metric_spec(name).direction == "maximize" else -1.0
        drop = sign * (old - new)
        if name == "speedup":
            if new < old * (1.0 - allowed):
                out.append(
                    f"speedup {old:.2f}× → {new:.2f}× ({(new / old - 1) * 100:+.0f} %, tolerance −{allowed:.0%})"
                )
        elif drop > allowed:
            out.append(f"{name} {old:.4g} → {new:.4g} (worse by {abs(old - new):.3g}, tolerance {allowed:g})")
    return out


def _export(
    cfg: NightlyConfig,
    job: ModelJob,
    profile_job: ProfileJob,
    pipe: Any,
    space_state: Mapping[str, Any],
    folder: Path,
    say: Callable[[str], None],
) -> dict[str, Any]:
    from difftune.search.export import export_point

    study = str(space_state.get("study"))
    directory = profile_job.format != "difftune"
    staged = folder / "profiles" / job.name / (profile_job.name if directory else f"{profile_job.name}.json")
    say(f"{job.name}/{profile_job.name}: exporting '{profile_job.select}' from {study} …")
    try:
        result = export_point(
            cfg.storage,
            study,
            profile_job.select,
            staged,
            format=profile_job.format,
            samples=job.held_out_samples or job.samples,
            latency_repeats=job.latency_repeats,
            pipeline=pipe,
            fit=profile_job.fit,
        )
    except DifftuneError as exc:
        kept = _deployed(cfg, job, profile_job)
        return {
            "status": "not_met",
            "select": profile_job.select,
            "reason": f"no point of {study} keeps '{profile_job.select}' tonight ({exc})"
            + (f"; last night's profile stays in {kept}" if kept else ""),
        }
    target = _profiles_dir(cfg, job) / staged.name
    _put_in_place(staged, target)
    trial = result.trial
    return {
        "status": "ok",
        "select": profile_job.select,
        "study": study,
        "trial": trial.number,
        "kind": trial.kind,
        "held_out": dict(result.held_out),
        "calibration": dict(result.calibration),
        "path": str(target),
        "warnings": list(result.warnings),
        "rejected": [t.number for t in result.rejected],
    }


def _put_in_place(staged: Path, target: Path) -> None:
    """Copy tonight's staged profile (file or directory) over the deployed one, atomically per file or by a
    rename of a complete directory."""
    from difftune._atomic import atomic_write

    if staged.is_file():
        data = staged.read_bytes()
        atomic_write(target, lambda tmp: tmp.write_bytes(data))
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    fresh = target.with_name(f".{target.name}.new")
    shutil.rmtree(fresh, ignore_errors=True)
    shutil.copytree(staged, fresh)
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(fresh, target)
    shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _study_rows(store: Any, name: str | None) -> tuple[Any, list[Any], list[Any]] | None:
    """(study, complete trials, front) of ``name``, or None when the store does not hold it."""
    from difftune.search.runner import study_settings
    from difftune.store import TrialState

    if not name:
        return None
    try:
        record = store.get_study(name)
        constraints = study_settings(record).constraints
    except DifftuneError:
        return None
    trials = store.list_trials(record.id, TrialState.COMPLETE)
    return record, trials, store.pareto_front(record.id, constraints=constraints)


def _plot(
    cfg: NightlyConfig, job: ModelJob, spaces: Mapping[str, Any], before: Mapping[str, Any], folder: Path
) -> str | None:
    """``<night>/<model>.png``: per space, tonight's trials and front against last night's front on the study's
    first two objectives."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from difftune.store import get_store

    store = get_store(cfg.storage)
    try:
        panels = []
        for space_job in job.spaces:
            tonight = _study_rows(store, spaces.get(space_job.space, {}).get("study"))
            last = _study_rows(store, before.get("spaces", {}).get(space_job.space, {}).get("study"))
            if tonight is not None and len(tonight[0].objectives) >= 2:
                panels.append((space_job.space, tonight, last))
        if not panels:
            return None
        fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
        for ax, (space, (record, trials, front), last) in zip(axes[0], panels, strict=True):
            x, y = record.objectives[0], record.objectives[1]

            def xy(rows: Sequence[Any], xs: Any = x, ys: Any = y) -> tuple[list[float], list[float]]:
                values = [r.values() for r in rows]
                values = [v for v in values if xs.name in v and ys.name in v]
                return [_shown(xs.name, v[xs.name]) for v in values], [_shown(ys.name, v[ys.name]) for v in values]

            ax.scatter(*xy(trials), s=12, c="#bbbbbb", label="tonight's trials")
            if last is not None:
                ax.scatter(*xy(last[2]), s=46, facecolors="none", edgecolors="#ff7f0e", label="last night's front")
            warm = [t for t in front if t.kind == "warm"]
            new = [t for t in front if t.kind != "warm"]
            ax.scatter(*xy(new), s=30, c="#1f77b4", label="tonight's front")
            if warm:
                ax.scatter(*xy(warm), s=34, c="#8c564b", marker="^", label="tonight's front (warm)")
            ax.set_xlabel(_axis_label(x))
            ax.set_ylabel(_axis_label(y))
            ax.set_title(f"{job.name} · {space} · {record.name}", fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = folder / f"{job.name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path.name
    finally:
        store.close()


#: PSNR above this is drawn at it: the identity's 100 dB (identical images) would squash every other point.
PSNR_SHOWN = 60.0


def _shown(name: str, value: float) -> float:
    return min(value, PSNR_SHOWN) if name == "psnr" else value


def _axis_label(spec: Any) -> str:
    cap = f"; ≥ {PSNR_SHOWN:g} dB drawn at {PSNR_SHOWN:g}" if spec.name == "psnr" else ""
    return f"{spec.name} ({spec.direction}{cap})"


def _fmt(name: str, value: Any) -> str:
    if not isinstance(value, (int, float)):
        return "–"
    if name == "speedup":
        return f"{value:.2f}×"
    if name == "psnr":
        return f"{value:.1f} dB"
    return f"{value:.3g}"


def _space_section(
    store: Any, job: ModelJob, space: str, tonight: Mapping[str, Any], last: Mapping[str, Any]
) -> list[str]:
    from difftune.search.runner import hypervolume_reference
    from difftune.store import hypervolume

    lines = [f"### {space}: study `{tonight.get('study')}`", ""]
    now = _study_rows(store, tonight.get("study"))
    if now is None:
        return [*lines, "The study is not in the store.", ""]
    record, trials, front = now
    specs = record.objectives
    kinds: dict[str, int] = {}
    for t in store.list_trials(record.id):
        kinds[t.kind] = kinds.get(t.kind, 0) + 1
    counted = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
    lines.append(
        f"- {tonight.get('finished', len(trials))} finished trials ({counted}), {tonight.get('failed', 0)} failed; "
        f"objectives {', '.join(f'{s.name} ({s.direction})' for s in specs)}."
    )
    if tonight.get("warm_from"):
        lines.append(
            f"- Warm start: {len(tonight.get('warm', []))} point(s) of last night's front "
            f"(`{tonight['warm_from']}`) re-measured first."
        )
    if tonight.get("warm_note"):
        lines.append(f"- {tonight['warm_note']}")
    for note in tonight.get("notes", []):
        lines.append(f"- {note}")
    before = _study_rows(store, last.get("study"))
    by_kind = {k: sum(t.kind == k for t in front) for k in ("warm", "searched", "retry", "baseline", "seed")}
    lines.append(
        f"- Front: {len(front)} points ({', '.join(f'{n} {k}' for k, n in by_kind.items() if n)})"
        + (f"; last night {len(before[2])}" if before else "")
        + "."
    )
    if before is not None:
        rows = [t.values() for t in [*front, *before[2]]]
        rows = [r for r in rows if all(s.name in r for s in specs)]
        ref = hypervolume_reference(specs, rows)

        def hv(points: Sequence[Any]) -> float:
            values = [t.values() for t in points]
            values = [v for v in values if all(s.name in v for s in specs)]
            if not values:
                return 0.0
            return hypervolume([[v[s.name] for s in specs] for v in values], ref, [s.direction for s in specs])

        h_now, h_then = hv(front), hv(before[2])
        change = f" ({(h_now / h_then - 1) * 100:+.1f} %)" if h_then > 0 else ""
        lines.append(f"- Hypervolume (one reference for both nights): {h_then:.4g} → {h_now:.4g}{change}.")
        drift = _drift(store, record, before[0], specs)
        if drift:
            lines.append(f"- Warm points re-measured tonight vs last night: {drift}.")
    lines += [
        "",
        "| trial | kind | from | " + " | ".join(s.name for s in specs) + " |",
        "|---" * (3 + len(specs)) + "|",
    ]
    for t in front:
        values = t.values()
        origin = (t.config or {}).get("warm") or (t.config or {}).get("baseline") or (t.config or {}).get("seed") or ""
        cells = " | ".join(_fmt(s.name, values.get(s.name)) for s in specs)
        lines.append(f"| {t.number} | {t.kind} | {origin} | {cells} |")
    return [*lines, ""]


def _drift(store: Any, record: Any, last_record: Any, specs: Sequence[Any]) -> str:
    """Median and largest change of each objective between a warm point tonight and its trial last night."""
    import statistics

    from difftune.store import TrialState

    last = {
        f"{last_record.name}#{t.number}": t.values() for t in store.list_trials(last_record.id, TrialState.COMPLETE)
    }
    pairs = []
    for t in store.list_trials(record.id, TrialState.COMPLETE):
        origin = (t.config or {}).get("warm")
        if t.kind == "warm" and origin in last:
            pairs.append((last[origin], t.values()))
    if not pairs:
        return ""
    parts = []
    for s in specs:
        if s.name == "speedup":
            changes = [(new[s.name] / old[s.name] - 1) * 100 for old, new in pairs if old.get(s.name) and s.name in new]
            unit = " %"
        else:
            changes = [new[s.name] - old[s.name] for old, new in pairs if s.name in old and s.name in new]
            unit = ""
        if changes:
            worst = max(changes, key=abs)
            parts.append(f"{s.name} median {statistics.median(changes):+.3g}{unit}, largest {worst:+.3g}{unit}")
    return f"{len(pairs)} pairs; " + "; ".join(parts)


def _write_report(
    cfg: NightlyConfig, state: Mapping[str, Any], previous: tuple[str, Mapping[str, Any]] | None, folder: Path
) -> Path:
    from difftune.store import get_store

    regressions, errors = _findings(state)
    last = previous[1] if previous else {}
    code = int(state.get("exit_code") or 0)
    verdict = {EXIT_ERROR: "configuration or model error", EXIT_REGRESSION: "regression"}.get(code, "all well")
    lines = [
        f"# difftune nightly — {state['night']}",
        "",
        f"- Configuration `{state.get('config')}`, storage `{state.get('storage')}`, machine `{socket.gethostname()}`.",
        f"- Started {state.get('started')}, finished {state.get('finished')}; exit code **{code}** ({verdict}).",
        f"- Previous night: {previous[0] if previous else 'none (first night)'}.",
    ]
    lines += [f"- {note}" for note in state.get("notes", [])]
    versions, old_versions = state.get("versions", {}), last.get("versions", {})
    moved = {k: (old_versions.get(k), v) for k, v in versions.items() if old_versions and old_versions.get(k) != v}
    lines.append(
        "- Libraries: "
        + ", ".join(f"{k} {v}" for k, v in versions.items())
        + (
            f" (changed since last night: {', '.join(f'{k} {a} → {b}' for k, (a, b) in moved.items())})"
            if moved
            else ""
        )
        + "."
    )
    lines += ["", "## Regressions", ""]
    lines += [f"- {r}" for r in regressions] or ["None."]
    if errors:
        lines += ["", "## Errors", ""] + [f"- {e}" for e in errors]
    store = get_store(cfg.storage)
    try:
        for model, entry in state.get("models", {}).items():
            before = last.get("models", {}).get(model, {})
            fp = str(entry.get("fingerprint", ""))
            lines += ["", f"## {model}", ""]
            lines.append(
                f"- Fingerprint `{fp[:16]}…`"
                + (" (unchanged)" if before.get("fingerprint") == fp else "")
                + (f"; {entry['fresh']}" if entry.get("fresh") else "")
                + "."
            )
            if entry.get("status") == "error":
                lines.append(f"- **Error:** {entry.get('error')}")
            if entry.get("plot"):
                lines += ["", f"![fronts of {model}]({entry['plot']})", ""]
            job = next((m for m in cfg.models if m.name == model), None)
            for space, tonight in entry.get("spaces", {}).items():
                if job is not None:
                    lines += _space_section(store, job, space, tonight, before.get("spaces", {}).get(space, {}))
            lines += _profiles_section(entry, before)
    finally:
        store.close()
    path = folder / REPORT_FILE
    text = "\n".join(lines) + "\n"
    from difftune._atomic import atomic_write

    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return path


def _profiles_section(entry: Mapping[str, Any], before: Mapping[str, Any]) -> list[str]:
    checks, exported = entry.get("revalidated", {}), entry.get("exported", {})
    names = list(dict.fromkeys([*checks, *exported]))
    if not names:
        return []
    lines = ["### Profiles", "", "| profile | last night's, re-validated tonight | tonight's export |", "|---|---|---|"]
    for name in names:
        check, new = checks.get(name), exported.get(name, {})
        if check is None:
            old_text = "none (first export)"
        else:
            shown = ", ".join(
                f"{m} {_fmt(m, check.get('recorded', {}).get(m))} → {_fmt(m, v)}"
                for m, v in check.get("measured", {}).items()
                if m in ("speedup", "psnr", "class_accuracy", "ssim")
            )
            old_text = f"**{check.get('status')}**: {check.get('reason')}" + (f" ({shown})" if shown else "")
        if new.get("status") == "ok":
            held = new.get("held_out", {})
            figures = ", ".join(
                f"{m} {_fmt(m, held.get(m))}" for m in ("speedup", "psnr", "class_accuracy") if m in held
            )
            old_new = before.get("exported", {}).get(name, {})
            same = (
                " (same trial as last night)"
                if old_new.get("trial") == new.get("trial") and old_new.get("study") == new.get("study")
                else ""
            )
            new_text = f"trial {new.get('trial')} ({new.get('kind')}) of `{new.get('study')}`: {figures}{same}"
        else:
            new_text = f"**{new.get('status', 'not run')}**: {new.get('reason', '')}"
        lines.append(f"| {name} | {old_text} | {new_text} |")
    return [*lines, ""]
