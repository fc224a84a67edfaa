"""Forward-time overhead of UniViGUTransformer against the stock diffusers WanTransformer3DModel.

Prints, per architecture, measured in one run on the same inputs after a warm-up, the median over
repeats (the headline) and the minimum (the run least disturbed by other processes on a shared machine):
  no text  UniViGU forward with `text_states=None` / stock Wan forward          (target <= 1.01)
  0 text   UniViGU forward through the joint path with 0 text tokens / stock  (information)
  N text   (UniViGU forward with N text tokens / stock) / FLOP-expected ratio (target <= 1.05)
The FLOP-expected ratio counts matmul FLOPs from token counts: linear layers scale with tokens,
attention with tokens^2 (self) and tokens x prompt tokens (cross).

Architectures: world-tiny (the recipe's transformer) and Wan2.1-T2V-1.3B (the recipe's transformer at
reduced depth and token count, to fit a small CPU). Random weights: timing does not depend on them.

    PYTHONPATH=. python benchmarks/model_overhead.py [--quick] [--threads 1]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import time

import torch
from diffusers import WanTransformer3DModel

from vigu_cli.core.convert import text_stream_config
from vigu_cli.core.model import UniViGUTransformer
from vigu_cli.recipe import load_recipe


def matmul_flops(arch: dict, video_tokens: int, text_tokens: int, prompt_tokens: int, text_width: int) -> float:
    """Forward FLOPs (2 per multiply-add) of the matmuls of one forward pass. `arch` may carry the text stream's
    layout (`video_attends_text`, `text_video_keys`, `text_cross_attention`; default: the paper's joint attention)."""
    d, ffn, layers = arch["num_attention_heads"] * arch["attention_head_dim"], arch["ffn_dim"], arch["num_layers"]
    n, t = video_tokens, text_tokens
    s = n + t
    joint = arch.get("video_attends_text", True)
    per_layer = (
        2 * s * 4 * d * d  # attn1 q, k, v, out
        + (4 * s * s * d if joint else 4 * n * n * d + 4 * t * s * d)  # attn1 scores and weighted sum
        + 2 * s * 2 * d * d  # attn2 q, out
        + 2 * prompt_tokens * 2 * d * d  # attn2 k, v of the prompt
        + 4 * s * prompt_tokens * d  # attn2 scores and weighted sum
        + 2 * s * 2 * d * ffn  # ffn (video) / ffn_text (text), same width
    )
    if t:  # the text's own projections of what the video tokens and the prompt offer it
        per_layer += 2 * n * 2 * d * d * (not joint and arch.get("text_video_keys") == "text")
        per_layer += 2 * prompt_tokens * 2 * d * d * (arch.get("text_cross_attention") == "own")
    patch_values = arch["in_channels"] * math.prod(arch["patch_size"])
    outside = (
        2 * video_tokens * 2 * d * patch_values  # patch embedding, proj_out
        + 2 * prompt_tokens * (arch["text_dim"] * d + d * d)  # prompt embedder
        + 2 * text_tokens * 2 * d * text_width  # text_in, text_out
    )
    return layers * per_layer + outside


def text_only_flops(arch: dict, video_tokens: int, text_tokens: int, prompt_tokens: int, text_width: int) -> float:
    """Forward FLOPs of the matmuls of a text-only forward over a `VideoContext` (a video that does not attend
    to the text, computed before, with the keys and values the text reads of it and of the prompt, as sampling
    keeps them): the text tokens' own and their attention over video + text keys and over the prompt."""
    d, ffn, layers = arch["num_attention_heads"] * arch["attention_head_dim"], arch["ffn_dim"], arch["num_layers"]
    n, t = video_tokens, text_tokens
    per_layer = (
        2 * t * 4 * d * d  # attn1 q, k, v, out of the text
        + 4 * t * (n + t) * d  # the text's scores and weighted sum over [video ; text]
        + 2 * t * 2 * d * d + 4 * t * prompt_tokens * d  # attn2: the text's q and out, its scores over the prompt
        + 2 * t * 2 * d * ffn  # ffn_text
    )
    outside = 2 * t * 2 * d * text_width  # text_in and text_out
    return layers * per_layer + outside


def bench(name: str, arch: dict, text: dict, video_shape: tuple, text_tokens: int, prompt_tokens: int, repeats: int):
    torch.manual_seed(0)
    stock = WanTransformer3DModel(**arch).eval()
    model = UniViGUTransformer.from_wan(stock, **text).eval()
    video = torch.randn(1, arch["in_channels"], *video_shape)
    timestep = torch.tensor([500.0])
    prompt = torch.randn(1, prompt_tokens, arch["text_dim"])
    d_t = text["text_latent_dim"]
    text_states, no_text = torch.randn(1, text_tokens, d_t), torch.randn(1, 0, d_t)
    p_t, p_h, p_w = arch["patch_size"]
    video_tokens = video_shape[0] // p_t * (video_shape[1] // p_h) * (video_shape[2] // p_w)

    runs = {
        "stock": lambda: stock(video, timestep, prompt),
        "no text": lambda: model(video, timestep, prompt),
        "0 text": lambda: model(video, timestep, prompt, text_states=no_text, timestep_text=timestep),
        "N text": lambda: model(video, timestep, prompt, text_states=text_states, timestep_text=timestep),
    }
    times = {key: [] for key in runs}
    with torch.no_grad():
        for fn in runs.values():  # warm-up
            fn()
        for _ in range(repeats):  # interleaved, so drift in machine load hits every variant alike
            for key, fn in runs.items():
                start = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - start)
    layout = {**arch, **text}
    expected = matmul_flops(layout, video_tokens, text_tokens, prompt_tokens, d_t) / matmul_flops(
        layout, video_tokens, 0, prompt_tokens, d_t
    )
    n_stock = sum(p.numel() for p in stock.parameters())
    n_model = sum(p.numel() for p in model.parameters())
    print(
        f"{name}: {arch['num_layers']} layers, width {arch['num_attention_heads'] * arch['attention_head_dim']}, "
        f"{video_tokens} video tokens, {text_tokens} text tokens, {prompt_tokens} prompt tokens; "
        f"params {n_stock / 1e6:.1f}M stock, {n_model / 1e6:.1f}M unified; {repeats} repeats"
    )
    labels = [
        "stock forward, ms",
        "no text / stock (target <= 1.01)",
        "0 text / stock (joint path)",
        f"N text / stock (FLOP-expected {expected:.3f})",
        "N text / FLOP-expected (target <= 1.05)",
    ]
    columns = []
    for stat in (statistics.median, min):
        t = {key: stat(v) for key, v in times.items()}
        n_text = t["N text"] / t["stock"]
        no_text, empty_text = t["no text"] / t["stock"], t["0 text"] / t["stock"]
        columns.append([t["stock"] * 1e3, no_text, empty_text, n_text, n_text / expected])
    print(f"  {'':42} {'median':>8} {'min':>8}")
    for label, median_value, min_value in zip(labels, *columns):
        print(f"  {label:42} {median_value:8.3f} {min_value:8.3f}")


