"""Seconds per solver step of `caption`, `generate` and `joint`, against a stock Wan text-to-video step.

For each architecture, in one run on the same shapes, after a warm-up, interleaved repeats:
  stock Wan T2V step  diffusers `WanTransformer3DModel` (the same weights, text dropped) called twice,
                      conditional and unconditional (classifier-free guidance), plus the Euler update
  caption             `UniViGUPipeline.caption` (no hint: the empty prompt, so one forward per step; with
                      `video_attends_text: false` the video is computed once and each step runs the text alone)
  generate            `UniViGUPipeline.generate` (the prompt frozen in the text stream, none where the video
                      does not attend to the text; guidance: two forwards)
  joint               `UniViGUPipeline.joint` (both streams flow; guidance: two forwards, the unconditional
                      one without the unguided text where the video does not attend to the text)
A step's time is the interval between two of the pipeline's step callbacks (prompt encoding, the VAE
and the first step are left out); the headline is the median over steps and repeats, `min` the least
disturbed step on a shared machine; ratio = mode step / stock step. `FLOP-expected` is that ratio
predicted from matmul FLOPs alone (forwards per step, video + text tokens; `model_overhead.py`'s count).

Architectures (random weights: timing does not depend on them; the recipe's sampling defaults):
  world-tiny          the recipe as it is (its video does not attend to the text)
  wan2.1-t2v-1.3b     the recipe's transformer at 2 layers, a reduced canvas (13 x 256 x 256 -> 1,024
                      video tokens; --quick: 13 x 128 x 256 -> 512), 128 text tokens (--quick: 64), the
                      512-token prompt; a tiny umT5 of width 4096 and a tiny AutoencoderKLWan stand in
                      for the real ones, which no step calls; the paper's attention (the Wan recipes'), then
                      with `text.video_attends_text: false`.

    PYTHONPATH=. python benchmarks/sampling.py [--quick] [--threads 1] [--world-only]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from benchmarks.model_overhead import matmul_flops, text_only_flops
from vigu_cli.core.convert import pipeline_from_recipe, wan_from_vigu
from vigu_cli.recipe import load_recipe
from vigu_cli.sampling import quiet_libraries

PROMPT = "a red circle moving left"

WAN_13B_AT_2_LAYERS = [  # the 1.3B transformer (wan2.1-t2v-1.3b.yaml) with world stand-ins for umT5 and the VAE
    "model.base=world", "model.transformer.patch_size=[1,2,2]", "model.transformer.num_attention_heads=12",
    "model.transformer.attention_head_dim=128", "model.transformer.in_channels=16",
    "model.transformer.out_channels=16", "model.transformer.text_dim=4096", "model.transformer.freq_dim=256",
    "model.transformer.ffn_dim=8960", "model.transformer.num_layers=2",
    "model.text_encoder.d_model=4096", "model.text_encoder.d_kv=64", "model.text_encoder.num_heads=2",
    "model.text_encoder.d_ff=64", "model.text_encoder.num_layers=1", "model.text_encoder.max_length=512",
    "model.prompt_max_length=512", "model.vae.kind=wan", "model.vae.base_dim=8", "model.vae.z_dim=16",
    "model.num_frames=13", "model.fps=16", "text.latent_dim=64",
    "sampling.guidance_video=5.0", "sampling.guidance_text=1.0",
]


def step_times(run) -> list[float]:
    """Seconds between consecutive step callbacks of one call of `run(callback)`."""
    stamps: list[float] = []
    run(lambda step, total: stamps.append(time.perf_counter()))
    return list(np.diff(stamps))


def bench(name: str, pipe, steps: int, repeats: int) -> None:
    stock = wan_from_vigu(pipe).transformer.eval()
    cfg = pipe.config
    guidance = cfg.guidance_video
    condition = pipe.encode_condition([PROMPT], "cpu")
    uncondition = pipe.encode_condition([""], "cpu")
    clip = torch.rand(1, 3, cfg.num_frames, cfg.height, cfg.width) * 2 - 1
    generator = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    latents = pipe.prepare_latents(1, pipe.transformer.config.in_channels, cfg.height, cfg.width, cfg.num_frames,
                                   torch.float32, "cpu", generator())
    timestep = torch.tensor([500.0])

    def stock_steps(callback):
        x = latents
        for i in range(steps):
            cond = stock(x, timestep, condition, return_dict=False)[0]
            uncond = stock(x, timestep, uncondition, return_dict=False)[0]
            x = x - 0.01 * (uncond + guidance * (cond - uncond))
            callback(i + 1, steps)

    runs = {
        "stock Wan T2V step (CFG)": stock_steps,
        "caption": lambda cb: pipe.caption(clip, generator=generator(), callback=cb, steps=steps,
                                           caption_candidates=1),  # one caption: one text stream per step
        "generate": lambda cb: pipe.generate(PROMPT, generator=generator(), callback=cb, steps=steps, output_type="latent"),
        "joint": lambda cb: pipe.joint(PROMPT, generator=generator(), callback=cb, steps=steps, output_type="latent"),
    }
    times = {key: [] for key in runs}
    with torch.no_grad():
        for run in runs.values():  # warm-up
            run(lambda step, total: None)
        for _ in range(repeats):  # interleaved, so drift in machine load hits every variant alike
            for key, run in runs.items():
                times[key] += step_times(run)

    arch = pipe.transformer.config
    p_t, p_h, p_w = arch.patch_size
    video_tokens = latents.shape[2] // p_t * (latents.shape[3] // p_h) * (latents.shape[4] // p_w)
    print(
        f"{name}: {arch.num_layers} layers, width {arch.num_attention_heads * arch.attention_head_dim}, "
        f"{video_tokens} video tokens, {cfg.text_max_length} text tokens, {cfg.prompt_max_length} prompt tokens; "
        f"batch 1, guidance video {guidance} / text {cfg.guidance_text}; {steps} steps x {repeats} repeats"
    )
    sizes = (video_tokens, cfg.text_max_length, cfg.prompt_max_length, arch.text_latent_dim)
    video_only, with_text = matmul_flops(dict(arch), sizes[0], 0, *sizes[2:]), matmul_flops(dict(arch), *sizes)
    guided = 2 if max(guidance, cfg.guidance_text) > 1 else 1
    one_way = not arch.video_attends_text  # caption then runs the text alone, generate no text stream
    unconditional = 0 if guided == 1 else video_only if one_way and cfg.guidance_text <= 1 else with_text
    stock_step, joint_step = 2 * video_only, with_text + unconditional
    caption_step = text_only_flops(dict(arch), *sizes) if one_way else with_text
    generate_step = guided * (video_only if one_way else with_text)
    expected = {"stock Wan T2V step (CFG)": 1.0, "caption": caption_step / stock_step,
                "generate": generate_step / stock_step, "joint": joint_step / stock_step}
    stock_median, stock_min = statistics.median(times["stock Wan T2V step (CFG)"]), min(times["stock Wan T2V step (CFG)"])
    print(f"  {'':28} {'s/step median':>14} {'min':>8} {'ratio median':>13} {'ratio min':>10} {'FLOP-expected':>14}")
    for key, values in times.items():
        median, least = statistics.median(values), min(values)
        print(f"  {key:28} {median:14.4f} {least:8.4f} {median / stock_median:13.3f} {least / stock_min:10.3f} "
              f"{expected[key]:14.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer steps, repeats and tokens")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: steadier timings)")
    parser.add_argument("--world-only", action="store_true", help="world-tiny alone (the 1.3B rows take minutes)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    quiet_libraries()
    print(f"torch {torch.__version__}, {args.threads} thread(s), device cpu")

    bench("world-tiny", pipeline_from_recipe(load_recipe("world-tiny")), steps=6 if args.quick else 12,
          repeats=2 if args.quick else 5)
    if args.world_only:
        return
    canvas = ["model.height=128", "model.width=256", "text.max_length=64"] if args.quick else [
        "model.height=256", "model.width=256", "text.max_length=128"]
    paper = ["text.video_attends_text=true", "text.video_keys=video"]  # the Wan recipes' attention
    for name, attention in (("the paper's attention", paper), ("video not attending to the text", [])):
        wan = pipeline_from_recipe(load_recipe("world-tiny", WAN_13B_AT_2_LAYERS + canvas + attention))
        bench(f"wan2.1-t2v-1.3b (2 layers), {name}", wan, steps=3 if args.quick else 4,
              repeats=1 if args.quick else 3)


if __name__ == "__main__":
    main()
