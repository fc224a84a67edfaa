"""`vigu train --dry-run`: parameters and an estimate of memory per GPU, before anything is loaded.

The model is built on the meta device from the recipe's architecture (no memory, no weights), so the
14B plan prints in seconds on a laptop. Memory per GPU, for fp32 parameters trained under bf16
autocast with AdamW (the official release's set-up):
- weights 4 B/param, gradients 4 B/trainable param, optimizer 8 B/trainable param (two fp32 moments);
  FSDP shards all three, DeepSpeed ZeRO-2 gradients and optimizer states, ZeRO-3 all three;
- activations, bf16, per sample and layer ~ tokens x (16 d + 2 ffn) x 2 B without gradient
  checkpointing (attention through SDPA/flash keeps no tokens^2 matrix), or tokens x d x 2 B per
  layer plus one layer's full activations with it; with `trainable: text` and `text.video_attends_text: false`
  only the text tokens' (and the video keys and values they attend to), as the video stream is not in the graph.
With `cache_video` it also prints the cache's disk per training clip (both conditions, every block's video tokens).
It is an estimate (allocator fragmentation, CUDA context ~1 GB and temporary buffers come on top); the
point is to see an out-of-memory coming before it happens.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .core.convert import text_stream_config
from .core.model import UniViGUTransformer
from .errors import VigUError
from .recipe import RECIPES_DIR, Recipe, StageSection, parse_yaml, stage_section

GIB = 1024**3
GPU_GIB = 80  # an H800's or H100's memory
ACCELERATE_DIR = RECIPES_DIR / "accelerate"


@dataclass
class Plan:
    stage: StageSection
    total_params: int
    trainable_params: int
    processes: int
    sharding: str
    video_tokens: int
    text_tokens: int
    weights: float
    gradients: float
    optimizer: float
    activations: float
    video_cache_per_clip: float = 0.0  # `cache_video`: GiB on disk per training clip, in bf16 (twice in fp32)
    video_cache_unused: str = ""  # `cache_video` set where it does not apply: why

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations


def video_loss_trains(stage: StageSection, video_attends_text: bool) -> bool:
    """Whether the video loss reaches a trained parameter: a video or shared weight is trained, or the video
    attends to the text whose parameters are. Where it does not (`trainable: text` with a video that does not
    attend to the text), the step skips the video's prediction and loss (the same gradient, less work) and the
    video is out of the autograd graph but its keys and values."""
    return stage.trainable != "text" or video_attends_text


def video_cache_unused(stage_name: str) -> str:
    """Why `cache_video` does not apply to a stage whose video loss trains (the run goes on without it)."""
    return (f"train.{stage_name}.cache_video: not used, as the video trains or reads the text (it needs "
            f"train.{stage_name}.trainable=text and text.video_attends_text=false)")


SHARDS_PARAMETERS = ("fsdp", "zero3")  # no process holds the whole model
FSDP1_REFUSED = ("FSDP1 (fsdp_version: 1, accelerate's default) is not supported: set fsdp_version: 2 in the "
                 "accelerate config's fsdp_config, as recipes/accelerate/8xh800-fsdp.yaml does")
NO_VALIDATION = ("validation: not run, as no process holds the whole model (FSDP, ZeRO-3); score the saved model "
                 "with `vigu eval`")


def check_stage(recipe: Recipe, stage_name: str, sharding: str) -> None:
    """Refuse, before anything loads, what a stage cannot do: `base` from scratch where `model.base` is a pretrained
    folder (it would train an untrained copy of its architecture; Uni-ViGU starts at `recall`), and where the
    parameters are sharded the settings that need the whole model on every process: the EMA (one process
    checkpoints its state), LoRA (merged into the whole model) and the video cache (each process runs the model
    alone on its share of clips)."""
    stage = stage_section(recipe, stage_name)
    if stage_name == "base" and stage.init == "fresh" and recipe.model.base not in ("world", "world-pretrained"):
        raise VigUError(f"stage base pretrains a text-to-video model from scratch, but model.base "
                        f"({recipe.model.base}) is pretrained already: start Uni-ViGU training at --stage recall")
    if sharding not in SHARDS_PARAMETERS:
        return
    conflicts = [name for name, on in (("ema_decay", stage.ema_decay > 0), ("trainable: lora", stage.trainable == "lora"),
                                       ("cache_video", stage.cache_video)) if on]
    if conflicts:
        raise VigUError(f"train.{stage_name}: {', '.join(conflicts)} cannot run with {sharding}, which leaves no "
                        "process the whole model: turn them off, or train with DDP or DeepSpeed ZeRO-2 "
                        "(recipes/accelerate/8xh800-deepspeed-zero2.yaml)")


def read_accelerate_config(path: str | Path | None) -> tuple[int, str]:
    """(processes, sharding) of an accelerate config file (a path, or a shipped config's name): sharding is none,
    fsdp, zero2 or zero3."""
    if path is None:
        return 1, "none"
    given, path = path, Path(path)
    if not path.is_file():  # a shipped one by name (`8xh800-fsdp`) or by its path in the repository, from anywhere
        path = ACCELERATE_DIR / f"{path.stem}.yaml"
    if not path.is_file():
        shipped = ", ".join(sorted(p.stem for p in ACCELERATE_DIR.glob("*.yaml")))
        raise VigUError(f"accelerate config {given} not found: give a file, or one of the shipped configs: {shipped}")
    config = parse_yaml(path.read_text(), f"accelerate config {given}", "fix the file") or {}
    if not isinstance(config, dict):
        raise VigUError(f"accelerate config {given} must be a mapping such as `accelerate config` writes, got "
                        f"{type(config).__name__}")
    kind = str(config.get("distributed_type", "NO")).upper()
    if kind == "FSDP" and int((config.get("fsdp_config") or {}).get("fsdp_version", 1)) != 2:
        raise VigUError(f"accelerate config {given}: {FSDP1_REFUSED}")
    sharding = {"FSDP": "fsdp", "DEEPSPEED": f"zero{config.get('deepspeed_config', {}).get('zero_stage', 2)}"}.get(kind, "none")
    return int(config.get("num_processes", 1)), sharding


def transformer_on_meta(recipe: Recipe, vocab_size: int) -> UniViGUTransformer:
    with torch.device("meta"):
        return UniViGUTransformer(**vars(recipe.model.transformer), **text_stream_config(recipe, vocab_size))


def latent_factors(recipe: Recipe) -> tuple[int, int]:
    vae = recipe.model.vae
    return (vae.temporal_fold, vae.spatial_fold) if vae.kind == "world" else (4, 8)


def plan(recipe: Recipe, stage_name: str, accelerate_config: str | Path | None = None, vocab_size: int | None = None) -> Plan:
    stage = stage_section(recipe, stage_name)
    vocab = vocab_size or (50 if recipe.text.tokenizer == "world" else 256_300)  # umT5: 256,000 pieces + 300 extra ids
    model = transformer_on_meta(recipe, vocab)
    text_names = set(model.text_parameter_names())
    params = dict(model.named_parameters())
    total = sum(p.numel() for p in params.values())
    text_params = sum(p.numel() for n, p in params.items() if n in text_names)
    arch = recipe.model.transformer
    dim = arch.num_attention_heads * arch.attention_head_dim
    if stage.trainable == "full":
        trainable = total if stage.text_target != "none" else total - text_params
    elif stage.trainable == "text":
        trainable = text_params
    else:  # LoRA on the listed projections of every block, plus the new text parameters
        per_block = sum(stage.lora_rank * (dim + dim) for _ in stage.lora_targets)
        trainable = per_block * arch.num_layers + text_params
        total += per_block * arch.num_layers

    processes, sharding = read_accelerate_config(accelerate_config)
    check_stage(recipe, stage_name, sharding)
    shard_all = sharding in SHARDS_PARAMETERS
    shard_states = sharding != "none"
    t, s = latent_factors(recipe)
    p_t, p_h, p_w = arch.patch_size
    m = recipe.model
    video_tokens = (1 + (m.num_frames - 1) // t) // p_t * (m.height // s // p_h) * (m.width // s // p_w)
    text_tokens = recipe.text.max_length if stage.text_target != "none" else 0
    tokens = video_tokens + text_tokens
    graph = tokens  # the tokens whose activations autograd keeps
    frozen_video = not video_loss_trains(stage, recipe.text.video_attends_text)
    if frozen_video:
        graph = text_tokens  # out of the graph but its keys and values
    per_layer = graph * (16 * dim + 2 * arch.ffn_dim) * 2 + (tokens - graph) * 2 * dim * 2
    if stage.gradient_checkpointing:
        activations = graph * dim * 2 * arch.num_layers + per_layer
    else:
        activations = per_layer * arch.num_layers
    return Plan(
        stage=stage,
        total_params=total,
        trainable_params=trainable,
        processes=processes,
        sharding=sharding,
        video_tokens=video_tokens,
        text_tokens=text_tokens,
        weights=4 * total / (processes if shard_all else 1) / GIB,
        gradients=4 * trainable / (processes if shard_states else 1) / GIB,
        optimizer=8 * trainable / (processes if shard_states else 1) / GIB,
        activations=stage.batch_size * activations / GIB,
        # both conditions of a clip, each block's video tokens as the text reads them (video_cache.py)
        video_cache_per_clip=(2 * arch.num_layers * video_tokens * dim * 2 / GIB
                              if frozen_video and stage.cache_video else 0.0),
        video_cache_unused=video_cache_unused(stage_name) if stage.cache_video and not frozen_video else "",
    )


def fits(p: Plan) -> str:
    """Whether the estimate leaves a H800's or H100's 80 GiB some room (the estimate leaves out ~10%: the CUDA
    context, fragmentation, temporary buffers), and if not, what would lower it, biggest first."""
    if p.total <= 0.9 * GPU_GIB:
        return "yes"
    ways = [
        *(["gradient_checkpointing: true"] if not p.stage.gradient_checkpointing else []),
        *(["FSDP (--accelerate-config 8xh800-fsdp)"] if p.sharding not in SHARDS_PARAMETERS else []),
        *([f"a smaller batch_size with grad_accum (now {p.stage.batch_size})"] if p.stage.batch_size > 1 else []),
    ]
    return "no: " + ("; ".join(ways) if ways else "more GPUs to shard over") + " would lower it"


def describe(p: Plan) -> list[tuple[str, str]]:
    """Rows for a table: what, value."""
    stage = p.stage
    rates = f"{stage.learning_rate:g}" + (f", new text parameters {stage.text_learning_rate:g}"
                                          if stage.text_learning_rate is not None else "")
    return [
        ("stage", f"trainable {stage.trainable}, text target {stage.text_target}, condition dropout "
                  f"{stage.cond_dropout:g}, from {stage.init}"),
        ("steps x clips per step", f"{stage.max_steps:,} x {stage.batch_size * stage.grad_accum * p.processes:,} "
                                   f"({stage.batch_size} per GPU x {stage.grad_accum} accumulated x {p.processes})"),
        ("learning rate", f"{rates} ({stage.lr_scheduler}, {stage.warmup_steps:,} warm-up steps); "
                          f"Adam betas ({stage.betas[0]:g}, {stage.betas[1]:g})"),
        ("parameters", f"{p.total_params / 1e6:,.1f} M"),
        ("trainable", f"{p.trainable_params / 1e6:,.1f} M ({100 * p.trainable_params / p.total_params:.1f}%)"),
        ("processes / sharding", f"{p.processes} / {p.sharding}"),
        ("tokens per sample", f"{p.video_tokens:,} video + {p.text_tokens:,} text"),
        ("weights per GPU", f"{p.weights:.2f} GiB"),
        ("gradients per GPU", f"{p.gradients:.2f} GiB"),
        ("optimizer per GPU", f"{p.optimizer:.2f} GiB"),
        ("activations per GPU", f"{p.activations:.2f} GiB"),
        ("total per GPU (estimate)", f"{p.total:.2f} GiB"),
        (f"fits an {GPU_GIB} GiB GPU (H800, H100)", fits(p)),
        *([("video cache on disk", f"{p.video_cache_per_clip * 1024:.2f} MiB per training clip (bf16; fp32: twice)")]
          if p.video_cache_per_clip else []),
        *([("video cache", p.video_cache_unused)] if p.video_cache_unused else []),
        *([("validation", NO_VALIDATION.removeprefix("validation: "))] if p.sharding in SHARDS_PARAMETERS else []),
    ]

