"""`vigu train --dry-run`'s plan: parameters and memory per GPU from the recipe, nothing loaded."""

from pathlib import Path

import pytest

from vigu_cli.recipe import load_recipe
from vigu_cli.errors import VigUError
from vigu_cli.train_plan import describe, plan, transformer_on_meta

ACCELERATE = Path(__file__).resolve().parents[1] / "recipes" / "accelerate"


def test_parameters_follow_what_the_stage_trains():
    recipe = load_recipe("world-tiny", ["train.refine.trainable=full"])
    model = transformer_on_meta(recipe, 50)
    text = sum(p.numel() for n, p in model.named_parameters() if n in set(model.text_parameter_names()))
    full, text_only = plan(recipe, "refine"), plan(recipe, "recall")  # world-tiny's recall trains text only
    assert full.total_params == text_only.total_params == sum(p.numel() for p in model.parameters())
    assert full.trainable_params == full.total_params and text_only.trainable_params == text
    assert text_only.gradients == pytest.approx(full.gradients * text / full.total_params)


def test_sharding_divides_what_it_shards():
    recipe = load_recipe("wan2.1-t2v-1.3b")
    one = plan(recipe, "recall")
    fsdp = plan(recipe, "recall", ACCELERATE / "8xh800-fsdp.yaml")
    zero2 = plan(recipe, "recall", ACCELERATE / "8xh800-deepspeed-zero2.yaml")
    assert (fsdp.processes, fsdp.sharding, zero2.sharding) == (8, "fsdp", "zero2")
    assert fsdp.weights == pytest.approx(one.weights / 8) and zero2.weights == pytest.approx(one.weights)
    assert fsdp.optimizer == zero2.optimizer == pytest.approx(one.optimizer / 8)
    assert fsdp.activations == one.activations > 0
    assert plan(recipe, "recall", "8xh800-fsdp") == fsdp  # a shipped config by name, from any folder
    with pytest.raises(VigUError, match="accelerate config nope.yaml not found: give a file, or one of the shipped "
                                        "configs: 8xh800-deepspeed-zero2, 8xh800-fsdp, multi-node-fsdp, single-gpu"):
        plan(recipe, "recall", "nope.yaml")


def test_a_frozen_video_that_does_not_read_the_text_keeps_fewer_activations():
    both = plan(load_recipe("world-tiny", ["text.video_attends_text=true", "text.video_keys=video"]), "refine")
    one_way = plan(load_recipe("world-tiny", ["text.video_attends_text=false"]), "refine")
    full = plan(load_recipe("world-tiny", ["text.video_attends_text=false", "train.refine.trainable=full"]), "refine")
    assert one_way.activations < both.activations / 4 and full.activations == both.activations


def test_the_video_cache_is_planned_where_it_is_used():
    """world-tiny's refine caches 2 conditions x 4 blocks x 320 video tokens x width 256 in bf16 per clip: 1.25 MiB,
    what a chunk file of 16 clips measured (20,982,592 bytes); a stage that trains the video caches nothing."""
    refine = plan(load_recipe("world-tiny"), "refine")
    assert refine.video_cache_per_clip * 2**30 == 2 * 4 * 320 * 256 * 2
    assert plan(load_recipe("world-tiny", ["train.refine.trainable=full"]), "refine").video_cache_per_clip == 0
    assert plan(load_recipe("world-tiny"), "recall").video_cache_per_clip == 0  # recall does not set cache_video
    # asked for where it does not apply: the dry run says so, as the run itself does
    rows = dict(describe(plan(load_recipe("world-tiny", ["train.refine.trainable=full"]), "refine")))
    assert rows["video cache"].startswith("train.refine.cache_video: not used")
    assert "video cache" not in dict(describe(refine))


@pytest.mark.parametrize("name", ["wan2.1-t2v-1.3b", "wan2.1-t2v-14b"])
def test_the_wan_recipes_carry_the_papers_stages(name):
    """Paper section 4.1: recall 40K steps at 2e-4 on the prompt, refine 60K at 5e-5 on the caption, Adam (0.9, 0.95),
    both from the full model (recall from model.base, refine from recall's); the dry run shows them."""
    recipe = load_recipe(name)
    recall, refine = recipe.train.recall, recipe.train.refine
    assert (recall.max_steps, recall.learning_rate, recall.text_target, recall.init) == (40_000, 2e-4, "prompt", "base")
    assert (refine.max_steps, refine.learning_rate, refine.text_target, refine.init) == (60_000, 5e-5, "caption", "previous")
    assert recall.betas == refine.betas == [0.9, 0.95] and recall.trainable == refine.trainable == "full"
    rows = dict(describe(plan(recipe, "recall", ACCELERATE / "8xh800-fsdp.yaml")))
    assert rows["steps x clips per step"].startswith("40,000 x 8 ")
    assert rows["learning rate"].startswith("0.0002 ") and rows["learning rate"].endswith("Adam betas (0.9, 0.95)")


