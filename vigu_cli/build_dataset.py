"""`vigu build-dataset`: the paper's data recipe (section 4.1), sharded by rank and resumable.

brief prompts (`synth/prompts.py`) -> videos (`synth/generators.py`: world | wan | files) -> detailed
captions (`synth/captioners.py`: world | openai | transformers, with the token-length rules) -> the cache
training reads (`data/cache.py`), in the folder laid out by `data/manifest.py`.

Item i is determined by (data.seed, i) alone: its prompt, its video and its caption. Items are grouped
into shards; shard k is built by rank k % world_size (`accelerate.PartialState`: one process, `accelerate
launch` or `torchrun`), and written as tensors, then lines. A re-run skips every finished shard and
redoes the others, keeping the final outcomes of a shard it finished before: only items whose caption
failed for an infrastructure reason (endpoint down, timeout, 5xx, ...) are made again. So a build killed
at any point and re-run equals an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import socket
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from .core.convert import base_folder, pipeline_from_recipe
from .data.cache import (FORMAT, TENSORS, VERSION, cache_settings, common_tensors, item_tensors, load_tensors,
                         model_identity, read_info, save_tensors, tensor_key, tensor_keys)
from .data.manifest import (COMMON, INFO, SHARDS, VIDEOS, ItemLine, check_writable, is_validation, merge_manifest,
                            read_lines, remove_temporary_files, shard_name, shard_paths, shard_ranges, shards_of_rank,
                            write_json, write_lines)
from .data.video_io import write_video
from .errors import VigUError
from .precision import resolve_dtype
from .recipe import Recipe
from .synth.captioners import CaptionItem, Captioner, count_tokens, make_captioner, unknown_words
from .synth.generators import Clip, VideoGenerator, make_generator
from .synth.prompts import PlannedItem, plan_items

log = logging.getLogger(__name__)

# Ranks finish their shards at different times and wait for the last one at a barrier; the process group's
# default timeout (10 min for NCCL, 30 min for gloo) would abort a Wan build whose shards take longer.
RANK_WAIT = timedelta(hours=24)
VIDEO_WRITERS = 4  # mp4 files written at once (each by its own ffmpeg process)
# Captioner settings that change how results arrive, not what they are: free to change between runs.
CAPTIONER_TRANSPORT = ("base_url", "api_key_env", "concurrency", "timeout_s", "max_retries", "backoff_s", "device")


@dataclass
class BuildReport:
    """What a build did. `lines`: the merged manifest (on the main process; empty on the others);
    `made`: items this run processed (all ranks), whatever their outcome; `done_before`: shards a previous run had
    finished."""

    root: Path
    lines: list[ItemLine]
    made: int
    done_before: int
    val_every: int

    def outcomes(self) -> Counter:
        """(status, reason) -> items."""
        return Counter((line.status, line.reason) for line in self.lines)


def build_dataset(recipe: Recipe, *, overwrite: bool = False, console: Console | None = None) -> BuildReport:
    """Build (or finish) the dataset of `recipe.data` in `recipe.data.out`. `console`: show progress bars
    and route log lines through it (the CLI); None: quiet."""
    data = recipe.data
    check_settings(recipe)
    if data.captioner.backend == "openai":
        check_endpoint(data.captioner)
    state = PartialState(cpu=not torch.cuda.is_available(), timeout=RANK_WAIT)
    root = dataset_dir(recipe)
    check_writable(root, "data.out", folder=True)
    plan = plan_items(data, recipe.model)
    check_existing(root, {"settings": content_settings(recipe, state.device)}, overwrite)  # before loading models
    check_not_shrinking(root, len(plan), overwrite)
    with _reporting(console):
        pipe = encoding_pipeline(recipe, state.device)
        info = start_info(recipe, pipe, state.device)
        check_existing(root, info, overwrite)
        shards = [[plan[i] for i in indices] for indices in shard_ranges(len(plan), data.shard_size)]
        mine = shards_of_rank(len(shards), state.process_index, state.num_processes)
        todo = {k: {} if overwrite else reusable(root, k, shards[k]) for k in mine}
        todo = {k: kept for k, kept in todo.items() if kept is not None}
        items = sum(len(shards[k]) - len(kept) for k, kept in todo.items())
        shown = console if state.is_local_main_process else None
        progress = StageProgress(shown, items)
        # the generator and the captioner load only when there is work, and before the folder is touched
        builder = ShardBuilder(root, recipe, pipe, state, progress) if todo else None
        state.wait_for_everyone()
        if state.is_main_process:
            prepare_folder(root, info, pipe, overwrite)
        state.wait_for_everyone()

        if console is not None and state.num_processes > 1:
            listed = ", ".join(map(str, mine[:4])) + (", ..." if len(mine) > 4 else "")
            console.print(f"rank {state.process_index} of {state.num_processes}: shards {listed} "
                          f"({len(mine)} in all, {len(todo)} to build)")
        if shown:
            shown.print(f"{len(shards)} shard(s), {len(mine) - len(todo)} of this process's done before: "
                        f"making {items} item(s)")
        made = 0
        with progress:
            for k, kept in todo.items():
                made += builder.build(k, shards[k], kept)
                if builder.captioner.error:  # the shard is written; nothing more can be captioned
                    raise builder.captioner.error
        state.wait_for_everyone()
        made, done_before = sum(gather_object([made])), sum(gather_object([len(mine) - len(todo)]))
        lines = finish(root, info, len(shards), data.val_every) if state.is_main_process else []
        state.wait_for_everyone()
    return BuildReport(root, lines, made, done_before, data.val_every)


def dataset_dir(recipe: Recipe) -> Path:
    return Path(recipe.data.out or f"runs/{recipe.name}/data")


# ----------------------------------------------------------------------------------------------------
# Checks before any work
# ----------------------------------------------------------------------------------------------------


def check_settings(recipe: Recipe) -> None:
    """One-line `VigUError` for settings that cannot work together."""
    data, length = recipe.data, recipe.text.max_length
    generator, captioner = data.generator.backend, data.captioner.backend
    if generator == "world" and data.prompts != "world":
        raise VigUError("data.generator.backend=world renders the world sampler's clips: set data.prompts=world, "
                        "or use the wan, vigu or files generator")
    if captioner == "world" and (data.prompts != "world" or generator != "world"):
        raise VigUError("data.captioner.backend=world writes the ground truth of the clips the world renders: "
                        "set data.prompts=world and data.generator.backend=world, or caption what the clips show "
                        "with the measure, openai or transformers captioner")
    if generator == "files" and data.prompts == "world":
        raise VigUError("data.generator.backend=files takes each video's prompt from data.prompts=sidecar "
                        "(<video>.txt) or a .jsonl whose ids are the video file names")
    if generator != "files" and data.prompts == "sidecar":
        raise VigUError("data.prompts=sidecar reads <video>.txt files: it needs data.generator.backend=files")
    for key, top in (("data.max_prompt_tokens", data.max_prompt_tokens),
                     ("data.captioner.max_caption_tokens", data.captioner.max_caption_tokens)):
        if top >= length:
            raise VigUError(f"{key}={top} leaves no room for EOS in text.max_length={length}: "
                            f"set it to at most {length - 1}")
    if not 0 <= data.min_prompt_tokens <= data.max_prompt_tokens:
        raise VigUError(f"need 0 <= data.min_prompt_tokens <= data.max_prompt_tokens, got {data.min_prompt_tokens} "
                        f"and {data.max_prompt_tokens}")
    for key, value, least in (("data.shard_size", data.shard_size, 1), ("data.num_items", data.num_items, 0),
                              ("data.val_every", data.val_every, 0),
                              ("data.generator.batch_size", data.generator.batch_size, 1)):
        if value < least:
            raise VigUError(f"{key} must be at least {least}, got {value}")
    if data.keep_videos and (recipe.model.height % 2 or recipe.model.width % 2):
        raise VigUError("data.keep_videos writes mp4 (H.264), which needs an even model.height and model.width")
    data.captioner.validate()


def check_endpoint(config) -> None:
    """Fail before any work when the caption server cannot be reached (a TCP connection to it)."""
    url = urllib.parse.urlsplit(config.base_url)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise VigUError(f"data.captioner.base_url {config.base_url!r} is not an http(s) URL: write it whole, e.g. "
                        "http://localhost:8000/v1")
    if urllib.request.getproxies().get(url.scheme) and not urllib.request.proxy_bypass(url.hostname or ""):
        return  # requests go through a proxy: the captioner reports what happens there
    try:
        port = url.port or (443 if url.scheme == "https" else 80)
        socket.create_connection((url.hostname, port), timeout=min(config.timeout_s, 10)).close()
    except (OSError, ValueError) as error:
        reason = " ".join(str(error).split()) or type(error).__name__
        raise VigUError(f"caption endpoint {config.base_url} is unreachable ({reason}): start the server "
                        f"(e.g. `vllm serve {config.model}`) or fix data.captioner.base_url") from None


def encoding_pipeline(recipe: Recipe, device: torch.device):
    """The recipe's prompt encoder, tokenizers and VAE, which make the cache. A model folder is loaded
    without its transformer, which the cache does not need."""
    dtype = resolve_dtype(recipe.data.text_encoder_dtype, device)
    pipe = pipeline_from_recipe(recipe, transformer=None, torch_dtype={"text_encoder": dtype, "default": torch.float32})
    pipe.text_encoder.to(device, dtype)
    pipe.vae.to(device)
    return pipe


def content_settings(recipe: Recipe, device: torch.device) -> dict:
    """The settings that decide what the items are (not how fast or from where they arrive); `auto`
    dtypes as resolved on `device`."""
    data = dataclasses.asdict(recipe.data)
    for key in ("out", "num_items", "val_every"):
        del data[key]
    for key in CAPTIONER_TRANSPORT:
        del data["captioner"][key]
    for section, key in ((data, "text_encoder_dtype"), (data["generator"], "dtype")):
        section[key] = str(resolve_dtype(section[key], device)).removeprefix("torch.")
    settings = {"model.fps": recipe.model.fps, "data": data}
    if recipe.data.generator.backend == "vigu":  # its clips are sampled with these
        settings["sampling"] = dataclasses.asdict(recipe.sampling)
    return settings


def start_info(recipe: Recipe, pipe, device: torch.device) -> dict:
    """`dataset.json` as written before any shard: what the cache is and what made it."""
    model, vae = recipe.model, pipe.vae.config
    latent_shape = [vae.z_dim, 1 + (model.num_frames - 1) // pipe.vae_scale_factor_temporal,
                    model.height // pipe.vae_scale_factor_spatial, model.width // pipe.vae_scale_factor_spatial]
    return {
        "format": FORMAT, "version": VERSION, "complete": False, "recipe": recipe.name,
        "settings": content_settings(recipe, device),
        "model": model_identity(pipe),
        "cache": {
            **cache_settings(pipe), "fps": model.fps, "latent_shape": latent_shape,
            "latents_dtype": recipe.data.latents_dtype, "embeds_dtype": recipe.data.embeds_dtype,
            "prompt_embed_dim": pipe.text_encoder.config.d_model,
            "prompt_vocab_size": len(pipe.tokenizer), "text_vocab_size": len(pipe.text_tokenizer),
            "tensors": list(TENSORS),
        },
    }


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_existing(root: Path, info: dict, overwrite: bool) -> None:
    """Refuse a folder holding something else, or (without `overwrite`) a dataset made another way:
    the sections of `info` given (`settings`, `model`, `cache`) must match its `dataset.json`."""
    if not root.exists() or (root.is_dir() and not any(root.iterdir())):
        return
    if not (root / INFO).is_file():
        raise VigUError(f"{root} exists and is not a vigu dataset: give another folder with --out")
    old = read_info(root)
    if overwrite:
        return
    labels = {section: label for section, label in
              (("settings", ""), ("model", "fingerprint of the "), ("cache", "cache.")) if section in info}
    mine, theirs = ({key: value for section, label in labels.items()
                     for key, value in _flatten(source[section], label).items()} for source in (info, old))
    changed = [f"{key}: {_short(theirs.get(key))} -> {_short(mine.get(key))}"
               for key in sorted(set(mine) | set(theirs)) if mine.get(key) != theirs.get(key)]
    if changed:
        more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
        raise VigUError(f"{root} holds a dataset made with other settings ({'; '.join(changed[:3])}{more}): re-run "
                        "with --overwrite to rebuild it, or give another folder with --out")


def check_not_shrinking(root: Path, planned: int, overwrite: bool) -> None:
    """A finished dataset of more items than this run plans would silently lose the rest (and a later run with
    the larger count would make them again): refused without `overwrite`."""
    held = read_info(root).get("items", 0) if (root / INFO).is_file() else 0
    if held > planned and not overwrite:
        raise VigUError(f"{root} holds {held} items and this run plans {planned} (-n / data.num_items, or the "
                        f"prompts it reads): it would drop {held - planned}; ask for {held} or more, or pass "
                        "--overwrite to rebuild it")


def _short(value) -> str:
    text = repr(value)
    return text[:15] + "..." if isinstance(value, str) and len(value) == 64 else text  # fingerprints


def prepare_folder(root: Path, info: dict, pipe, overwrite: bool) -> None:
    """Main process, while every rank waits: clear the folder (`overwrite`) or the temporary files a
    killed run left; write `dataset.json` (incomplete) and the common tensors."""
    if overwrite and root.exists():
        shutil.rmtree(root)
    for folder in (root, root / SHARDS, root / VIDEOS):
        folder.mkdir(parents=True, exist_ok=True)
    removed = remove_temporary_files([root, root / SHARDS, root / VIDEOS])
    if removed:
        log.info("removed %d half-written file(s) of an interrupted run", removed)
    write_json(root / INFO, info)
    embeds_dtype = info["cache"]["embeds_dtype"]
    save_tensors(root / COMMON, common_tensors(pipe, embeds_dtype))


def finish(root: Path, info: dict, num_shards: int, val_every: int) -> list[ItemLine]:
    """Main process, after every rank is done: the merged manifest and the final `dataset.json`."""
    lines = merge_manifest(root, num_shards)
    statuses = Counter(line.status for line in lines)
    usable = [line for line in lines if line.status == "ok"]
    val = sum(is_validation(line.index, val_every) for line in usable)
    write_json(root / INFO, {
        **info, "complete": True,
        "items": len(lines), "shards": num_shards,
        "counts": {status: statuses[status] for status in ("ok", "rejected", "skipped")},
        "reasons": dict(sorted(Counter(line.reason for line in lines if line.reason).items())),
        "pending": sum(not line.final for line in lines),
        "split": {"val_every": val_every, "train": len(usable) - val, "val": val},
    })
    return lines


# ----------------------------------------------------------------------------------------------------
# One shard
# ----------------------------------------------------------------------------------------------------


def reusable(root: Path, k: int, items: Sequence[PlannedItem]) -> dict[str, ItemLine] | None:
    """None when shard k is finished. Otherwise the lines of an earlier run that stand, by id: final
    outcomes of the same items (same index and prompt), with their tensors when `ok`."""
    tensors_path, lines_path = shard_paths(root, k)
    previous = read_lines(lines_path) or []
    keys = tensor_keys(tensors_path)
    wanted = {item.id: item for item in items}
    kept = {}
    for line in previous:
        item = wanted.get(line.id)
        if item is None or (line.index, line.prompt) != (item.index, item.prompt) or not line.final:
            continue
        if line.status == "ok" and not (keys and all(tensor_key(line.id, name) in keys for name in TENSORS)):
            continue
        kept[line.id] = line
    finished = len(kept) == len(items) == len(previous) and keys is not None
    return None if finished else kept


class ShardBuilder:
    """Builds shards: prompt rule -> clips -> captions -> cached tensors -> the shard's two files."""

    def __init__(self, root: Path, recipe: Recipe, pipe, state: PartialState, progress: StageProgress):
        self.root, self.recipe, self.pipe, self.progress = root, recipe, pipe, progress
        data = recipe.data
        shared = {}
        base = base_folder(recipe.model)
        if data.generator.backend == "wan" and base is not None and \
                Path(data.generator.path or base).resolve() == base.resolve():
            shared = {"tokenizer": pipe.tokenizer, "text_encoder": pipe.text_encoder, "vae": pipe.vae}
        self.generator: VideoGenerator = make_generator(recipe, state.device, shared)
        config = data.captioner
        if config.device == "auto" and state.device.type == "cuda":  # each rank captions on its own GPU
            config = dataclasses.replace(config, device=str(state.device))
        self.captioner: Captioner = make_captioner(config, pipe.text_tokenizer)

    def build(self, k: int, items: Sequence[PlannedItem], kept: dict[str, ItemLine]) -> int:
        """Build shard k, keeping the `kept` outcomes; returns how many items were made."""
        data, progress = self.recipe.data, self.progress
        tensors_path, lines_path = shard_paths(self.root, k)
        lines = dict(kept)
        kept_ok = [tensor_key(i, name) for i, line in kept.items() if line.status == "ok" for name in TENSORS]
        tensors = load_tensors(tensors_path, kept_ok) if kept_ok else {}

        def record(item: PlannedItem, status: str, **fields) -> None:
            lines[item.id] = ItemLine(
                id=item.id, index=item.index, status=status, prompt=item.prompt, source=item.source,
                prompt_from=item.prompt_from, shard=shard_name(k), prompt_tokens=tokens[item.id],
                **{"reason": None, "caption": None, "caption_tokens": None, "attempts": 0, "video": None,
                   "detail": None, **fields},
            )

        tokens = {item.id: None if item.prompt is None else count_tokens(self.pipe.text_tokenizer, item.prompt)
                  for item in items}
        valid = []
        for item in items:
            problem = self._prompt_problem(item, tokens[item.id])
            if problem is None:
                valid.append(item)
            elif item.id not in kept:
                record(item, problem[0], reason=problem[1], detail=problem[2])
                progress.drop_from("videos")

        clips = self._clips(valid, kept)
        for item, clip in clips:
            if clip.frames is None:
                record(item, "skipped", reason=clip.reason, detail=clip.detail)
                progress.drop_from("captions")
        if data.keep_videos:  # each write waits on its own ffmpeg process: a few at once
            with ThreadPoolExecutor(VIDEO_WRITERS) as pool:
                list(pool.map(lambda pair: write_video(self.root / VIDEOS / f"{pair[0].id}.mp4", pair[1].frames,
                                                       self.recipe.model.fps),
                              [(item, clip) for item, clip in clips if clip.frames is not None]))

        captioned = [(item, clip) for item, clip in clips if clip.frames is not None]
        results = self.captioner.caption_batch(
            [CaptionItem(item.id, item.prompt, clip.frames, item.spec) for item, clip in captioned]
        )
        progress.advance("captions", len(results))
        for (item, clip), result in zip(captioned, results, strict=True):
            unreadable = self.unreadable(result.caption) if result.ok else None
            ok = result.ok and unreadable is None
            record(item, "ok" if ok else "rejected", reason="caption_unknown_words" if unreadable else result.reason,
                   detail=unreadable, caption=result.caption if ok else None, caption_tokens=result.num_tokens,
                   attempts=result.attempts, video=f"{VIDEOS}/{item.id}.mp4" if data.keep_videos else None)
            if ok:
                tensors.update(item_tensors(self.pipe, item.id, clip.frames, item.prompt, result.caption,
                                            data.latents_dtype, data.embeds_dtype))
                progress.advance("cache")
            else:
                progress.drop_from("cache")
        save_tensors(tensors_path, tensors)
        write_lines(lines_path, [lines[item.id] for item in items])  # last: marks the shard written
        return len(items) - len(kept)

    def _prompt_problem(self, item: PlannedItem, tokens: int | None) -> tuple[str, str, str] | None:
        """(status, reason, detail) when the item cannot be made from its prompt (the paper's prompt rule)."""
        data = self.recipe.data
        if item.prompt is None:
            where = (f"no {Path(item.source).stem}.txt next to it" if data.prompts == "sidecar"
                     else f"no line with its id in {data.prompts}")
            return "skipped", "no_prompt", f"{item.source}: no prompt ({where})"
        if tokens > data.max_prompt_tokens:
            return "rejected", "prompt_too_long", f"{tokens} tokens, more than {data.max_prompt_tokens}"
        if tokens < data.min_prompt_tokens:
            return "rejected", "prompt_too_short", f"{tokens} tokens, fewer than {data.min_prompt_tokens}"
        if unreadable := self.unreadable(item.prompt):
            return "rejected", "prompt_unknown_words", unreadable
        return None

    def unreadable(self, text: str) -> str | None:
        """Which words of `text` the model's tokenizers (prompt and text stream) map to their unknown token: a
        word-level vocabulary such as the world's lacks most words; subword ones such as umT5's read nearly all."""
        tokenizers = dict.fromkeys([self.pipe.tokenizer, self.pipe.text_tokenizer])
        words = list(dict.fromkeys(word for tokenizer in tokenizers for word in unknown_words(tokenizer, text)))
        return f"the model's vocabulary lacks {', '.join(map(repr, words))}" if words else None

    def _clips(self, valid: Sequence[PlannedItem], kept: dict) -> list[tuple[PlannedItem, Clip]]:
        """Clips of the valid items not kept. Batches are fixed runs of the shard's valid items, so an
        item's batch-mates (and with them its video, to the last bit) never depend on what was kept."""
        size = self.generator.batch_size
        clips = []
        for start in range(0, len(valid), size):
            batch = valid[start : start + size]
            if all(item.id in kept for item in batch):
                continue
            made = [(item, clip) for item, clip in zip(batch, self.generator.generate(batch), strict=True)
                    if item.id not in kept]
            clips.extend(made)
            self.progress.advance("videos", len(made))
        return clips


