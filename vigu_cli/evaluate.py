"""Scores for every mode, judged by the world's rules (WORLD.md "Checking").

- captioning: the attributes parsed from a generated caption against the truth;
- generation (prompt following): shape, colour and motion measured in a generated clip against the
  prompt;
- joint coherence: the attributes of a joint caption against what is measured in the joint clip.

Speed exists only for moving clips: it is scored only where the truth has one. `macro` is the mean over
attributes; `hidden` the mean over the attributes a brief prompt never names (size, speed, background,
start), which a model can only get from the video.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from .data import world

HIDDEN = ("size", "speed", "background", "start")
PROMPTED = ("shape", "color", "motion")


def attribute_accuracy(predicted: Iterable[dict], truth: Iterable[dict], attributes: Iterable[str]) -> dict[str, float]:
    """Per-attribute accuracy of `predicted` against `truth` (None in the truth: not scored), plus
    `macro` and, where all of them were scored, `hidden`."""
    attributes = list(attributes)
    hits = {a: [] for a in attributes}
    for pred, true in zip(predicted, truth, strict=True):
        for a in attributes:
            if true.get(a) is not None:
                hits[a].append(pred.get(a) == true[a])
    scores = {a: float(np.mean(v)) for a, v in hits.items() if v}
    scores["macro"] = float(np.mean([scores[a] for a in attributes if a in scores]))
    if all(a in scores for a in HIDDEN):
        scores["hidden"] = float(np.mean([scores[a] for a in HIDDEN]))
    return scores


def caption_accuracy(captions: list[str], truths: list[dict]) -> dict[str, float]:
    return attribute_accuracy((world.parse_caption(c) for c in captions), truths, world.ATTRIBUTES)


def generation_accuracy(videos: Iterable[np.ndarray], prompts: list[str]) -> dict[str, float]:
    return attribute_accuracy((world.measure_video(v) for v in videos), (world.parse_prompt(p) for p in prompts), PROMPTED)


def joint_coherence(videos: Iterable[np.ndarray], captions: list[str]) -> dict[str, float]:
    measured = [world.measure_video(v) for v in videos]
    return attribute_accuracy((world.parse_caption(c) for c in captions), measured, world.ATTRIBUTES)
