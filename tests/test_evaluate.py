"""The scores of `vigu eval` against values computed by hand, and the held-out world set."""

import math

import numpy as np
import pytest

from vigu_cli import evaluate
from vigu_cli.data import world
from vigu_cli.run_eval import EVAL_STREAM, parse_steps, world_items
from vigu_cli.errors import VigUError

# ----------------------------------------------------------------------------------------------------
# BLEU-4
# ----------------------------------------------------------------------------------------------------


def test_bleu4_by_hand():
    # one word differs: precisions 5/6, 4/5, 3/4, 2/3, same length -> (5/6 * 4/5 * 3/4 * 2/3) ** (1/4) = (1/3) ** (1/4)
    assert evaluate.bleu4(["A large red circle moves left."], [["a large red circle moves right"]]) == pytest.approx(
        (1 / 3) ** 0.25)
    # a prefix: every precision 1, c = 4 < r = 6: brevity penalty exp(1 - 6/4)
    assert evaluate.bleu4(["a large red circle"], [["a large red circle moves right"]]) == pytest.approx(math.exp(-0.5))
    # no 4-gram in common: 0 (unsmoothed)
    assert evaluate.bleu4(["a b c d"], [["a b c e"]]) == 0.0
    assert evaluate.bleu4(["the same words here"], [["the same words here"]]) == 1.0


