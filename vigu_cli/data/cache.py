"""The training cache that `vigu build-dataset` writes and training reads: per item, the VAE latents,
the umT5 prompt embeddings and the text-stream token ids, in safetensors shards (layout: `manifest.py`).

Tensors of a usable item, in its shard's safetensors, keys `<id>/<name>`:
    latents         [C, F', H', W']  `pipe.encode_video` of the clip (normalised as WanPipeline when the
                                     model says so), `data.latents_dtype`
    prompt_embeds   [n, D]           `pipe.encode_condition` of the prompt, only its n real rows
                                     (WanPipeline zero-pads past them), `data.embeds_dtype`
    prompt_ids      [text_max_length] int64, `pipe.text_ids` of the prompt (the recall-stage target)
    caption_ids     [text_max_length] int64, `pipe.text_ids` of the detailed caption (the refine-stage target)
`cache-common.safetensors` holds `empty_prompt_embeds` [n, D] (the condition of dropped prompts).

The cache is valid only for the text encoder, VAE and tokenizers that made it: `dataset.json` keeps their
fingerprints (`model_identity`), and `check_compatible(dataset_dir, pipe)` says when a model differs.
`CachedVideoTextDataset` reads only the cache and pads the embeddings back exactly as WanPipeline does.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.utils.data import ConcatDataset, Dataset, default_collate

from ..errors import VigUError
from .manifest import (COMMON, INFO, MANIFEST, SHARDS, ItemLine, atomic_write, is_validation, read_json,
                       read_lines)
from .video_io import frames_to_tensor

FORMAT = "vigu-dataset"
VERSION = 1
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
TENSORS = ("latents", "prompt_embeds", "prompt_ids", "caption_ids")  # per usable item
PROBE_TEXT = "A large red circle moves left quickly. Ein Hund läuft über die Straße. 一只猫在草地上奔跑。"


def tensor_key(item_id: str, name: str) -> str:
    return f"{item_id}/{name}"


# ----------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------


def trim_prompt_embeds(embeds: torch.Tensor) -> torch.Tensor:
    """`[L, D]` -> the rows up to the last non-zero one: the prompt's real tokens, which WanPipeline
    follows with zero rows. `pad_prompt_embeds` gives back exactly the input."""
    nonzero = torch.nonzero(embeds.abs().amax(dim=-1) > 0)
    length = int(nonzero[-1]) + 1 if len(nonzero) else 0
    return embeds[:length]


def pad_prompt_embeds(embeds: torch.Tensor, length: int) -> torch.Tensor:
    """`[n, D]` -> `[length, D]`, zero rows after the n real ones (WanPipeline's padding)."""
    return torch.cat([embeds, embeds.new_zeros(length - embeds.shape[0], embeds.shape[1])])


@torch.no_grad()
def item_tensors(pipe, item_id: str, frames: np.ndarray, prompt: str, caption: str, latents_dtype: str,
                 embeds_dtype: str) -> dict[str, torch.Tensor]:
    """The cached tensors of one item, made with the pipeline's own encoders (one item at a time, so an
    item's tensors never depend on which items share its batch)."""
    latents = pipe.encode_video(frames_to_tensor(frames)[None])[0]
    embeds = pipe.encode_condition([prompt], pipe.text_encoder.device)[0]
    prompt_ids, caption_ids = pipe.text_ids([prompt, caption])
    tensors = {
        "latents": latents.to(DTYPES[latents_dtype]),
        "prompt_embeds": trim_prompt_embeds(embeds).to(DTYPES[embeds_dtype]),
        "prompt_ids": prompt_ids,
        "caption_ids": caption_ids,
    }
    return {tensor_key(item_id, name): tensor.cpu().clone() for name, tensor in tensors.items()}


@torch.no_grad()
def common_tensors(pipe, embeds_dtype: str) -> dict[str, torch.Tensor]:
    embeds = pipe.encode_condition([""], pipe.text_encoder.device)[0]
    return {"empty_prompt_embeds": trim_prompt_embeds(embeds).to(DTYPES[embeds_dtype]).cpu().clone()}


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor]) -> None:
    metadata = {"format": FORMAT, "version": str(VERSION)}
    atomic_write(path, lambda temporary: save_file(tensors, temporary, metadata=metadata))