def arch_of(recipe_name: str, **changes) -> tuple[dict, dict]:
    recipe = load_recipe(recipe_name)
    arch = dataclasses.asdict(recipe.model.transformer)
    arch["patch_size"] = tuple(arch["patch_size"])
    arch.update(changes)
    # E is not used by the forward pass; its size does not matter here
    text = {**text_stream_config(recipe, 1000), "text_formulation": "embedding"}
    return arch, text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats and tokens (about 20 s on 2 cores)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: steadier timings)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), device cpu")

    world = load_recipe("world-tiny")
    arch, text = arch_of("world-tiny")
    fold = world.model.vae
    video_shape = (
        1 + (world.model.num_frames - 1) // fold.temporal_fold,
        world.model.height // fold.spatial_fold,
        world.model.width // fold.spatial_fold,
    )
    bench("world-tiny", arch, text, video_shape, world.text.max_length, world.model.prompt_max_length,
          repeats=15 if args.quick else 50)

    # Wan2.1-T2V-1.3B blocks at 2 layers; 4 x 32 x 32 latent = 1,024 video tokens (quick: 512), 1/8 as many text
    # tokens (the full model: 32,760 video and 256 text tokens; the prompt is always 512).
    arch, text = arch_of("wan2.1-t2v-1.3b", num_layers=2)
    video_shape = (2, 32, 32) if args.quick else (4, 32, 32)
    text_tokens = 64 if args.quick else 128
    bench("wan2.1-t2v-1.3b (2 layers)", arch, text, video_shape, text_tokens, 512, repeats=3 if args.quick else 7)


if __name__ == "__main__":
    main()
