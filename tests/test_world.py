"""The embedded world (WORLD.md): sampling, rendering, text, parsing, measuring, tokenizer."""

import re
from dataclasses import replace

import numpy as np
import pytest
from transformers import AutoTokenizer

from vigu_cli.data.video_io import read_video, write_video
from vigu_cli.data.world import (
    ATTRIBUTES,
    BACKGROUNDS,
    CAPTION_TEMPLATES,
    PALETTE,
    ClipSpec,
    caption_text,
    every_spec,
    measure_video,
    parse_caption,
    parse_prompt,
    prompt_text,
    render,
    sample_clip,
    vocabulary,
)
from vigu_cli.data.world_text import build_world_tokenizer, decode_text

CANVASES = [(64, 64, 17), (32, 32, 17), (48, 80, 17), (33, 33, 9)]


@pytest.mark.parametrize("height, width, num_frames", CANVASES)
def test_sampled_paths_stay_inside_the_canvas_and_start_in_their_quadrant(height, width, num_frames):
    rng = np.random.default_rng(0)
    specs = [sample_clip(rng, height, width, num_frames) for _ in range(1500)]
    for spec in specs:
        assert (spec.height, spec.width, spec.num_frames) == (height, width, num_frames)
        assert (spec.speed is None) == (spec.motion == "still")
        path, half = spec.centers(), spec.side / 2
        assert np.all(path - half >= -0.5 - 1e-9) and np.all(path + half <= np.array([height, width]) - 0.5 + 1e-9)
        row, col = spec.center
        assert row == int(row) and col == int(col)  # start positions are pixel centres
        vertical, horizontal = spec.start.split()
        assert (row < (height - 1) / 2) == (vertical == "top") and row != (height - 1) / 2
        assert (col < (width - 1) / 2) == (horizontal == "left") and col != (width - 1) / 2
    for name, values in ATTRIBUTES.items():  # every value is drawn
        assert {getattr(spec, name) for spec in specs} >= set(values)


def test_rejection_happens_where_the_quadrant_forbids_a_motion():
    # At 64 x 64 x 17 a fast shape travels 28.7 px, more than a quadrant allows toward its own border:
    # unrejected, about 5% of clips would start so. Slow ones fit, and fast ones fit the other way.
    rng = np.random.default_rng(1)
    combos = {(s.motion, s.speed, s.start) for s in (sample_clip(rng) for _ in range(3000))}
    toward_own_border = {"left": "left", "right": "right", "up": "top", "down": "bottom"}
    for motion, side in toward_own_border.items():
        starts = [start for start in ATTRIBUTES["start"] if side in start]
        others = [start for start in ATTRIBUTES["start"] if side not in start]
        assert not any((motion, "fast", start) in combos for start in starts)
        assert all((motion, "slow", start) in combos for start in starts)
        assert all((motion, "fast", start) in combos for start in others)


def test_tiny_canvas_is_refused():
    with pytest.raises(ValueError, match="at least 8"):
        sample_clip(np.random.default_rng(0), 4, 4)


def test_render_draws_the_palette_on_the_background():
    spec = ClipSpec("square", "red", "gray", "large", "right", "slow", "top left", center=(20.0, 20.0))
    frames = render(spec)
    assert frames.shape == (17, 64, 64, 3) and frames.dtype == np.uint8
    assert tuple(frames[0, 0, 0]) == BACKGROUNDS["gray"] and tuple(frames[0, 20, 20]) == PALETTE["red"]
    # 16 frames later it has moved right by 16 * 0.012 * 64 = 12.3 px: its left edge is at column 21.4
    assert tuple(frames[-1, 20, 32]) == PALETTE["red"] and tuple(frames[-1, 20, 20]) == BACKGROUNDS["gray"]
    edge_values = {tuple(pixel) for pixel in frames[0].reshape(-1, 3)}
    assert len(edge_values) > 2  # anti-aliased edges blend the two colours


def _recovery_through_mp4(tmp_path, height, width, num_clips, seed):
    """Fraction of clips whose seven measured attributes all match, after an mp4 round trip. The clips
    go through one mp4 back to back (the same H.264 path as one file each, ~20x faster)."""
    rng = np.random.default_rng(seed)
    specs = [sample_clip(rng, height, width) for _ in range(num_clips)]
    write_video(tmp_path / "clips.mp4", np.concatenate([render(spec) for spec in specs]), fps=8)
    clips = read_video(tmp_path / "clips.mp4").reshape(num_clips, 17, height, width, 3)
    return np.mean([measure_video(clip) == spec.attributes() for clip, spec in zip(clips, specs)])


def test_measuring_recovers_every_attribute_through_mp4(tmp_path):
    assert _recovery_through_mp4(tmp_path, 64, 64, 200, seed=0) >= 0.99  # measured: 200/200


def test_measuring_recovers_every_attribute_through_mp4_on_a_small_canvas(tmp_path):
    assert _recovery_through_mp4(tmp_path, 32, 32, 200, seed=1) >= 0.99  # measured: 200/200


@pytest.mark.parametrize("height, width, num_frames", [(48, 80, 17), (33, 33, 9)])
def test_measuring_recovers_every_attribute_of_rendered_clips(height, width, num_frames):
    rng = np.random.default_rng(2)
    specs = [sample_clip(rng, height, width, num_frames) for _ in range(60)]
    assert np.mean([measure_video(render(spec)) == spec.attributes() for spec in specs]) >= 0.99


