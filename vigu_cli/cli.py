"""The `vigu` command line. One function per subcommand, each a few lines over the core."""

from __future__ import annotations

import functools
import inspect
import json
import os
import sys
from typing import Annotated, Optional, get_type_hints

import typer
from rich.console import Console

from .errors import VigUError
from .recipe import dump_recipe, load_recipe

# OpenMP's threads spin while they wait for work (its default, ACTIVE): next to any other busy process, a small
# model's many short parallel regions stall on a descheduled thread. `vigu generate` on the demo's model, 2 cores,
# another process busy on one of them: 63 s spinning, 6.7 s passive. Set before torch loads OpenMP (this module
# imports no torch); a user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

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
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace DST if it exists (never SRC).")] = False,
) -> None:
    """Stock Wan2.1 folder -> vigu folder (new text parameters per the recipe), or vigu -> stock Wan."""
    from .core.convert import convert_folder
    from .sampling import quiet_libraries

    quiet_libraries()
    made = convert_folder(src, dst, load_recipe(recipe, set_), overwrite=overwrite)
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
    from .sampling import quiet_libraries

    quiet_libraries()
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
    if accelerate_config is not None and not dry_run:
        raise VigUError(f"--accelerate-config plans a --dry-run; to train with {accelerate_config}, launch "
                        f"`accelerate launch --config_file {accelerate_config} -m vigu_cli train ...`")
    if dry_run:
        from rich.table import Table

        from .train_plan import describe, plan

        table = Table(title=f"vigu train --stage {stage} ({loaded.name})", show_header=False)
        for name, value in describe(plan(loaded, stage, accelerate_config)):
            table.add_row(name, value)
        Console().print(table)
        return
    from accelerate import PartialState

    from .sampling import quiet_libraries
    from .train import train as run

    quiet_libraries()  # stderr carries the run's own progress and its errors

    folder = run(loaded, stage, resume=resume)
    if PartialState().is_main_process:  # under torchrun / accelerate launch, once
        console.print(f"wrote {folder}")


# ----------------------------------------------------------------------------------------------------
# The sampling commands: caption, generate, joint (and eval) share one set of options
# ----------------------------------------------------------------------------------------------------

SAMPLING_OPTIONS = {  # name: (annotation, default); a command receives them as one SamplingOptions
    "model": (Annotated[Optional[str], typer.Option(
        "--model", "-m", help="A vigu folder, or a stock Wan2.1 diffusers folder (converted on the fly with --recipe); "
        "default: the demo's model, runs/demo/model.")], None),
    "recipe": (RecipeOpt, "world-tiny"),
    "steps": (Annotated[Optional[int], typer.Option("--steps", help="Solver steps (default: the model's).")], None),
    "solver": (Annotated[Optional[str], typer.Option("--solver", help="euler | heun (default: the model's).")], None),
    "shift": (Annotated[Optional[float], typer.Option("--shift", help="Time-grid shift (default: the model's).")], None),
    "guidance_video": (Annotated[Optional[float], typer.Option(
        "--guidance-video", help="Classifier-free guidance scale of the video stream (default: the model's).")], None),
    "guidance_text": (Annotated[Optional[float], typer.Option(
        "--guidance-text", help="Classifier-free guidance scale of the text stream (default: the model's).")], None),
    "text_shift": (Annotated[Optional[float], typer.Option(
        "--text-shift", help="Time-grid shift of the text stream (default: the model's, else --shift).")], None),
    "text_temperature": (Annotated[Optional[float], typer.Option(
        "--text-temperature", help="Discrete text flow: temperature of each token draw, 0 = the most likely token "
        "(default: the model's).")], None),
    "text_order": (Annotated[Optional[str], typer.Option(
        "--text-order", help="Discrete text flow: which tokens jump at each step, random (the official sampler) "
        "| confidence (most likely first) (default: the model's).")], None),
    "video_eta": (Annotated[Optional[float], typer.Option(
        "--video-eta", help="DDIM's eta for the video's Euler steps: fresh noise at each step, 0 = the deterministic "
        "flow, 1 = as much as the DDPM posterior (default: the model's).")], None),
    "negative_prompt": (Annotated[Optional[str], typer.Option(
        "--negative-prompt", help="What the video's guidance steers away from, as WanPipeline's negative_prompt "
        "(default: the model's, the empty prompt unless its recipe sets sampling.negative_prompt).")], None),
    "caption_candidates": (Annotated[Optional[int], typer.Option(
        "--caption-candidates", help="Captions drawn per clip, the one that agrees most with the others kept "
        "(minimum Bayes risk decoding; default: the model's).")], None),
    "seed": (Annotated[int, typer.Option("--seed", help="Sample i uses seed + i, whatever the batch.")], 0),
    "batch": (Annotated[int, typer.Option("--batch", "-b", help="Samples per solver call.")], 1),
    "device": (Annotated[str, typer.Option("--device", help="auto | cpu | cuda | cuda:N")], "auto"),
    "dtype": (Annotated[str, typer.Option(
        "--dtype", help="auto (bfloat16 where it is fast: CUDA, a CPU with AMX or AVX512-BF16; else float32) | "
        "float32 | bfloat16 | float16")], "auto"),
}
JsonOpt = Annotated[bool, typer.Option("--json", help="One JSON object per line (the sidecar) instead of plain text.")]


