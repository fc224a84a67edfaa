"""The world's captioners: the embedded world's ground truth, or what its measurer reads in the clip,
written as a detailed caption (WORLD.md).

- `world`: `world.caption_text(spec, rng)` names every attribute of the clip's `ClipSpec`, in varied
  wording: the paper's LLM captioner for clips the world rendered.
- `measure`: WORLD.md's measurer reads the seven attributes from the clip's frames and the caption names
  them: the world's vision-language model, for clips that have no ground truth (a generator's, the
  user's). A clip where some attribute cannot be measured (no shape in a frame) is rejected as
  `unmeasurable`, as a captioner that cannot see the shape would be.

The wording is drawn from a seed derived from (`config.seed`, item id, attempt), so a dataset rebuilds
identically in any order or sharding.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..data import world
from ..errors import VigUError
from .captioners import Captioner, CaptionItem, Reply, item_seed


class WorldCaptioner(Captioner):
    def draft(self, items: Sequence[CaptionItem], attempt: int, notes: Sequence[str]) -> list[Reply]:
        replies = []
        for item in items:
            spec = self.spec(item)
            if spec is None:
                replies.append(Reply(None, "unmeasurable", detail="no shape in some frame"))
                continue
            rng = np.random.default_rng(item_seed(self.config.seed, f"{item.id}/{attempt}"))
            replies.append(Reply(world.caption_text(spec, rng)))
        return replies

    def spec(self, item: CaptionItem) -> world.ClipSpec | None:
        if item.spec is None:
            raise VigUError(f"item {item.id} has no ClipSpec: the world captioner writes captions from it "
                            "(data.captioner.backend=measure reads them from the clip)")
        return item.spec


class MeasureCaptioner(WorldCaptioner):
    def spec(self, item: CaptionItem) -> world.ClipSpec | None:
        if item.frames is None:
            raise VigUError(f"item {item.id} has no frames: the measure captioner reads the clip")
        found = world.measure_video(np.asarray(item.frames))
        if any(found[name] is None for name in world.ATTRIBUTES if name != "speed" or found["motion"] != "still"):
            return None
        height, width = item.frames.shape[1:3]
        return world.ClipSpec(**found, center=((height - 1) / 2, (width - 1) / 2), height=height, width=width,
                              num_frames=len(item.frames))