def tensor_keys(path: str | os.PathLike) -> set[str] | None:
    """The keys of a safetensors file, or None when it is missing or unreadable."""
    try:
        with safe_open(path, framework="pt") as handle:
            return set(handle.keys())
    except (OSError, SafetensorError):
        return None


def load_tensors(path: str | os.PathLike, keys: list[str]) -> dict[str, torch.Tensor]:
    with safe_open(path, framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in keys}


# ----------------------------------------------------------------------------------------------------
# Which model made the cache
# ----------------------------------------------------------------------------------------------------

PARTS = {"text_encoder": "text encoder", "vae": "VAE", "tokenizer": "prompt tokenizer",
         "text_tokenizer": "text-stream tokenizer"}


def _module_digest(module: torch.nn.Module, extra: dict) -> str:
    """sha256 over the state dict (names, shapes, values rounded to bf16, so the same weights loaded in
    fp32 or bf16 agree) and `extra` (config values that change the output, e.g. latent statistics)."""
    digest = hashlib.sha256(json.dumps(extra, sort_keys=True).encode())
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}{list(tensor.shape)}".encode())
        values = tensor.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16)
        digest.update(values.numpy().tobytes())
    return digest.hexdigest()


def _tokenizer_digest(tokenizer: Any) -> str:
    """sha256 over the vocabulary and the ids of a fixed multilingual probe text."""
    payload = {"vocab": sorted(tokenizer.get_vocab().items()), "probe": tokenizer(PROBE_TEXT)["input_ids"]}
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode()).hexdigest()


def model_identity(pipe) -> dict[str, str]:
    """Fingerprints of the parts of `pipe` that the cache depends on."""
    vae_stats = {key: pipe.vae.config.get(key) for key in ("latents_mean", "latents_std")}
    return {
        "text_encoder": _module_digest(pipe.text_encoder, {}),
        "vae": _module_digest(pipe.vae, vae_stats),
        "tokenizer": _tokenizer_digest(pipe.tokenizer),
        "text_tokenizer": _tokenizer_digest(pipe.text_tokenizer),
    }


def cache_settings(pipe) -> dict:
    """The pipeline settings the cached tensors depend on, as `dataset.json` records them."""
    config = pipe.config
    return {
        "height": config.height, "width": config.width, "num_frames": config.num_frames,
        "normalize_latents": config.normalize_latents, "prompt_max_length": config.prompt_max_length,
        "text_max_length": config.text_max_length,
    }


def read_info(dataset_dir: str | os.PathLike) -> dict:
    """`dataset.json` of a dataset folder, or a one-line `VigUError`."""
    info = read_json(Path(dataset_dir) / INFO)
    if info is None or info.get("format") != FORMAT:
        raise VigUError(f"{dataset_dir} is not a vigu dataset (no {INFO}): build one with `vigu build-dataset`")
    if info["version"] != VERSION:
        raise VigUError(
            f"{dataset_dir} has cache format version {info['version']}, this vigu reads {VERSION}: rebuild it "
            "with `vigu build-dataset --overwrite`"
        )
    return info


def check_compatible(dataset_dir: str | os.PathLike, pipe) -> None:
    """Raise a one-line `VigUError` unless `pipe` has the text encoder, VAE, tokenizers and settings
    that made the cache in `dataset_dir`."""
    info = read_info(dataset_dir)
    if not hasattr(pipe, "text_tokenizer"):
        raise VigUError(f"check_compatible takes a vigu pipeline (UniViGUPipeline), got a {type(pipe).__name__}: "
                        "load the model with vigu_cli.core.convert.load_pipeline, which converts a stock Wan folder")
    fix = "rebuild the cache with this model (`vigu build-dataset ... --overwrite`) or use the model that built it"
    identity = model_identity(pipe)
    for part, label in PARTS.items():
        if info["model"][part] != identity[part]:
            raise VigUError(
                f"the cache in {dataset_dir} was made with another {label} (fingerprint "
                f"{info['model'][part][:12]}, this model's {identity[part][:12]}): {fix}"
            )
    for key, value in cache_settings(pipe).items():
        if info["cache"][key] != value:
            raise VigUError(f"the cache in {dataset_dir} was made with {key}={info['cache'][key]}, this model has "
                            f"{value}: {fix}")


