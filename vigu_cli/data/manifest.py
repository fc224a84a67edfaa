"""The folder `vigu build-dataset` writes: its layout, the JSONL manifest, shards by rank, atomic writes.

    dataset.json                     settings, model identity, counts, shapes (first written with
                                     "complete": false, rewritten when every shard is done)
    manifest.jsonl                   one line per item, in item order, merged from the shards at the end
    cache-common.safetensors         tensors every item shares (`empty_prompt_embeds`)
    shards/shard-00007.safetensors   the cached tensors of shard 7's usable items, keys "<id>/<name>"
    shards/shard-00007.jsonl         shard 7's manifest lines; written last, it marks the shard done
    videos/<id>.mp4                  each clip (`data.keep_videos`)

Items are grouped into shards of `data.shard_size` consecutive items; shard k belongs to rank
`k % world_size`. Every file goes to a temporary name in its folder (`.<name>.<hex>.tmp`) and is renamed
into place, so a file with its final name is always complete; temporary files left by a killed run are
removed when the next run starts.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from ..errors import VigUError

INFO = "dataset.json"
MANIFEST = "manifest.jsonl"
COMMON = "cache-common.safetensors"
SHARDS = "shards"
VIDEOS = "videos"

# Caption failures of the service, not of the data: such an item is tried again by the next run.
RETRYABLE = {"endpoint_unreachable", "timeout", "connection_error", "malformed_reply", "http_401", "http_403",
             "http_404", "http_408", "http_429"}


def is_retryable(reason: str | None) -> bool:
    """True for infrastructure rejections (`timeout`, `http_503`, ...), which a later run retries."""
    return reason is not None and (reason in RETRYABLE or re.fullmatch(r"http_5\d\d", reason) is not None)


@dataclass
class ItemLine:
    """One item of the dataset: a manifest line.

    `status`: `ok` (captioned and cached), `rejected` (`reason`: prompt or caption length, or a caption
    service failure that the next run retries) or `skipped` (no clip: `reason` and `detail` say why).
    `attempts`: captions asked for; `prompt_tokens` / `caption_tokens`: text-stream tokens, special tokens
    not counted; `video`: the clip's mp4 relative to the dataset folder; `source`: the user's video file
    (`files` generator); `prompt_from`: where the prompt came from."""

    id: str
    index: int
    status: str
    reason: str | None
    prompt: str | None
    caption: str | None
    prompt_tokens: int | None
    caption_tokens: int | None
    attempts: int
    video: str | None
    source: str | None
    prompt_from: str
    detail: str | None
    shard: str

    @property
    def final(self) -> bool:
        """Whether this outcome stands: everything except a retryable caption failure."""
        return not is_retryable(self.reason)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> ItemLine:
        return cls(**json.loads(text))


def check_writable(path: str | os.PathLike | None, what: str, folder: bool) -> None:
    """Before any work: that `path` (None: nothing) can be written as a folder (`folder`) or a file, so that a bad
    output path stops a command at once, in one line, rather than after the work it was to keep."""
    if path is None:
        return
    path = Path(path)
    if path.exists() and path.is_dir() != folder:
        wanted = "folder" if folder else "file"
        raise VigUError(f"{what} {path} is {'a file' if folder else 'a folder'}: give a {wanted} path")
    start = path if folder else path.parent
    existing = next(p for p in (start, *start.parents) if p.exists())
    if not existing.is_dir():
        raise VigUError(f"{what} {path}: {existing} is a file, not a folder; give another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise VigUError(f"{what} {path}: {existing} is not writable; give another path")


# the process's umask, read once at import (reading it means setting it: never while other threads create files)
UMASK = os.umask(0)
os.umask(UMASK)


def umask_mode(path: Path) -> None:
    """`path` and everything under it readable as the umask allows a new file (`tempfile.mkdtemp` makes folders
    0700 and safetensors writes files 0600: a model or dataset others on the machine could not read)."""
    for item in [path, *path.rglob("*")] if path.is_dir() else [path]:
        os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~UMASK)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Call `write(temporary)` for a temporary path next to `path`, flush it to disk, rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(temporary)
        with open(temporary, "rb+") as handle:
            os.fsync(handle.fileno())
        umask_mode(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def write_json(path: str | os.PathLike, payload: dict) -> None:
    write_text(path, json.dumps(payload, indent=2, ensure_ascii=False) + "\n")


def read_json(path: str | os.PathLike) -> dict | None:
    """The JSON object in `path`, or None when there is no such file."""
    path = Path(path)
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def remove_temporary_files(folders: Iterable[Path]) -> int:
    """Delete the temporary files a killed run left (`.<name>.<hex>.tmp`, and `write_video`'s
    `.<stem>.<hex>.tmp.mp4`). Call only while no process is writing. Returns how many were removed."""
    pattern = re.compile(r"\..+\.[0-9a-f]{8}\.tmp(\.mp4)?")
    removed = 0
    for folder in folders:
        if folder.is_dir():
            for path in folder.iterdir():
                if pattern.fullmatch(path.name):
                    path.unlink(missing_ok=True)
                    removed += 1
    return removed


def shard_name(k: int) -> str:
    return f"shard-{k:05d}"


def shard_ranges(num_items: int, shard_size: int) -> list[range]:
    """Item indices of each shard: consecutive runs of `shard_size`, the last one shorter."""
    return [range(start, min(start + shard_size, num_items)) for start in range(0, num_items, shard_size)]


def shards_of_rank(num_shards: int, rank: int, world_size: int) -> list[int]:
    """The shards rank `rank` of `world_size` builds: k % world_size == rank (disjoint, covering)."""
    return list(range(rank, num_shards, world_size))


def shard_paths(root: str | os.PathLike, k: int) -> tuple[Path, Path]:
    """(tensors, lines) files of shard k."""
    folder = Path(root) / SHARDS
    return folder / f"{shard_name(k)}.safetensors", folder / f"{shard_name(k)}.jsonl"


def write_lines(path: str | os.PathLike, lines: Iterable[ItemLine]) -> None:
    write_text(path, "".join(line.to_json() + "\n" for line in lines))


def read_lines(path: str | os.PathLike) -> list[ItemLine] | None:
    """The lines of a JSONL manifest file, or None when it is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return [ItemLine.from_json(text) for text in path.read_text(encoding="utf-8").splitlines()]
    except (ValueError, TypeError):
        return None


def merge_manifest(root: str | os.PathLike, num_shards: int) -> list[ItemLine]:
    """Concatenate every shard's lines, in shard (hence item) order, into `manifest.jsonl`."""
    lines: list[ItemLine] = []
    for k in range(num_shards):
        shard_lines = read_lines(shard_paths(root, k)[1])
        if shard_lines is None:
            raise FileNotFoundError(f"{shard_paths(root, k)[1]} is missing: shard {k} was not built")
        lines.extend(shard_lines)
    write_lines(Path(root) / MANIFEST, lines)
    return lines


def is_validation(index: int, val_every: int) -> bool:
    """The held-out split: every `val_every`-th item (index % k == k - 1); stable when the set grows."""
    return val_every > 0 and index % val_every == val_every - 1
