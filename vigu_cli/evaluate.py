"""Scores for every mode, judged by the world's rules (WORLD.md "Checking"), and caption text metrics.

- captioning: the attributes parsed from a generated caption against the truth;
- generation (prompt following): shape, colour and motion measured in a generated clip against the
  prompt;
- what generation draws for the attributes the prompt leaves open, against the world's draws (`draw_gap`);
- joint coherence: the attributes of a joint caption against what is measured in the joint clip (an
  attribute the clip does not show measurably cannot agree with the caption: it counts as wrong);
- BLEU-4, ROUGE-L and CIDEr of captions against reference captions, computed as the coco-caption
  toolkit (pycocoevalcap) computes them, in plain Python: no Java, no extra dependency. Text is
  lower-cased and split into alphanumeric words (punctuation dropped, as its PTB tokenizer does).

Speed exists only for moving clips: it is scored only where the truth has one. `macro` is the mean over
attributes; `hidden` the mean over the attributes a brief prompt never names (size, speed, background,
start), which a model can only get from the video.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Iterable

import numpy as np

from .core.text import words
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


def world_truth(caption: str) -> dict | None:
    """The attributes the world's parser reads from a reference caption, or None where it cannot read them
    all (a caption not in the world's phrasings: a user's own data). Speed may be None: a still clip's."""
    truth = world.parse_caption(caption)
    return truth if all(value is not None for name, value in truth.items() if name != "speed") else None


def world_prompted(prompts: Iterable[str]) -> bool:
    """Whether every prompt follows the world's grammar, so that generations can be scored against it."""
    return all(None not in world.parse_prompt(p).values() for p in prompts)


def caption_accuracy(captions: list[str], truths: list[dict]) -> dict[str, float]:
    return attribute_accuracy((world.parse_caption(c) for c in captions), truths, world.ATTRIBUTES)


def prompt_accuracy(texts: list[str], prompts: list[str]) -> dict[str, float]:
    """Brief prompts said of clips (what a `recall` model writes, its text target being the prompt) against the
    clips' prompts: shape, colour and motion by the prompt parser."""
    return attribute_accuracy((world.parse_prompt(t) for t in texts), (world.parse_prompt(p) for p in prompts), PROMPTED)


def prompt_following(measured: Iterable[dict], prompts: list[str]) -> dict[str, float]:
    """Generation's prompt following: shape, colour and motion measured in each clip (`world.measure_video`)
    against its prompt."""
    return attribute_accuracy(measured, (world.parse_prompt(p) for p in prompts), PROMPTED)


def draw_gap(measured: Iterable[dict], truths: Iterable[dict], attributes: Iterable[str] = HIDDEN) -> dict[str, dict]:
    """What generation draws for the attributes a brief prompt leaves open, against what the world drew for the
    same prompts: per attribute, the share of each value among the generated clips (as measured; `none`: not
    measurable, or a still clip's speed) and among the truths, and `tv`, the total variation distance between the
    two (0: drawn as the world draws; 1: nothing in common); `mean` is the mean `tv`. A model that falls back on
    the data's mean (a gray background, a middling size) shows here while its prompt following may not."""
    measured, truths = list(measured), list(truths)
    gap = {}
    for attribute in attributes:
        drawn = _shares(item.get(attribute) for item in measured)
        world_shares = _shares(item.get(attribute) for item in truths)
        tv = sum(abs(drawn.get(v, 0.0) - world_shares.get(v, 0.0)) for v in {*drawn, *world_shares}) / 2
        gap[attribute] = {"generated": drawn, "world": world_shares, "tv": tv}
    gap["mean"] = float(np.mean([entry["tv"] for entry in gap.values()]))
    return gap


def _shares(values: Iterable) -> dict[str, float]:
    counts = Counter("none" if value is None else value for value in values)
    total = sum(counts.values())
    return {value: count / total for value, count in sorted(counts.items())}


def joint_coherence(videos: Iterable[np.ndarray], captions: list[str]) -> dict[str, float]:
    return caption_coherence((world.measure_video(v) for v in videos), captions)


UNMEASURED = "<not measurable>"  # never equal to a parsed value


def caption_coherence(measured: Iterable[dict], captions: list[str]) -> dict[str, float]:
    """`joint_coherence` on clips already measured. What the clip shows is the truth; an attribute it
    does not show measurably is wrong whatever the caption says; speed is scored where the clip moves."""
    truths = [
        {a: UNMEASURED if m[a] is None else m[a] for a in world.ATTRIBUTES if a != "speed" or m["motion"] != "still"}
        for m in measured
    ]
    return attribute_accuracy((world.parse_caption(c) for c in captions), truths, world.ATTRIBUTES)