# ----------------------------------------------------------------------------------------------------
# Reading: the training dataset
# ----------------------------------------------------------------------------------------------------


def split_lines(dataset_dir: str | os.PathLike, split: str, info: dict | None = None) -> list[ItemLine]:
    """The manifest lines of a dataset's usable items in `split`: `train`, `val` (every `val_every`-th item, as
    `dataset.json` records it: `info`, read here when not given) or `all`."""
    val_every = (info or read_info(dataset_dir))["split"]["val_every"]
    return [line for line in read_lines(Path(dataset_dir) / MANIFEST) or []
            if line.status == "ok" and split in ("all", "val" if is_validation(line.index, val_every) else "train")]


class CachedVideoTextDataset(Dataset):
    """The usable (`ok`) items of a built dataset, read from the cache only.

    `split`: `train` (every item but the held-out ones), `val` (the held-out ones: every `val_every`-th
    item, recorded in `dataset.json`) or `all`. An item is a dict: `id` (str), `latents` [C, F', H', W'],
    `prompt_embeds` [prompt_max_length, D] (zero-padded as WanPipeline pads), `prompt_ids` and
    `caption_ids` [text_max_length] (int64). Tensors keep their stored dtype. Shards are opened lazily,
    once per process (DataLoader workers each open their own). `id_prefix` is put before every item's id
    (`CachedDatasets` keeps the ids of several folders apart with it)."""

    def __init__(self, dataset_dir: str | os.PathLike, split: str = "train", id_prefix: str = ""):
        if split not in ("train", "val", "all"):
            raise ValueError(f"split must be train, val or all, got {split!r}")
        self.root = Path(dataset_dir)
        self.info = read_info(self.root)
        if not self.info["complete"]:
            raise VigUError(f"the build in {self.root} has not finished: re-run the same `vigu build-dataset` command")
        self.items = [(line.id, line.shard) for line in split_lines(self.root, split, self.info)]
        self.prompt_max_length = self.info["cache"]["prompt_max_length"]
        self.id_prefix = id_prefix
        self._handles: dict[str, Any] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        item_id, shard = self.items[i]
        handle = self._shard(shard)
        sample = {name: handle.get_tensor(tensor_key(item_id, name)) for name in TENSORS}
        sample["prompt_embeds"] = pad_prompt_embeds(sample["prompt_embeds"], self.prompt_max_length)
        return {"id": self.id_prefix + item_id, **sample}

    @property
    def empty_prompt_embeds(self) -> torch.Tensor:
        """The empty prompt's embeddings `[prompt_max_length, D]`, for condition dropout."""
        with safe_open(self.root / COMMON, framework="pt") as handle:
            return pad_prompt_embeds(handle.get_tensor("empty_prompt_embeds"), self.prompt_max_length)

    def _shard(self, shard: str):
        if self._pid != os.getpid():  # a forked DataLoader worker: open its own handles
            self._handles, self._pid = {}, os.getpid()
        if shard not in self._handles:
            self._handles[shard] = safe_open(self.root / SHARDS / f"{shard}.safetensors", framework="pt")
        return self._handles[shard]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_handles": {}}


class CachedDatasets(ConcatDataset):
    """Several built datasets read as one (`train.dataset` as a list of folders): the items of all of them, in
    order, each folder's `split`. Ids past the first folder's gain their folder's position, `"1/000015"`, so
    items of two folders never share an id. The empty prompt is the first folder's: `check_compatible`
    holds every folder to the same text encoder."""

    def __init__(self, folders: list[Path], split: str = "train"):
        super().__init__([
            CachedVideoTextDataset(folder, split, id_prefix=f"{k}/" if k else "") for k, folder in enumerate(folders)
        ])

    @property
    def empty_prompt_embeds(self) -> torch.Tensor:
        return self.datasets[0].empty_prompt_embeds


def collate(batch: list[dict]) -> dict:
    """Items -> a batch: `id` a list of str, every tensor stacked along a new first dimension."""
    return default_collate(batch)