def test_an_unknown_stage_is_one_error():
    with pytest.raises(VigUError, match="unknown stage 'bogus': use one of base, recall, refine"):
        plan(load_recipe("world-tiny"), "bogus")


def test_sharded_parameters_refuse_what_needs_the_whole_model_and_say_validation_does_not_run():
    """FSDP and ZeRO-3 leave no process the whole model: the EMA, LoRA and the video cache are refused in one line
    (world-tiny's refine sets both the EMA and the cache), and the plan says validation will not run."""
    with pytest.raises(VigUError, match=r"train.refine: ema_decay, cache_video cannot run with fsdp, which leaves "
                                        r"no process the whole model: turn them off, or train with DDP"):
        plan(load_recipe("world-tiny"), "refine", ACCELERATE / "8xh800-fsdp.yaml")
    rows = dict(describe(plan(load_recipe("wan2.1-t2v-14b"), "recall", ACCELERATE / "8xh800-fsdp.yaml")))
    assert rows["validation"].startswith("not run, as no process holds the whole model")
    assert "validation" not in dict(describe(plan(load_recipe("wan2.1-t2v-14b"), "recall",
                                                  ACCELERATE / "8xh800-deepspeed-zero2.yaml")))


def test_an_fsdp1_config_is_refused_in_one_line(tmp_path):
    """vigu trains with FSDP2 (the shipped configs; `test_train.py` runs it): an FSDP config without fsdp_version 2
    (accelerate's default is 1) is refused by the plan as by the run."""
    fsdp1 = (ACCELERATE / "8xh800-fsdp.yaml").read_text().replace("fsdp_version: 2", "fsdp_version: 1")
    (tmp_path / "fsdp1.yaml").write_text(fsdp1)
    with pytest.raises(VigUError, match=r"fsdp1.yaml: FSDP1 \(fsdp_version: 1, accelerate's default\) is not supported"):
        plan(load_recipe("world-tiny"), "recall", tmp_path / "fsdp1.yaml")


def test_a_broken_accelerate_config_is_one_line(tmp_path):
    recipe = load_recipe("world-tiny")
    (tmp_path / "bad.yaml").write_text("distributed_type: FSDP\nnum_processes: [8\n")
    with pytest.raises(VigUError, match=r"accelerate config .*bad.yaml is not valid YAML at line 3, column 1: "):
        plan(recipe, "recall", tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(VigUError, match=r"list.yaml must be a mapping such as `accelerate config` writes, got list"):
        plan(recipe, "recall", tmp_path / "list.yaml")


def test_the_plan_says_whether_it_fits_an_80_gib_gpu_and_what_would_make_it_fit():
    row = "fits an 80 GiB GPU (H800, H100)"
    zero2 = dict(describe(plan(load_recipe("wan2.1-t2v-14b"), "refine", ACCELERATE / "8xh800-deepspeed-zero2.yaml")))
    assert zero2[row] == "no: FSDP (--accelerate-config 8xh800-fsdp) would lower it"  # 14B weights on every GPU
    assert dict(describe(plan(load_recipe("wan2.1-t2v-14b"), "refine", ACCELERATE / "8xh800-fsdp.yaml")))[row] == "yes"
    bare = plan(load_recipe("wan2.1-t2v-1.3b", ["train.recall.gradient_checkpointing=false",
                                                "train.recall.batch_size=4"]), "recall")
    assert dict(describe(bare))[row] == ("no: gradient_checkpointing: true; FSDP (--accelerate-config 8xh800-fsdp); "
                                         "a smaller batch_size with grad_accum (now 4) would lower it")


def test_stage_base_from_scratch_is_refused_where_the_model_is_pretrained():
    with pytest.raises(VigUError, match=r"stage base pretrains a text-to-video model from scratch, but model.base "
                                        r"\(Wan2.1-T2V-1.3B-Diffusers\) is pretrained already: start .* recall"):
        plan(load_recipe("wan2.1-t2v-1.3b"), "base")
    assert plan(load_recipe("world-tiny"), "base").total_params > 0  # the world's base is what `base` is for
