"""`vigu train` on a tiny world dataset: resume after kill -9, two processes, trainable sets, stages, NaN."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType
from safetensors.torch import load_file

from conftest import TINY, tiny_recipe
from vigu_cli.build_dataset import build_dataset
from vigu_cli.core.pipeline import UniViGUPipeline
from vigu_cli.errors import VigUError
from vigu_cli.train import accelerator_sharding, checkpoints, configure_trainable, drop_condition, train
from vigu_cli.train_plan import NO_VALIDATION
from vigu_cli.video_cache import VideoContextCache

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["train.recall.max_steps=12", "train.recall.batch_size=4", "train.recall.checkpoint_every=4",
         "train.recall.log_every=1", "train.recall.val_items=0", "train.recall.warmup_steps=2",
         "train.recall.learning_rate=1e-3", "train.recall.init=fresh", "train.recall.keep_checkpoints=2"]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A tiny world dataset (40 clips, 16x16x9) built by `build_dataset`, shared by every test here."""
    out = tmp_path_factory.mktemp("data")
    build_dataset(tiny_recipe(f"data.out={out}", "data.num_items=40", "data.shard_size=20", "data.val_every=10",
                              "data.keep_videos=false"))
    return out


def recipe_for(data, out, *extra):
    return tiny_recipe(f"train.dataset={data}", f"train.output_dir={out}", *STEPS, *extra)


def overrides_for(data, out, *extra):
    """The same recipe as `recipe_for`, as `--set` options of the command line."""
    return [arg for o in [*TINY, f"train.dataset={data}", f"train.output_dir={out}", *STEPS, *extra] for arg in ("--set", o)]


def metrics(path):
    keep = ("step", "loss", "loss_video", "loss_text", "lr", "grad_norm")
    return [{k: v for k, v in json.loads(line).items() if k in keep} for line in path.read_text().splitlines()]


def weights(folder):
    return load_file(folder / "model" / "transformer" / "diffusion_pytorch_model.safetensors")


def vigu_train(*args, env=None):
    return subprocess.Popen([sys.executable, "-m", "vigu_cli", "train", "--stage", "recall", *args],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_kill_9_then_resume_equals_an_uninterrupted_run(tiny_data, tmp_path):
    """Must show 1: bit-exact final weights and metrics after kill -9 + --resume."""
    straight = train(recipe_for(tiny_data, tmp_path / "straight"), "recall")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = vigu_train(*overrides_for(tiny_data, tmp_path / "killed"), env=env)
    ckpt = tmp_path / "killed" / "recall" / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and not (ckpt.is_dir() and any(p.name.startswith("step-") for p in ckpt.iterdir())):
        time.sleep(0.05)
    os.kill(run.pid, signal.SIGKILL)
    run.wait()
    assert not (tmp_path / "killed" / "recall" / "model").exists()  # killed before the end
    resumed = vigu_train(*overrides_for(tiny_data, tmp_path / "killed"), "--resume", env=env)
    assert resumed.wait() == 0, resumed.stderr.read()
    for name, tensor in weights(straight.parent).items():
        assert torch.equal(tensor, weights(tmp_path / "killed" / "recall")[name]), name
    assert metrics(straight.parent / "metrics.jsonl") == metrics(tmp_path / "killed" / "recall" / "metrics.jsonl")
    assert [p.name for p in checkpoints(tmp_path / "killed" / "recall")] == ["step-00000008", "step-00000012"]


def test_two_processes_match_one_process_with_twice_the_batch(tiny_data, tmp_path):
    """Must show 2: torchrun x2 (gloo, gradients all-reduced) == one process with the doubled batch, step
    for step: each rank reads its own half of every global batch (were they the same half, or were the
    gradients not synchronised, the losses and weights would part); one set of checkpoints."""
    one = train(recipe_for(tiny_data, tmp_path / "one", "train.recall.batch_size=8"), "recall")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "vigu_cli", "train",
         "--stage", "recall", *overrides_for(tiny_data, tmp_path / "two", "train.recall.batch_size=4")],
        cwd=ROOT, env=env, capture_output=True, text=True,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert (two.stdout + two.stderr).count("wrote ") == 1  # the final folder is reported by the main process only
    assert "Writing model shards" not in two.stderr  # diffusers' bars stay out of the run's own output
    a, b = metrics(one.parent / "metrics.jsonl"), metrics(tmp_path / "two" / "recall" / "metrics.jsonl")
    assert [m["step"] for m in a] == [m["step"] for m in b]
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) <= 1e-4 * max(1.0, abs(x["loss"])), (x, y)
    for name, tensor in weights(one.parent).items():
        assert torch.allclose(tensor, weights(tmp_path / "two" / "recall")[name], atol=1e-4), name
    assert len(checkpoints(tmp_path / "two" / "recall")) == 2


