"""difftune's command line. Heavy libraries are imported inside the commands, so --help is instant."""

from __future__ import annotations

import inspect
import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from difftune.errors import DifftuneError

app = typer.Typer(
    name="difftune",
    help="Search and autotune diffusion-model inference (solver schedules, caching, sparsity, quantization).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)

#: Exit code for bad input (unknown model, bad path, bad label, malformed file).
EXIT_BAD_INPUT = 2


@app.command()
def models() -> None:
    """List the models difftune knows, the embedded default first, and whether each is available here."""
    from rich.table import Table

    from difftune.models import KNOWN_MODELS, is_available_locally

    table = Table(title="Models difftune knows")
    table.add_column("model", no_wrap=True, overflow="fold")
    table.add_column("family")
    table.add_column("here")
    table.add_column("notes")
    missing = []
    for m in KNOWN_MODELS:
        if m.source != "hub":
            where = "[green]ships[/]"
        elif is_available_locally(m.name):
            where = "[green]cached[/]"
        else:
            where = "[yellow]no[/]"
            missing.append(m.name)
        table.add_row(m.name, m.family, where, m.note)
    console.print(table)
    console.print(
        "The default is [bold]embedded[/]. Any diffusers pipeline directory or locally cached hub id of these "
        "families also works as --model; difftune never downloads weights on its own"
        + (f" (to get one: `hf download {missing[0]}`)." if missing else ".")
    )


def _scheduler_from_name(pipe: Any, name: str) -> Any:
    import diffusers

    choices: dict[str, tuple[str, dict[str, Any]]] = {
        "dpm++": ("DPMSolverMultistepScheduler", {}),
        "unipc": ("UniPCMultistepScheduler", {}),
        "ddim": ("DDIMScheduler", {}),
        "euler": ("EulerDiscreteScheduler", {}),
    }
    if name not in choices:
        raise DifftuneError(f"unknown scheduler {name!r}; choose one of: {', '.join(choices)} (or omit --scheduler)")
    cls_name, extra = choices[name]
    return getattr(diffusers, cls_name).from_config(pipe.scheduler.config, **extra)


def make_grid(images: list[Any], columns: int, min_cell: int = 64) -> Any:
    """Paste PIL images into a grid, upscaling tiny ones (nearest neighbour) to ``min_cell`` pixels."""
    from PIL import Image

    w, h = images[0].size
    scale = max(1, -(-min_cell // max(w, h)))
    cw, ch = w * scale, h * scale
    rows = -(-len(images) // columns)
    grid = Image.new("RGB", (columns * cw + (columns + 1) * 2, rows * ch + (rows + 1) * 2), "white")
    for i, img in enumerate(images):
        r, c = divmod(i, columns)
        cell = img.convert("RGB").resize((cw, ch), Image.Resampling.NEAREST)
        grid.paste(cell, (2 + c * (cw + 2), 2 + r * (ch + 2)))
    return grid


def save_atomically(image: Any, out: Path) -> None:
    """Write to a temporary file beside ``out`` and rename, so a crash never leaves half a file."""
    from difftune._atomic import atomic_write

    atomic_write(
        out, lambda tmp: image.save(tmp, format=(out.suffix.lstrip(".") or "png").upper().replace("JPG", "JPEG"))
    )


@app.command()
def generate(
    prompt: Annotated[
        list[str],
        typer.Option("--prompt", "-p", help="Prompt(s); for the embedded model class names like 'digit 3' or '3'."),
    ],
    more_prompts: Annotated[list[str] | None, typer.Argument(help="More prompts (so `--prompt A B C` works).")] = None,
    model: Annotated[str, typer.Option(help="'embedded', a diffusers pipeline directory, or a cached hub id.")] = (
        "embedded"
    ),
    out: Annotated[Path, typer.Option(help="Where to write the image grid (PNG).")] = Path("grid.png"),
    profile: Annotated[
        Path | None, typer.Option(help="Apply this difftune profile (JSON) to the pipeline before generating.")
    ] = None,
    steps: Annotated[
        int | None, typer.Option(min=1, help="num_inference_steps (default: the profile's, else 25).")
    ] = None,
    guidance_scale: Annotated[
        float | None, typer.Option(help="Classifier-free guidance scale (default: the pipeline's).")
    ] = None,
    per_prompt: Annotated[int, typer.Option(min=1, help="Images per prompt (the grid's columns).")] = 4,
    seed: Annotated[int, typer.Option(help="Seed of the first image; image k uses seed+k.")] = 0,
    scheduler: Annotated[
        str | None, typer.Option(help="Swap the pipeline's scheduler: dpm++, unipc, ddim or euler.")
    ] = None,
) -> None:
    """Run a pipeline and save a grid: one row per prompt, --per-prompt images per row."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    prompts = list(prompt) + list(more_prompts or [])
    loaded = None
    if profile is not None:
        from difftune.profile import load_profile

        loaded = load_profile(profile)
    with console.status(f"loading {model} …"):
        import torch
        from diffusers.utils import logging as diffusers_logging

        _quiet_loading()  # diffusers' and transformers' loading bars ("Loading weights"), unless DIFFTUNE_VERBOSE
        diffusers_logging.set_verbosity_error()  # the CLI reports problems itself, one line each

        from difftune.models import describe, load_pipeline

        pipe = load_pipeline(model)
        info = describe(pipe)
    if scheduler:
        pipe.scheduler = _scheduler_from_name(pipe, scheduler)
    if loaded is not None:
        from difftune.profile import apply_profile

        apply_profile(pipe, loaded)
        steps = steps or loaded.context.num_inference_steps
        if guidance_scale is None and loaded.context.guidance_scale is not None:
            guidance_scale = loaded.context.guidance_scale
    steps = steps or 25
    pipe.set_progress_bar_config(disable=True)
    if info.family == "embedded":
        pipe.get_label_ids(prompts)  # fail on a bad label before any work
    n = len(prompts) * per_prompt
    generators = [torch.Generator(device="cpu").manual_seed(seed + k) for k in range(n)]
    kwargs: dict[str, Any] = {
        "prompt": [p for p in prompts for _ in range(per_prompt)],
        "num_inference_steps": steps,
        "generator": generators,
        "output_type": "pil",
    }
    if guidance_scale is not None:
        kwargs["guidance_scale"] = guidance_scale
    params = inspect.signature(pipe.__call__).parameters
    with Progress(
        TextColumn("[bold]generating[/]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    ) as progress:
        task = progress.add_task("steps", total=steps)
        if "callback_on_step_end" in params:

            def on_step(_pipe: Any, i: int, _t: Any, kw: dict) -> dict:
                progress.update(task, completed=i + 1)
                return kw

            kwargs["callback_on_step_end"] = on_step
        images = pipe(**kwargs).images
        progress.update(task, completed=steps)
    save_atomically(make_grid(list(images), columns=per_prompt), out)
    what = f", profile {loaded.name!r}" if loaded is not None else ""
    console.print(f"wrote {out} ({len(prompts)} prompt(s) × {per_prompt}, {steps} steps, {info.family} model{what})")


@app.command()
def bench(
    name: Annotated[
        str,
        typer.Argument(
            help="Which benchmark: runtime (hooks, solver, SADA, masks), front (tuned vs baseline fronts, "
            "minutes), store (searcher and store overhead, 100k-trial front query), search (random vs seeded "
            "and screened NSGA-II on ECAD's genome, each space's best point; ~15 minutes), solver (tuned schedules vs "
            "DPM-Solver++ / UniPC at NFE 4, 5, 8, before and after the continuous fit, tpe vs evo vs s3, DC "
            "ratios fitted and CPR-predicted; ~30 minutes), "
            "joint (solver × cache × SADA × quantization vs the four single spaces at equal evaluations, naive "
            "stacks vs the joint front, SADA tuned vs τ = 0 at 50 steps, the quant front; ~20 minutes)."
        ),
    ] = "runtime",
    repeats: Annotated[
        int | None,
        typer.Option(
            min=3, help="Timed repeats per side (runtime: 7, at least 15 for the mask figures at --batch; front: 5)."
        ),
    ] = None,
    batch: Annotated[
        int | None,
        typer.Option(min=1, help="runtime: images per pipeline call (16); the cache-mask figures also run at 4× it."),
    ] = None,
    budget: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="front / store / search / joint: finished trials of the (joint / random-start / each) study "
            "(200 / 16 / 96 / 64).",
        ),
    ] = None,
    samples: Annotated[
        int | None, typer.Option(min=2, help="front / store / search: calibration samples per trial (20).")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="front / search: the searchers' seed (0).")] = None,
    device: Annotated[
        str | None,
        typer.Option(
            help="runtime: where the pipelines run: cuda[:N] (timed with CUDA events) or cpu; CUDA when present."
        ),
    ] = None,
) -> None:
    """Run a benchmark and print each figure as a ratio measured in the same run, against its target."""
    from rich.table import Table

    import difftune.search._bench
    import difftune.search._bench_joint
    import difftune.search._bench_solver  # noqa: F401  (registers solver, joint)
    from difftune.benchmarks import run_benchmark

    _quiet_loading()
    options: dict[str, Any] = {"repeats": repeats, "batch": batch, "budget": budget, "samples": samples, "seed": seed}
    if name == "runtime":
        from difftune.search.settings import resolve_device

        options["device"] = resolve_device(device)  # default: CUDA when present, else the CPU
        console.print(f"device: {options['device']}")
    with console.status(f"running benchmark {name} …") as status:

        def on_trial(event: Any) -> None:
            status.update(
                f"running benchmark {name}: study {event.study}, {event.finished}/{event.budget} trials · "
                f"front {event.front_size} · HV {event.hypervolume:.4g} · {event.label}"
            )

        figures = run_benchmark(name, progress=on_trial, **options)
    table = Table(title=f"difftune bench {name}")
    for col in ("figure", "value", "target", "met", "measured"):
        table.add_column(col)
    for f in figures:
        met = {True: "[green]yes[/]", False: "[red]no[/]", None: ""}[f.met]
        table.add_row(f.name, f"{f.value:.3f}", f.target, met, f.detail)
    console.print(table)


def _storage_url(storage: str | None) -> str:
    from difftune.store import default_url

    return storage or default_url()


def _open_existing_store(storage: str | None) -> Any:
    """The store at ``storage`` for a command that only reads it: a missing SQLite file is an error, not created."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    from difftune.errors import StoreError
    from difftune.store import get_store, mask_url

    url = _storage_url(storage)
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        parsed = None  # get_store reports a malformed URL in its own words
    if parsed is not None and parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        if database and database != ":memory:" and not database.startswith("file:") and not Path(database).exists():
            raise StoreError(
                f"no database at {mask_url(url)}: run `difftune calibrate` first, or pass --storage "
                "(or set DIFFTUNE_STORAGE) to the database that holds your studies"
            )
    return get_store(url)


def _front_rows(store: Any, study: Any) -> tuple[list[Any], Any]:
    """The trials of the latest recorded front of ``study`` (the live front when none is recorded)."""
    front = store.latest_front(study.id)
    if front is None:
        return store.pareto_front(study.id, constraints=_study_constraints(study)), None
    by_id = {t.id: t for t in store.list_trials(study.id)}
    trials = [by_id[i] for i in front.trial_ids if i in by_id]
    first = study.objectives[0]
    sign = -1.0 if first.direction == "maximize" else 1.0
    trials.sort(key=lambda t: (sign * (t.value(first.name) or 0.0), t.number))
    return trials, front


def _study_constraints(study: Any) -> tuple[str, ...]:
    """The constraints stored with ``study`` (none for studies made before constraints existed)."""
    return tuple((study.reference or {}).get("constraints") or ())


def _study_device(study: Any) -> str:
    settings = study.reference or {}
    return " ".join(str(v) for v in (settings.get("device") or "cpu", settings.get("dtype") or "") if v)


def _point_label(trial: Any, study: Any = None) -> str:
    """Where a point came from: the hand-made method of a baseline or seed, the retried trial of a retry,
    the space and searcher of a searched point; and the trial whose figures it reused (memo)."""
    config = trial.config or {}
    if trial.kind == "retry":
        label = f"of trial {config.get('retry_of', '?')}"
    elif config.get("baseline") or config.get("seed"):
        label = str(config.get("baseline") or config.get("seed"))
    elif trial.kind == "warm":
        label = f"warm: {config.get('warm', '?')}"
    else:
        label = f"{study.space} search ({study.searcher})" if study is not None else ""
    memo = config.get("memo_of")
    if isinstance(memo, dict):
        where = "" if study is not None and memo.get("study_id") == study.id else f"study {memo.get('study_id')} "
        label += f" · figures of {where}trial {memo.get('trial')}"
    return label


def _front_table(study: Any, trials: list[Any], title: str | None = None, constraints: Sequence[str] = ()) -> Any:
    from rich.table import Table

    from difftune.store import parse_constraint

    names = [o.name for o in study.objectives]
    bounded = [parse_constraint(c).metric for c in constraints]
    extra = [n for n in (*bounded, "latency_ms", "nfe") if n not in names]
    extra = list(dict.fromkeys(extra))
    title = title or f"Pareto front of {study.name!r} ({study.space} space, {len(trials)} points)"
    if constraints:
        title += f" · feasible points only: {' and '.join(constraints)}"
    table = Table(title=title)
    table.add_column("trial", justify="right", min_width=5)
    table.add_column("kind", min_width=8, no_wrap=True)
    table.add_column("method", overflow="fold", min_width=8)
    for objective in study.objectives:
        arrow = "↑" if objective.direction == "maximize" else "↓"
        table.add_column(f"{objective.name} {arrow}", justify="right", no_wrap=True)
    for name in extra:
        table.add_column(name, justify="right", no_wrap=True)
    for trial in trials:
        values = trial.values()
        cells = [f"{values[n]:.4g}" if n in values else "" for n in (*names, *extra)]
        table.add_row(str(trial.number), trial.kind, _point_label(trial, study), *cells)
    return table


def _select_hint(study: Any, trials: list[Any]) -> str:
    """A --select expression that some point of the front satisfies, for the printed next commands."""
    psnr = sorted((v for t in trials if (v := t.value("psnr")) is not None and v < 99), reverse=True)
    names = {o.name for o in study.objectives}
    for metric, goal in (("speedup", "fastest"), ("weight_memory_mb", "smallest")):
        if metric in names and psnr:
            bound = math.floor(psnr[len(psnr) // 2])
            return f"{goal} where psnr>={bound}"
    return f"best {study.objectives[0].name}"


#: Exit code of a run whose trials all failed (the reasons are printed).
EXIT_ALL_FAILED = 1


def _print_failures(result: Any) -> None:
    """The most common failure reasons of a run, with counts, on stderr."""
    err_console.print(
        f"[red]error:[/] every trial of this run failed ({result.new_failed} of {result.new_trials}); "
        f"study {result.study.name!r} holds {result.complete} complete trials. Most common reasons:",
        highlight=False,
        soft_wrap=True,
    )
    for reason, count in list(result.failures.items())[:5]:
        err_console.print(f"  {count} × {reason}", highlight=False, soft_wrap=True)


def _on_start(verb: str) -> Callable[[Any], None]:
    def show(settings: Any) -> None:
        console.print(f"{verb} {settings.model} on {settings.describe_call()}", highlight=False, soft_wrap=True)
        for name, reason in (settings.extra.get("not_measured") or {}).items():
            console.print(f"  not measured here: {name} — {reason}", highlight=False, soft_wrap=True, style="dim")

    return show


@app.command()
def calibrate(
    model: Annotated[
        str,
        typer.Option(
            help="'embedded', a diffusers pipeline directory, a single-file checkpoint, or a hub id already in the "
            "local Hugging Face cache (never downloaded)."
        ),
    ] = "embedded",
    space: Annotated[
        str,
        typer.Option(
            help="Search space: cache (structured masks), solver (USF schedules), joint (solver + cache), ecad "
            "(ECAD's full cache genome, pymoo NSGA-II), bac (BAC's DP over feature similarity), harmonica "
            "(HarmoniCa's router, trained per l1 value: ~1–2 CPU minutes each), sada (SADA's step skipping and token "
            "pruning), dc (DC-Solver's per-step ratios, fitted through the denoiser: ~5 s per point), quant (per-block "
            "weight / activation bits against weight memory as served). Default ecad: on "
            "the embedded model its 100-trial screened search finds points that dominate "
            "the hand-made schedules in 3–4 minutes."
        ),
    ] = "ecad",
    budget: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Finished trials the study must hold; rerunning with more resumes (default: the space's, 100 for "
            "ecad, 24 for the others).",
        ),
    ] = None,
    study: Annotated[str | None, typer.Option(help="Study name (default: MODEL-SPACE).")] = None,
    storage: Annotated[
        str | None, typer.Option(help="Database URL (default: $DIFFTUNE_STORAGE or sqlite:///difftune.db).")
    ] = None,
    searcher: Annotated[
        str | None,
        typer.Option(
            help="nsga2, tpe, gp, random (Optuna), pymoo-nsga2, evo (USF's per-NFE evolution) or s3 (evo "
            "candidates ranked by a learnt predictor) (default: the space's own)."
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="The searcher's seed.")] = 0,
    population: Annotated[
        int | None,
        typer.Option(
            min=2,
            help="Individuals per generation of nsga2 / pymoo-nsga2 (default: pymoo-nsga2 takes ECAD's 72 when the "
            "budget holds 4 generations of it, else budget ÷ 4; Optuna's nsga2 its 50). Kept when the study resumes.",
        ),
    ] = None,
    memo: Annotated[
        bool,
        typer.Option(
            help="Reuse the figures of a trial any study in the store already measured with the same profile, "
            "model, device, call and samples (--no-memo measures every trial)."
        ),
    ] = True,
    screen: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="Multi-fidelity: measure every candidate first on this many calibration samples (one timed call "
            "for its speed) and only the best 1/--screen-eta of them by Pareto rank in full; screened-out trials "
            "are 'pruned' and never on a front (default: 4 for the ecad space, 0 = off for the others). Kept when "
            "the study resumes.",
        ),
    ] = None,
    screen_eta: Annotated[
        int | None,
        typer.Option(min=2, help="One screened candidate in this many goes on to the full evaluation (default 3)."),
    ] = None,
    reference_steps: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Compare trials' images with the plain pipeline at this many steps (e.g. 200: near the exact ODE "
            "solution) instead of at --steps; speedups stay relative to the plain pipeline at --steps. Kept when "
            "the study resumes.",
        ),
    ] = None,
    ems: Annotated[
        int,
        typer.Option(
            min=0,
            help="solver space: compute DPM-Solver-v3's empirical model statistics from this many trajectories "
            "(64 is a good start; cached per model and call) and search the 'v3' prediction too; 0 = off. Kept "
            "when the study resumes.",
        ),
    ] = 0,
    steps: Annotated[int, typer.Option(min=2, help="num_inference_steps of the reference setting.")] = 20,
    samples: Annotated[int, typer.Option(min=2, help="Calibration samples per trial (prompts × seeds).")] = 20,
    batch_size: Annotated[
        int | None,
        typer.Option(
            min=1, help="Images per pipeline call (default: all samples at once; large models need a few per call)."
        ),
    ] = None,
    nfe: Annotated[
        str, typer.Option(help="solver / joint spaces: the range of model evaluations searched, LOW:HIGH.")
    ] = "3:12",
    device: Annotated[
        str | None,
        typer.Option(
            help="cpu, cuda, cuda:N or mps (default: CUDA when present, else the CPU). A device this machine "
            "lacks is an error, never a silent CPU run."
        ),
    ] = None,
    dtype: Annotated[
        str | None, typer.Option(help="float32, float16 or bfloat16 (default: the weights' own dtype).")
    ] = None,
    revision: Annotated[
        str | None, typer.Option(help="Hub revision (branch, tag or commit) of a hub id --model.")
    ] = None,
    pipeline_class: Annotated[
        str | None,
        typer.Option(
            help="Single-file checkpoint --model: its diffusers pipeline class, e.g. StableDiffusionXLPipeline "
            "(default: inferred from the file)."
        ),
    ] = None,
    config: Annotated[
        str | None,
        typer.Option(
            help="Single-file checkpoint --model: a local pipeline directory or cached hub id with the pipeline's "
            "configs (default: the hub repo diffusers associates with the checkpoint, if cached)."
        ),
    ] = None,
    prompts: Annotated[
        Path | None,
        typer.Option(
            help="Calibration prompts: a text file with one prompt per line ('#' starts a comment) or a JSON list "
            "(class names for class-conditional models). Default: the family's built-in set."
        ),
    ] = None,
    negative_prompt: Annotated[str | None, typer.Option(help="Negative prompt of every call.")] = None,
    height: Annotated[int | None, typer.Option(min=8, help="Image height (default: the pipeline's).")] = None,
    width: Annotated[int | None, typer.Option(min=8, help="Image width (default: the pipeline's).")] = None,
    guidance_scale: Annotated[
        float | None, typer.Option(help="Classifier-free guidance scale (default: the pipeline's).")
    ] = None,
    call_arg: Annotated[
        list[str] | None,
        typer.Option(
            help="Another keyword argument of the pipeline call, KEY=VALUE with a JSON value (repeatable), e.g. "
            "max_sequence_length=256 or use_resolution_binning=false.",
        ),
    ] = None,
    objectives: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated objectives, each NAME or NAME:min|max, e.g. speedup,psnr,lpips (default: "
            "speedup,psnr,class_accuracy for the embedded model, speedup,psnr,sharpness otherwise)."
        ),
    ] = None,
    constraint: Annotated[
        list[str] | None,
        typer.Option(
            help="A bound every front point must meet, e.g. 'lpips<=0.1' (repeatable); the searcher treats "
            "points that miss it as infeasible."
        ),
    ] = None,
    stack_from: Annotated[
        str | None,
        typer.Option(
            help="joint space: comma-separated solver / cache / sada / quant studies of this model in the same "
            "database; their best points at PSNR >= 25 / 30 / 35 dB are stacked and measured as baselines "
            "stack_psnr25 … (the naive stack), and the report after the front sets each beside the joint search's "
            "best point at least as fast (and as small)."
        ),
    ] = None,
) -> None:
    """Run or resume a study until it holds --budget finished trials; print its Pareto front.

    Spaces: ecad (the default: the full cache mask, step × block × component, evolved by NSGA-II from
    the hand-made schedules), cache (structured cache masks at --steps), solver (USF schedules of --nfe
    evaluations), joint (a solver schedule plus, each optional, a cache mask over its steps, SADA and per-block
    quantization; objectives speedup, psnr, weight_memory_mb and the guard), bac, harmonica, sada,
    dc (DC-Solver compensation ratios fitted per schedule of --nfe evaluations), quant (per-block bit-widths;
    objectives weight_memory_mb, psnr and the guard).
    The baselines (FORA, Δ-DiT, T-GATE-like, DPM-Solver++ / UniPC / DDIM at their best spacing,
    FirstBlockCache, …) run first.

    The device, dtype, prompts, call options, objectives and constraints are stored with the study:
    `difftune worker`, `fronts` and `export` reuse them. Everything is checked (one short probe
    call of the pipeline) before the database is opened. Exit codes: 0 done, 1 every trial of the run
    failed (the reasons are printed), 2 bad input.
    """
    try:
        low, high = (int(v) for v in nfe.split(":"))
    except ValueError:
        raise DifftuneError(f"--nfe: expected LOW:HIGH, e.g. 3:12, got {nfe!r}") from None
    from difftune.search.runner import default_study_name, run_study
    from difftune.search.settings import parse_call_args, read_prompts

    _quiet_loading()
    extra_args = parse_call_args(call_arg or [])
    prompt_list = read_prompts(prompts) if prompts is not None else None
    name = study or default_study_name(model, space)
    if budget is None:
        from difftune.spaces import get_space

        budget = get_space(space).default_budget
    with _trial_progress("calibrating", name, budget) as on_trial:
        result = run_study(
            model,
            space,
            budget=budget,
            study=name,
            storage=storage,
            searcher=searcher,
            seed=seed,
            num_inference_steps=steps,
            samples=samples,
            progress=on_trial,
            nfe_range=(low, high),
            device=device,
            dtype=dtype,
            revision=revision,
            prompts=prompt_list,
            negative_prompt=negative_prompt,
            height=height,
            width=width,
            guidance_scale=guidance_scale,
            call_args=extra_args,
            batch_size=batch_size,
            population=population,
            memo=memo,
            screen=screen,
            screen_eta=screen_eta,
            ems=ems,
            reference_steps=reference_steps,
            pipeline_class=pipeline_class,
            config=config,
            objectives=[objectives] if objectives else None,
            constraints=list(constraint or []),
            on_start=_on_start("calibrating"),
            stack_from=[n.strip() for n in stack_from.split(",") if n.strip()] if stack_from else (),
        )
    console.print(_front_table(result.study, result.front, constraints=result.constraints))
    _print_stack_report(result, storage)
    failed = f", {result.failed} failed" if result.failed else ""
    console.print(
        f"study {result.study.name!r} holds {result.finished} finished trials ({result.new_trials} new{failed}) "
        f"in {result.storage}"
    )
    for note in result.notes:
        console.print(f"note: {note}", highlight=False, soft_wrap=True)
    if result.all_failed:
        _print_failures(result)
        sys.exit(EXIT_ALL_FAILED)
    where = f" --storage {storage}" if storage else ""
    console.print("Next:")
    console.print(f"  difftune fronts --study {name}{where}", highlight=False, soft_wrap=True)
    console.print(f"  difftune dashboard{where}    # browse the front, the schedules and the images", highlight=False)
    console.print(
        f'  difftune export --study {name}{where} --select "{_select_hint(result.study, result.front)}" '
        "--out profile.json",
        highlight=False,
        soft_wrap=True,
    )