# ----------------------------------------------------------------------------------------------------
# Progress and summary
# ----------------------------------------------------------------------------------------------------


class RateColumn(ProgressColumn):
    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:.2f} items/s" if speed else "", style="progress.data.speed")


class StageProgress:
    """One rich progress bar per stage, with items/s; silent when `console` is None. Each bar's total
    is the items that reach its stage: an item dropped before a stage (`drop_from`) shrinks it."""

    STAGES = ("videos", "captions", "cache")

    def __init__(self, console: Console | None, items: int):
        self.progress = Progress(
            TextColumn("{task.description:>8}"), BarColumn(), MofNCompleteColumn(), RateColumn(),
            TimeElapsedColumn(), console=console, disable=console is None or items == 0,
        )
        self.tasks = {stage: self.progress.add_task(stage, total=items) for stage in self.STAGES}

    def __enter__(self) -> StageProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def advance(self, stage: str, count: int = 1) -> None:
        self.progress.advance(self.tasks[stage], count)

    def drop_from(self, stage: str) -> None:
        for later in self.STAGES[self.STAGES.index(stage):]:
            task = self.tasks[later]
            self.progress.update(task, total=self.progress.tasks[task].total - 1)


@contextmanager
def _reporting(console: Console | None) -> Iterator[None]:
    """With a console: log lines through it (rejected captions; this module's notes), library loading bars off."""
    if console is None:
        yield
        return
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    handler = RichHandler(console=console, show_time=False, show_path=False)
    package, levels = logging.getLogger("vigu_cli"), {}
    for logger, level in ((package, logging.WARNING), (log, logging.INFO)):  # rejections; this module's notes
        levels[logger] = logger.level
        logger.setLevel(level)
    package.addHandler(handler)
    try:
        yield
    finally:
        package.removeHandler(handler)
        for logger, level in levels.items():
            logger.setLevel(level)


