"""What `vigu caption`, `vigu generate` and `vigu joint` share (and `vigu eval` reuses): the model they
load, the inputs they read, the vocabulary check, batches with a seed per sample and a progress bar,
and the files they write.

- Every input is checked before anything is sampled or written: a missing or unreadable prompts
  file, clip, or a word the model cannot read stops the command with one line.
- Sample i (the i-th prompt or clip of the command) draws its noise from its own generator seeded with
  `seed + i`, whatever `--batch` puts it with: its sidecar records that seed, and `--seed <it>`
  reproduces the sample alone. (BLAS kernels are chosen by matrix shape, so a different batch size can
  move the floats by ~1e-6; the same batch size gives the same bits.)
- Files are written to a temporary name and renamed: an interrupted command leaves whole files only.
"""

from __future__ import annotations

import logging
import re
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from .core.convert import load_pipeline
from .core.pipeline import SAMPLING_SETTINGS, UniViGUPipeline, UniViGUPipelineOutput
from .core.text import TEXT_ORDERS
from .data.manifest import check_writable, write_json, write_text
from .data.video_io import frames_to_tensor, load_clip, write_video
from .errors import VigUError
from .precision import default_device, resolve_dtype
from .recipe import load_recipe
from .synth.captioners import unknown_words

DEFAULT_MODEL = "runs/demo/model"
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class SamplingOptions:
    """The options every sampling command takes. None: the model's own default (its folder's config)."""

    model: Optional[str] = None  # None: DEFAULT_MODEL, the demo's
    recipe: str = "world-tiny"  # converts a stock Wan folder on the fly
    steps: Optional[int] = None
    solver: Optional[str] = None
    shift: Optional[float] = None
    guidance_video: Optional[float] = None
    guidance_text: Optional[float] = None
    text_shift: Optional[float] = None
    text_temperature: Optional[float] = None
    text_order: Optional[str] = None
    video_eta: Optional[float] = None
    negative_prompt: Optional[str] = None
    caption_candidates: Optional[int] = None
    seed: int = 0
    batch: int = 1  # samples per solver call
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bfloat16 where its matmuls are fast: CUDA, AMX CPUs; else float32) | float32 | ...

    def __post_init__(self):
        """Every value is checked before a model is loaded."""
        for name, allowed in CHOICES.items():
            value = getattr(self, name)
            if value is not None and value not in allowed:
                raise VigUError(f"unknown {flag(name)} '{value}': use {', '.join(allowed[:-1])} or {allowed[-1]}")
        for name in ("steps", "batch", "caption_candidates"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise VigUError(f"{flag(name)} must be at least 1, got {value}")
        for name in ("shift", "text_shift"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise VigUError(f"{flag(name)} must be above 0 (1: the plain time grid), got {value}")
        if self.text_temperature is not None and self.text_temperature < 0:
            raise VigUError(f"--text-temperature must be at least 0 (0: the most likely token), got {self.text_temperature}")
        if self.video_eta is not None and not 0 <= self.video_eta <= 1:
            raise VigUError(f"--video-eta must be between 0 (the deterministic flow) and 1, got {self.video_eta}")
        resolve_device(self.device)
        self.model = self.model or DEFAULT_MODEL

    def overrides(self) -> dict:
        """The solver settings to pass to the pipeline (None: the model's default)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name in SAMPLING_SETTINGS}


CHOICES = {"solver": ("euler", "heun"), "text_order": TEXT_ORDERS, "dtype": ("auto", *DTYPES)}


def flag(name: str) -> str:
    """The command-line spelling of a `SamplingOptions` field: text_order -> --text-order."""
    return "--" + name.replace("_", "-")


# ----------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return default_device()
    if not re.fullmatch(r"cpu|cuda(:\d+)?", name):
        raise VigUError(f"unknown device '{name}': use auto, cpu, cuda or cuda:N")
    device = torch.device(name)
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise VigUError(f"--device {name}: this machine has no such CUDA device; use --device cpu")
    return device


# torch's notes that say nothing a user can act on, each seen in `vigu train` under bf16 autocast: an RMS norm of
# bf16 activations with float32 weights takes the unfused kernel (measured at a world-tiny step's shape: 7.7
# against 7.0 ms forward and backward), and torch.compile skips the profiler range DDP opens in its forward
TORCH_NOTES = ("Mismatch dtype between input and weight", "Profiler record function")


def _no_torch_notes(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(TORCH_NOTES)


def quiet_libraries() -> None:
    """diffusers' and transformers' loading bars and notes off, and torch's TORCH_NOTES: stderr carries vigu's
    progress and errors."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for library in (diffusers_logging, transformers_logging):
        library.disable_progress_bar()
        library.set_verbosity_error()
    warnings.filterwarnings("ignore", message=TORCH_NOTES[0], category=UserWarning)
    dynamo = logging.getLogger("torch._dynamo.variables.ctx_manager")
    if _no_torch_notes not in dynamo.filters:
        dynamo.addFilter(_no_torch_notes)


def load_model(options: SamplingOptions, mode: Optional[str] = None) -> UniViGUPipeline:
    """The pipeline of `--model` on `--device` in `--dtype` (the VAE stays in float32, as Wan's), for `mode`
    (None: every mode, as `vigu eval`)."""
    if options.model == DEFAULT_MODEL and not Path(DEFAULT_MODEL).exists():
        raise VigUError(f"no model at {DEFAULT_MODEL}: run `make demo` or pass --model PATH")
    device = resolve_device(options.device)
    dtype = resolve_dtype(options.dtype, device)
    quiet_libraries()
    pipe = load_pipeline(
        options.model, load_recipe(options.recipe),
        torch_dtype={"transformer": dtype, "text_encoder": dtype, "default": torch.float32},
    )
    for name, inert in (("text_temperature", 1.0), ("text_order", "random")):
        if getattr(options, name) not in (None, inert) and pipe.text_flow.continuous:
            raise VigUError(f"{flag(name)}: {options.model} uses the {pipe.text_flow.name} text flow, "
                            "which draws no tokens (the option is for the discrete flow); leave it out")
    settings = pipe.recorded_settings(mode, **options.overrides())  # those that act in `mode` (caption's video is given)
    if settings.get("negative_prompt"):
        check_vocabulary(pipe, [settings["negative_prompt"]])
    if settings["solver"] == "heun" and settings.get("video_eta", 0.0) > 0:
        raise VigUError(f"--solver heun with --video-eta {settings['video_eta']}: the video's stochastic step is an "
                        "Euler step; leave --video-eta out (Heun integrates the deterministic flow) or use --solver euler")
    return pipe.to(device)


# ----------------------------------------------------------------------------------------------------
# Inputs, checked before anything is sampled
# ----------------------------------------------------------------------------------------------------


def read_inputs(given: Optional[list[str]], file: Optional[str], what: str) -> list[str]:
    """The command's arguments followed by the non-empty lines of `file` (`-`: standard input; a pipe such as
    `<(...)` reads too)."""
    items = list(given or [])
    if file is not None:
        path = Path(file)
        if file != "-" and not path.exists():
            raise VigUError(f"{path}: no such {what}s file; check the path")
        if path.is_dir():
            raise VigUError(f"{path}: is a folder, not a {what}s file; give a file with one {what} per line")
        try:
            text = sys.stdin.read() if file == "-" else path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise VigUError(f"{file}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from None
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if not lines:
            raise VigUError(f"{path}: holds no {what}s; write one {what} per line")
        items += lines
    if not items:
        raise VigUError(f"no {what} given: pass one or more {what.upper()} arguments or --{what}s-file FILE")
    return items


def known_words(tokenizer, limit: int = 200) -> Optional[list[str]]:
    """A small (word-level) vocabulary's words, special tokens left out; None for a large one."""
    if len(tokenizer) > limit:
        return None
    return sorted(set(tokenizer.get_vocab()) - set(tokenizer.all_special_tokens))


def check_vocabulary(pipe: UniViGUPipeline, texts: list[str]) -> None:
    """Every word of every text must be known to the text-stream tokenizer and the prompt tokenizer
    (subword tokenizers such as umT5's know everything; the world's word-level one does not)."""
    for tokenizer in dict.fromkeys([pipe.text_tokenizer, pipe.tokenizer]):
        found = {text: unknown_words(tokenizer, text) for text in texts}
        found = {text: words for text, words in found.items() if words}
        if found:
            words = list(dict.fromkeys(w for ws in found.values() for w in ws))
            named = ", ".join(f"'{w}'" for w in words)
            first = next(iter(found))
            where = f'"{first}"' + (f" and {len(found) - 1} more" if len(found) > 1 else "")
            vocabulary = known_words(tokenizer)
            knows = f"it knows only: {' '.join(vocabulary)}" if vocabulary else f"it has {len(tokenizer)} tokens"
            plural = "s" if len(words) > 1 else ""
            raise VigUError(f"the model's vocabulary has no word{plural} {named} (in {where}): {knows}; use words it knows")


def clip_shape(pipe: UniViGUPipeline) -> tuple[int, int, int]:
    return pipe.config.num_frames, pipe.config.height, pipe.config.width


def check_clips(pipe: UniViGUPipeline, paths: list[str]) -> None:
    """Read every clip once (the same code as build-dataset's): a missing, corrupt or too-short one
    stops the command before anything is sampled."""
    for path in paths:
        load_clip(path, *clip_shape(pipe))


def clip_batch(pipe: UniViGUPipeline, paths: list[str]) -> torch.Tensor:
    """Clips fitted to the model's shape (frame-sampled, resized, centre-cropped) as `[B, 3, F, H, W]`."""
    return torch.stack([frames_to_tensor(load_clip(path, *clip_shape(pipe))) for path in paths])


# ----------------------------------------------------------------------------------------------------
# Sampling in batches
# ----------------------------------------------------------------------------------------------------


@dataclass
class Sample:
    index: int
    seed: int
    video: Optional[np.ndarray]  # uint8 [F, H, W, 3]
    text: Optional[str]
    seconds: float  # wall time of its batch, divided by the batch size


# call(start, stop, generators, callback) -> the pipeline's output for the inputs start..stop-1
BatchCall = Callable[[int, int, list, Callable[[int, int], None]], UniViGUPipelineOutput]


def batch_call(pipe: UniViGUPipeline, mode: str, overrides: dict, prompts: Optional[list[str]] = None,
               clips: Optional[Callable[[int, int], torch.Tensor]] = None, **mode_options) -> BatchCall:
    """A mode's pipeline call on inputs start..stop-1: `prompts[start:stop]` (generate, joint) or
    `clips(start, stop)`, a `[B, 3, F, H, W]` batch (caption, with `prompts[start:stop]` as hints if given)."""

    def call(start, stop, generators, callback):
        texts = None if prompts is None else prompts[start:stop]
        if mode == "caption":
            return pipe.caption(clips(start, stop), texts, generator=generators, callback=callback, **overrides,
                                **mode_options)
        return getattr(pipe, mode)(texts, generator=generators, callback=callback, **overrides, **mode_options)

    return call


@contextmanager
def progress_bar(console: Console) -> Iterator[Progress]:
    """Progress bars on the console (stderr; shown on a terminal only): stdout keeps only the results."""
    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("steps"),
        TimeRemainingColumn(), console=console, transient=True, disable=not console.is_terminal,
    )
    with progress:
        yield progress


def sample_batches(
    pipe: UniViGUPipeline, options: SamplingOptions, count: int, call: BatchCall, progress: Progress, label: str
) -> Iterator[Sample]:
    """Run `call` on batches of `options.batch` inputs, sample i with a generator seeded `seed + i`;
    the bar advances once per solver step."""
    steps = pipe.sampling_settings(**options.overrides())["steps"]
    task = progress.add_task(label, total=steps * -(-count // options.batch))
    for start in range(0, count, options.batch):
        stop = min(start + options.batch, count)
        generators = [torch.Generator(pipe.device).manual_seed(options.seed + i) for i in range(start, stop)]
        began = time.perf_counter()
        out = call(start, stop, generators, lambda step, total: progress.advance(task))
        seconds = (time.perf_counter() - began) / (stop - start)
        for i in range(start, stop):
            yield Sample(
                index=i, seed=options.seed + i, seconds=seconds,
                video=out.videos[i - start] if out.videos is not None else None,
                text=out.texts[i - start] if out.texts is not None else None,
            )
    progress.remove_task(task)


# ----------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------


def sample_name(index: int, count: int, text: str) -> str:
    """`<index>-<slug>`: the index zero-padded to the count's width, the slug from the prompt or clip."""
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48].rstrip("-") or "sample"
    return f"{index:0{max(3, len(str(count - 1)))}d}-{slug}"


def sample_record(pipe: UniViGUPipeline, options: SamplingOptions, mode: str, sample: Sample, **fields) -> dict:
    """The sidecar of a sample: what made it and how to make it again."""
    return {
        "mode": mode, **fields, "index": sample.index, "seed": sample.seed,
        **pipe.recorded_settings(mode, **options.overrides()),
        "model": str(options.model), "device": str(pipe.device), "dtype": str(pipe.transformer.dtype).removeprefix("torch."),
        "fps": pipe.config.fps, "batch": options.batch, "seconds": round(sample.seconds, 4),
    }


def write_sample(out: Path, name: str, record: dict, video: Optional[np.ndarray], fps: int) -> None:
    """`<name>.mp4` (a video; its path goes into `record`), `<name>.txt` (a caption) and `<name>.json`
    (the sidecar, last), each written atomically."""
    if video is not None:
        record["video"] = str(out / f"{name}.mp4")
        write_video(record["video"], video, fps)
    if record.get("caption") is not None:
        write_text(out / f"{name}.txt", record["caption"] + "\n")
    write_json(out / f"{name}.json", record)


def run_command(
    pipe: UniViGUPipeline, options: SamplingOptions, mode: str, names: list[str], call: BatchCall,
    describe: Callable[[int], dict], out: Optional[str], console: Console,
) -> Iterator[dict]:
    """The loop of a sampling command: batches with progress, a sidecar record per sample (`describe(i)`
    gives its inputs), files under `out` (none when it is None); yields each record as it is done."""
    with progress_bar(console) as progress:
        for sample in sample_batches(pipe, options, len(names), call, progress, mode):
            record = sample_record(pipe, options, mode, sample, **describe(sample.index))
            if sample.text is not None:
                record["caption"] = sample.text
            if out is not None:
                write_sample(Path(out), sample_name(sample.index, len(names), names[sample.index]), record,
                             sample.video, pipe.config.fps)
            yield record


# ----------------------------------------------------------------------------------------------------
# The three commands (the CLI prints what they yield)
# ----------------------------------------------------------------------------------------------------


def caption_clips(options: SamplingOptions, clips, clips_file, hint: Optional[str], out: Optional[str],
                  console: Console) -> Iterator[dict]:
    """`vigu caption`: each clip fitted to the model's shape, its text flowed from noise (paper eq. 16)."""
    paths = read_inputs(clips, clips_file, "clip")
    check_writable(out, "--out", folder=True)
    pipe = load_model(options, "caption")
    check_vocabulary(pipe, [hint] if hint else [])
    check_clips(pipe, paths)
    hints = [hint] * len(paths) if hint else None
    call = batch_call(pipe, "caption", options.overrides(), hints, lambda a, b: clip_batch(pipe, paths[a:b]))
    describe = lambda i: {"clip": paths[i], "hint": hint}  # noqa: E731
    return run_command(pipe, options, "caption", [Path(p).stem for p in paths], call, describe, out, console)


def generate_clips(options: SamplingOptions, prompts, prompts_file, text_stream: Optional[str], out: str,
                   console: Console) -> Iterator[dict]:
    """`vigu generate`: the video flowed from noise, the text stream frozen at the prompt (eq. 17) or absent."""
    prompts = read_inputs(prompts, prompts_file, "prompt")
    check_writable(out, "--out", folder=True)
    if text_stream not in (None, "prompt", "none"):
        raise VigUError(f"unknown --text-stream '{text_stream}': use prompt or none")
    pipe = load_model(options, "generate")
    check_vocabulary(pipe, prompts)
    stream = text_stream or pipe.config.generate_text
    call = batch_call(pipe, "generate", options.overrides(), prompts, text_stream=stream)
    describe = lambda i: {"prompt": prompts[i], "text_stream": stream}  # noqa: E731
    return run_command(pipe, options, "generate", prompts, call, describe, out, console)


def joint_clips(options: SamplingOptions, prompts, prompts_file, out: str, console: Console) -> Iterator[dict]:
    """`vigu joint`: video and caption flowed together from noise (eq. 18)."""
    prompts = read_inputs(prompts, prompts_file, "prompt")
    check_writable(out, "--out", folder=True)
    pipe = load_model(options, "joint")
    check_vocabulary(pipe, prompts)
    call = batch_call(pipe, "joint", options.overrides(), prompts)
    describe = lambda i: {"prompt": prompts[i]}  # noqa: E731
    return run_command(pipe, options, "joint", prompts, call, describe, out, console)
