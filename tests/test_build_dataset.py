"""`vigu build-dataset`: the world end to end, each generator and captioner backend inside a build, resume
after kill -9, two processes, the cache contract (Dataset, padding, check_compatible) and bad inputs."""

import json
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from conftest import TINY_WAN_VAE, tiny_recipe
from test_captioners import (TIMEOUT, FakeChatServer, free_closed_port, no_proxies, tiny_vlm,  # noqa: F401 (fixtures)
                             world_prompt)
from vigu_cli import cli
from vigu_cli.build_dataset import build_dataset, summary_table
from vigu_cli.core.convert import WORLD_PRETRAINED, load_pipeline, pipeline_from_recipe
from vigu_cli.core.pipeline import SAMPLING_SETTINGS
from vigu_cli.data import world
from vigu_cli.data.cache import CachedVideoTextDataset, check_compatible, collate, pad_prompt_embeds
from vigu_cli.data.manifest import is_retryable, read_lines, shard_ranges, shards_of_rank
from vigu_cli.data.video_io import frames_to_tensor, read_video, tensor_to_frames, write_video
from vigu_cli.errors import VigUError
from vigu_cli.recipe import load_recipe
from vigu_cli.synth.captioners import count_tokens
from vigu_cli.synth.generators import WanGenerator, make_generator, video_seed
from vigu_cli.synth.prompts import plan_items

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
# the reference build, as CLI arguments; the text encoder in float32 whatever `auto` means on this machine
WORLD_ARGS = ["-n", "64", "--set", "data.shard_size=8", "--set", "data.text_encoder_dtype=float32"]


def world_recipe(out, *extra):
    return load_recipe("world-tiny", ["data.num_items=64", "data.shard_size=8", "data.text_encoder_dtype=float32",
                                      f"data.out={out}", *extra])


def vigu(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "vigu_cli", *args], capture_output=True, text=True, env=ENV,
                          cwd=ROOT, **kwargs)


def temporary_files(root):
    return [p for p in Path(root).rglob("*") if p.name.endswith(".tmp") or ".tmp." in p.name]