def test_measuring_without_a_shape_in_every_frame_leaves_the_path_unmeasured():
    spec = ClipSpec("circle", "blue", "white", "small", "down", "slow", "top left", center=(20.0, 20.0))
    frames = render(spec)
    frames[5] = BACKGROUNDS["white"]
    assert measure_video(frames) == {**spec.attributes(), "motion": None, "speed": None, "start": None}
    frames[:] = BACKGROUNDS["white"]
    assert measure_video(frames) == {**dict.fromkeys(ATTRIBUTES), "background": "white"}


def test_prompts_follow_the_grammar_and_parse_back():
    grammar = re.compile(rf"a ({'|'.join(PALETTE)}) (circle|square|triangle) (moving (left|right|up|down)|staying still)")
    for spec in every_spec()[::5]:
        text = prompt_text(spec)
        assert grammar.fullmatch(text), text
        assert parse_prompt(text) == {"shape": spec.shape, "color": spec.color, "motion": spec.motion}
    assert parse_prompt("A red circle moving left.")["motion"] == "left"
    assert parse_prompt("a red circle moving left, a blue square staying still") == dict.fromkeys(["shape", "color", "motion"])


def _fragments(spec):
    moving = spec.motion != "still"
    return [
        f"{spec.size} {spec.color} {spec.shape}",
        f"{spec.background} background",
        f"moves {spec.motion} {'slowly' if spec.speed == 'slow' else 'quickly'}" if moving else "stays still",
        f"{'from' if moving else 'in'} the {spec.start}",
    ]


def test_every_phrasing_carries_the_fragments_and_parses_back():
    assert len(CAPTION_TEMPLATES) >= 6
    rng = np.random.default_rng(3)
    for index in range(len(CAPTION_TEMPLATES)):
        for spec in every_spec()[index::7]:
            text = caption_text(spec, rng, template=index)
            assert text[0].isupper() and text.endswith(".") and text.count(".") in (1, 2), text
            assert all(fragment in text.lower() for fragment in _fragments(spec)), text
            assert parse_caption(text) == spec.attributes(), text


def test_caption_phrasing_varies():
    spec = sample_clip(np.random.default_rng(4))
    rng = np.random.default_rng(5)
    assert len({caption_text(spec, rng) for _ in range(200)}) == len(CAPTION_TEMPLATES)


def test_a_missing_or_contradictory_fragment_parses_as_none():
    spec = ClipSpec("circle", "red", "gray", "large", "left", "fast", "top right", center=(20.0, 40.0))
    text = caption_text(spec, np.random.default_rng(0), template=0)
    assert text == "A large red circle moves left quickly from the top right of a gray background."
    truth = spec.attributes()
    cases = {
        text.replace("gray background", "gray canvas"): {"background": None},
        text.replace("large red circle", "large red round shape"): {"shape": None, "color": None, "size": None},
        text.replace("from the top right", "near the top right"): {"start": None},
        text.replace(" quickly", ""): {"speed": None},
        text + " It moves right slowly.": {"motion": None, "speed": None},
        text + " It stays still.": {"motion": None, "speed": None},
        text + " A small red circle.": {"size": None},
        text + " It starts in the bottom left.": {"start": None},
        text + " The gray background is plain.": {},  # repeating a fragment that agrees is fine
    }
    for caption, wrong in cases.items():
        assert parse_caption(caption) == {**truth, **wrong}, caption
    assert parse_caption("") == dict.fromkeys(ATTRIBUTES)


# The world's tokenizer (vigu_cli/data/world_text.py)


def test_tokenizer_special_ids_and_padding():
    tokenizer = build_world_tokenizer()
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id, tokenizer.mask_token_id) == (0, 1, 2, 3)
    assert tokenizer.convert_ids_to_tokens([0, 1, 2, 3]) == ["<pad>", "</s>", "<unk>", "<mask>"]
    assert len(tokenizer) == 4 + len(vocabulary())
    ids = tokenizer(["A Red circle.", "a red circle zebra, staying still"], padding="max_length", max_length=10).input_ids
    red, circle, dot = tokenizer.convert_tokens_to_ids(["red", "circle", "."])
    assert ids[0][:5] == [ids[1][0], red, circle, dot, 1] and ids[0][5:] == [0] * 5  # lower-cased, EOS, right padding
    assert ids[1][3] == 2 and tokenizer.convert_ids_to_tokens(ids[1][4]) == ","  # unknown word; comma on its own


def test_tokenizer_round_trips_every_phrasing():
    tokenizer = build_world_tokenizer()
    rng = np.random.default_rng(6)
    for index in range(len(CAPTION_TEMPLATES)):
        for spec in every_spec()[index::41]:
            caption, prompt = caption_text(spec, rng, template=index), prompt_text(spec)
            ids = tokenizer(caption).input_ids
            assert 2 not in ids and ids[-1] == 1
            assert decode_text(tokenizer, ids + [0, 0]) == caption
            assert parse_caption(decode_text(tokenizer, ids)) == spec.attributes()
            assert decode_text(tokenizer, tokenizer(prompt).input_ids) == prompt.capitalize()
    assert decode_text(tokenizer, tokenizer("a red circle. the end").input_ids[:4] + [1, 9, 9]) == "A red circle."


def test_tokenizer_saves_and_loads_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tokenizer = build_world_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    text = caption_text(sample_clip(np.random.default_rng(7)), np.random.default_rng(7))
    padded = {"padding": "max_length", "max_length": 32}
    assert loaded(text, **padded).input_ids == tokenizer(text, **padded).input_ids
    specials = (loaded.pad_token_id, loaded.eos_token_id, loaded.unk_token_id, loaded.mask_token_id)
    assert specials == (0, 1, 2, 3) and loaded.padding_side == "right"
    assert decode_text(loaded, loaded(text).input_ids) == text