def fsdp_launch(*args):
    """`accelerate launch` with the shipped 8xh800-fsdp config on 2 CPU processes (`fsdp_on_cpu`: Accelerate's FSDP,
    torch's FSDP2 over gloo), the stage's parameters all trained, in float32."""
    return subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "recipes/accelerate/8xh800-fsdp.yaml",
         "--num_processes", "2", "--mixed_precision", "no", "tests/fsdp_on_cpu.py", "train", "--stage", "recall",
         *args],
        cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
    )


@pytest.mark.parametrize("settings", [
    ("train.recall.trainable=full",),
    ("train.recall.trainable=text", "text.formulation=discrete", "text.video_attends_text=false", "text.video_keys=text"),
], ids=["wan", "world-tiny"])
def test_fsdp_matches_one_process_and_resumes_from_its_sharded_checkpoints(tiny_data, tmp_path, settings):
    """The shipped FSDP config (FSDP2: every parameter, gradient and optimizer state sharded over the processes) on
    2 processes == one process with the doubled batch, step for step, gradient norms (clipping) included; each
    process writes its own shard of every checkpoint; the final folder is the whole model; and `--resume` from
    the sharded checkpoint before the last ends with the same weights, bit for bit. `wan`: the Wan recipes'
    training (every parameter trained; the embedding text flow, whose token table is read outside the forward
    and must be gathered: `token_embeddings`); `world-tiny`: the text alone trained, over a video that does not
    read it and runs only as far as the text reads it (the last block's attention input)."""
    settings = (*settings, "train.recall.max_grad_norm=1.0")
    one = train(recipe_for(tiny_data, tmp_path / "one", *settings, "train.recall.batch_size=8"), "recall")
    args = overrides_for(tiny_data, tmp_path / "fsdp", *settings, "train.recall.batch_size=4")
    run = fsdp_launch(*args)
    assert run.returncode == 0, run.stderr[-3000:]
    assert NO_VALIDATION in run.stdout + run.stderr
    stage = tmp_path / "fsdp" / "recall"
    a, b = metrics(one.parent / "metrics.jsonl"), metrics(stage / "metrics.jsonl")
    assert [m["step"] for m in a] == [m["step"] for m in b] == list(range(1, 13))
    assert any(m["grad_norm"] > 1.0 for m in a)  # clipping acts
    for x, y in zip(a, b):
        for key in ("loss", "grad_norm"):
            assert abs(x[key] - y[key]) <= 1e-4 * max(1.0, abs(x[key])), (key, x, y)
    straight = weights(stage)
    for name, tensor in weights(one.parent).items():
        assert torch.allclose(tensor, straight[name], atol=1e-4), name
    last = checkpoints(stage)[-1]
    assert sorted(p.name for p in (last / "pytorch_model_fsdp_0").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert not (last / "model.safetensors").exists()

    shutil.rmtree(last)  # as if killed after the checkpoint before the last
    shutil.rmtree(stage / "model")
    resumed = fsdp_launch(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert all(torch.equal(tensor, weights(stage)[name]) for name, tensor in straight.items())
    assert metrics(stage / "metrics.jsonl") == b


def test_fsdp1_is_refused_in_one_line():
    fsdp1 = SimpleNamespace(distributed_type=DistributedType.FSDP, is_fsdp2=False)
    with pytest.raises(VigUError, match=r"^FSDP1 \(fsdp_version: 1, accelerate's default\) is not supported: set "
                                        r"fsdp_version: 2"):
        accelerator_sharding(fsdp1)


def test_trainable_text_changes_no_video_parameter(tiny_data, tmp_path):
    """Must show 3a."""
    out = train(recipe_for(tiny_data, tmp_path, "train.recall.trainable=text", "train.recall.max_steps=3"), "recall")
    trained = UniViGUPipeline.from_pretrained(out, local_files_only=True).transformer
    from vigu_cli.train import initial_pipeline

    start = initial_pipeline(recipe_for(tiny_data, tmp_path), "recall").transformer
    text = set(start.text_parameter_names())
    after = dict(trained.named_parameters())
    changed = {n for n, p in start.named_parameters() if not torch.equal(p, after[n])}
    assert changed and changed <= text
    assert any(".ffn_text." in n for n in changed) and any(".attn1_text." in n for n in changed)  # text.attention: own


def test_a_video_whose_loss_trains_nothing_is_not_predicted_and_the_text_trains_the_same(tiny_data, tmp_path, monkeypatch):
    """`trainable: text` with a video that does not attend to the text: no video prediction or loss (it would
    reach no trained parameter), and the same text weights and text losses as a run that computes them."""
    one_way = ("train.recall.trainable=text", "train.recall.max_steps=3", "text.video_attends_text=false")
    out = train(recipe_for(tiny_data, tmp_path / "skip", *one_way), "recall")
    monkeypatch.setattr("vigu_cli.train.video_loss_trains", lambda stage, video_attends_text: True)
    full = train(recipe_for(tiny_data, tmp_path / "full", *one_way), "recall")
    skipped, computed = metrics(out.parent / "metrics.jsonl"), metrics(full.parent / "metrics.jsonl")
    assert all(m["loss_video"] is None for m in skipped) and all(m["loss_video"] > 0 for m in computed)
    for a, b in zip(skipped, computed):
        assert a["loss_text"] == pytest.approx(b["loss_text"], rel=1e-5)
    for name, tensor in weights(out.parent).items():
        torch.testing.assert_close(tensor, weights(full.parent)[name], atol=1e-5, rtol=1e-4)


def test_cached_video_contexts_train_the_text_as_the_video_itself(tiny_data, tmp_path, monkeypatch, capsys):
    """`cache_video`: the clean clips' video contexts computed once before the first step, the noised clips'
    video run as before: the same text losses and weights as a run without the cache; the cache (gigabytes on
    the world) is deleted once the model is saved."""
    one_way = ("train.recall.trainable=text", "train.recall.max_steps=3", "text.video_attends_text=false",
               "text.video_keys=text", "flow.corner_prob=0.6", "flow.understanding_share=1.0")
    reads = []
    read = VideoContextCache._read
    monkeypatch.setattr(VideoContextCache, "_read", lambda self, *args: reads.append(args) or read(self, *args))
    cached = train(recipe_for(tiny_data, tmp_path / "cached", *one_way, "train.recall.cache_video=true"), "recall")
    live = train(recipe_for(tiny_data, tmp_path / "live", *one_way), "recall")
    assert {dropped for _, dropped, _ in reads} == {False, True}  # clean rows, with their prompt and without
    assert not (cached.parent / "video-cache").exists()
    for a, b in zip(metrics(cached.parent / "metrics.jsonl"), metrics(live.parent / "metrics.jsonl"), strict=True):
        assert a["loss_text"] == pytest.approx(b["loss_text"], rel=1e-5)
    for name, tensor in weights(cached.parent).items():
        torch.testing.assert_close(tensor, weights(live.parent)[name], atol=1e-5, rtol=1e-4)

    reads.clear()  # where the video trains, a cache would be stale after a step: it is not used, in one line
    train(recipe_for(tiny_data, tmp_path / "full", "train.recall.cache_video=true", "train.recall.max_steps=1"), "recall")
    assert "train.recall.cache_video: not used" in capsys.readouterr().err and not reads


def test_a_video_cache_build_resumes_and_reads_what_a_forward_gives(tiny_data, tmp_path, monkeypatch):
    """A killed build leaves whole chunk files only (temporary name, then rename): a rebuild computes just the
    missing chunks; a row read back is the video context of that clip under that condition."""
    from accelerate import Accelerator

    from vigu_cli.data.cache import CachedDatasets
    from vigu_cli.train import dataset_folders, initial_pipeline
    from vigu_cli import video_cache

    monkeypatch.setattr(video_cache, "CHUNK", 10)
    # two folders read as one (`train.dataset` as a list; here the same folder twice): the second's ids are prefixed
    recipe = recipe_for(tiny_data, tmp_path, "text.video_attends_text=false", "text.video_keys=text",
                        f"train.dataset=[{tiny_data}, {tiny_data}]")
    assert dataset_folders(recipe) == [tiny_data, tiny_data]
    core = initial_pipeline(recipe, "recall").transformer
    dataset = CachedDatasets(dataset_folders(recipe), split="train")
    ids = [dataset[i]["id"] for i in range(len(dataset))]
    assert len(ids) == 72 and len(set(ids)) == 72 and ids[36:] == [f"1/{item_id}" for item_id in ids[:36]]
    empty, folder, accelerator = dataset.empty_prompt_embeds, tmp_path / "video-cache", Accelerator(cpu=True)
    VideoContextCache.build(accelerator, core, dataset, empty, folder, batch_size=4)
    chunks = sorted(folder.iterdir())
    assert [p.name for p in chunks] == [f"chunk-{k:05d}.safetensors" for k in range(8)]  # 72 clips, 10 a chunk
    kept = chunks[0].stat().st_mtime_ns
    chunks[2].unlink()
    calls = []
    forward = core.video_context
    monkeypatch.setattr(core, "video_context", lambda *args: calls.append(args[0].shape[0]) or forward(*args))
    cache = VideoContextCache.build(accelerator, core, dataset, empty, folder, batch_size=4)
    assert sum(calls) == 2 * 10 and chunks[2].is_file() and chunks[0].stat().st_mtime_ns == kept

    for index in (25, 36 + 25):  # a clip of each folder
        item = dataset[index]
        for dropped, condition in ((False, item["prompt_embeds"]), (True, empty)):
            expected = forward(item["latents"][None].float(), torch.zeros(1), condition[None])
            for block, tokens in enumerate(expected.tokens):
                torch.testing.assert_close(cache._read(item["id"], dropped, block), tokens[0])
    with pytest.raises(VigUError, match="every process must see the stage folder"):
        VideoContextCache(folder, [*chunks, folder / "chunk-00008.safetensors"])


@pytest.fixture
def fresh_accelerator_state():
    """Accelerate keeps one process-wide state, set by the first `Accelerator` (float32 in the other tests)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_a_one_way_text_step_trains_under_bf16_mixed_precision(tiny_data, tmp_path, fresh_accelerator_state):
    """world-tiny's recall and refine under `auto` precision on a bf16 machine (CUDA, AMX or AVX512-BF16 CPUs):
    Accelerate's autocast wrapper converts the outputs to float32 and rebuilds them, and the video's prediction
    is absent; the step must read the text's prediction and train it."""
    one_way = ("train.recall.trainable=text", "train.recall.max_steps=2", "text.video_attends_text=false",
               "train.recall.mixed_precision=bf16")
    out = train(recipe_for(tiny_data, tmp_path, *one_way), "recall")
    rows = metrics(out.parent / "metrics.jsonl")
    assert [row["step"] for row in rows] == [1, 2]
    assert all(row["loss_video"] is None and 0 < row["loss_text"] < float("inf") for row in rows)


def test_text_learning_rate_sets_the_rate_of_the_new_text_parameters(tiny_data, tmp_path):
    """A text rate of 0 freezes exactly the new text parameters; the shared and video ones still move."""
    out = train(recipe_for(tiny_data, tmp_path, "train.recall.trainable=full", "train.recall.text_learning_rate=0",
                           "train.recall.max_steps=3"), "recall")
    trained = dict(UniViGUPipeline.from_pretrained(out, local_files_only=True).transformer.named_parameters())
    from vigu_cli.train import initial_pipeline

    start = initial_pipeline(recipe_for(tiny_data, tmp_path), "recall").transformer
    changed = {n for n, p in start.named_parameters() if not torch.equal(p, trained[n])}
    assert changed and not changed & set(start.text_parameter_names())
    assert any(".attn1." in n for n in changed)


def test_lora_trains_only_adapters_and_merges_back(tiny_data, tmp_path):
    """Must show 3b: LoRA (peft) on the shared attention; only adapter and text weights train; merged folder."""
    recipe = recipe_for(tiny_data, tmp_path, "train.recall.trainable=lora", "train.recall.max_steps=3",
                        "train.recall.lora_rank=4")
    from vigu_cli.train import initial_pipeline

    model = initial_pipeline(recipe, "recall").transformer
    trained = configure_trainable(model, recipe.train.recall)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert len(trained) == len(names) and any("lora_A" in n for n in names)
    assert all("lora_" in n or n in set(model.text_parameter_names()) for n in names)
    assert not any(".attn1.to_q.base_layer" in n for n in names)

    out = train(recipe, "recall")
    merged = UniViGUPipeline.from_pretrained(out, local_files_only=True).transformer
    keys = set(merged.state_dict())
    assert not any("lora" in k for k in keys) and "blocks.0.attn1.to_q.weight" in keys
    start = initial_pipeline(recipe, "recall").transformer
    assert not torch.equal(merged.blocks[0].attn1.to_q.weight, start.blocks[0].attn1.to_q.weight)  # merged in
    assert torch.equal(merged.blocks[0].ffn.net[2].weight, start.blocks[0].ffn.net[2].weight)  # video FFN frozen


def test_stage_semantics_targets_and_condition_dropout(tiny_data, monkeypatch, tmp_path):
    """Must show 4: recall learns the prompt with the condition dropped at its rate; refine the caption."""
    seen = []
    import vigu_cli.train as train_module

    real = train_module.unified_objective

    def spy(model, text_flow, cfg, latents, ids, cond, generator, **options):
        seen.append((ids.clone(), cond.clone()))
        return real(model, text_flow, cfg, latents, ids, cond, generator, **options)

    monkeypatch.setattr(train_module, "unified_objective", spy)
    recall = recipe_for(tiny_data, tmp_path / "a", "train.recall.max_steps=2")
    train(recall, "recall")
    from vigu_cli.data.cache import CachedVideoTextDataset

    dataset = CachedVideoTextDataset(tiny_data, "train")
    prompts = {tuple(dataset[i]["prompt_ids"].tolist()) for i in range(len(dataset))}
    captions = {tuple(dataset[i]["caption_ids"].tolist()) for i in range(len(dataset))}
    assert all(tuple(row.tolist()) in prompts for ids, _ in seen for row in ids)
    seen.clear()
    refine = recipe_for(tiny_data, tmp_path / "b", "train.refine.max_steps=2", "train.refine.batch_size=4",
                        "train.refine.val_items=0", "train.refine.init=fresh")
    train(refine, "refine")
    assert all(tuple(row.tolist()) in captions for ids, _ in seen for row in ids)

    embeds, empty = torch.randn(4000, 3, 2), torch.zeros(3, 2)
    generator = torch.Generator().manual_seed(0)
    dropped, mask = drop_condition(embeds, empty, 0.3, generator, 0, 4000)
    assert torch.equal(dropped.abs().sum((1, 2)) == 0, mask)
    assert abs(float(mask.float().mean()) - 0.3) < 0.03


def test_nan_loss_stops_with_one_line_and_keeps_the_checkpoint(tiny_data, tmp_path):
    recipe = recipe_for(tiny_data, tmp_path, "train.recall.learning_rate=1e30", "train.recall.text_learning_rate=1e30",
                        "train.recall.max_grad_norm=1e30", "train.recall.warmup_steps=0", "train.recall.checkpoint_every=1")
    with pytest.raises(VigUError) as info:
        train(recipe, "recall")
    message = str(info.value)
    assert "loss is nan" in message or "loss is inf" in message
    assert "last good checkpoint" in message and "\n" not in message
    saved = checkpoints(tmp_path / "recall")
    assert saved and all((p / "trainer_state.json").is_file() for p in saved)
    assert not (tmp_path / "recall" / "model").exists()


def test_existing_run_without_resume_is_refused(tiny_data, tmp_path):
    train(recipe_for(tiny_data, tmp_path, "train.recall.max_steps=1"), "recall")
    with pytest.raises(VigUError, match="pass --resume"):
        train(recipe_for(tiny_data, tmp_path, "train.recall.max_steps=1"), "recall")


def test_ema_weights_are_saved_and_checkpointed(tiny_data, tmp_path):
    plain = train(recipe_for(tiny_data, tmp_path / "plain", "train.recall.max_steps=4"), "recall")
    ema = train(recipe_for(tiny_data, tmp_path / "ema", "train.recall.max_steps=4", "train.recall.ema_decay=0.5"), "recall")
    a, b = weights(plain.parent), weights(ema.parent)
    assert any(not torch.equal(a[k], b[k]) for k in a)
    # the EMA's state travels with every checkpoint, so a resumed run averages the same way
    assert all(list(p.glob("custom_checkpoint_0.*")) for p in checkpoints(tmp_path / "ema" / "recall"))
    again = tmp_path / "ema2"
    train(recipe_for(tiny_data, again, "train.recall.max_steps=4", "train.recall.ema_decay=0.5"), "recall")
    assert all(torch.equal(b[k], weights(again / "recall")[k]) for k in b)  # deterministic


def test_resuming_a_finished_run_keeps_one_line_per_validation(tiny_data, tmp_path, capsys):
    extra = ("train.recall.max_steps=4", "train.recall.validate_every=2", "train.recall.val_items=2",
             "train.recall.val_steps=2")
    train(recipe_for(tiny_data, tmp_path, *extra), "recall")
    log = tmp_path / "recall" / "validation.jsonl"
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [2, 4]
    record = json.loads(log.read_text().splitlines()[0])
    shown = [line for line in capsys.readouterr().err.splitlines() if line.startswith("validation at step 2 ")]
    assert shown == [f"validation at step 2 on 2 held-out items; caption {record['caption']['macro']:.3f} "
                     f"(shape {record['caption']['shape']:.2f}, color {record['caption']['color']:.2f}, "
                     f"motion {record['caption']['motion']:.2f}); generation {record['generation']['macro']:.3f} "
                     f"(shape {record['generation']['shape']:.2f}, color {record['generation']['color']:.2f}, "
                     f"motion {record['generation']['motion']:.2f})"]
    # recall's text target is the prompt: what the model says of a clip is scored as a prompt
    assert set(json.loads(log.read_text().splitlines()[0])["caption"]) == {"shape", "color", "motion", "macro"}
    train(recipe_for(tiny_data, tmp_path, *extra), "recall", resume=True)  # validates and saves again
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [2, 4]


def test_validation_on_a_dataset_with_nothing_held_out_says_so_and_writes_no_scores(tiny_data, tmp_path, capsys):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    info = json.loads((data / "dataset.json").read_text())
    info["split"]["val_every"] = 0
    (data / "dataset.json").write_text(json.dumps(info))
    train(tiny_recipe(f"train.dataset={data}", f"train.output_dir={tmp_path}", "train.recall.max_steps=1"), "recall")
    assert (tmp_path / "recall" / "model" / "model_index.json").is_file()
    assert not (tmp_path / "recall" / "validation.jsonl").exists()
    assert (f"validation at step 1: {data} holds no held-out items (data.val_every 0; 0 holds none out): build it "
            "with more items or a smaller data.val_every; skipped") in capsys.readouterr().err


def test_validation_on_data_the_worlds_judge_cannot_read_saves_samples_and_null_scores(tiny_data, tmp_path, capsys):
    """A dataset of the user's own prompts and captions (not the world's phrasings): validation still captions and
    generates its held-out items, `batch_size` at a time, and saves them, but scores nothing (null), rather than
    parse them with the world's grammar."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    lines = [json.loads(line) for line in (data / "manifest.jsonl").read_text().splitlines()]
    for line in lines:
        line["prompt"], line["caption"] = "a cat surfing", "a cat surfs a wave at sunset, filmed from the beach"
    (data / "manifest.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    held_out = ("train.refine.init=fresh", "train.refine.max_steps=1", "train.refine.batch_size=2",
                "train.refine.val_items=3", "train.refine.val_steps=2", "train.refine.log_every=1")
    train(tiny_recipe(f"train.dataset={data}", f"train.output_dir={tmp_path}", *held_out), "refine")
    record = json.loads((tmp_path / "refine" / "validation.jsonl").read_text())
    assert record == {"step": 1, "caption": None, "generation": None}
    assert ("validation at step 1 on 3 held-out items; caption: not scored (the world's judge does not read this "
            "data); generation: not scored") in capsys.readouterr().err
    samples = tmp_path / "refine" / "samples" / "step-00000001"
    assert sorted(p.name for p in samples.iterdir()) == ["0-generated.mp4", "0.txt", "1-generated.mp4", "1.txt",
                                                         "2-generated.mp4", "2.txt"]
    assert (samples / "2.txt").read_text().startswith("prompt: a cat surfing\ncaption: ")


def test_with_sharded_parameters_the_final_model_is_gathered_whole_and_validation_is_skipped(tiny_data, tmp_path,
                                                                                           monkeypatch):
    """Where no process holds the whole model (FSDP, ZeRO-3; here the run is only told it is sharded, in process):
    the saved model is a whole copy loaded from `accelerator.get_state_dict`, equal to the trained weights, and
    validation, which would run the sharded model on one process, is skipped with a line saying so."""
    import vigu_cli.train as train_module

    short = ("train.recall.max_steps=3", "train.recall.validate_every=2", "train.recall.val_items=2",
             "train.recall.val_steps=2")
    plain = train(recipe_for(tiny_data, tmp_path / "plain", *short), "recall")
    monkeypatch.setattr(train_module, "accelerator_sharding", lambda accelerator: "fsdp")
    gathered = train(recipe_for(tiny_data, tmp_path / "sharded", *short), "recall")
    a, b = weights(plain.parent), weights(gathered.parent)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (plain.parent / "validation.jsonl").is_file() and not (gathered.parent / "validation.jsonl").exists()
    with pytest.raises(VigUError, match="train.recall: ema_decay cannot run with fsdp"):
        train(recipe_for(tiny_data, tmp_path / "ema", *short, "train.recall.ema_decay=0.5"), "recall")


def test_an_output_folder_that_cannot_be_written_stops_before_training(tiny_data, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(VigUError, match=r"train.output_dir's stage folder .*/recall: .*file is a file, not a folder"):
        train(recipe_for(tiny_data, tmp_path / "file"), "recall")


def test_resume_with_nothing_to_resume_says_so_and_starts_from_step_0(tiny_data, tmp_path, capsys):
    out = train(recipe_for(tiny_data, tmp_path, "train.recall.max_steps=1"), "recall", resume=True)
    assert f"--resume: {tmp_path / 'recall'} holds no checkpoint yet; starting from step 0" in capsys.readouterr().err
    assert [m["step"] for m in metrics(out.parent / "metrics.jsonl")] == [1]


def test_max_grad_norm_zero_clips_nothing(tiny_data, tmp_path):
    """0 turns clipping off (as in transformers' Trainer), rather than scaling every gradient to zero: the weights
    are those of a run whose threshold no gradient reaches, and the logged norm is measured all the same."""
    short = ("train.recall.max_steps=2", "train.recall.learning_rate=1e-2")
    off = train(recipe_for(tiny_data, tmp_path / "off", *short, "train.recall.max_grad_norm=0"), "recall")
    huge = train(recipe_for(tiny_data, tmp_path / "huge", *short, "train.recall.max_grad_norm=1e9"), "recall")
    clipped = train(recipe_for(tiny_data, tmp_path / "clipped", *short, "train.recall.max_grad_norm=1e-3"), "recall")
    a, b, c = weights(off.parent), weights(huge.parent), weights(clipped.parent)
    assert all(torch.equal(a[k], b[k]) for k in a) and any(not torch.equal(a[k], c[k]) for k in a)
    assert all(m["grad_norm"] > 0 for m in metrics(off.parent / "metrics.jsonl"))


def test_compile_trains_the_same_model_and_saves_plain_weights(tiny_data, tmp_path):
    """`compile: true` (torch.compile of the prepared model): the losses follow the eager run's, checkpoints and the
    final folder hold the plain module's names, and `--resume` continues from them."""
    short = ("train.recall.max_steps=3", "train.recall.checkpoint_every=2")
    eager = train(recipe_for(tiny_data, tmp_path / "eager", *short), "recall")
    torch._dynamo.reset()
    compiled = train(recipe_for(tiny_data, tmp_path / "compiled", *short, "train.recall.compile=true"), "recall")
    for a, b in zip(metrics(eager.parent / "metrics.jsonl"), metrics(compiled.parent / "metrics.jsonl"), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-2)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # the steps ran through torch.compile
    assert set(weights(compiled.parent)) == set(weights(eager.parent))
    assert not [k for k in load_file(checkpoints(compiled.parent)[-1] / "model.safetensors") if "_orig_mod" in k]
    more = train(recipe_for(tiny_data, tmp_path / "compiled", "train.recall.max_steps=4", "train.recall.compile=true"),
                 "recall", resume=True)
    assert [m["step"] for m in metrics(more.parent / "metrics.jsonl")] == [1, 2, 3, 4]


def test_compile_without_a_cpp_compiler_is_one_line(tiny_data, tmp_path, monkeypatch):
    from torch._inductor import cpp_builder, exc

    def missing():
        raise exc.InvalidCxxCompiler()

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", missing)
    with pytest.raises(VigUError, match="compile needs a C\\+\\+ compiler.*compile=false"):
        train(recipe_for(tiny_data, tmp_path, "train.recall.compile=true"), "recall")
