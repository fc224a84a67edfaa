"""`vigu build-dataset` step 2: a clip for each item, at the model's shape (`model.num_frames/height/width`).

- `world`: the world's renderer draws the item's sampled clip (the paper's "state-of-the-art generator").
- `wan`: diffusers `WanPipeline` from a local folder, several prompts per call, each item with its own
  `torch.Generator` seeded from (data.seed, index), so its video does not depend on the order of the run.
- `vigu`: a Uni-ViGU folder, or a stock Wan2.1 folder converted with the recipe, sampled by vigu's own
  solver with the recipe's `sampling` section, as `vigu generate` samples: the clips a Uni-ViGU model's
  video stream draws (the world's: what joint generation's text reads). Seeds as `wan`.
- `files`: the user's own videos, frame-sampled, resized and centre-cropped to the model's shape; a file
  that cannot be read or is too short gives no clip and a reason, never an exception.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data import world
from ..data.video_io import fit_video, read_video
from ..errors import VigUError
from ..precision import resolve_dtype
from ..recipe import DataSection, ModelSection, Recipe
from .captioners import item_seed
from .prompts import PlannedItem


@dataclass
class Clip:
    """An item's video (uint8 [F, H, W, 3]), or None with a reason code and a line saying why."""

    frames: np.ndarray | None
    reason: str | None = None
    detail: str | None = None


class VideoGenerator(ABC):
    batch_size = 1  # items per `generate` call

    def __init__(self, model: ModelSection):
        self.shape = (model.num_frames, model.height, model.width)

    @abstractmethod
    def generate(self, items: Sequence[PlannedItem]) -> list[Clip]:
        """One clip per item, in order."""


class WorldGenerator(VideoGenerator):
    def generate(self, items: Sequence[PlannedItem]) -> list[Clip]:
        return [Clip(world.render(item.spec)) for item in items]


class FilesGenerator(VideoGenerator):
    def generate(self, items: Sequence[PlannedItem]) -> list[Clip]:
        return [self._load(Path(item.source)) for item in items]

    def _load(self, path: Path) -> Clip:
        num_frames, height, width = self.shape
        try:
            frames = read_video(path)
        except VigUError as error:
            return Clip(None, "unreadable_video", str(error))
        if len(frames) < num_frames:
            return Clip(None, "too_few_frames", f"{path}: has {len(frames)} frames, fewer than the {num_frames} needed")
        return Clip(fit_video(frames, num_frames, height, width))


def generator_folder(model: ModelSection, data: DataSection, kind: str) -> Path:
    """`data.generator.path`, by default `model.base`: a folder, or the shipped world Wan2.1."""
    from ..core.convert import base_folder

    path = data.generator.path or base_folder(model)
    if path is not None and Path(path).is_file():
        raise VigUError(f"generator folder {path} is a file: set data.generator.path to {kind}")
    if path is None or not Path(path).is_dir():
        raise VigUError(f"generator folder {path or model.base} not found: set data.generator.path to {kind}")
    return Path(path)


def model_dtypes(data: DataSection, device: torch.device) -> dict:
    """`data.generator.dtype` for the transformer and text encoder; the VAE in float32, as Wan's."""
    dtype = resolve_dtype(data.generator.dtype, device)
    return {"transformer": dtype, "text_encoder": dtype, "default": torch.float32}


class WanGenerator(VideoGenerator):
    """A stock Wan2.1 diffusers folder. `shared` components (e.g. the text encoder and VAE already loaded
    for the cache, when both come from the same folder) are reused instead of loaded twice."""

    def __init__(self, model: ModelSection, data: DataSection, device: torch.device, shared: dict):
        from diffusers import WanPipeline

        from ..core.convert import folder_class, torch_dtype_accepted

        super().__init__(model)
        settings = data.generator
        path = generator_folder(model, data, "a local Wan2.1 diffusers folder")
        if folder_class(path) != "WanPipeline":
            raise VigUError(f"data.generator.path {path} holds a {folder_class(path)}: the wan generator needs a stock "
                            "Wan2.1 diffusers folder (WanPipeline)")
        dtypes = model_dtypes(data, device)
        with torch_dtype_accepted():
            self.pipe = WanPipeline.from_pretrained(path, local_files_only=True, torch_dtype=dtypes, **shared).to(device)
        scheduler = self.pipe.scheduler
        shift_key = "flow_shift" if "flow_shift" in scheduler.config else "shift"
        self.pipe.scheduler = type(scheduler).from_config(scheduler.config, **{shift_key: settings.shift})
        self.pipe.set_progress_bar_config(disable=True)
        self.settings, self.seed, self.prompt_max_length = settings, data.seed, model.prompt_max_length
        self.batch_size = settings.batch_size

    def generate(self, items: Sequence[PlannedItem]) -> list[Clip]:
        num_frames, height, width = self.shape
        settings = self.settings
        videos = self.pipe(
            prompt=[item.prompt for item in items],
            negative_prompt=[settings.negative_prompt] * len(items),
            height=height, width=width, num_frames=num_frames,
            num_inference_steps=settings.steps, guidance_scale=settings.guidance,
            generator=[torch.Generator().manual_seed(video_seed(self.seed, item.index)) for item in items],
            output_type="np", max_sequence_length=self.prompt_max_length,
        ).frames
        return [Clip((np.asarray(video) * 255).round().clip(0, 255).astype(np.uint8)) for video in videos]


class VigUGenerator(VideoGenerator):
    """A vigu folder, or a stock Wan2.1 folder converted with the recipe, sampled by `UniViGUPipeline.generate`
    with the recipe's `sampling` section."""

    def __init__(self, recipe: Recipe, device: torch.device):
        from ..core.convert import load_pipeline
        from ..core.pipeline import SAMPLING_SETTINGS

        super().__init__(recipe.model)
        data = recipe.data
        path = generator_folder(recipe.model, data, "a vigu folder or a local Wan2.1 diffusers folder")
        self.pipe = load_pipeline(path, recipe, torch_dtype=model_dtypes(data, device)).to(device)
        self.settings = {name: getattr(recipe.sampling, name) for name in SAMPLING_SETTINGS}
        self.seed, self.batch_size = data.seed, data.generator.batch_size

    def generate(self, items: Sequence[PlannedItem]) -> list[Clip]:
        num_frames, height, width = self.shape
        videos = self.pipe.generate(
            [item.prompt for item in items], height=height, width=width, num_frames=num_frames,
            generator=[torch.Generator().manual_seed(video_seed(self.seed, item.index)) for item in items],
            **self.settings,
        ).videos
        return [Clip(video) for video in videos]


def video_seed(seed: int, index: int) -> int:
    """The seed of item `index`'s noise: independent of the order, batching and sharding of the run."""
    return item_seed(seed, f"video/{index}") % 2**63


def make_generator(recipe: Recipe, device: torch.device, shared: dict) -> VideoGenerator:
    model, data = recipe.model, recipe.data
    backend = data.generator.backend
    if backend == "world":
        return WorldGenerator(model)
    if backend == "files":
        return FilesGenerator(model)
    if backend == "vigu":
        return VigUGenerator(recipe, device)
    return WanGenerator(model, data, device, shared)