def test_bleu4_clips_counts_takes_the_closest_reference_length_and_sums_over_the_corpus():
    # "a b a b a b" against "a b a b x y": counts clipped at the reference's: 1-grams 4/6, 2-grams 3/5, 3-grams 2/4, 4-grams 1/3
    assert evaluate.bleu4(["a b a b a b"], [["a b a b x y"]]) == pytest.approx((4 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25)
    # r = the reference length closest to the hypothesis's (4, not 7): no brevity penalty
    assert evaluate.bleu4(["a b c d e"], [["a b c d e f g", "a b c d"]]) == 1.0
    # corpus: matches and counts summed before dividing. Item 1 = its reference (4 words); item 2 "x y z w"
    # against "x y z q": 1-grams 3/4, 2-grams 2/3, 3-grams 1/2, 4-grams 0/1 -> corpus 7/8, 5/6, 3/4, 1/2
    corpus = evaluate.bleu4(["p q r s", "x y z w"], [["p q r s", "long long long long long long"], ["x y z q"]])
    assert corpus == pytest.approx((7 / 8 * 5 / 6 * 3 / 4 * 1 / 2) ** 0.25)  # closest lengths 4 and 4: no penalty


# ----------------------------------------------------------------------------------------------------
# ROUGE-L and CIDEr
# ----------------------------------------------------------------------------------------------------


def rouge_f(p, r, beta=1.2):
    return (1 + beta**2) * p * r / (r + beta**2 * p)


def test_rouge_l_by_hand():
    assert evaluate.lcs_length("a b c d".split(), "a c b d".split()) == 3
    assert evaluate.rouge_l(["a b c d"], [["a c b d"]]) == pytest.approx(0.75)  # P = R = 3/4
    assert evaluate.rouge_l(["a b c d"], [["a x b y c z"]]) == pytest.approx(rouge_f(3 / 4, 3 / 6))
    # the best precision and the best recall, over the references, each on its own
    assert evaluate.rouge_l(["a b"], [["a b c d e f", "a z"]]) == pytest.approx(rouge_f(1.0, 1 / 2))
    assert evaluate.rouge_l(["a b", "q"], [["a b"], ["r"]]) == pytest.approx(0.5)  # mean over sentences: (1 + 0) / 2


def test_cider_by_hand():
    # two items, disjoint references: every n-gram's idf = log(2/1). A hypothesis equal to its reference
    # has cosine 1 for n = 1, 2 and no 3- or 4-grams: 10 * (1 + 1 + 0 + 0) / 4 = 5
    assert evaluate.cider(["a b", "c d"], [["a b"], ["c d"]]) == pytest.approx(5.0)
    # "a" against "a b": unigram cosine 1/sqrt(2), nothing for n >= 2, length difference 1: exp(-1 / 72)
    first = 10 * (1 / math.sqrt(2)) * math.exp(-1 / 72) / 4
    assert evaluate.cider(["a", "c d"], [["a b"], ["c d"]]) == pytest.approx((first + 5.0) / 2)
    # an n-gram in every item's references has idf 0 and counts for nothing
    assert evaluate.cider(["x", "x"], [["x"], ["x"]]) == 0.0
    # two references: the mean over them
    # two references: the mean over them. c, d and "c d" are in both items' references (idf 0), so item 1
    # scores 10 * (2/4 for "a b" + 0 for "c d") / 2 = 2.5 and item 2 ("c d") scores 0
    two = evaluate.cider(["a b", "c d"], [["a b", "c d"], ["c d"]])
    assert two == pytest.approx((2.5 + 0.0) / 2)


def test_text_scores_of_world_captions_rank_right_over_wrong():
    specs = [world.sample_clip(np.random.default_rng(k), 32, 32, 17) for k in range(4)]
    references = [[world.caption_text(spec, np.random.default_rng(0), k) for k in range(7)] for spec in specs]
    right = [refs[0] for refs in references]
    wrong = right[1:] + right[:1]  # every caption describes another clip
    good, bad = evaluate.text_scores(right, references), evaluate.text_scores(wrong, references)
    assert good["bleu4"] == 1.0 and good["rouge_l"] == 1.0 and good["cider"] > 1.0
    assert all(good[k] > bad[k] for k in good)


# ----------------------------------------------------------------------------------------------------
# Attribute scores
# ----------------------------------------------------------------------------------------------------


def test_caption_accuracy_per_attribute_macro_and_hidden():
    truths = [
        {"shape": "circle", "color": "red", "background": "gray", "size": "large", "motion": "left", "speed": "fast",
         "start": "top right"},
        {"shape": "square", "color": "blue", "background": "black", "size": "small", "motion": "still", "speed": None,
         "start": "bottom left"},
    ]
    captions = [
        "A large red circle moves left slowly from the top right of a gray background.",  # speed wrong
        "On a white background, a small blue square stays still in the bottom left.",  # background wrong
    ]
    scores = evaluate.caption_accuracy(captions, truths)
    assert scores["speed"] == 0.0  # scored on the moving clip only
    assert scores["background"] == 0.5 and scores["shape"] == scores["start"] == 1.0
    assert scores["macro"] == pytest.approx((5 * 1.0 + 0.5 + 0.0) / 7)
    assert scores["hidden"] == pytest.approx((1.0 + 0.0 + 0.5 + 1.0) / 4)  # size, speed, background, start


def test_prompt_accuracy_scores_a_recall_models_prompts_by_the_prompt_parser():
    said = ["a red circle moving left", "a blue square staying still", "A large red circle moves left."]
    prompts = ["a red circle moving left", "a blue triangle moving up", "a red circle moving left"]
    scores = evaluate.prompt_accuracy(said, prompts)
    # the third is a caption: the prompt parser reads its "red circle" but finds no "moving left" in it
    assert scores == {"shape": pytest.approx(2 / 3), "color": 1.0, "motion": pytest.approx(1 / 3),
                      "macro": pytest.approx(2 / 3)}


def test_joint_coherence_counts_what_the_clip_does_not_show_as_wrong():
    measured = [
        {"shape": "circle", "color": "red", "background": "gray", "size": "large", "motion": "left", "speed": "fast",
         "start": "top right"},
        {"shape": None, "color": None, "background": "white", "size": None, "motion": None, "speed": None, "start": None},
    ]
    caption = "A large red circle moves left quickly from the top right of a gray background."
    scores = evaluate.caption_coherence(measured, [caption, caption.replace("gray", "white")])
    assert scores["background"] == 1.0  # both agree with their clips
    assert scores["shape"] == scores["motion"] == scores["speed"] == 0.5  # the blank clip shows none of them
    still = [{**measured[0], "motion": "still", "speed": None}]
    assert "speed" not in evaluate.caption_coherence(still, [caption])


def test_draw_gap_compares_what_generation_draws_with_the_worlds_draws():
    truths = [{"background": b, "size": "small", "speed": None, "start": "top left"} for b in ("black", "white", "gray")]
    collapsed = [{"background": "gray", "size": None, "speed": None, "start": "top left"}] * 3
    gap = evaluate.draw_gap(collapsed, truths)
    assert gap["background"]["generated"] == {"gray": 1.0} and gap["background"]["world"] == pytest.approx(
        {"black": 1 / 3, "gray": 1 / 3, "white": 1 / 3})
    assert gap["background"]["tv"] == pytest.approx(2 / 3)
    assert gap["size"] == {"generated": {"none": 1.0}, "world": {"small": 1.0}, "tv": 1.0}  # unmeasurable counts as drawn wrong
    assert gap["speed"]["tv"] == gap["start"]["tv"] == 0.0  # still clips: no speed on either side
    assert gap["mean"] == pytest.approx((2 / 3 + 1.0) / 4)
    assert evaluate.draw_gap(truths, truths)["mean"] == 0.0


def test_prompt_following_on_rendered_clips():
    specs = [world.sample_clip(np.random.default_rng(k), 32, 32, 17) for k in range(4)]
    measured = [world.measure_video(world.render(spec)) for spec in specs]
    assert evaluate.prompt_following(measured, [world.prompt_text(s) for s in specs])["macro"] == 1.0
    shuffled = [world.prompt_text(s) for s in specs[1:] + specs[:1]]
    assert evaluate.prompt_following(measured, shuffled)["macro"] < 1.0


def test_world_truth_and_prompted_tell_the_worlds_text_from_a_users():
    spec = world.sample_clip(np.random.default_rng(3), 32, 32, 17)
    caption = world.caption_text(spec, np.random.default_rng(0), 0)
    assert evaluate.world_truth(caption) == spec.attributes()
    assert evaluate.world_truth("a cat surfs a wave at sunset, filmed from the beach") is None
    assert evaluate.world_prompted([world.prompt_text(spec)])
    assert not evaluate.world_prompted([world.prompt_text(spec), "a cat surfing"])


# ----------------------------------------------------------------------------------------------------
# The held-out world set
# ----------------------------------------------------------------------------------------------------


def test_world_eval_set_is_fresh_rendered_at_the_model_shape_with_seven_references():
    items = world_items(6, seed=0, num_frames=9, height=16, width=16, fps=8)
    training = [world.sample_clip(np.random.default_rng([0, i]), 16, 16, 9, 8) for i in range(6)]  # build-dataset's draws
    assert [item.prompt for item in items] != [world.prompt_text(spec) for spec in training]
    assert all(not np.array_equal(item.load(), world.render(spec)) for item, spec in zip(items, training))
    assert items[0].load().shape == (9, 16, 16, 3)
    for item in items:
        assert len(set(item.references)) == 7
        assert all(world.parse_caption(r) == item.truth for r in item.references)
    again = world_items(6, seed=0, num_frames=9, height=16, width=16, fps=8)
    assert [i.prompt for i in again] == [i.prompt for i in items] and EVAL_STREAM == 0x5EED_E7A1


def test_steps_list():
    assert parse_steps("5,10,25,50") == [5, 10, 25, 50] and parse_steps(None) == [None]
    for bad in ("5,x", "0,5"):
        with pytest.raises(VigUError):
            parse_steps(bad)
