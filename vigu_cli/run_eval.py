"""`vigu eval`: a model scored on a held-out set in every mode, at one or more step counts.

Sets:
- fresh world clips (`--items N --seed S`): clip i is drawn with `np.random.default_rng([EVAL_STREAM,
  S, i])`, a stream that `vigu build-dataset` (which draws item i with `[seed, i]`) never uses, and
  rendered at the model's shape; its references are its caption in each of the world's 7 phrasings;
- a built dataset (`--data DIR`): its held-out split (all its items when it has none), each clip
  fitted to the model's shape, its caption the reference; the first `--items` of them.

Per step count: captions of the clips (no hint: understanding from the video alone; `--hint`: each conditioned on
its prompt, the paper's stage-2 setting), a clip per prompt, a joint clip and caption per prompt. Scores: caption
accuracy per attribute, macro and hidden (where the references are world captions, which the world's parser reads
back to the truth); generation prompt following and joint coherence (where the prompts follow the world's grammar);
BLEU-4, ROUGE-L and CIDEr of the captions against the references (always). Videos are measured as they come and not
kept (but the contact sheet's few), so a large set needs no memory for them.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from . import evaluate
from .contact_sheet import SheetRow, write_contact_sheet
from .data import world
from .data.cache import split_lines
from .data.video_io import frames_to_tensor, load_clip
from .errors import VigUError
from .sampling import (SamplingOptions, batch_call, check_clips, check_vocabulary, clip_shape, load_model,
                       progress_bar, sample_batches)

EVAL_STREAM = 0x5EED_E7A1  # first word of the world eval set's seeds; build-dataset seeds item i with [seed, i]
SHEET_ITEMS = 6  # items shown on the contact sheet (three rows each: caption, generate, joint)


@dataclass
class EvalItem:
    name: str
    prompt: str
    references: list[str]
    truth: Optional[dict]  # the 7 attributes where the world's parser reads them from the reference
    load: Callable[[], np.ndarray]  # the clip, uint8 [F, H, W, 3] at the model's shape
    path: Optional[str] = None  # the clip's file, if it has one


def world_items(count: int, seed: int, num_frames: int, height: int, width: int, fps: int) -> list[EvalItem]:
    items = []
    for i in range(count):
        spec = world.sample_clip(np.random.default_rng([EVAL_STREAM, seed, i]), height, width, num_frames, fps)
        rng = np.random.default_rng(0)  # unused: every phrasing is given by index
        references = [world.caption_text(spec, rng, k) for k in range(len(world.CAPTION_TEMPLATES))]
        items.append(EvalItem(f"world-{seed}-{i}", world.prompt_text(spec), references, spec.attributes(),
                              functools.partial(world.render, spec)))
    return items


def dataset_items(root: str | Path, count: Optional[int], num_frames: int, height: int,
                  width: int) -> tuple[list[EvalItem], str]:
    """The held-out items of a built dataset (all of them where it holds none out) and which: `val` or `all`."""
    root = Path(root)
    held_out = split_lines(root, "val")
    split = "val" if held_out else "all"
    items = []
    for line in (held_out or split_lines(root, "all"))[:count]:
        if line.video is None:
            raise VigUError(f"{root} keeps no videos (data.keep_videos=false): rebuild it with data.keep_videos=true")
        path = str(root / line.video)
        items.append(EvalItem(line.id, line.prompt, [line.caption], evaluate.world_truth(line.caption),
                              functools.partial(load_clip, path, num_frames, height, width), path))
    if not items:
        raise VigUError(f"{root} has no usable items to evaluate: build it with `vigu build-dataset`")
    return items, split


def parse_steps(text: Optional[str]) -> list[Optional[int]]:
    """`--steps 5,10,25,50` -> [5, 10, 25, 50]; None -> [None] (the model's default)."""
    if text is None:
        return [None]
    try:
        steps = [int(part) for part in text.split(",")]
    except ValueError:
        raise VigUError(f"--steps '{text}' is not a list of whole numbers such as 5,10,25,50") from None
    if min(steps) < 1:
        raise VigUError(f"--steps '{text}': every step count must be at least 1")
    return steps


def eval_set(pipe, data: Optional[str], count: Optional[int], seed: int) -> tuple[list[EvalItem], dict]:
    """The items and a description of where they come from."""
    if count is not None and count < 1:
        raise VigUError(f"--items must be at least 1, got {count}")
    num_frames, height, width = clip_shape(pipe)
    if data is not None:
        items, split = dataset_items(data, count, num_frames, height, width)
        check_clips(pipe, [item.path for item in items])
        return items, {"source": str(data), "split": split, "items": len(items)}
    items = world_items(200 if count is None else count, seed, num_frames, height, width, pipe.config.fps)
    return items, {"source": "world", "seed": seed, "stream": EVAL_STREAM, "items": len(items)}


def run_eval(
    options: SamplingOptions, data: Optional[str], count: Optional[int], steps: list[Optional[int]], console: Console,
    sheet: Optional[str] = None, hint: bool = False,
) -> dict:
    """Sample and score every mode at each step count; returns the report (what `--json` writes). The
    seed draws both the world set and the noise (sample i: seed + i). `hint`: captions conditioned on the
    items' prompts."""
    pipe = load_model(options)
    items, source = eval_set(pipe, data, count, options.seed)
    if source.get("split") == "all":
        console.print(f"note: {data} holds no items out for validation (data.val_every); scoring its training items")
    prompts, references = [item.prompt for item in items], [item.references for item in items]
    truths = [item.truth for item in items]
    judged = all(truth is not None for truth in truths)
    prompted = evaluate.world_prompted(prompts)
    if prompted or hint:
        check_vocabulary(pipe, prompts)
    settings = {k: v for k, v in pipe.recorded_settings(**options.overrides()).items() if k != "steps"}
    report = {"model": options.model, "set": source,
              "sampling": {**settings, "seed": options.seed, "batch": options.batch, "device": str(pipe.device),
                           "dtype": str(pipe.transformer.dtype).removeprefix("torch.")},
              "caption_hint": "prompt" if hint else None, "results": []}
    clips = lambda start, stop: torch.stack([frames_to_tensor(item.load()) for item in items[start:stop]])  # noqa: E731
    # a video that does not read the text: joint's videos are generate's, bit for bit on the same seeds (a
    # test), so the joint run scores generation too
    shared_video = prompted and not pipe.transformer.config.video_attends_text
    modes = ["caption"] + (["joint"] if shared_video else ["generate", "joint"] if prompted else [])
    with progress_bar(console) as progress:
        for step_count in steps:
            run = dataclasses.replace(options, steps=step_count)
            row, outputs = {"steps": pipe.sampling_settings(**run.overrides())["steps"]}, {}
            for mode in modes:
                given = prompts if mode != "caption" or hint else None  # caption's prompts are its hints
                call = batch_call(pipe, mode, run.overrides(), given, clips)
                label = f"{mode} · {row['steps']} steps"
                began = time.perf_counter()
                outputs[mode] = collect(sample_batches(pipe, run, len(items), call, progress, label))
                row.setdefault("seconds_per_item", {})[mode] = round((time.perf_counter() - began) / len(items), 4)
            if shared_video:
                outputs["generate"] = outputs["joint"]
            captions, joint = outputs["caption"]["texts"], outputs.get("joint")
            row["caption"] = evaluate.caption_accuracy(captions, truths) if judged else None
            row["text"] = evaluate.text_scores(captions, references)
            row["generation"] = evaluate.prompt_following(outputs["generate"]["measured"], prompts) if prompted else None
            row["generation_draws"] = (evaluate.draw_gap(outputs["generate"]["measured"], truths)
                                       if prompted and judged else None)
            row["joint"] = evaluate.caption_coherence(joint["measured"], joint["texts"]) if prompted else None
            report["results"].append(row)
    if sheet is not None:
        report["sheet"] = [str(p) for p in write_contact_sheet(sheet, sheet_rows(items, outputs, hint), sheet_title(report))]
    return report


def collect(samples) -> dict:
    """Texts, world measurements of the videos, and the first few videos (for the contact sheet)."""
    out = {"texts": [], "measured": [], "videos": []}
    for sample in samples:
        out["texts"].append(sample.text)
        if sample.video is not None:
            out["measured"].append(world.measure_video(sample.video))
            if sample.index < SHEET_ITEMS:
                out["videos"].append(sample.video)
    return out


def sheet_rows(items: list[EvalItem], outputs: dict, hint: bool = False) -> list[SheetRow]:
    rows = []
    for i, item in enumerate(items[:SHEET_ITEMS]):
        lines = [f"caption: {outputs['caption']['texts'][i]}", f"reference: {item.references[0]}"]
        rows.append(SheetRow("caption", item.load(), [f"hint: {item.prompt}", *lines] if hint else lines))
        if "generate" in outputs:
            rows.append(SheetRow("generate", outputs["generate"]["videos"][i], [f"prompt: {item.prompt}"]))
            rows.append(SheetRow("joint", outputs["joint"]["videos"][i],
                                 [f"prompt: {item.prompt}", f"caption: {outputs['joint']['texts'][i]}"]))
    return rows


def sheet_title(report: dict) -> str:
    last = report["results"][-1]
    hinted = ", captions hinted by the prompt" if report["caption_hint"] else ""
    return (f"vigu eval: {report['model']} on {report['set']['items']} items ({report['set']['source']}), "
            f"{last['steps']} steps{hinted}")


# ----------------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------------


def _cell(scores: Optional[dict], key: str) -> str:
    return f"{scores[key]:.3f}" if scores and key in scores else "-"


def attribute_table(report: dict) -> Table:
    """Per attribute, at the last step count: caption accuracy, generation prompt following, joint coherence."""
    last = report["results"][-1]
    modes = [(label, last[key]) for label, key in (("caption", "caption"), ("generation", "generation"),
                                                    ("joint coherence", "joint")) if last[key] is not None]
    table = Table(title=f"{sheet_title(report)}: accuracy per attribute")
    table.add_column("attribute")
    for label, _ in modes:
        table.add_column(label, justify="right")
    for attribute in [*world.ATTRIBUTES, "macro", "hidden"]:
        table.add_row(attribute, *[_cell(scores, attribute) for _, scores in modes])
    return table


def steps_table(report: dict) -> Table:
    """One row per step count: the headline scores and the wall time per item of the three modes."""
    table = Table(title="accuracy vs steps" if len(report["results"]) > 1 else "scores", show_edge=False, pad_edge=False)
    for column in ("steps", "caption", "hidden", "generate", "joint", "BLEU-4", "ROUGE-L", "CIDEr", "s/item"):
        table.add_column(column, justify="right")
    for row in report["results"]:
        table.add_row(
            str(row["steps"]), _cell(row["caption"], "macro"), _cell(row["caption"], "hidden"),
            _cell(row["generation"], "macro"), _cell(row["joint"], "macro"), _cell(row["text"], "bleu4"),
            _cell(row["text"], "rouge_l"), _cell(row["text"], "cider"), f"{sum(row['seconds_per_item'].values()):.2f}",
        )
    return table


def draws_table(draws: dict) -> Table:
    """What generation drew for each attribute the prompt leaves open, next to the world's draws."""
    shares = lambda values: "  ".join(f"{value} {share:.2f}" for value, share in values.items())  # noqa: E731
    table = Table(title=f"generation: what the prompt leaves open (total variation from the world's draws, mean "
                        f"{draws['mean']:.3f})")
    for column in ("attribute", "generated", "world", "TV"):
        table.add_column(column, justify="right" if column == "TV" else "left")
    for attribute, entry in draws.items():
        if attribute != "mean":
            table.add_row(attribute, shares(entry["generated"]), shares(entry["world"]), f"{entry['tv']:.3f}")
    return table


def tables(report: dict) -> list[Table]:
    """The curve, then the per-attribute table where the world's judge scored anything, then what generation
    drew where the prompt says nothing."""
    last = report["results"][-1]
    judged = any(last[key] is not None for key in ("caption", "generation", "joint"))
    draws = [draws_table(last["generation_draws"])] if last["generation_draws"] else []
    return [steps_table(report)] + ([attribute_table(report)] if judged else []) + draws