def summary_table(report: BuildReport) -> Table:
    """Items by outcome: made, rejected and skipped, with their reasons."""
    outcomes = report.outcomes()
    usable = outcomes[("ok", None)]
    val = sum(line.status == "ok" and is_validation(line.index, report.val_every) for line in report.lines)
    table = Table(title=f"{report.root}: {usable} usable item(s) ({usable - val} train, {val} val); "
                        f"{report.made} processed by this run (made, rejected or skipped)", title_justify="left")
    table.add_column("status")
    table.add_column("reason")
    table.add_column("items", justify="right")
    table.add_column("detail")
    for (status, reason), count in sorted(outcomes.items(), key=lambda entry: (entry[0][0] != "ok", entry[0])):
        examples = [line for line in report.lines if (line.status, line.reason) == (status, reason)]
        details = [line.detail for line in examples if line.detail]  # what was wrong (the words, the file, ...)
        detail = "retried by the next run" if reason and not examples[0].final else "; ".join(details[:3])
        if detail and len(details) > 3:
            detail += " ..."
        table.add_row("made" if status == "ok" else status, reason or "", str(count), detail)
    table.add_row("total", "", str(len(report.lines)), "")
    pending = sum(not line.final for line in report.lines)
    if pending:
        table.caption = f"{pending} item(s) failed for service reasons: run the same command again to retry them"
    return table
