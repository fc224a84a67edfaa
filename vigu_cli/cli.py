"""The `vigu` command line. One function per subcommand, each a few lines over the core."""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer
from rich.console import Console

from .errors import VigUError
from .recipe import dump_recipe, load_recipe

app = typer.Typer(
    name="vigu",
    help="Uni-ViGU: a Wan2.1 text-to-video transformer turned into a unified video generation and "
    "understanding model (build a dataset, train, caption, generate, joint).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True, soft_wrap=True)

RecipeOpt = Annotated[str, typer.Option("--recipe", "-r", help="Recipe name (see `vigu recipe`) or YAML path.")]
SetOpt = Annotated[
    Optional[list[str]], typer.Option("--set", help="Override a recipe value: section.key=value (repeatable).")
]


def not_built(command: str, version: str, issue: int) -> None:
    """Unbuilt commands say so and fail; they never print made-up output."""
    console.print(f"error: `vigu {command}` is not built yet: it arrives in vigu {version} (issue #{issue}).")
    raise typer.Exit(2)


@app.command()
def recipe(
    name: Annotated[str, typer.Argument(help="Recipe name or YAML path.")] = "world-tiny",
    set_: SetOpt = None,
) -> None:
    """Print a recipe with every default filled in and overrides applied."""
    print(dump_recipe(load_recipe(name, set_)), end="")


@app.command()
def convert(
    src: Annotated[str, typer.Argument(help="A local stock Wan2.1 diffusers folder, or a vigu folder.")],
    dst: Annotated[str, typer.Argument(help="Output folder (written to a temporary name, then renamed).")],
    recipe: RecipeOpt = "world-tiny",
    set_: SetOpt = None,
) -> None:
    """Stock Wan2.1 folder -> vigu folder (new text parameters per the recipe), or vigu -> stock Wan."""
    from .core.convert import convert_folder

    made = convert_folder(src, dst, load_recipe(recipe, set_))
    console.print(f"wrote {dst} ({made})")


@app.command("build-dataset")
def build_dataset(
    recipe: RecipeOpt = "world-tiny",
    set_: SetOpt = None,
    out: Annotated[Optional[str], typer.Option("--out", "-o", help="Dataset folder (default: data.out).")] = None,
    num_items: Annotated[
        Optional[int], typer.Option("--num-items", "-n", help="Items to build (default: data.num_items).")
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Rebuild from scratch; by default a re-run resumes the folder.")
    ] = False,
) -> None:
    """Prompts -> videos -> LLM-written detailed captions -> cached latents and embeddings.

    Multi-process: `torchrun --nproc_per_node N -m vigu_cli build-dataset ...` (or `accelerate launch`)."""
    from rich.console import Console as StdoutConsole

    from .build_dataset import build_dataset as build, summary_table

    loaded = load_recipe(recipe, set_)
    loaded.data.out = out or loaded.data.out
    loaded.data.num_items = loaded.data.num_items if num_items is None else num_items
    report = build(loaded, overwrite=overwrite, console=console)
    if report.lines:
        StdoutConsole(soft_wrap=True).print(summary_table(report))


@app.command()
def train(
    stage: Annotated[str, typer.Option("--stage", "-s", help="base | recall | refine")],
    recipe: RecipeOpt = "world-tiny",
    set_: SetOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the stage's last checkpoint.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print parameters and memory per GPU; train nothing.")] = False,
    accelerate_config: Annotated[
        Optional[str], typer.Option("--accelerate-config", help="With --dry-run: the accelerate config to plan for.")
    ] = None,
) -> None:
    """Train a stage (base | recall | refine) in one Accelerate loop; launch with `accelerate launch -m vigu_cli`."""
    loaded = load_recipe(recipe, set_)
    if dry_run:
        from rich.table import Table

        from .train_plan import describe, plan

        table = Table(title=f"vigu train --stage {stage} ({loaded.name})", show_header=False)
        for name, value in describe(plan(loaded, stage, accelerate_config)):
            table.add_row(name, value)
        Console().print(table)
        return
    from .train import train as run

    console.print(f"wrote {run(loaded, stage, resume=resume)}")


@app.command()
def caption() -> None:
    """Video understanding: write a detailed caption for each clip."""
    not_built("caption", "0.4", 6)


@app.command()
def generate() -> None:
    """Text-to-video: generate a clip for each prompt."""
    not_built("generate", "0.4", 6)


@app.command()
def joint() -> None:
    """Joint generation: a clip and its detailed caption together, both from noise."""
    not_built("joint", "0.4", 6)


@app.command("eval")
def evaluate() -> None:
    """Score a model: captioning, prompt following, joint coherence, BLEU-4 / ROUGE-L / CIDEr."""
    not_built("eval", "0.4", 6)


def main() -> None:
    try:
        app()
    except VigUError as exc:
        console.print(f"error: {exc}", markup=False, highlight=False)
        sys.exit(1)


if __name__ == "__main__":
    main()
