"""difftune's command line. Heavy libraries are imported inside the commands, so --help is instant."""

from __future__ import annotations

import inspect
import os
import sys
import tempfile
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
    out.parent.mkdir(parents=True, exist_ok=True)
    suffix = out.suffix or ".png"
    fd, tmp = tempfile.mkstemp(prefix=f".{out.stem}.", suffix=suffix, dir=out.parent)
    os.close(fd)
    try:
        image.save(tmp)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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

        diffusers_logging.disable_progress_bar()
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
    name: Annotated[str, typer.Argument(help="Which benchmark: runtime.")] = "runtime",
    repeats: Annotated[int, typer.Option(min=3, help="Timed repeats per side (alternating A/B).")] = 7,
    batch: Annotated[int, typer.Option(min=1, help="Images per pipeline call.")] = 16,
) -> None:
    """Run a benchmark and print each figure as a ratio measured in the same run, against its target."""
    from rich.table import Table

    from difftune.benchmarks import run_benchmark

    with console.status(f"running benchmark {name} …"):
        figures = run_benchmark(name, repeats=repeats, batch=batch)
    table = Table(title=f"difftune bench {name}")
    for col in ("figure", "value", "target", "met", "measured"):
        table.add_column(col)
    for f in figures:
        met = {True: "[green]yes[/]", False: "[red]no[/]", None: ""}[f.met]
        table.add_row(f.name, f"{f.value:.3f}", f.target, met, f.detail)
    console.print(table)


def _quiet_libraries() -> None:
    """Keep stderr for difftune's own one-line errors: libraries' log chatter (diffusers' loading notes,
    optional-kernel probes of torchao, torch's deprecation logs) is shown only with DIFFTUNE_VERBOSE=1."""
    import logging

    if os.environ.get("DIFFTUNE_VERBOSE"):
        return
    logging.getLogger().addHandler(logging.NullHandler())
    for name in ("torch", "torchao", "diffusers", "transformers", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app, turning difftune's own errors into one line on stderr and exit code 2."""
    _quiet_libraries()
    try:
        app(args=argv, standalone_mode=False)
    except DifftuneError as exc:
        err_console.print(f"[red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(EXIT_BAD_INPUT)
    except typer.Abort:
        err_console.print("aborted")
        sys.exit(130)
    except Exception as exc:  # click's usage errors
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise


if __name__ == "__main__":
    main()
