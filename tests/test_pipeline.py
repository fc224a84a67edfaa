"""UniViGUPipeline, convert and the unified objective, on tiny stock Wan folders (tests/conftest.py)."""

import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import WanPipeline, WanTransformer3DModel

from conftest import TINY_WAN_VAE, nudged_pipeline, tiny_recipe
from vigu_cli.core.convert import convert_folder, load_pipeline, pipeline_from_recipe, vigu_from_wan
from vigu_cli.core.flow import FlowSolver, Stream, derived_generators
from vigu_cli.core.objective import unified_objective
from vigu_cli.core.pipeline import CANDIDATE_KEY, UniViGUPipeline
from vigu_cli.core.text import consensus
from vigu_cli.data import world
from vigu_cli.data.video_io import frames_to_tensor
from vigu_cli.errors import VigUError
from vigu_cli.recipe import load_recipe

PROMPT = "a red circle moving left"
SAMPLING = dict(steps=4, shift=3.0, guidance=4.0)


def wan_latents(wan: WanPipeline, prompt=PROMPT, seed=0):
    return wan(
        prompt, height=32, width=32, num_frames=9, num_inference_steps=SAMPLING["steps"],
        guidance_scale=SAMPLING["guidance"], generator=torch.Generator().manual_seed(seed),
        output_type="latent", max_sequence_length=32,
    ).frames


def test_solver_matches_wan_pipeline_on_plain_text_to_video(tiny_wan_vae_dir):
    """Test 5: vigu's solver with no text stream == WanPipeline (same stock model, seed, steps, shift, guidance)."""
    wan = WanPipeline.from_pretrained(tiny_wan_vae_dir, local_files_only=True)
    expected = wan_latents(wan)

    generator = torch.Generator().manual_seed(0)
    embeds, negative = wan.encode_prompt(PROMPT, max_sequence_length=32, device="cpu")
    latents = wan.prepare_latents(1, 16, 32, 32, 9, torch.float32, "cpu", generator)

    def model_fn(x_v, x_t, t_v, t_t, condition):
        return wan.transformer(hidden_states=x_v, timestep=t_v, encoder_hidden_states=condition, return_dict=False)[0], None

    solver = FlowSolver(SAMPLING["steps"], "euler", SAMPLING["shift"])
    with torch.no_grad():
            ours, _ = solver(model_fn, Stream(latents), None, None, embeds, negative, guidance_video=SAMPLING["guidance"])
    assert ours.shape == expected.shape
    assert float((ours - expected).abs().max()) <= 1e-5


def test_convert_then_generate_equals_wan_and_exports_back(tiny_wan_vae_dir, tmp_path):
    """Test 8: stock folder -> vigu convert -> generate == WanPipeline on the original; export back loads strictly."""
    recipe = tiny_recipe(base=TINY_WAN_VAE)
    assert convert_folder(tiny_wan_vae_dir, tmp_path / "vigu", recipe) == "UniViGUPipeline"
    pipe = UniViGUPipeline.from_pretrained(tmp_path / "vigu", local_files_only=True)
    ours = pipe.generate(
        PROMPT, generator=torch.Generator().manual_seed(0), text_stream="none", output_type="latent",
        steps=SAMPLING["steps"], shift=SAMPLING["shift"], guidance_video=SAMPLING["guidance"], height=32, width=32,
        video_eta=0.0,  # WanPipeline's deterministic flow (world-tiny samples with the stochastic step)
    ).videos
    expected = wan_latents(WanPipeline.from_pretrained(tiny_wan_vae_dir, local_files_only=True))
    assert float((ours - expected).abs().max()) <= 1e-5
    # WanPipeline's own __call__ runs on the vigu folder too (the transformer without text is the stock one)
    assert float((wan_latents(pipe) - expected).abs().max()) <= 1e-5
    with pytest.raises(ValueError, match="Wan2.2's options"):
        UniViGUPipeline(**{**pipe.components, "boundary_ratio": 0.875})

    assert convert_folder(tmp_path / "vigu", tmp_path / "wan-again", recipe) == "WanPipeline"
    _, info = WanTransformer3DModel.from_pretrained(
        tmp_path / "wan-again", subfolder="transformer", local_files_only=True, output_loading_info=True
    )
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []
    exported = WanPipeline.from_pretrained(tmp_path / "wan-again", local_files_only=True)
    again = wan_latents(exported)
    assert torch.equal(again, expected)


