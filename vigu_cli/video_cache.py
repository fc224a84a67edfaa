"""What the text stream reads of each clean training clip, computed once per stage (`train.<stage>.cache_video`).

With `trainable: text` and a video that does not attend to the text (`text.video_attends_text: false`), the video
stream is frozen and reads nothing of the text: what the text reads of a clean clip (a task corner, sigma_v = 0)
depends only on the clip and its condition, the item's prompt or the empty prompt (condition dropout). Both
`VideoContext`s of every training item are computed before the first step into `<stage dir>/video-cache/`
(safetensors, one file per chunk of items, each written to a temporary name and renamed, so a killed build
resumes where it stopped and any process count reads it), and each step runs the video stream only for its
noised clips. The stage deletes the folder once its model is saved.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from accelerate import Accelerator
from rich.progress import track
from safetensors import safe_open
from safetensors.torch import save_file

from .core.model import VideoContext
from .data.cache import CachedDatasets, collate
from .errors import VigUError

CHUNK = 64  # items per file
VARIANTS = ("prompt", "empty")  # the condition of a clip: its prompt, or the empty prompt (dropped)


def key(item_id: str, dropped: bool, block: int) -> str:
    return f"{item_id}/{VARIANTS[int(dropped)]}/{block}"


class VideoContextCache:
    """The cached contexts of a dataset's clips (`build`), read a row at a time by `context`."""

    def __init__(self, folder: Path, files: list[Path]):
        self.folder = folder
        missing = [path.name for path in files if not path.is_file()]
        if missing:
            raise VigUError(f"{folder} lacks {missing[0]} (and {len(missing) - 1} more) that another process wrote: "
                            "every process must see the stage folder (a filesystem shared by the nodes), or set "
                            "cache_video=false")
        self._handles = [safe_open(path, framework="pt") for path in files]
        self._where = {name.rsplit("/", 2)[0]: handle for handle in self._handles for name in handle.keys()}

    @classmethod
    def build(
        cls, accelerator: Accelerator, core, dataset: CachedDatasets, empty: torch.Tensor, folder: Path,
        batch_size: int,
    ) -> "VideoContextCache":
        """Each process computes its share of the missing chunks (chunk k: process k mod N); all then read all."""
        chunks = [range(start, min(start + CHUNK, len(dataset))) for start in range(0, len(dataset), CHUNK)]
        files = [folder / f"chunk-{k:05d}.safetensors" for k in range(len(chunks))]
        folder.mkdir(parents=True, exist_ok=True)
        mine = [k for k in range(len(chunks)) if k % accelerator.num_processes == accelerator.process_index]
        todo = [k for k in mine if not files[k].exists()]
        for k in track(todo, description="caching video contexts", disable=not accelerator.is_main_process):
            tensors = {}
            for start in range(chunks[k].start, chunks[k].stop, batch_size):
                batch = collate([dataset[i] for i in range(start, min(start + batch_size, chunks[k].stop))])
                latents = batch["latents"].float().to(accelerator.device)
                prompt = batch["prompt_embeds"].to(accelerator.device)
                zero = torch.zeros(latents.shape[0], device=latents.device)
                for dropped, condition in ((False, prompt), (True, empty.to(prompt).expand_as(prompt))):
                    with accelerator.autocast():
                        context = core.video_context(latents, zero, condition)
                    for row, item_id in enumerate(batch["id"]):
                        for block, tokens in enumerate(context.tokens):
                            tensors[key(item_id, dropped, block)] = tokens[row].detach().cpu().clone()
            temporary = files[k].with_name(files[k].name + ".tmp")
            save_file(tensors, temporary)
            os.replace(temporary, files[k])
        accelerator.wait_for_everyone()
        return cls(folder, files)

    def context(
        self, core, ids: list[str], dropped: torch.Tensor, x_v: torch.Tensor, timestep: torch.Tensor,
        condition: torch.Tensor, clean: torch.Tensor,
    ) -> VideoContext:
        """The batch's `VideoContext`: clean rows from the cache, the others from a forward of their video."""
        noised = (~clean).nonzero().flatten().tolist()
        live = core.video_context(x_v[noised], timestep[noised], condition[noised]) if noised else None
        live_row = {row: k for k, row in enumerate(noised)}  # batch row -> its row of `live`
        dropped = dropped.tolist()  # once, not a device sync per row and block
        tokens = []
        for block in range(len(core.blocks)):
            rows = [live.tokens[block][live_row[i]] if i in live_row else self._read(item_id, dropped[i], block)
                    for i, item_id in enumerate(ids)]
            tokens.append(torch.stack([row.to(x_v.device, rows[0].dtype) for row in rows]))
        return VideoContext(tokens, core.rope(x_v))

    def _read(self, item_id: str, dropped: bool, block: int) -> torch.Tensor:
        if item_id not in self._where:
            raise VigUError(f"item {item_id} is not in the video cache {self.folder}: the dataset changed since the "
                            "cache was built; remove that folder and resume")
        return self._where[item_id].get_tensor(key(item_id, dropped, block))
