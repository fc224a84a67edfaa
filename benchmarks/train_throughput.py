"""Training throughput: tokens/s reading the build-dataset cache vs encoding on the fly, and MFU.

Measured in one run, on the same model, batch and steps (a world-tiny recall step: video + prompt text):
- cached: `CachedVideoTextDataset` + DataLoader (what `vigu train` does);
- cached, compiled: the same with `torch.compile` of the model (`train.<stage>.compile: true`); its first
  step, which compiles, is timed on its own;
- on the fly: read each clip's mp4, fit it to the model's shape, VAE-encode it, umT5-encode its prompt
  and tokenize it, every step (what training without the cache would do);
- MFU: the model's matmul FLOPs per second over the peak of a large matmul measured in the same run,
  in the precision the step runs in;
- `trainable: text` (eager, cached), with video tokens that attend to the text tokens (the paper) and with
  video tokens that do not (world-tiny's `text.video_attends_text: false`, read through the text's own keys):
  the frozen video stream then needs no backward, and `vigu train` stops it where the text has read it (no
  video prediction or loss: `video_loss_trains`); the last row computes them anyway, as before that.

The rows above the last three train every weight with the paper's attention.

    PYTHONPATH=. python benchmarks/train_throughput.py [--steps 20] [--batch 8] [--threads 2] [--bf16]
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from vigu_cli.build_dataset import build_dataset
from vigu_cli.core.convert import pipeline_from_recipe
from vigu_cli.core.objective import unified_objective
from vigu_cli.data.cache import CachedVideoTextDataset, collate
from vigu_cli.data.manifest import MANIFEST, read_lines
from vigu_cli.data.video_io import frames_to_tensor, load_clip
from vigu_cli.recipe import load_recipe


def matmul_peak(dtype: torch.dtype, size: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def step_flops(model, batch: int, video_tokens: int, text_tokens: int, prompt_tokens: int) -> float:
    """Matmul FLOPs of one forward + backward (x3 the forward): linear layers 2 x params x tokens, self
    attention 4 x tokens^2 x width per layer, cross attention 4 x tokens x prompt x width per layer."""
    cfg = model.config
    width = cfg.num_attention_heads * cfg.attention_head_dim
    tokens = video_tokens + text_tokens
    per_block = 8 * width * width + 2 * width * cfg.ffn_dim * 2  # attn1 + attn2 projections (q,k,v,o), one FFN
    linear = 2 * tokens * per_block * cfg.num_layers
    attention = (4 * tokens * tokens * width + 4 * tokens * prompt_tokens * width) * cfg.num_layers
    return 3 * batch * (linear + attention)


def run(args) -> None:
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="vigu-throughput-"))
    overrides = [f"data.out={work / 'data'}", f"data.num_items={args.batch * 4}", "data.val_every=0",
                 "data.keep_videos=true"]
    paper = ["text.video_attends_text=true", "text.video_keys=video"]  # every token attends to every token
    recipe = load_recipe("world-tiny", [*overrides, *paper])
    build_dataset(recipe)
    pipe = pipeline_from_recipe(recipe)
    model, flow = pipe.transformer.train(), pipe.text_flow
    optimizers = {model: torch.optim.AdamW(model.parameters(), lr=1e-4)}
    text_only = {}  # `trainable: text`, video reading the text or not
    for attends in (True, False):
        copy = pipeline_from_recipe(load_recipe("world-tiny", [*overrides, *(paper if attends else [])]))
        copy = copy.transformer.train()
        names = set(copy.text_parameter_names())
        for name, param in copy.named_parameters():
            param.requires_grad_(name in names)
        optimizers[copy] = torch.optim.AdamW([p for p in copy.parameters() if p.requires_grad], lr=1e-4)
        text_only[attends] = copy
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    m = recipe.model
    lines = [line for line in read_lines(work / "data" / MANIFEST) if line.status == "ok"]

    def train_step(latents, ids, cond, step, forward, core, video_prediction):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            loss, _ = unified_objective(forward, flow, recipe.flow, latents.float(), ids, cond,
                                        torch.Generator().manual_seed(step), core=core,
                                        video_prediction=video_prediction)
        loss.backward()
        optimizers[core].step()
        optimizers[core].zero_grad()

    def cached_batches():
        loader = DataLoader(CachedVideoTextDataset(work / "data", "all"), batch_size=args.batch, shuffle=True,
                            drop_last=True, collate_fn=collate)
        while True:
            for batch in loader:
                yield batch["latents"], batch["prompt_ids"], batch["prompt_embeds"]

    def on_the_fly_batches():
        while True:
            for i in range(0, len(lines) - args.batch + 1, args.batch):
                chunk = lines[i : i + args.batch]
                clips = torch.stack([frames_to_tensor(load_clip(work / "data" / line.video, m.num_frames, m.height, m.width))
                                     for line in chunk])
                prompts = [line.prompt for line in chunk]
                yield pipe.encode_video(clips), pipe.text_ids(prompts), pipe.encode_condition(prompts, "cpu")

    results = {}
    runs = (("cached", cached_batches(), model, model, True),
            ("on the fly", on_the_fly_batches(), model, model, True),
            ("compiled", cached_batches(), torch.compile(model), model, True),
            ("text, v<-t", cached_batches(), text_only[True], text_only[True], True),
            ("text, v-/-t", cached_batches(), text_only[False], text_only[False], False),
            ("text, v-/-t, video predicted", cached_batches(), text_only[False], text_only[False], True))
    for name, source, forward, core, video_prediction in runs:
        latents, ids, cond = next(source)
        start = time.perf_counter()
        train_step(latents, ids, cond, 0, forward, core, video_prediction)  # warm-up (compiled: the compile)
        first = time.perf_counter() - start
        start = time.perf_counter()
        for step in range(args.steps):
            latents, ids, cond = next(source)
            train_step(latents, ids, cond, step + 1, forward, core, video_prediction)
        seconds = (time.perf_counter() - start) / args.steps
        video_tokens = math.prod(latents.shape[2:]) // math.prod(model.config.patch_size)
        results[name] = (seconds, video_tokens, ids.shape[1], cond.shape[1], first)

    peak = matmul_peak(dtype)
    print(f"world-tiny recall step, batch {args.batch}, {args.threads} thread(s), {'bf16 autocast' if args.bf16 else 'fp32'}, "
          f"{args.steps} steps each (after one warm-up)")
    for name, (seconds, video_tokens, text_tokens, prompt_tokens, first) in results.items():
        tokens = args.batch * (video_tokens + text_tokens)
        flops = step_flops(model, args.batch, video_tokens, text_tokens, prompt_tokens)
        mfu = f"MFU {flops / seconds / peak:6.1%}" if name in ("cached", "on the fly", "compiled") else " " * 10
        print(f"  {name:28s} {seconds:7.3f} s/step  {tokens / seconds:9.0f} tokens/s  {mfu}"
              f"  (first step {first:.1f} s)")
    step = {name: row[0] for name, row in results.items()}  # seconds per step, by run
    print(f"  cached / on the fly speed-up: {step['on the fly'] / step['cached']:.2f}x")
    print(f"  compiled / eager speed-up (cached): {step['cached'] / step['compiled']:.2f}x")
    print(f"  trainable text, video not attending / attending to text: {step['text, v<-t'] / step['text, v-/-t']:.2f}x")
    print("  trainable text, video not attending, stopped where the text read it / predicted: "
          f"{step['text, v-/-t, video predicted'] / step['text, v-/-t']:.2f}x")
    print(f"  matmul peak ({'bf16' if args.bf16 else 'fp32'}, 2048^3, same run): {peak / 1e9:.0f} GFLOP/s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (AMX on recent Xeons)")
    run(parser.parse_args())