def assert_same_dataset(a, b):
    """Byte-identical manifest and dataset.json; identical tensors in every safetensors file."""
    assert (a / "manifest.jsonl").read_bytes() == (b / "manifest.jsonl").read_bytes()
    assert (a / "dataset.json").read_bytes() == (b / "dataset.json").read_bytes()
    files = sorted(p.relative_to(a) for p in a.rglob("*.safetensors"))
    assert files == sorted(p.relative_to(b) for p in b.rglob("*.safetensors")) and files
    for name in files:
        left, right = load_file(a / name), load_file(b / name)
        assert left.keys() == right.keys()
        assert all(torch.equal(left[key], right[key]) for key in left), name
    assert temporary_files(b) == []


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted one-process world build of 64 clips (8 shards of 8)."""
    out = tmp_path_factory.mktemp("reference")
    report = build_dataset(world_recipe(out))
    return out, report


# ----------------------------------------------------------------------------------------------------
# The world, end to end
# ----------------------------------------------------------------------------------------------------


def test_world_build_of_64_clips_end_to_end(reference):
    out, report = reference
    recipe = world_recipe(out)
    lines = read_lines(out / "manifest.jsonl")
    assert [line.index for line in lines] == list(range(64)) and report.lines == lines
    assert all(line.status == "ok" and line.reason is None for line in lines)
    assert [line.shard for line in lines] == [f"shard-{i // 8:05d}" for i in range(64)]
    info = json.loads((out / "dataset.json").read_text())
    assert info["complete"] and info["counts"] == {"ok": 64, "rejected": 0, "skipped": 0} and info["pending"] == 0
    assert info["cache"]["latent_shape"] == [48, 5, 8, 8] and info["split"] == {"val_every": 16, "train": 60, "val": 4}

    pipe = pipeline_from_recipe(recipe)
    specs = [world.sample_clip(np.random.default_rng([0, i]), 16, 16, 17) for i in range(64)]
    train, val = CachedVideoTextDataset(out, "train"), CachedVideoTextDataset(out, "val")
    assert len(train) == 60 and [item[0] for item in val.items] == ["000015", "000031", "000047", "000063"]
    assert not {i for i, _ in train.items} & {i for i, _ in val.items}
    everything = CachedVideoTextDataset(out, "all")
    for i in range(64):
        item, line, spec = everything[i], lines[i], specs[i]
        assert item["id"] == line.id and line.prompt == world.prompt_text(spec)
        assert world.parse_caption(line.caption) == spec.attributes()
        assert line.prompt_tokens == count_tokens(pipe.text_tokenizer, line.prompt) == 5
        assert item["latents"].shape == (48, 5, 8, 8) and item["latents"].dtype == torch.float32
        assert item["prompt_embeds"].shape == (32, 32)
        # padding the stored rows back gives exactly WanPipeline's embeddings
        assert torch.equal(item["prompt_embeds"], pipe.encode_condition([line.prompt], "cpu")[0])
        assert torch.equal(item["prompt_ids"], pipe.text_ids([line.prompt])[0])
        assert torch.equal(item["caption_ids"], pipe.text_ids([line.caption])[0])
        # the cached latent decodes to the rendered clip itself
        decoded = tensor_to_frames(pipe.decode_latents(item["latents"][None])[0])
        assert np.array_equal(decoded, world.render(spec)), line.id
        assert read_video(out / line.video).shape == (17, 16, 16, 3)
    assert torch.equal(train.empty_prompt_embeds, pipe.encode_condition([""], "cpu")[0])
    stored = load_file(out / "shards" / "shard-00000.safetensors")["000000/prompt_embeds"]
    assert stored.shape == (6, 32)  # only the prompt's real rows are stored: 5 words and EOS

    batch = next(iter(DataLoader(train, batch_size=16, num_workers=1, collate_fn=collate)))
    assert batch["latents"].shape == (16, 48, 5, 8, 8) and batch["prompt_embeds"].shape == (16, 32, 32)
    assert batch["prompt_ids"].shape == batch["caption_ids"].shape == (16, 32) and len(batch["id"]) == 16


def test_check_compatible_names_the_part_that_differs(reference, tmp_path):
    out, _ = reference
    pipe = pipeline_from_recipe(world_recipe(out))
    check_compatible(out, pipe)  # the model that built it
    with torch.no_grad():
        pipe.text_encoder.shared.weight[5, 0] += 1.0
    with pytest.raises(VigUError, match="another text encoder .*rebuild the cache") as info:
        check_compatible(out, pipe)
    assert "\n" not in str(info.value)
    pipe = pipeline_from_recipe(world_recipe(out))
    pipe.vae.register_to_config(latents_mean=[0.0] * 48)
    with pytest.raises(VigUError, match="another VAE"):
        check_compatible(out, pipe)
    with pytest.raises(VigUError, match="text_max_length=32, this model has 48"):
        check_compatible(out, pipeline_from_recipe(world_recipe(out, "text.max_length=48")))
    with pytest.raises(VigUError, match="not a vigu dataset"):
        check_compatible(tmp_path, pipe)
    from vigu_cli.core.convert import wan_from_vigu

    with pytest.raises(VigUError, match="check_compatible takes a vigu pipeline .*, got a WanPipeline: load the model"):
        check_compatible(out, wan_from_vigu(pipe))


def test_world_tiny_caption_range_fits_every_phrasing():
    """The world captioner must never reject ground truth: every phrasing of every clip fits the range,
    and the range leaves room for EOS in the text stream."""
    recipe = load_recipe("world-tiny")
    tokenizer = pipeline_from_recipe(recipe).text_tokenizer
    rule = recipe.data.captioner
    counts = {count_tokens(tokenizer, world.caption_text(spec, np.random.default_rng(0), template))
              for spec in world.every_spec() for template in range(len(world.CAPTION_TEMPLATES))}
    assert rule.min_caption_tokens <= min(counts) and max(counts) <= rule.max_caption_tokens < recipe.text.max_length
    assert recipe.data.max_prompt_tokens < recipe.text.max_length


# ----------------------------------------------------------------------------------------------------
# Resume, kill -9, two processes
# ----------------------------------------------------------------------------------------------------


def test_kill_9_mid_shard_then_resume_equals_an_uninterrupted_build(reference, tmp_path):
    out = tmp_path / "killed"
    args = ["build-dataset", "--out", str(out), *WORLD_ARGS]
    run = subprocess.Popen([sys.executable, "-m", "vigu_cli", *args], env=ENV, cwd=ROOT,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done = lambda: {k for k in range(8) if (out / "shards" / f"shard-{k:05d}.jsonl").exists()}  # noqa: E731

    def started_shards():  # shards that have made their first clip but are not written
        return [k for k in range(8) if k not in done() and (out / "videos" / f"{8 * k:06d}.mp4").exists()]

    started, deadline = [], time.monotonic() + 300
    while not started and time.monotonic() < deadline and run.poll() is None:
        if len(done()) >= 2 and started_shards():
            run.send_signal(signal.SIGSTOP)  # frozen, then checked again: on a loaded machine the shard may have ended
            started = started_shards()
            if not started:
                run.send_signal(signal.SIGCONT)
        time.sleep(0.002)
    run.send_signal(signal.SIGKILL)
    assert run.wait() == -signal.SIGKILL and started
    assert 2 <= len(done()) < 8 and started[0] not in done()  # killed in the middle of a shard
    # files a kill during a write would leave: a half-written shard and a half-written clip
    (out / "shards" / ".shard-00007.safetensors.0123abcd.tmp").write_bytes(b"half")
    (out / "videos" / ".000063.0123abcd.tmp.mp4").write_bytes(b"half")

    again = vigu(*args)
    assert again.returncode == 0, again.stderr
    assert "shard(s)" in again.stderr and "processed by this run (made, rejected or skipped)" in again.stdout
    assert_same_dataset(reference[0], out)
    assert sorted(p.name for p in (out / "videos").iterdir()) == [f"{i:06d}.mp4" for i in range(64)]


def test_two_processes_build_disjoint_shards_and_one_manifest(reference, tmp_path):
    out = tmp_path / "two"
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "vigu_cli",
         "build-dataset", "--out", str(out), *WORLD_ARGS],
        capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "rank 0 of 2: shards 0, 2, 4, 6 (4 in all, 4 to build)" in run.stderr
    assert "rank 1 of 2: shards 1, 3, 5, 7 (4 in all, 4 to build)" in run.stderr
    assert run.stdout.count("64 usable item(s)") == 1  # one summary, from rank 0
    assert_same_dataset(reference[0], out)


def test_sharding_is_disjoint_and_covers_every_item():
    ranges = shard_ranges(21, 4)
    assert [list(r) for r in ranges][-1] == [20] and sum(len(r) for r in ranges) == 21
    per_rank = [shards_of_rank(len(ranges), rank, 3) for rank in range(3)]
    assert sorted(k for shards in per_rank for k in shards) == list(range(len(ranges)))
    assert per_rank[1] == [1, 4]


def test_rerun_resumes_grows_and_refuses_other_settings(reference, tmp_path):
    out = tmp_path / "grow"
    first = build_dataset(world_recipe(out, "data.num_items=60"))
    assert first.made == 60 and (out / "shards" / "shard-00007.jsonl").exists()  # the last shard has 4 items
    assert build_dataset(world_recipe(out, "data.num_items=60")).made == 0  # same command: nothing to do
    grown = build_dataset(world_recipe(out))  # 64 items: only the short last shard is redone
    assert grown.made == 4 and grown.done_before == 7
    assert_same_dataset(reference[0], out)
    with pytest.raises(VigUError, match=r"holds 64 items and this run plans 8 .*: it would drop 56; ask for 64 or "
                                        r"more, or pass --overwrite to rebuild it"):
        build_dataset(world_recipe(out, "data.num_items=8"))  # a smaller -n would silently drop finished items
    assert len(read_lines(out / "manifest.jsonl")) == 64

    with pytest.raises(VigUError, match=r"other settings \(data.seed: 0 -> 1\): re-run with --overwrite") as info:
        build_dataset(world_recipe(out, "data.seed=1"))
    assert "\n" not in str(info.value)
    rebuilt = build_dataset(world_recipe(out, "data.seed=1", "data.num_items=8"), overwrite=True)
    assert rebuilt.made == 8 and len(read_lines(out / "manifest.jsonl")) == 8
    assert not (out / "shards" / "shard-00007.jsonl").exists()  # --overwrite started from an empty folder


# ----------------------------------------------------------------------------------------------------
# Backends inside a build
# ----------------------------------------------------------------------------------------------------


def write_clips(folder, names, num_frames=17):
    """World clips at 32x32 as mp4, each with a sidecar prompt that names it (`world_prompt`: the fake server's key)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(5)
    for name in names:
        spec = world.sample_clip(rng, 32, 32, num_frames)
        write_video(folder / f"{name}.mp4", world.render(spec), 8)
        prompt = world_prompt(name) if name.startswith("clip-") else world.prompt_text(spec)
        (folder / f"{name}.txt").write_text(f"{prompt}\n")


OPENAI = [
    "data.captioner.backend=openai", f"data.captioner.timeout_s={TIMEOUT}", "data.captioner.max_retries=2",
    "data.captioner.backoff_s=0.01", "data.captioner.length_attempts=2", "data.captioner.concurrency=3",
    "data.captioner.min_caption_tokens=8", "data.captioner.max_caption_tokens=16",
    "data.captioner.max_new_tokens=64", "data.captioner.num_frames=4", "data.captioner.image_size=32",
]


def files_recipe(folder, out, *extra):
    return tiny_recipe("data.generator.backend=files", f"data.generator.path={folder}", "data.prompts=sidecar",
                       "data.num_items=0", f"data.out={out}", *OPENAI, *extra)


# per item: the fake server's behaviour per request, and the outcome of the first build
SCRIPTS = {
    "clip-00": (["good"], "ok", None),
    "clip-01": (["500", "429", "good"], "ok", None),
    "clip-02": (["hang", "good"], "ok", None),
    "clip-03": (["not_json", "good"], "ok", None),
    "clip-04": (["short", "good"], "ok", None),
    "clip-05": (["500"] * 3, "rejected", "http_500"),
    "clip-06": (["hang"] * 3, "rejected", "timeout"),
    "clip-07": (["empty", "no_choices", "not_json"], "rejected", "malformed_reply"),
    "clip-08": (["long", "long"], "rejected", "too_long"),
    "clip-09": (["good"], "ok", None),
}


def test_openai_captioner_in_a_build_loses_nothing_and_a_rerun_retries_only_service_failures(tmp_path):
    folder, out = tmp_path / "clips", tmp_path / "data"
    write_clips(folder, SCRIPTS)
    with FakeChatServer({name: script for name, (script, _, _) in SCRIPTS.items()}) as server:
        first = build_dataset(files_recipe(folder, out, f"data.captioner.base_url={server.url}", "data.shard_size=4"))
    lines = {line.id: line for line in first.lines}
    assert sorted(lines) == sorted(SCRIPTS)  # none lost
    for name, (_, status, reason) in SCRIPTS.items():
        assert (lines[name].status, lines[name].reason) == (status, reason), name
        assert (lines[name].caption is not None) == (status == "ok")
    assert lines["clip-04"].attempts == 2 and lines["clip-08"].attempts == 2 and lines["clip-08"].caption_tokens == 24
    info = json.loads((out / "dataset.json").read_text())
    assert info["pending"] == 3
    assert info["reasons"] == {"http_500": 1, "malformed_reply": 1, "timeout": 1, "too_long": 1}
    cached = {key.split("/")[0] for shard in (out / "shards").glob("*.safetensors") for key in load_file(shard)}
    assert cached == {name for name, (_, status, _) in SCRIPTS.items() if status == "ok"}

    with FakeChatServer(defaultdict(list)) as good:  # answers every request well
        second = build_dataset(files_recipe(folder, out, f"data.captioner.base_url={good.url}", "data.shard_size=4"))
    assert dict(good.requests) == {"clip-05": 1, "clip-06": 1, "clip-07": 1}  # only the service failures
    after = {line.id: line for line in second.lines}
    assert [name for name, line in after.items() if line.status != "ok"] == ["clip-08"]
    assert all(after[name] == lines[name] for name in lines if lines[name].final)  # final outcomes kept
    assert second.made == 3 and json.loads((out / "dataset.json").read_text())["pending"] == 0
    assert len(CachedVideoTextDataset(out, "all")) == 9


def test_a_refused_key_stops_the_build_after_writing_the_shard_and_a_rerun_finishes(tmp_path):
    folder, out = tmp_path / "clips", tmp_path / "data"
    names = [f"clip-{i:02d}" for i in range(6)]
    write_clips(folder, names)
    with FakeChatServer({name: ["401"] * 9 for name in names}) as server:
        with pytest.raises(VigUError, match="refused the API key") as info:
            build_dataset(files_recipe(folder, out, f"data.captioner.base_url={server.url}", "data.shard_size=2"))
    assert "\n" not in str(info.value)
    written = read_lines(out / "shards" / "shard-00000.jsonl")  # the shard in progress was written first
    assert [line.reason for line in written] == ["http_401"] * 2 and not written[0].final
    assert not (out / "shards" / "shard-00001.jsonl").exists() and temporary_files(out) == []
    with FakeChatServer(defaultdict(list)) as good:
        report = build_dataset(files_recipe(folder, out, f"data.captioner.base_url={good.url}", "data.shard_size=2"))
    assert [line.status for line in report.lines] == ["ok"] * 6 and set(good.requests) == set(names)


def test_words_the_model_cannot_read_reject_the_item_and_are_named(tmp_path):
    """A prompt or a caption with words the model's (word-level) vocabulary lacks would train on unknown tokens:
    the item is rejected, for good, with the words named; the prompt's before any video or caption is made."""
    folder, out = tmp_path / "clips", tmp_path / "data"
    write_clips(folder, ["clip-00", "clip-01", "clip-02"])
    (folder / "clip-02.txt").write_text("a cat surfing\n")
    with FakeChatServer(defaultdict(list, {"clip-01": ["foreign"]})) as server:
        report = build_dataset(files_recipe(folder, out, f"data.captioner.base_url={server.url}"))
    lines = {line.id: line for line in report.lines}
    assert {name: (line.status, line.reason) for name, line in lines.items()} == {
        "clip-00": ("ok", None), "clip-01": ("rejected", "caption_unknown_words"),
        "clip-02": ("rejected", "prompt_unknown_words")}
    assert lines["clip-01"].detail == "the model's vocabulary lacks 'surfs', 'wave'" and lines["clip-01"].caption is None
    assert lines["clip-02"].detail == "the model's vocabulary lacks 'cat', 'surfing'" and lines["clip-02"].video is None
    assert dict(server.requests) == {"clip-00": 1, "clip-01": 1}  # the unreadable prompt is never captioned
    assert [item_id for item_id, _ in CachedVideoTextDataset(out, "all").items] == ["clip-00"]
    assert not any(is_retryable(line.reason) for line in report.lines)  # a rerun keeps both rejections
    console = Console(record=True, width=250)
    console.print(summary_table(report))
    text = console.export_text()
    assert "prompt_unknown_words" in text and "the model's vocabulary lacks 'cat', 'surfing'" in text


def test_files_generator_skips_a_corrupt_or_short_video_by_name(tmp_path):
    folder, out = tmp_path / "clips", tmp_path / "data"
    good, short, broken, unprompted = ["clip-10", "clip-11", "clip-12"], "clip-13", "clip-14", "clip-15"
    write_clips(folder, good)
    write_clips(folder, [short], num_frames=5)
    (folder / f"{broken}.mp4").write_bytes(os.urandom(3000))
    (folder / f"{broken}.txt").write_text(f"{world_prompt(broken)}\n")
    write_video(folder / f"{unprompted}.mp4", world.render(world.sample_clip(np.random.default_rng(1), 32, 32, 17)), 8)
    wordy = "clip-16"
    write_clips(folder, [wordy])
    (folder / f"{wordy}.txt").write_text(f"a red circle {'and a red circle ' * 5}moving left\n")
    with FakeChatServer(defaultdict(list)) as server:
        report = build_dataset(files_recipe(folder, out, f"data.captioner.base_url={server.url}"))
    lines = {line.id: line for line in report.lines}
    assert [lines[name].status for name in good] == ["ok"] * 3
    assert {name: (lines[name].status, lines[name].reason) for name in (broken, short, unprompted)} == {
        broken: ("skipped", "unreadable_video"), short: ("skipped", "too_few_frames"),
        unprompted: ("skipped", "no_prompt")}
    assert str(folder / f"{broken}.mp4") in lines[broken].detail and "cannot be read" in lines[broken].detail
    assert "has 5 frames, fewer than the 9 needed" in lines[short].detail
    assert lines[good[0]].source == str(folder / f"{good[0]}.mp4") and lines[good[0]].prompt_from == f"{good[0]}.txt"
    assert (lines[wordy].status, lines[wordy].reason, lines[wordy].prompt_tokens) == ("rejected", "prompt_too_long", 25)
    assert lines[wordy].video is None  # the prompt rule comes before any video
    assert set(server.requests) == set(good)  # skipped and rejected items are never captioned
    dataset = CachedVideoTextDataset(out, "all")
    assert [item_id for item_id, _ in dataset.items] == good
    assert dataset[0]["latents"].shape == (48, 3, 8, 8)  # resized and frame-sampled to the model's 16x16x9
    assert read_video(out / lines[good[0]].video).shape == (9, 16, 16, 3)

    console = Console(record=True, width=250)
    console.print(summary_table(report))
    text = console.export_text()
    assert "unreadable_video" in text and f"{broken}.mp4" in text and "too_few_frames" in text and "no_prompt" in text


def test_transformers_captioner_in_a_build(tiny_vlm, tmp_path):  # noqa: F811 (fixture)
    recipe = tiny_recipe(
        "data.num_items=6", "data.shard_size=3", f"data.out={tmp_path}", "data.captioner.backend=transformers",
        f"data.captioner.model_path={tiny_vlm}", "data.captioner.num_frames=2", "data.captioner.image_size=28",
        "data.captioner.temperature=0", "data.captioner.max_new_tokens=32", "data.captioner.min_caption_tokens=2",
        "data.captioner.length_attempts=2", "data.captioner.device=cpu", "data.captioner.dtype=float32",
    )
    report = build_dataset(recipe)
    assert len(report.lines) == 6
    ok = [line for line in report.lines if line.status == "ok"]
    rejected = [line for line in report.lines if line.status == "rejected"]
    assert ok and len(ok) + len(rejected) == 6
    assert all(2 <= line.caption_tokens <= 31 for line in ok)
    assert all(line.reason in ("too_short", "too_long") and line.attempts == 2 for line in rejected)
    dataset = CachedVideoTextDataset(tmp_path, "all")
    pipe = pipeline_from_recipe(recipe)
    for i, line in enumerate(ok):
        assert torch.equal(dataset[i]["caption_ids"], pipe.text_ids([line.caption])[0])


def test_wan_generator_with_a_tiny_stock_folder_and_a_prompts_file(tiny_wan_vae_dir, tmp_path):
    """The Wan recipes' combination: a .txt of prompts -> WanPipeline from a local folder -> an openai captioner."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{world_prompt('clip-00')}\n\n{world_prompt('clip-01')}\n{world_prompt('clip-02')}\n")
    with FakeChatServer(defaultdict(list)) as server:
        recipe = tiny_recipe(
            f"model.base={tiny_wan_vae_dir}", "data.generator.backend=wan", "data.generator.steps=2",
            "data.generator.batch_size=2", f"data.prompts={prompts}", "data.num_items=0", "data.shard_size=2",
            f"data.out={tmp_path / 'data'}", *OPENAI, f"data.captioner.base_url={server.url}", base=TINY_WAN_VAE,
        )
        report = build_dataset(recipe)
    assert [line.status for line in report.lines] == ["ok"] * 3
    assert [line.prompt_from for line in report.lines] == ["prompts.txt:1", "prompts.txt:3", "prompts.txt:4"]
    assert [line.id for line in report.lines] == ["000000", "000001", "000002"]
    dataset = CachedVideoTextDataset(tmp_path / "data", "all")
    assert dataset[0]["latents"].shape == (16, 3, 4, 4)
    assert read_video(tmp_path / "data" / "videos" / "000002.mp4").shape == (9, 32, 32, 3)

    # item 2 (alone in its batch) is WanPipeline's video for its prompt and its own seed, encoded
    from diffusers import WanPipeline

    wan = WanPipeline.from_pretrained(tiny_wan_vae_dir, local_files_only=True)
    video = wan(report.lines[2].prompt, negative_prompt="", height=32, width=32, num_frames=9, num_inference_steps=2,
                guidance_scale=5.0, generator=torch.Generator().manual_seed(video_seed(0, 2)), output_type="np",
                max_sequence_length=32).frames[0]
    frames = (video * 255).round().clip(0, 255).astype(np.uint8)
    pipe = load_pipeline(tiny_wan_vae_dir, recipe, transformer=None)
    assert torch.equal(dataset[2]["latents"], pipe.encode_video(frames_to_tensor(frames)[None])[0])


# ----------------------------------------------------------------------------------------------------
# Bad inputs: one line, exit 1
# ----------------------------------------------------------------------------------------------------


def run_cli(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["vigu", "build-dataset", *args])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    captured = capsys.readouterr()
    return exit_info.value.code, captured.err.strip().splitlines(), captured.out


TRANSFORMERS = ["--set", "data.captioner.backend=transformers", "--set", "data.captioner.model_path=/nowhere"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--set", "data.captioner.backend=openai", "--set", "data.captioner.max_caption_tokens=31",
          "--set", "data.captioner.base_url=http://127.0.0.1:{port}/v1"],
         "error: caption endpoint http://127.0.0.1:{port}/v1 is unreachable"),
        (["--set", "data.captioner.backend=openai", "--set", "data.captioner.max_caption_tokens=31",
          "--set", "data.captioner.base_url=localhost:{port}"],
         "error: data.captioner.base_url 'localhost:{port}' is not an http(s) URL: write it whole"),
        (["--set", "data.prompts=/nowhere/prompts.txt", "--set", "data.generator.backend=wan", *TRANSFORMERS],
         "error: prompts file /nowhere/prompts.txt not found: set data.prompts"),
        (["--set", "data.generator.backend=files", "--set", "data.generator.path=/nowhere", "--set",
          "data.prompts=sidecar", *TRANSFORMERS], "error: videos folder '/nowhere' not found"),
        (["--set", "data.captioner.concurency=3"], "error: unknown recipe key 'data.captioner.concurency' in "
         "data.captioner: did you mean 'concurrency'?"),
        (["--set", "model.base=/nowhere/Wan2.1"], "error: model folder /nowhere/Wan2.1 does not exist"),
        (["--set", "data.generator.backend=wan", "--set", "data.generator.path=/nowhere/Wan2.1-14B", *TRANSFORMERS],
         "error: generator folder /nowhere/Wan2.1-14B not found"),
        (["--set", "data.generator.backend=wan", "--set", "data.generator.path={file}", *TRANSFORMERS],
         "error: generator folder {file} is a file: set data.generator.path to a local Wan2.1 diffusers folder"),
        (["--set", "data.generator.backend=vigu"], "error: data.captioner.backend=world writes the ground truth of the "
         "clips the world renders"),
        (["--set", "data.captioner.backend=transformers", "--set", "data.captioner.model_path=/nowhere/VLM"],
         "error: captioner model folder /nowhere/VLM not found"),
        (["--set", "data.prompts=/nowhere/prompts.txt"], "error: data.generator.backend=world renders the world"),
        (["--set", "data.max_prompt_tokens=32"], "error: data.max_prompt_tokens=32 leaves no room for EOS"),
    ],
)
def test_bad_inputs_are_one_line_and_exit_1(monkeypatch, capsys, tmp_path, args, message):
    names = {"port": free_closed_port(), "file": __file__}
    args = [arg.format(**names) for arg in args]
    code, err, out = run_cli(monkeypatch, capsys, "--out", str(tmp_path / "data"), *args)
    assert code == 1 and len(err) == 1 and err[0].startswith(message.format(**names)), err
    assert out == "" and not (tmp_path / "data").exists()  # found before anything was written


def test_a_folder_that_is_not_a_dataset_is_refused_even_with_overwrite(monkeypatch, capsys, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    code, err, _ = run_cli(monkeypatch, capsys, "--out", str(tmp_path), "-n", "2", "--overwrite")
    assert code == 1
    assert err == [f"error: {tmp_path} exists and is not a vigu dataset: give another folder with --out"]
    assert (tmp_path / "notes.txt").exists()


def test_prompt_sources_give_ids_prompts_and_where_they_came_from(tmp_path):
    model = load_recipe("world-tiny").model
    data = load_recipe("world-tiny", ["data.generator.backend=wan", "data.num_items=0"]).data
    (tmp_path / "p.txt").write_text("first prompt\n\n  second prompt  \n")
    data.prompts = str(tmp_path / "p.txt")
    assert [(i.id, i.prompt, i.prompt_from) for i in plan_items(data, model)] == [
        ("000000", "first prompt", "p.txt:1"), ("000001", "second prompt", "p.txt:3")]
    (tmp_path / "p.jsonl").write_text('{"prompt": "a", "id": "cat"}\n{"prompt": "b"}\n')
    data.prompts, data.num_items = str(tmp_path / "p.jsonl"), 5
    assert [(i.index, i.id, i.prompt) for i in plan_items(data, model)] == [(0, "cat", "a"), (1, "000001", "b")]
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n{"text": "b"}\n')
    data.prompts = str(tmp_path / "bad.jsonl")
    with pytest.raises(VigUError, match='bad.jsonl:2: each line must be a JSON object with a "prompt"'):
        plan_items(data, model)
    (tmp_path / "empty.txt").write_text("\n  \n")
    data.prompts = str(tmp_path / "empty.txt")
    with pytest.raises(VigUError, match="empty.txt holds no prompts"):
        plan_items(data, model)
    (tmp_path / "twice.jsonl").write_text('{"prompt": "a", "id": "x"}\n{"prompt": "b", "id": "x"}\n')
    data.prompts = str(tmp_path / "twice.jsonl")
    with pytest.raises(VigUError, match="item id 'x' appears twice"):
        plan_items(data, model)

    videos = tmp_path / "videos"
    write_clips(videos, ["b-clip", "a-clip", "c-clip"])
    (videos / "a-clip.txt").unlink()
    (tmp_path / "by-id.jsonl").write_text('{"id": "a-clip", "prompt": "from the jsonl"}\n'
                                          '{"id": "c-clip.mp4", "prompt": "named with its extension"}\n')
    data.generator.backend, data.generator.path, data.num_items = "files", str(videos), 0
    data.prompts = str(tmp_path / "by-id.jsonl")
    assert [(i.id, i.prompt, i.prompt_from, Path(i.source).name) for i in plan_items(data, model)] == [
        ("a-clip", "from the jsonl", "by-id.jsonl:1", "a-clip.mp4"), ("b-clip", None, "none", "b-clip.mp4"),
        ("c-clip", "named with its extension", "by-id.jsonl:2", "c-clip.mp4")]
    data.prompts = "sidecar"
    sidecars = [(i.prompt is None, i.prompt_from) for i in plan_items(data, model)]
    assert sidecars == [(True, "none"), (False, "b-clip.txt"), (False, "c-clip.txt")]


def test_retryable_reasons_are_the_service_failures():
    assert all(map(is_retryable, ["timeout", "http_503", "http_429", "endpoint_unreachable", "malformed_reply"]))
    final = ["too_long", "too_short", "http_400", "prompt_too_long", "unreadable_video", None]
    assert not any(map(is_retryable, final))


def test_padding_round_trip_is_exact():
    rows = torch.randn(5, 8)
    padded = pad_prompt_embeds(rows, 12)
    assert padded.shape == (12, 8) and torch.equal(padded[:5], rows) and not padded[5:].any()


def test_wan_generator_defaults_to_the_recipe_base_even_the_shipped_world():
    recipe = load_recipe("world-tiny", ["data.generator.backend=wan"])
    generator = make_generator(recipe, torch.device("cpu"), {})
    assert isinstance(generator, WanGenerator)
    assert generator.pipe.transformer.config.num_layers == recipe.model.transformer.num_layers
    for backend in ("wan", "vigu"):
        untrained = load_recipe("world-tiny", [f"data.generator.backend={backend}", "model.base=world"])
        with pytest.raises(VigUError, match="generator folder world not found: set data.generator.path"):
            make_generator(untrained, torch.device("cpu"), {})


def test_vigu_generator_samples_as_the_pipeline_and_measure_captions_what_it_drew(tmp_path):
    """The world's "Wan2.1" sampled by vigu's solver with the recipe's `sampling` section (the clips joint
    generation's text reads), captioned by the measurer: each item's latents are the pipeline's `generate` for
    its prompt and its own seed, whatever the batch, and its caption names what is measured in that clip."""
    recipe = world_recipe(tmp_path / "data", "data.num_items=3", "data.generator.backend=vigu",
                          "data.captioner.backend=measure", "data.generator.batch_size=2", "data.generator.dtype=float32")
    report = build_dataset(recipe)
    pipe = load_pipeline(WORLD_PRETRAINED, recipe, torch_dtype=torch.float32)
    dataset = {item["id"]: item for item in CachedVideoTextDataset(tmp_path / "data", "all")}
    settings = {name: getattr(recipe.sampling, name) for name in SAMPLING_SETTINGS}
    for line in report.lines:
        video = pipe.generate(line.prompt, generator=torch.Generator().manual_seed(video_seed(0, line.index)),
                              **settings).videos[0]
        found = world.measure_video(video)
        if line.status != "ok":
            assert line.reason == "unmeasurable" and None in found.values()
            continue
        assert world.parse_caption(line.caption) == found
        assert torch.equal(dataset[line.id]["latents"], pipe.encode_video(frames_to_tensor(video)[None])[0])
    assert sum(line.status == "ok" for line in report.lines) >= 2