def sampling_options(*skip: str, **defaults):
    """Decorator: give a command the shared options (but `skip`; `defaults` replace theirs); it receives
    them as one `SamplingOptions` named `options`."""

    def decorate(command):
        names = [name for name in SAMPLING_OPTIONS if name not in skip]
        hints = get_type_hints(command, include_extras=True)
        own = [p.replace(annotation=hints[p.name]) for p in inspect.signature(command).parameters.values()
               if p.name != "options"]
        shared = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=SAMPLING_OPTIONS[name][0],
                                    default=defaults.get(name, SAMPLING_OPTIONS[name][1])) for name in names]

        @functools.wraps(command)
        def wrapper(**kwargs):
            from .sampling import SamplingOptions

            options = SamplingOptions(**{name: kwargs.pop(name) for name in names})
            return command(options=options, **kwargs)

        wrapper.__signature__ = inspect.Signature(own + shared)
        wrapper.__annotations__ = {p.name: p.annotation for p in own + shared}
        return wrapper

    return decorate


def emit(records, as_json: bool, text) -> None:
    """Results on stdout, one line each, as they are done (progress and messages go to stderr)."""
    for record in records:
        print(json.dumps(record, ensure_ascii=False) if as_json else text(record), flush=True)


@app.command()
@sampling_options()
def caption(
    options,
    clips: Annotated[Optional[list[str]], typer.Argument(help="Video files, fitted to the model's shape.")] = None,
    clips_file: Annotated[Optional[str], typer.Option("--clips-file", help="A file of video paths, one per line.")] = None,
    hint: Annotated[Optional[str], typer.Option("--hint", help="A brief prompt to condition on (paper stage 2).")] = None,
    out: Annotated[Optional[str], typer.Option("--out", "-o", help="Also write <index>-<clip>.txt/.json here.")] = None,
    json_: JsonOpt = False,
) -> None:
    """Video understanding: a detailed caption for each clip, one per line on stdout."""
    from .sampling import caption_clips

    emit(caption_clips(options, clips, clips_file, hint, out, console), json_, lambda r: r["caption"])


@app.command()
@sampling_options()
def generate(
    options,
    prompts: Annotated[Optional[list[str]], typer.Argument(help="Brief prompts, e.g. \"a red circle moving left\".")] = None,
    prompts_file: Annotated[Optional[str], typer.Option("--prompts-file", help="A file of prompts, one per line.")] = None,
    text_stream: Annotated[Optional[str], typer.Option(
        "--text-stream", help="prompt (the clean prompt rides in the text stream) | none (plain Wan)")] = None,
    out: Annotated[str, typer.Option("--out", "-o", help="Folder of <index>-<slug>.mp4 + .json sidecars.")] = "runs/generate",
    json_: JsonOpt = False,
) -> None:
    """Text-to-video: a clip for each prompt; prints the written mp4 paths."""
    from .sampling import generate_clips

    emit(generate_clips(options, prompts, prompts_file, text_stream, out, console), json_, lambda r: r["video"])


@app.command()
@sampling_options()
def joint(
    options,
    prompts: Annotated[Optional[list[str]], typer.Argument(help="Brief prompts, e.g. \"a red circle moving left\".")] = None,
    prompts_file: Annotated[Optional[str], typer.Option("--prompts-file", help="A file of prompts, one per line.")] = None,
    out: Annotated[str, typer.Option("--out", "-o", help="Folder of <index>-<slug>.mp4/.txt/.json.")] = "runs/joint",
    json_: JsonOpt = False,
) -> None:
    """Joint generation: a clip and its detailed caption together, both from noise; prints `mp4<TAB>caption`."""
    from .sampling import joint_clips

    emit(joint_clips(options, prompts, prompts_file, out, console), json_, lambda r: f"{r['video']}\t{r['caption']}")


@app.command("eval")
@sampling_options("steps", batch=16)
def evaluate(
    options,
    data: Annotated[Optional[str], typer.Option(
        "--data", help="A built dataset: its held-out split, its captions the references (default: fresh world clips).")] = None,
    items: Annotated[Optional[int], typer.Option(
        "--items", "-n", help="Items to score (default: 200 fresh world clips drawn with --seed; all of --data's).")] = None,
    steps: Annotated[Optional[str], typer.Option(
        "--steps", help="Solver steps, or a list (5,10,25,50) for the accuracy-vs-steps curve (default: the model's).")] = None,
    json_out: Annotated[Optional[str], typer.Option("--json", help="Also write the report to this JSON file.")] = None,
    sheet: Annotated[Optional[str], typer.Option("--sheet", help="Write a contact sheet, PATH.html and PATH.png.")] = None,
    hint: Annotated[bool, typer.Option(
        "--hint", help="Caption each clip with its prompt as the hint (paper stage 2; default: the video alone).")] = False,
) -> None:
    """Score a model: captioning, prompt following, joint coherence, BLEU-4 / ROUGE-L / CIDEr."""
    from .contact_sheet import sheet_paths
    from .data.manifest import check_writable, write_json
    from .run_eval import parse_steps, run_eval, tables

    check_writable(json_out, "--json", folder=False)
    for made in ([] if sheet is None else sheet_paths(sheet)):
        check_writable(made, "--sheet", folder=False)
    report = run_eval(options, data, items, parse_steps(steps), console, sheet, hint)
    if json_out is not None:
        write_json(json_out, report)
    for table in tables(report):
        Console(soft_wrap=True).print(table)


def main() -> None:
    try:
        app()
    except VigUError as exc:
        console.print(f"error: {exc}", markup=False, highlight=False)
        sys.exit(1)
    except KeyboardInterrupt:  # what is written stays whole (temporary names, then renames)
        console.print("interrupted: what was finished is kept; run the same command again to go on (vigu train: "
                      "add --resume)", markup=False, highlight=False)
        sys.exit(130)


if __name__ == "__main__":
    main()
