"""The `world` captioner: the embedded world's ground truth written as a detailed caption (WORLD.md).

It plays the paper's LLM captioner for the embedded world: `world.caption_text(spec, rng)` names every
attribute of the clip, in varied wording. The wording is drawn from a seed derived from
(`config.seed`, item id, attempt), so a dataset rebuilds identically in any order or sharding.
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
            if item.spec is None:
                raise VigUError(f"item {item.id} has no ClipSpec: the world captioner writes captions from it")
            rng = np.random.default_rng(item_seed(self.config.seed, f"{item.id}/{attempt}"))
            replies.append(Reply(world.caption_text(item.spec, rng)))
        return replies