def _print_stack_report(result: Any, storage: str | None) -> None:
    """For a joint study holding stacked baselines: each stack beside the joint search's comparable point."""
    if result.study.space != "joint":
        return
    from difftune.search.stack import format_stack_report, stack_report
    from difftune.store import default_url, get_store

    with get_store(storage or default_url()) as store:
        rows = stack_report(store, result.study.id)
    if rows:
        console.print("Naive stacks of single-space points vs the joint search (calibration figures):")
        console.print(format_stack_report(rows), highlight=False, soft_wrap=True)


@contextmanager
def _trial_progress(verb: str, name: str, budget: int | None) -> Iterator[Callable[[Any], None]]:
    """A rich progress bar over a study's finished trials, with the front's size and hypervolume."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn(f"[bold]{verb}[/] {{task.fields[study]}}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("trials · front {task.fields[front]} · HV {task.fields[hv]} · {task.fields[last]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as bar:
        task = bar.add_task("trials", total=budget, study=name, front="–", hv="–", last="preparing …")

        def on_trial(event: Any) -> None:
            bar.update(
                task,
                total=event.budget,
                completed=min(event.finished, event.budget),
                front=str(event.front_size),
                hv=f"{event.hypervolume:.4g}",
                last=f"{event.label}: {event.trial.state.value}",
            )

        yield on_trial
        bar.update(task, last="done")


@app.command()
def worker(
    study: Annotated[str, typer.Option(help="The study to join (created by difftune calibrate).")],
    storage: Annotated[
        str | None, typer.Option(help="Database URL (default: $DIFFTUNE_STORAGE or sqlite:///difftune.db).")
    ] = None,
    max_trials: Annotated[
        int | None, typer.Option(min=1, help="Stop after this many trials even if the budget is not used up.")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="The sampler's seed (default: random per worker).")] = None,
    device: Annotated[
        str | None,
        typer.Option(help="This worker's device, e.g. cuda:1 (default: the study's); its type must be the study's."),
    ] = None,
) -> None:
    """Join a running study as one more worker: claim and run its trials until its budget is used up.

    The model, device type, dtype, prompts, call options, space, searcher, objectives and constraints
    are the study's own; a worker on another kind of device is refused (its timings would not
    compare). Workers coordinate only through the database: no trial is run twice and the budget is
    never exceeded.
    """
    from difftune.search.runner import run_worker

    _quiet_loading()
    _open_existing_store(storage).close()  # a missing database is bad input, not a new empty one
    with _trial_progress("working on", study, None) as on_trial:
        result = run_worker(
            study,
            storage,
            progress=on_trial,
            seed=seed,
            max_trials=max_trials,
            device=device,
            on_start=_on_start("working on"),
        )
    failed = f", {result.failed} failed" if result.failed else ""
    console.print(
        f"worker ran {result.new_trials} trials; study {result.study.name!r} holds {result.finished} finished "
        f"trials{failed} (budget {result.study.budget}) in {result.storage}",
        highlight=False,
        soft_wrap=True,
    )
    if result.new_trials and result.all_failed:
        _print_failures(result)
        sys.exit(EXIT_ALL_FAILED)


def _front_json(study: Any, trials: list[Any], front: Any) -> dict[str, Any]:
    return {
        "study": study.name,
        "space": study.space,
        "searcher": study.searcher,
        "status": study.status.value,
        "objectives": [o.to_dict() for o in study.objectives],
        "constraints": list(_study_constraints(study)),
        "device": (study.reference or {}).get("device") or "cpu",
        "dtype": (study.reference or {}).get("dtype"),
        "computed_at": None if front is None else front.computed_at.isoformat(),
        "points": [
            {
                "trial": t.number,
                "kind": t.kind,
                "baseline": (t.config or {}).get("baseline"),
                "seed": (t.config or {}).get("seed"),
                "method": _point_label(t, study),
                "memo_of": (t.config or {}).get("memo_of"),
                "params": t.params,
                "metrics": {m.name: {"value": m.value, "unit": m.unit, "direction": m.direction} for m in t.metrics},
            }
            for t in trials
        ],
    }


@app.command()
def fronts(
    study: Annotated[str | None, typer.Option(help="Only this study (default: every study).")] = None,
    storage: Annotated[
        str | None, typer.Option(help="Database URL (default: $DIFFTUNE_STORAGE or sqlite:///difftune.db).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
) -> None:
    """Print the stored Pareto fronts as tables (or JSON)."""
    import json

    store = _open_existing_store(storage)
    try:
        studies = [store.get_study(study)] if study else store.list_studies()
        out = []
        for record in studies:
            trials, front = _front_rows(store, record)
            out.append((record, trials, front))
    finally:
        store.close()
    if as_json:
        print(json.dumps([_front_json(r, t, f) for r, t, f in out], indent=2))
        return
    if not out:
        console.print(f"no studies in {store.url}; run `difftune calibrate` first")
        return
    for record, trials, front in out:
        when = "live, not recorded yet" if front is None else f"recorded {front.computed_at:%Y-%m-%d %H:%M}"
        title = (
            f"{record.name} — {record.space} space, {record.searcher}, {_study_device(record)}, {len(trials)} points "
            f"({when})"
        )
        console.print(_front_table(record, trials, title=title, constraints=_study_constraints(record)))


@app.command()
def export(
    study: Annotated[str, typer.Option(help="The study to export from.")],
    select: Annotated[
        str, typer.Option(help="Which Pareto point, e.g. 'fastest where psnr>=30' or 'best psnr where speedup>=2'.")
    ],
    out: Annotated[
        Path, typer.Option(help="Where to write the profile (JSON file; a directory for the directory formats).")
    ],
    storage: Annotated[
        str | None, typer.Option(help="Database URL (default: $DIFFTUNE_STORAGE or sqlite:///difftune.db).")
    ] = None,
    format: Annotated[
        str,
        typer.Option(
            "--format",
            help="difftune: one profile JSON; diffusers: a directory with profile.json and the native diffusers "
            "configs where the setting is expressible there; cache-dit, sglang, vllm-omni: such a directory with "
            "that serving stack's cache-dit config (cache_dit.yaml, sglang.env, vllm_omni_cache_config.json); "
            "ecad: ECAD's schedule JSON (cache masks only).",
        ),
    ] = "difftune",
    validate: Annotated[
        bool,
        typer.Option(
            "--validate/--no-validate",
            help="Re-measure the point on held-out samples the search never saw (default); --no-validate keeps the "
            "calibration figures.",
        ),
    ] = True,
    samples: Annotated[
        int | None, typer.Option(min=2, help="Held-out samples (default: as many as the study's calibration samples).")
    ] = None,
    max_candidates: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Re-measure at most this many points on held-out samples (default: every point that meets "
            "--select on calibration samples, best goal first, until one meets it on held-out samples too).",
        ),
    ] = None,
    steps: Annotated[
        int | None,
        typer.Option(
            min=2,
            help="Export for another num_inference_steps than the study's: cache masks are resampled and every "
            "candidate is re-measured at these steps; nothing is written unless one keeps --select there.",
        ),
    ] = None,
    guidance_scale: Annotated[
        float | None,
        typer.Option(help="Export for another guidance scale than the study's (candidates re-measured with it)."),
    ] = None,
    height: Annotated[
        int | None, typer.Option(min=8, help="Export for another image height (candidates re-measured at it).")
    ] = None,
    width: Annotated[
        int | None, typer.Option(min=8, help="Export for another image width (candidates re-measured at it).")
    ] = None,
    fit: Annotated[
        int,
        typer.Option(
            min=0,
            help="Before re-measuring a candidate with a solver schedule, fit its timesteps, relaxation factors and "
            "DC ratios by CMA-ES with this many pipeline runs (e.g. 300; 0 = off) on calibration samples against the "
            "study's reference; the held-out figures are then the fitted schedule's.",
        ),
    ] = 0,
    fit_samples: Annotated[
        int,
        typer.Option(min=1, help="Calibration samples of --fit (40; with a study's 10 the fit follows their noise)."),
    ] = 40,
) -> None:
    """Write the profile of the Pareto point --select picks, re-measured on held-out samples.

    The points that meet --select on the calibration samples are re-measured on held-out samples in
    the order of the goal; the first whose held-out figures meet every constraint is written. When
    none does, the closest held-out point is named, nothing is written, and the exit code is 2."""
    from rich.table import Table

    from difftune.search.export import FORMATS, export_point
    from difftune.store import parse_select

    if format not in FORMATS:
        raise DifftuneError(f"--format {format!r}: expected one of {', '.join(FORMATS)}")
    parse_select(select)  # a malformed expression fails before the database is opened
    _quiet_loading()
    store = _open_existing_store(storage)  # a missing SQLite file is an error, never created
    try:
        with console.status("exporting …") as status:
            result = export_point(
                store,
                study,
                select,
                out,
                format=format,
                validate=validate,
                samples=samples,
                progress=lambda text: status.update(text),
                max_candidates=max_candidates,
                steps=steps,
                guidance_scale=guidance_scale,
                height=height,
                width=width,
                fit=fit,
                fit_samples=fit_samples,
            )
    finally:
        store.close()
    record, point = result.study, result.trial
    shown = [o.name for o in record.objectives]
    extra = [n for n in ("latency_ms", "nfe", "fid") if n not in shown]
    if result.validated:
        table = Table(title=f"trial {point.number} of {record.name!r}: held-out vs calibration")
        for col in ("metric", "held-out", "calibration"):
            table.add_column(col, justify="right" if col != "metric" else "left", no_wrap=True)
        for name in (*shown, *extra):
            held, cal = result.held_out.get(name), result.calibration.get(name)
            if held is None and cal is None:
                continue
            table.add_row(name, "" if held is None else f"{held:.4g}", "" if cal is None else f"{cal:.4g}")
        console.print(table)
        seeds = result.held_out_seeds
        span = f"seed {seeds[0]}" if len(seeds) == 1 else f"{len(seeds)} seeds, {seeds[0]}–{seeds[-1]}"
        console.print(
            f"held-out: {result.profile.provenance.get('held_out_samples')} samples ({span}; never seen by the search)",
            highlight=False,
        )
        moved = result.profile.provenance.get("transferred")
        if moved:
            changes = ", ".join(f"{name} {before} → {after}" for name, (before, after) in moved.items())
            console.print(
                f"moved to another call ({changes}): the held-out figures are measured there, against the plain "
                "pipeline in that call; the calibration figures are the study's",
                highlight=False,
            )
        fitted = result.profile.provenance.get("fitted")
        if fitted:
            before, after = fitted["calibration_mse"]
            console.print(
                f"fitted: {', '.join(fitted['knobs'])} by CMA-ES, {fitted['evaluations']} runs on {fitted['samples']} "
                f"calibration samples vs {fitted['reference_steps']} steps: MSE {before:.3g} → {after:.3g}; the "
                "held-out figures are the fitted schedule's (the study's calibration figures are the unfitted one's)",
                highlight=False,
                soft_wrap=True,
            )
    else:
        values = result.calibration
        figures = ", ".join(f"{n}={values[n]:.4g}" for n in shown if n in values)
        console.print(f"not re-measured (--no-validate): calibration figures {figures}", highlight=False)
    for rejected in result.rejected:
        held = rejected.values("held_out")
        figures = ", ".join(f"{n}={held[n]:.4g}" for n in shown if n in held)
        console.print(
            f"note: trial {rejected.number} missed {select!r} on held-out samples ({figures}); not exported",
            highlight=False,
            soft_wrap=True,
        )
    for warning in result.warnings:
        err_console.print(f"[yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
    for note in result.notes:
        console.print(f"note: {note}", highlight=False, soft_wrap=True)
    console.print(f"wrote {result.path}", highlight=False, soft_wrap=True)


@app.command()
def tiers(
    study: Annotated[str, typer.Option(help="The study to export the tiers from.")],
    tier: Annotated[
        list[str],
        typer.Option(
            help="NAME=SELECT, repeatable, e.g. --tier lossless='best psnr' --tier fast='fastest where psnr>=28'; "
            "the order given is the bundle's order."
        ),
    ],
    out: Annotated[Path, typer.Option(help="Where to write the bundle (JSON).")] = Path("tiers.json"),
    storage: Annotated[
        str | None, typer.Option(help="Database URL (default: $DIFFTUNE_STORAGE or sqlite:///difftune.db).")
    ] = None,
    samples: Annotated[
        int | None, typer.Option(min=2, help="Held-out samples (default: as many as the study's calibration samples).")
    ] = None,
) -> None:
    """Export several Pareto points as named quality tiers in one bundle, each re-measured on held-out samples.

    A server loads it with difftune.load_tiers and switches one loaded pipeline between tiers per request
    (difftune.TierSwitch). Nothing is written unless every tier keeps its selection on held-out samples.
    """
    from rich.table import Table

    from difftune.search.export import export_tiers

    asked: dict[str, str] = {}
    for item in tier:
        name, sep, select = item.partition("=")
        if not sep or not name.strip() or not select.strip():
            raise DifftuneError(f"--tier {item!r}: expected NAME=SELECT, e.g. fast='fastest where psnr>=28'")
        if name.strip() in asked:
            raise DifftuneError(f"--tier {name.strip()!r} is given twice")
        asked[name.strip()] = select.strip()
    _quiet_loading()
    store = _open_existing_store(storage)
    try:
        with console.status("exporting tiers …") as status:
            bundle, results = export_tiers(
                store, study, asked, out, samples=samples, progress=lambda text: status.update(text)
            )
    finally:
        store.close()
    record = next(iter(results.values())).study
    shown = [o.name for o in record.objectives]
    table = Table(title=f"tiers of {record.name!r} (held-out figures)")
    for col in ("tier", "select", "trial", *shown, "steps"):
        table.add_column(col)
    for name, result in results.items():
        values = result.held_out or result.calibration
        table.add_row(
            name,
            asked[name],
            str(result.trial.number),
            *(f"{values[n]:.4g}" if n in values else "" for n in shown),
            str(result.profile.context.num_inference_steps),
        )
    console.print(table)
    console.print(f"wrote {out} ({len(bundle.names)} tiers: {', '.join(bundle.names)})", highlight=False)


@app.command()
def nightly(
    config: Annotated[Path, typer.Option(help="The nightly configuration (TOML); see examples/nightly-embedded.toml.")],
    night: Annotated[
        str | None,
        typer.Option(help="The night's id (default: an interrupted night's, else today's date; .2, .3 … when taken)."),
    ] = None,
) -> None:
    """The cron entry point: per model, re-validate last night's profiles, search warm-started from last night's
    fronts, export tonight's profiles, and write a report (Markdown and a front plot).

    Exit code 0 when all is well, 1 when a profile regressed (or a selection is no longer met), 2 on a
    configuration or model error, or when another night holds the lock. An interrupted night is resumed by
    the next invocation. Crontab: 0 2 * * * cd /srv/difftune && difftune nightly --config nightly.toml
    """
    from difftune.search.nightly import load_config, run_nightly

    cfg = load_config(config)
    _quiet_loading()
    result = run_nightly(
        cfg, night=night, progress=lambda text: err_console.print(text, highlight=False, soft_wrap=True)
    )
    for line in result.errors:
        err_console.print(f"[red]error:[/] {line}", highlight=False, soft_wrap=True)
    for line in result.regressions:
        err_console.print(f"[yellow]regression:[/] {line}", highlight=False, soft_wrap=True)
    verdict = {0: "all well", 1: "regression", 2: "error"}[result.exit_code]
    console.print(f"night {result.night}: {verdict}; report {result.report}", highlight=False)
    if result.exit_code:
        sys.exit(result.exit_code)


@app.command()
def dashboard(
    storage: Annotated[
        str | None, typer.Option(help="Database URL (default: $DIFFTUNE_STORAGE or sqlite:///difftune.db).")
    ] = None,
    port: Annotated[int, typer.Option(min=1, max=65535, help="The port to serve on.")] = 8501,
    host: Annotated[
        str,
        typer.Option(help="The address to bind: 127.0.0.1 (this machine only) unless told otherwise; 0.0.0.0 for all."),
    ] = "127.0.0.1",
) -> None:
    """Serve the Streamlit dashboard over the database: fronts, points, schedules, images, exports.

    It reads the studies through difftune's store while they run (reload the page for new trials); an
    empty or missing database gets a page saying how to run a first calibration. Ctrl-C stops it."""
    import socket
    import subprocess

    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    from difftune.dashboard import streamlit_command
    from difftune.store import ENV_VAR, mask_url

    url = _storage_url(storage)
    try:
        make_url(url)
    except (ArgumentError, ValueError):
        raise DifftuneError(
            f"--storage {mask_url(url)!r} is not a database URL; e.g. sqlite:///difftune.db or "
            "postgresql+psycopg://user:password@host/dbname"
        ) from None
    try:
        with socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET):
            pass  # free now; Streamlit binds it next
    except OSError as exc:
        raise DifftuneError(
            f"cannot serve on {host}:{port} ({exc.strerror or exc}); pass another --port or --host"
        ) from None
    shown = f"[{host}]" if ":" in host else host
    console.print(
        f"difftune dashboard: http://{shown}:{port}  (storage {mask_url(url)}; Ctrl-C stops it)",
        highlight=False,
        soft_wrap=True,
    )
    if host not in ("127.0.0.1", "localhost", "::1"):
        err_console.print(
            f"[yellow]warning:[/] bound to {host}: anyone who reaches this machine can open the dashboard (it has no "
            "login) and export profiles from it",
            highlight=False,
            soft_wrap=True,
        )
    env = {**os.environ, ENV_VAR: url}  # the app opens the store the way every command does
    server = subprocess.Popen(streamlit_command(host, port), env=env)
    try:
        code = server.wait()
    except KeyboardInterrupt:  # the server got the same Ctrl-C: let it stop on its own
        try:
            code = server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            code = server.wait()
    if code not in (0, -2, 130):  # -2 / 130: stopped with Ctrl-C
        raise DifftuneError(f"the Streamlit server stopped with exit code {code} (see its messages above)")


import_app = typer.Typer(
    help="Turn settings published in other tools' formats into difftune profiles.", no_args_is_help=True
)
app.add_typer(import_app, name="import")


@import_app.command("ecad")
def import_ecad(
    file: Annotated[Path, typer.Argument(help="An ECAD schedule JSON (AniAggarwal/ecad's schedules/…/*.json).")],
    model: Annotated[
        str, typer.Option(help="The model the schedule is for: 'embedded', a pipeline directory or a cached hub id.")
    ] = "embedded",
    out: Annotated[Path, typer.Option(help="Where to write the difftune profile (JSON).")] = Path("profile.json"),
) -> None:
    """Turn an ECAD cache schedule into a difftune profile for --model (its blocks and components must match).

    The profile applies with difftune.apply_profile like any other, and `difftune calibrate --space ecad`
    studies of the same model and step count can start from it."""
    import json

    from difftune.errors import SpaceError
    from difftune.models import describe, load_pipeline
    from difftune.profile import ModelRef, Profile, ProfileContext
    from difftune.spaces.ecad import from_ecad_json

    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DifftuneError(f"no ECAD schedule at {file}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DifftuneError(f"{file} is not a readable JSON file ({exc})") from None
    _quiet_loading()
    info = describe(load_pipeline(model))
    cache = from_ecad_json(data, info.components)
    steps, blocks, _ = cache.array.shape
    if blocks != len(info.blocks):
        raise SpaceError(f"{file}: the schedule has {blocks} blocks, {model!r} has {len(info.blocks)}")
    name = str(data["cache_schedule"].get("name") or file.stem)
    profile = Profile(
        name=f"ecad: {name}",
        model=ModelRef(name=info.name, family=info.family, fingerprint=info.fingerprint),
        context=ProfileContext(num_inference_steps=steps),
        cache=cache,
        provenance={"imported_from": str(file), "format": "ecad"},
    )
    written = profile.save(out)
    reused = 1.0 - float(cache.array.mean())
    console.print(
        f"wrote {written}: ECAD schedule {name!r}, {steps} steps × {blocks} blocks × {list(cache.components)}, "
        f"{reused:.0%} of the cells reused",
        highlight=False,
        soft_wrap=True,
    )


@app.command()
def cpr(
    model: Annotated[str, typer.Option(help="'embedded', a diffusers pipeline directory, or a cached hub id.")] = (
        "embedded"
    ),
    nfe: Annotated[str, typer.Option(help="NFEs to fit DC ratios at, comma-separated.")] = "4,5,6,8,10",
    guidance: Annotated[str, typer.Option(help="Guidance scales to fit at, comma-separated.")] = "1.5,3",
    samples: Annotated[int, typer.Option(min=1, help="Calibration samples per fit (the reference: 10).")] = 10,
    predict: Annotated[
        list[str] | None, typer.Option(help="NFE@GUIDANCE to predict ratios for, e.g. 7@1.5 (repeatable).")
    ] = None,
) -> None:
    """Fit DC-Solver's cascade polynomial (CPR) for a model and store it; print the ratios it predicts.

    DC ratios are fitted through the denoiser at every NFE × guidance (UniPC as DC-Solver's reference
    runs it, ending at sigma_min; fits are cached), the 36 coefficients by least squares, and the
    polynomial is stored per model fingerprint: the `dc` space then adds UniPC with CPR-predicted
    ratios at the study's guidance to its baselines. Exit 2 on bad input.
    """
    from rich.table import Table

    def numbers(text: str, what: str, kind: Any) -> list[Any]:
        try:
            values = [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise typer.BadParameter(f"expected comma-separated numbers, got {text!r}", param_hint=what) from None
        if not values:
            raise typer.BadParameter("give at least one value", param_hint=what)
        return values

    nfes, scales = numbers(nfe, "--nfe", int), numbers(guidance, "--guidance", float)
    if min(nfes) < 3:
        raise typer.BadParameter("DC ratios need at least 3 steps (the first two are fixed at 1)", param_hint="--nfe")
    targets = []
    for item in predict or []:
        n, _, g = item.partition("@")
        try:
            targets.append((int(n), float(g)))
        except ValueError:
            raise typer.BadParameter(
                f"expected NFE@GUIDANCE such as 7@1.5, got {item!r}", param_hint="--predict"
            ) from None
    _quiet_loading()
    from difftune.evaluators import CalibrationSet
    from difftune.models import load_pipeline
    from difftune.search.dc import fit_model_cpr

    with console.status(f"loading {model} …"):
        pipe = load_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    chosen = CalibrationSet.for_pipeline(pipe)[:samples]
    table = Table(title="DC ratios fitted")
    for col in ("NFE", "guidance", "ratios", "seconds"):
        table.add_column(col)
    settings = [(n, g) for g in scales for n in nfes]
    with console.status("fitting DC ratios …") as status:

        def on_fit(n: int, g: float, fit: Any) -> None:
            status.update(f"fitting DC ratios: NFE {n}, guidance {g:g} done")
            seconds = "cached" if fit.from_cache else f"{fit.seconds:.1f}"
            table.add_row(str(n), f"{g:g}", ", ".join(f"{r:.3f}" for r in fit.ratios), seconds)

        polynomial, path = fit_model_cpr(pipe, settings, chosen, progress=on_fit)
    console.print(table)
    console.print(f"wrote the model's CPR to {path}")
    for at_nfe_value, at_scale in targets:
        ratios = ", ".join(f"{r:.3f}" for r in polynomial.ratios(at_nfe_value, at_scale))
        console.print(f"predicted at NFE {at_nfe_value}, guidance {at_scale:g}: [{ratios}]")


def _quiet_libraries() -> None:
    """Keep stderr for difftune's own one-line errors: libraries' log chatter (diffusers' loading notes,
    optional-kernel probes of torchao, torch's deprecation logs) is shown only with DIFFTUNE_VERBOSE=1."""
    import logging

    if os.environ.get("DIFFTUNE_VERBOSE"):
        return
    logging.getLogger().addHandler(logging.NullHandler())
    for name in ("torch", "torchao", "diffusers", "transformers", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # transformers and diffusers set their loggers' levels from these when they are imported (later, in a
    # command), and the hub's progress bars (transformers' "Loading weights") follow the third.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _quiet_loading() -> None:
    """No "Loading pipeline components" bars on stderr while a command loads a pipeline (DIFFTUNE_VERBOSE=1
    keeps them)."""
    if os.environ.get("DIFFTUNE_VERBOSE"):
        return
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app, turning difftune's own errors into one line on stderr and exit code 2."""
    _quiet_libraries()
    try:
        app(args=argv, prog_name="difftune", standalone_mode=False)
    except DifftuneError as exc:
        err_console.print(f"[red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(EXIT_BAD_INPUT)
    except typer.Abort:
        err_console.print("aborted")
        sys.exit(130)
    except Exception as exc:
        if _is_click_exception(exc):  # a usage error: the usual usage message, its suggestion, exit 2
            exc.show()  # type: ignore[attr-defined]
            sys.exit(exc.exit_code)  # type: ignore[attr-defined]
        if isinstance(exc, OSError):  # an unwritable --out, a full disk: one line, not a traceback
            where = f" {exc.filename}" if getattr(exc, "filename", None) else ""
            err_console.print(
                f"[red]error:[/] cannot write{where}: {exc.strerror or exc}", highlight=False, soft_wrap=True
            )
            sys.exit(EXIT_BAD_INPUT)
        raise


def _is_click_exception(exc: BaseException) -> bool:
    """Click's usage errors, from click itself or the copy of click that typer vendors (``typer._click``)."""
    return any(cls.__name__ == "ClickException" for cls in type(exc).__mro__) and hasattr(exc, "show")


if __name__ == "__main__":
    main()
