"""`vigu build-dataset` step 1: the items of a dataset and their brief prompts.

- `world`: item i's clip is drawn by the world sampler with `np.random.default_rng([seed, i])` at the
  model's canvas; its prompt is the world's prompt of that clip.
- a `.txt` file: item i is the i-th non-empty line; a `.jsonl` file: item i is the i-th line,
  `{"prompt": ..., "id": ...}` (`id` optional, unique).
- the `files` generator: item i is the i-th video of the folder (by name); its prompt comes from the
  sidecar `<stem>.txt` next to it (`prompts: sidecar`) or from the `.jsonl` line whose `id` is its file name
  (`clip.mp4`) or stem (`clip`).

Item ids default to the zero-padded index; `files` items use the video's stem.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data import world
from ..errors import VigUError
from ..recipe import DataSection, ModelSection

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi")


@dataclass(frozen=True)
class PlannedItem:
    """One item before any work: its place, id and prompt (None: a video with no prompt found)."""

    index: int
    id: str
    prompt: str | None
    prompt_from: str  # world, <file>:<line>, or <stem>.txt
    spec: world.ClipSpec | None = None  # world prompts: the clip's ground truth
    source: str | None = None  # files: the user's video


def plan_items(data: DataSection, model: ModelSection) -> list[PlannedItem]:
    """Every item of the dataset, in order (`data.num_items` of them; 0 or more than there are: all)."""
    if data.generator.backend == "files":
        items = _video_items(data)
    elif data.prompts == "world":
        if data.num_items < 1:
            raise VigUError("data.num_items must be at least 1 with data.prompts=world (the sampler never runs out)")
        return [_world_item(data.seed, i, model) for i in range(data.num_items)]
    else:
        items = _file_items(Path(data.prompts))
    return items[: data.num_items] if data.num_items > 0 else items


def _world_item(seed: int, index: int, model: ModelSection) -> PlannedItem:
    spec = world.sample_clip(
        np.random.default_rng([seed, index]), model.height, model.width, model.num_frames, model.fps
    )
    return PlannedItem(index, f"{index:06d}", world.prompt_text(spec), "world", spec=spec)


def _file_items(path: Path) -> list[PlannedItem]:
    entries = read_prompts_file(path)
    if not entries:
        raise VigUError(f"prompts file {path} holds no prompts: write one per line (or a JSON object per line)")
    ids = [entry_id or f"{index:06d}" for index, (entry_id, _, _) in enumerate(entries)]
    _check_unique(ids, path)
    return [PlannedItem(i, ids[i], prompt, where) for i, (_, prompt, where) in enumerate(entries)]


def read_prompts_file(path: Path) -> list[tuple[str | None, str, str]]:
    """(id or None, prompt, "<file>:<line>") per prompt of a `.txt` or `.jsonl` file."""
    if not path.is_file():
        raise VigUError(f"prompts file {path} not found: set data.prompts to a .txt or .jsonl file (or to world)")
    if path.suffix not in (".txt", ".jsonl"):
        raise VigUError(f"prompts file {path} must be a .txt (one prompt per line) or a .jsonl file")
    entries = []
    for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not text.strip():
            continue
        where = f"{path.name}:{number}"
        if path.suffix == ".txt":
            entries.append((None, text.strip(), where))
            continue
        try:
            record = json.loads(text)
            prompt, entry_id = record["prompt"], record.get("id")
        except (ValueError, KeyError, TypeError, AttributeError):
            raise VigUError(f'{where}: each line must be a JSON object with a "prompt" (and optionally an "id")'
                            ) from None
        if not isinstance(prompt, str):
            raise VigUError(f'{where}: "prompt" must be a string, got {prompt!r}')
        entries.append((None if entry_id is None else _valid_id(str(entry_id), where), prompt.strip(), where))
    return entries


def _video_items(data: DataSection) -> list[PlannedItem]:
    folder = Path(data.generator.path)
    if not data.generator.path or not folder.is_dir():
        raise VigUError(f"videos folder '{data.generator.path}' not found: set data.generator.path to a folder "
                        "of videos")
    videos = sorted(p for p in folder.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES and not p.name.startswith("."))
    if not videos:
        raise VigUError(f"videos folder {folder} holds no {'/'.join(VIDEO_SUFFIXES)} files: put the clips there")
    _check_unique([p.stem for p in videos], folder)
    if data.prompts == "sidecar":
        by_id = {p.stem: _sidecar(p) for p in videos}
    elif data.prompts.endswith(".jsonl"):
        path = Path(data.prompts)
        by_id = {entry_id: (prompt, where) for entry_id, prompt, where in read_prompts_file(path) if entry_id}
    else:
        raise VigUError(
            f"data.prompts={data.prompts} does not name videos: with data.generator.backend=files use sidecar "
            "(<video>.txt next to each video) or a .jsonl whose ids are the video file names"
        )
    return [  # a .jsonl id names its video with or without the extension
        PlannedItem(i, p.stem, *by_id.get(p.name, by_id.get(p.stem, (None, "none"))), source=str(p))
        for i, p in enumerate(videos)
    ]


def _sidecar(video: Path) -> tuple[str | None, str]:
    sidecar = video.with_suffix(".txt")
    if not sidecar.is_file():
        return None, "none"
    return " ".join(sidecar.read_text(encoding="utf-8").split()) or None, sidecar.name


def _valid_id(entry_id: str, where: str) -> str:
    if not entry_id or "/" in entry_id or entry_id.startswith(".") or entry_id != entry_id.strip():
        raise VigUError(f"{where}: id {entry_id!r} must be a non-empty name without '/', spaces around it or a "
                        "leading '.'")
    return entry_id


def _check_unique(ids: list[str], where: Path) -> None:
    seen = set()
    for entry_id in ids:
        if entry_id in seen:
            raise VigUError(f"{where}: item id {entry_id!r} appears twice: ids (or video names) must be unique")
        seen.add(entry_id)