def test_a_recipe_that_does_not_describe_its_model_folder_is_one_clear_error(tiny_wan_dir):
    """The folder's config is what loads, so a recipe whose model.transformer says otherwise (an architecture
    override meant for a model built from scratch) stops instead of describing another model."""
    assert pipeline_from_recipe(tiny_recipe(f"model.base={tiny_wan_dir}")).transformer.config.num_layers == 2
    with pytest.raises(VigUError, match=r"num_layers is 2 there, 3 in the recipe\): pass the recipe of that model"):
        pipeline_from_recipe(tiny_recipe(f"model.base={tiny_wan_dir}", "model.transformer.num_layers=3"))
    # a folder one of the shipped recipes describes: that recipe is named
    shipped = load_recipe("wan2.1-t2v-1.3b", ["model.base=world-pretrained"])
    with pytest.raises(VigUError, match=r"in the recipe\): pass --recipe world-tiny or make model.transformer match"):
        pipeline_from_recipe(shipped)


def test_save_load_round_trip_identical_for_all_three_modes(tiny_wan_dir, tmp_path):
    """Test 7: save_pretrained -> from_pretrained (offline) gives the same weights, bit for bit, and the same
    outputs in every mode: the same texts, and latents equal up to float rounding (on an AVX2 AMD EPYC the same
    weights loaded from safetensors gave latents up to 3e-6 away from the in-memory ones, with the state dicts
    equal: the kernels, not the weights; bit-equal on the Intel CPU with AMX of earlier sessions)."""
    pipe = nudged_pipeline(tiny_wan_dir)
    clip = frames_to_tensor(world.render(world.sample_clip(np.random.default_rng(0), 16, 16, 9)))[None]

    def run(p):
        g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
        return (
            p.generate(PROMPT, generator=g(), output_type="latent").videos,
            p.caption(clip, generator=g()).texts,
            p.joint(PROMPT, generator=g(), output_type="latent"),
        )

    before = run(pipe)
    pipe.save_pretrained(tmp_path / "saved")
    loaded = UniViGUPipeline.from_pretrained(tmp_path / "saved", local_files_only=True)
    after = run(loaded)
    saved, reloaded = pipe.transformer.state_dict(), loaded.transformer.state_dict()
    assert saved.keys() == reloaded.keys() and all(torch.equal(saved[k], reloaded[k]) for k in saved)
    torch.testing.assert_close(after[0], before[0], rtol=0, atol=1e-5)
    assert before[1] == after[1] and isinstance(before[1][0], str)
    torch.testing.assert_close(after[2].videos, before[2].videos, rtol=0, atol=1e-5)
    assert before[2].texts == after[2].texts
    assert type(loaded.transformer).__name__ == "UniViGUTransformer"


def test_caption_refuses_a_clip_not_at_the_models_shape(tiny_wan_dir):
    pipe = load_pipeline(tiny_wan_dir, tiny_recipe())
    clip = frames_to_tensor(world.render(world.sample_clip(np.random.default_rng(0), 16, 16, 9)))
    for wrong, got in ((clip, "float32 [3, 9, 16, 16]"), (clip[None, :, :5], "float32 [1, 3, 5, 16, 16]"),
                       ((clip[None] * 127).to(torch.uint8), "uint8 [1, 3, 9, 16, 16]")):
        with pytest.raises(ValueError, match=rf"caption takes float pixels \[B, 3, 9, 16, 16\] in \[-1, 1\], the "
                                             rf"model's shape, got {re.escape(got)}: "):
            pipe.caption(wrong)
    assert len(pipe.caption(clip[None], steps=1).texts) == 1


