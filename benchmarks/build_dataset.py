"""`vigu build-dataset` throughput, and what the cache saves training, measured in one run on the CPU.

1. Build: world clips per second through `build_dataset` (render, caption, cache, mp4), with and without
   the mp4s: per second of wall time with one torch thread, and per CPU-second (this process and the ffmpeg
   processes that encode the mp4s), after the set-up; and the cost of each step per clip.
2. Read: a training-style pass over the items (a DataLoader, batches of 8, one process) from the cache
   (`CachedVideoTextDataset`) against doing the same work on the fly (read the mp4, VAE-encode it, encode
   the prompt, tokenize prompt and caption), for the world's patch autoencoder and for a tiny real
   `AutoencoderKLWan` (base_dim 8) at the same 32x32x17 canvas. Printed as speed-up ratios; for scale,
   the VAE encode alone at Wan2.1's real VAE width.

    PYTHONPATH=. python benchmarks/build_dataset.py [--items 128] [--threads 1] [--quick]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from vigu_cli.build_dataset import build_dataset
from vigu_cli.core.convert import pipeline_from_recipe
from vigu_cli.data import world
from vigu_cli.data.cache import CachedVideoTextDataset, collate, item_tensors
from vigu_cli.data.manifest import read_lines
from vigu_cli.data.video_io import frames_to_tensor, read_video, write_video
from vigu_cli.recipe import load_recipe
from vigu_cli.synth.captioners import CaptionItem, make_captioner

# world-tiny with diffusers' AutoencoderKLWan (random weights: timing does not depend on them)
KL_WAN = ["model.vae.kind=wan", "model.vae.base_dim=8", "model.vae.z_dim=16", "model.transformer.in_channels=16",
          "model.transformer.out_channels=16", "model.transformer.patch_size=[1,2,2]"]


def timed(fn, repeats: int) -> float:
    """Median seconds of `fn()` over `repeats` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the ffmpeg encoders), user + system."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def build(root: Path, items: int, keep_videos: bool) -> tuple[float, float]:
    """(wall, CPU) seconds of a fresh world-tiny build of `items` clips."""
    recipe = load_recipe("world-tiny", [f"data.num_items={items}", f"data.keep_videos={keep_videos}",
                                        f"data.out={root / f'build-{items}-{keep_videos}'}"])
    wall, cpu = time.perf_counter(), cpu_seconds()
    build_dataset(recipe)
    return time.perf_counter() - wall, cpu_seconds() - cpu


def build_rate(root: Path, items: int) -> None:
    print(f"1. build: world clips (world-tiny, 32x32x17), a build of {items} minus a build of 1 (the set-up)")
    for keep in (True, False):
        (wall_1, cpu_1), (wall_n, cpu_n) = build(root, 1, keep), build(root, items, keep)
        clips = items - 1
        print(f"   {'with mp4s' if keep else 'no mp4s  '}: {clips / (wall_n - wall_1):6.1f} clips/s wall, "
              f"{clips / (cpu_n - cpu_1):6.1f} clips per CPU-second (ffmpeg included); set-up {wall_1:.1f} s")

    recipe = load_recipe("world-tiny")
    pipe = pipeline_from_recipe(recipe)
    captioner = make_captioner(recipe.data.captioner, pipe.text_tokenizer)
    spec = world.sample_clip(np.random.default_rng(0), 32, 32, 17)
    frames, prompt = world.render(spec), world.prompt_text(spec)
    caption = world.caption_text(spec, np.random.default_rng(0))
    path = root / "one.mp4"
    steps = {
        "sample + render": lambda: world.render(world.sample_clip(np.random.default_rng(1), 32, 32, 17)),
        "caption (world)": lambda: captioner.caption_batch([CaptionItem("x", prompt, frames, spec)]),
        "cache tensors": lambda: item_tensors(pipe, "x", frames, prompt, caption, "float32", "float32"),
        "mp4 write": lambda: write_video(path, frames, 8),
    }
    print("   per clip, median ms:", ", ".join(f"{name} {timed(fn, 30) * 1e3:.1f}" for name, fn in steps.items()))


def read_speedup(root: Path, items: int, name: str, overrides: list[str]) -> float:
    """Print both read rates and their ratio; return seconds per item read from the cache."""
    recipe = load_recipe("world-tiny", [*overrides, f"data.num_items={items}", f"data.out={root / name}",
                                        "data.val_every=0"])
    build_dataset(recipe)
    pipe = pipeline_from_recipe(recipe)
    lines = read_lines(root / name / "manifest.jsonl")

    class OnTheFly(torch.utils.data.Dataset):
        """What training would do without the cache: decode the mp4, encode video and prompt, tokenize."""

        def __len__(self):
            return len(lines)

        def __getitem__(self, i):
            line = lines[i]
            video = frames_to_tensor(read_video(root / name / line.video))[None]
            prompt_ids, caption_ids = pipe.text_ids([line.prompt, line.caption])
            return {"id": line.id, "latents": pipe.encode_video(video)[0],
                    "prompt_embeds": pipe.encode_condition([line.prompt], "cpu")[0],
                    "prompt_ids": prompt_ids, "caption_ids": caption_ids}

    def epoch(dataset):
        for batch in DataLoader(dataset, batch_size=8, collate_fn=collate):
            assert batch["latents"].shape[0] == 8

    cached = CachedVideoTextDataset(root / name, "all")
    assert cached[0]["latents"].shape == OnTheFly()[0]["latents"].shape
    on_the_fly_s, cached_s = timed(lambda: epoch(OnTheFly()), 2), timed(lambda: epoch(cached), 5)
    shape = list(cached[0]["latents"].shape)
    print(f"   {name:24} latents {shape}: on the fly {items / on_the_fly_s:6.1f} items/s, from the cache "
          f"{items / cached_s:8.1f} items/s, speed-up x{on_the_fly_s / cached_s:.0f}")
    return cached_s / items


def real_vae_encode_seconds() -> float:
    """One 32x32x17 clip through an AutoencoderKLWan of Wan2.1's real width (diffusers' defaults)."""
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan().eval()
    video = frames_to_tensor(world.render(world.sample_clip(np.random.default_rng(0), 32, 32, 17)))[None]
    with torch.no_grad():
        return timed(lambda: vae.encode(video), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=128, help="clips per build (default 128)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: per core)")
    parser.add_argument("--quick", action="store_true", help="32 clips")
    args = parser.parse_args()
    items = 32 if args.quick else args.items
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} torch thread(s), {os.cpu_count()} CPU(s) visible, device cpu")
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        build_rate(root, items)
        print(f"2. read: one pass over {items} items, DataLoader batch 8, one process")
        read_speedup(root, items, "world autoencoder", [])
        cached_s = read_speedup(root, items, "AutoencoderKLWan (tiny)", KL_WAN)
        encode_s = real_vae_encode_seconds()
        print(f"   for scale: Wan2.1's real VAE width (base_dim 96, 127M parameters) encodes one such clip in "
              f"{encode_s:.2f} s, x{encode_s / cached_s:.0f} the time of reading an item from the cache")


if __name__ == "__main__":
    main()