# ----------------------------------------------------------------------------------------------------
# Caption text metrics (coco-caption's definitions)
# ----------------------------------------------------------------------------------------------------


def ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def bleu4(hypotheses: list[str], references: list[list[str]]) -> float:
    """Corpus BLEU-4 (Papineni et al. 2002): clipped n-gram matches and counts summed over the corpus,
    the geometric mean of the four precisions, times the brevity penalty exp(1 - r / c) when the
    hypotheses are shorter (c words) than the references closest in length to each (r words)."""
    matched, total = [0] * 4, [0] * 4
    hyp_length = ref_length = 0
    for hypothesis, refs in zip(hypotheses, references, strict=True):
        hyp, refs = words(hypothesis), [words(r) for r in refs]
        hyp_length += len(hyp)
        ref_length += min((abs(len(r) - len(hyp)), len(r)) for r in refs)[1]
        for n in range(1, 5):
            counts = ngrams(hyp, n)
            most = Counter()
            for r in refs:
                most |= ngrams(r, n)
            matched[n - 1] += sum(min(c, most[g]) for g, c in counts.items())
            total[n - 1] += max(len(hyp) - n + 1, 0)
    if min(matched) == 0:
        return 0.0
    precision = math.exp(sum(math.log(m / t) for m, t in zip(matched, total)) / 4)
    return precision * (math.exp(1 - ref_length / hyp_length) if hyp_length < ref_length else 1.0)


def lcs_length(a: list[str], b: list[str]) -> int:
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0
        for j, y in enumerate(b, 1):
            diagonal, row[j] = row[j], diagonal + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(hypotheses: list[str], references: list[list[str]], beta: float = 1.2) -> float:
    """Mean sentence ROUGE-L (Lin 2004): from the longest common subsequence, the best precision and
    the best recall over the references, F = (1 + b^2) P R / (R + b^2 P) with b = 1.2 (coco-caption)."""
    scores = []
    for hypothesis, refs in zip(hypotheses, references, strict=True):
        hyp = words(hypothesis)
        lcs = [(lcs_length(hyp, words(r)), len(words(r))) for r in refs]
        precision = max(common / len(hyp) if hyp else 0.0 for common, _ in lcs)
        recall = max(common / length if length else 0.0 for common, length in lcs)
        scores.append((1 + beta**2) * precision * recall / (recall + beta**2 * precision) if precision and recall else 0.0)
    return float(np.mean(scores))


def cider(hypotheses: list[str], references: list[list[str]], sigma: float = 6.0) -> float:
    """Mean CIDEr as coco-caption computes it (CIDEr-D, Vedantam et al. 2015): per n = 1..4, tf-idf
    vectors of the n-grams (idf = log(items / items whose references hold the n-gram)), the clipped
    cosine min(h, r) . r / (|h| |r|), a Gaussian penalty exp(-d^2 / 2 sigma^2) on the length
    difference d, the mean over n and over the references, times 10. The idf comes from this corpus's
    references, so a corpus of one item scores 0."""
    refs_words = [[words(r) for r in refs] for refs in references]
    frequency = Counter(g for refs in refs_words for g in set().union(*(_grams(r) for r in refs)))
    log_items = math.log(len(references))

    def vector(tokens: list[str]) -> list[dict]:
        vec = [{} for _ in range(4)]
        for g, count in _grams(tokens).items():
            vec[len(g) - 1][g] = count * (log_items - math.log(max(1.0, frequency[g])))
        return vec

    def norm(part: dict) -> float:
        return math.sqrt(sum(v * v for v in part.values()))

    scores = []
    for hypothesis, refs in zip(hypotheses, refs_words, strict=True):
        hyp = words(hypothesis)
        hyp_vec = vector(hyp)
        total = 0.0
        for ref in refs:
            ref_vec = vector(ref)
            penalty = math.exp(-((len(hyp) - len(ref)) ** 2) / (2 * sigma**2))  # in words (coco counts bigrams: the same d)
            for h, r in zip(hyp_vec, ref_vec):
                value = sum(min(v, r.get(g, 0.0)) * r.get(g, 0.0) for g, v in h.items())
                total += (value / (norm(h) * norm(r)) if norm(h) and norm(r) else value) * penalty / 4
        scores.append(10.0 * total / len(refs))
    return float(np.mean(scores))


def _grams(tokens: list[str]) -> Counter:
    """Every 1- to 4-gram of `tokens` with its count."""
    return sum((ngrams(tokens, n) for n in range(1, 5)), Counter())


def text_scores(hypotheses: list[str], references: list[list[str]]) -> dict[str, float]:
    return {"bleu4": bleu4(hypotheses, references), "rouge_l": rouge_l(hypotheses, references),
            "cider": cider(hypotheses, references)}