def test_a_saved_folder_loads_in_a_fresh_python_that_imported_only_the_pipeline(tiny_wan_dir, tmp_path):
    """model_index.json names vigu's own modules (the transformer's, the world VAE's), which diffusers loads
    from only once imported: importing the pipeline is enough, as the README's Python example does."""
    load_pipeline(tiny_wan_dir, tiny_recipe()).save_pretrained(tmp_path / "saved")
    code = ("import sys; from vigu_cli.core.pipeline import UniViGUPipeline; "
            "p = UniViGUPipeline.from_pretrained(sys.argv[1], local_files_only=True); "
            "print(type(p.transformer).__name__, type(p.vae).__name__)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "saved")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["UniViGUTransformer", "WorldPatchAutoencoder"]


def test_tiny_model_overfits_one_pair_and_captions_it_exactly(tiny_wan_dir):
    """Test 9: one (video, caption) pair; after 400 steps the model captions that clip exactly and each
    stream's loss (mean of the last 100 steps, per-token means) is below its threshold: video 0.15 (from
    ~1.1 at the start), text 0.25 (velocity MSE + rounding cross-entropy, from ~4.5)."""
    recipe = tiny_recipe()
    pipe = vigu_from_wan(WanPipeline.from_pretrained(tiny_wan_dir, local_files_only=True), recipe)
    rng = np.random.default_rng(7)
    spec = world.sample_clip(rng, 16, 16, 9)
    caption = world.caption_text(spec, rng).lower()
    clip = frames_to_tensor(world.render(spec))[None]
    latents = pipe.encode_video(clip).repeat(8, 1, 1, 1, 1)
    ids = pipe.text_ids([caption]).repeat(8, 1)
    empty = pipe.encode_condition([""], "cpu").repeat(8, 1, 1)

    model = pipe.transformer.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    history = []
    for _ in range(400):
        loss, parts = unified_objective(model, pipe.text_flow, recipe.flow, latents, ids, empty, generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(parts)
    model.eval()
    first = {k: np.mean([h[k] for h in history[:10]]) for k in ("loss_video", "loss_text")}
    last = {k: np.mean([h[k] for h in history[-100:]]) for k in ("loss_video", "loss_text")}
    assert last["loss_video"] < 0.15 and last["loss_text"] < 0.25, (first, last)
    assert first["loss_video"] > 5 * last["loss_video"] and first["loss_text"] > 10 * last["loss_text"], (first, last)
    out = pipe.caption(clip, generator=torch.Generator().manual_seed(0), steps=10)
    assert out.texts[0] == caption
    assert world.parse_caption(out.texts[0]) == spec.attributes()


def test_caption_candidates_keep_the_consensus_of_captions_drawn_from_seeds_of_their_own(tiny_wan_dir):
    """`caption_candidates` K: each clip's K captions are the captions of K = 1 from its generator and from K - 1
    generators derived from its seed, whatever the batch; the one agreeing most with the others is kept."""
    pipe = nudged_pipeline(tiny_wan_dir, "text.video_attends_text=false", "text.formulation=discrete")
    clips = torch.stack([frames_to_tensor(world.render(world.sample_clip(np.random.default_rng(s), 16, 16, 9)))
                         for s in (0, 1)])
    settings = dict(steps=3, text_temperature=1.0)
    seeds = lambda: [torch.Generator().manual_seed(s) for s in (3, 4)]  # noqa: E731
    chosen = pipe.caption(clips, generator=seeds(), caption_candidates=3, **settings).texts
    assert pipe.caption(clips, generator=seeds(), **settings).texts == pipe.caption(
        clips, generator=seeds(), caption_candidates=1, **settings).texts
    distinct = 0
    for i, (clip, given) in enumerate(zip(clips, seeds())):
        group = [pipe.caption(clip[None], generator=[g], **settings).texts[0]
                 for g in [given, *(derived_generators(given, CANDIDATE_KEY, j) for j in (1, 2))]]
        assert chosen[i] == group[consensus(group)]
        distinct += len(set(group))
    assert distinct > 2  # the candidates differ


def test_one_way_caption_computes_the_video_once_per_condition_and_generate_skips_the_text(tiny_wan_dir):
    """With a video that does not attend to the text: `caption` runs the video through the blocks once per
    condition (hint and empty prompt under guidance), not at every step, and says what the step-by-step
    solve says; `generate` runs no text stream (the video could not read it)."""
    pipe = nudged_pipeline(tiny_wan_dir, "text.video_attends_text=false", "text.formulation=discrete")
    clip = frames_to_tensor(world.render(world.sample_clip(np.random.default_rng(0), 16, 16, 9)))[None]
    ffn_calls = []
    pipe.transformer.blocks[0].ffn.register_forward_hook(lambda *args: ffn_calls.append(1))
    settings = dict(steps=4, guidance_text=2.0)
    pipe.caption(clip, hint=PROMPT, generator=torch.Generator().manual_seed(3), **settings)
    assert len(ffn_calls) == 2  # the video's FFN: once for the hint, once for the empty prompt

    def solve(model_fn):
        frozen = Stream(pipe.encode_video(clip), frozen=True)
        text = Stream(pipe._noise_text(1, torch.Generator().manual_seed(3)))
        return pipe._solve(frozen, text, [PROMPT], torch.Generator().manual_seed(3), None, settings, model_fn)[1]

    stepwise, once = solve(pipe.model_fn), solve(pipe.frozen_video_model_fn())
    assert torch.equal(stepwise, once) and len(set(stepwise[0].tolist())) > 1

    text_calls = []
    pipe.transformer.blocks[0].ffn_text.register_forward_hook(lambda *args: text_calls.append(1))
    pipe.generate(PROMPT, generator=torch.Generator().manual_seed(3), steps=2, output_type="latent")
    assert text_calls == []

    # joint: the unconditional pass of the guided video runs without the unguided text, with the same result
    def joint(uncondition_text):
        video = Stream(pipe._noise_video(1, torch.Generator().manual_seed(4)))
        text = Stream(pipe._noise_text(1, torch.Generator().manual_seed(6)))
        condition, uncondition = pipe.encode_condition([PROMPT], "cpu"), pipe.encode_condition([""], "cpu")
        return FlowSolver(4)(pipe.model_fn, video, text, pipe.text_flow, condition, uncondition, guidance_video=4.0,
                             generator=torch.Generator().manual_seed(5), uncondition_text=uncondition_text)

    with_text, without = joint(True), joint(False)
    assert torch.equal(with_text[0], without[0]) and torch.equal(with_text[1], without[1])
    # and joint's video is generate's, bit for bit (what `vigu eval` relies on to run it once)
    seeds = lambda: [torch.Generator().manual_seed(s) for s in (7, 8)]  # noqa: E731
    prompts = [PROMPT, "a blue square staying still"]
    for video_eta in (0.0, 1.0):  # the stochastic video step draws from generators the text does not move
        generated = pipe.generate(prompts, generator=seeds(), steps=3, video_eta=video_eta, output_type="latent").videos
        joint_videos = pipe.joint(prompts, generator=seeds(), steps=3, video_eta=video_eta, output_type="latent").videos
        assert torch.equal(joint_videos, generated)
    deterministic = pipe.generate(prompts, generator=seeds(), steps=3, video_eta=0.0, output_type="latent").videos
    assert not torch.equal(generated, deterministic)
    text_calls.clear()
    pipe.joint(PROMPT, generator=torch.Generator().manual_seed(3), steps=2, guidance_video=4.0, output_type="latent")
    assert len(text_calls) == 2  # the conditional pass of each step only
    # a text scale below 1 guides too (the unconditional pass then carries the text): 0 is the unconditional caption
    text_calls.clear()
    pipe.joint(PROMPT, generator=torch.Generator().manual_seed(3), steps=2, guidance_video=4.0, guidance_text=0.5,
               output_type="latent")
    assert len(text_calls) == 4
    # caption's video is given: the video's scale (and its stochastic step) ask for no unconditional pass
    text_calls.clear()
    hinted = pipe.caption(clip, hint=PROMPT, generator=torch.Generator().manual_seed(3), steps=2, guidance_video=4.0,
                          video_eta=1.0).texts
    assert len(text_calls) == 2 and hinted == pipe.caption(clip, hint=PROMPT, generator=torch.Generator().manual_seed(3),
                                                            steps=2, guidance_video=1.0).texts
    unguided = pipe.caption(clip, generator=torch.Generator().manual_seed(3), steps=4).texts
    # the negative prompt is the unconditional prompt of the video's guidance: as a call's setting or the model's
    # default; caption's video is given, so caption ignores it
    away = dict(steps=2, guidance_video=4.0, output_type="latent")
    plain = pipe.generate(PROMPT, generator=torch.Generator().manual_seed(3), **away).videos
    negative = pipe.generate(PROMPT, generator=torch.Generator().manual_seed(3), negative_prompt="a blue square", **away)
    assert not torch.equal(negative.videos, plain)
    pipe.register_to_config(negative_prompt="a blue square")
    assert torch.equal(pipe.generate(PROMPT, generator=torch.Generator().manual_seed(3), **away).videos, negative.videos)
    hinted = dict(hint=PROMPT, steps=2, guidance_text=2.0)
    assert (pipe.caption(clip, generator=torch.Generator().manual_seed(3), **hinted).texts ==
            pipe.caption(clip, generator=torch.Generator().manual_seed(3), negative_prompt="", **hinted).texts)
    pipe.register_to_config(negative_prompt="")
    assert pipe.caption(clip, hint=PROMPT, generator=torch.Generator().manual_seed(3), steps=4,
                        guidance_text=0.0).texts == unguided
    assert pipe.caption(clip, hint=PROMPT, generator=torch.Generator().manual_seed(3), steps=4).texts != unguided
