"""`vigu train`: every stage (base | recall | refine) in one Accelerate loop.

A stage is a recipe section (`train.<stage>`), not a code path: what is trained (`full`, `text`,
`lora`), the text target (`none`, `prompt`, `caption`), condition dropout, optimiser and schedule.
The loop reads only the `vigu build-dataset` cache. It runs as one process, or under
`accelerate launch -m vigu_cli train ...` / `torchrun` for many (DDP, FSDP or DeepSpeed from an
accelerate config).

Determinism: every random draw of a step (condition dropout, sigmas, noise) comes from a generator
seeded by (seed, step) and drawn for the whole global batch, each process taking its slice; the data
order comes from accelerate's seedable sampler. So a resumed run equals an uninterrupted one, and N
processes equal one process with N times the batch.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, DistributedType, set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch.distributed.fsdp import register_fsdp_forward_method
from torch.utils.data import DataLoader

from .core.convert import load_pipeline, pipeline_from_recipe, save_folder, vigu_from_wan
from .core.components import build_wan_pipeline
from .core.objective import unified_objective
from .build_dataset import dataset_dir
from .data.cache import CachedDatasets, CachedVideoTextDataset, check_compatible, collate, read_info, split_lines
from .data.manifest import check_writable, write_text
from .data.video_io import write_video
from .errors import VigUError
from .precision import default_device, fast_bfloat16
from .evaluate import caption_accuracy, prompt_accuracy, prompt_following, world_prompted, world_truth
from .data import world
from .recipe import STAGES, Recipe, StageSection, stage_section
from .train_plan import FSDP1_REFUSED, NO_VALIDATION, SHARDS_PARAMETERS, check_stage, video_cache_unused, video_loss_trains
from .video_cache import VideoContextCache


CONSOLE = Console(stderr=True, soft_wrap=True)  # progress and notes; stdout stays free, as in the sampling commands


def say(accelerator: Accelerator, text: str) -> None:
    """A note of the run on stderr, from the main process only."""
    if accelerator.is_main_process:
        CONSOLE.print(text, markup=False, highlight=False)


# ----------------------------------------------------------------------------------------------------
# Folders and the starting model
# ----------------------------------------------------------------------------------------------------


def output_root(recipe: Recipe) -> Path:
    return Path(recipe.train.output_dir or f"runs/{recipe.name}")


def stage_dir(recipe: Recipe, stage: str) -> Path:
    return output_root(recipe) / stage


def initial_pipeline(recipe: Recipe, stage: str):
    """The model a stage starts from (`train.<stage>.init`)."""
    init = stage_section(recipe, stage).init
    if init == "fresh":
        return vigu_from_wan(build_wan_pipeline(recipe, seed=0), recipe)
    if init == "base":
        return pipeline_from_recipe(recipe)
    if init == "previous":
        previous = STAGES[STAGES.index(stage) - 1] if stage != STAGES[0] else None
        path = stage_dir(recipe, previous) / "model" if previous else None
        if path is None or not path.is_dir():
            raise VigUError(
                f"stage {stage} starts from the previous stage's model, but {path} does not exist: "
                f"run `vigu train --stage {previous}` first, or set train.{stage}.init=base"
            )
        return load_pipeline(path, recipe)
    return load_pipeline(init, recipe)


def configure_trainable(model, stage: StageSection) -> list[torch.nn.Parameter]:
    """Set `requires_grad` as the stage says; return the trained parameters."""
    text = set(model.text_parameter_names())
    if stage.trainable == "lora":
        from peft import LoraConfig

        model.add_adapter(
            LoraConfig(r=stage.lora_rank, lora_alpha=stage.lora_alpha, target_modules=stage.lora_targets, init_lora_weights=True)
        )
    for name, param in model.named_parameters():
        if stage.trainable == "full":
            param.requires_grad_(stage.text_target != "none" or name not in text)
        elif stage.trainable == "text":
            param.requires_grad_(name in text)
        else:
            param.requires_grad_("lora_" in name or name in text)
    params = trained_parameters(model)
    if not params:
        raise VigUError(f"nothing to train: trainable={stage.trainable} with text_target={stage.text_target}")
    return params


def trained_parameters(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def optimizer_groups(model, trained: list[torch.nn.Parameter], stage: StageSection) -> list[dict]:
    """AdamW parameter groups: with `text_learning_rate` set, the new text parameters form their own group
    at that rate (the scheduler scales both groups alike)."""
    if stage.text_learning_rate is None:
        return [{"params": trained}]
    names = set(model.text_parameter_names())
    text = {id(p) for name, p in model.named_parameters() if name in names}
    groups = [
        {"params": [p for p in trained if id(p) not in text]},
        {"params": [p for p in trained if id(p) in text], "lr": stage.text_learning_rate},
    ]
    return [group for group in groups if group["params"]]  # `trainable: text` leaves the first one empty


# ----------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------


def checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints (`step-NNNNNNNN`, holding `trainer_state.json`), oldest first."""
    folder = root / "checkpoints"
    found = [p for p in folder.glob("step-*") if (p / "trainer_state.json").is_file()] if folder.is_dir() else []
    return sorted(found)


def save_checkpoint(accelerator: Accelerator, root: Path, step: int, keep: int) -> Path:
    """`save_state` into a temporary folder, then rename: a kill never leaves a half checkpoint."""
    final = root / "checkpoints" / f"step-{step:08d}"
    tmp = root / "checkpoints" / f".tmp-step-{step:08d}"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step}))
        os.replace(tmp, final)
        for old in checkpoints(root)[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def truncate_jsonl(path: Path, step: int) -> None:
    """Keep the lines up to `step` (a resumed run rewrites what came after its checkpoint)."""
    if path.is_file():
        lines = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in lines))
        os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------
# One step's randomness, drawn for the global batch
# ----------------------------------------------------------------------------------------------------


def step_generator(seed: int, step: int, micro: int, device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + step * 1_009 + micro)


def drop_condition(
    embeds: torch.Tensor, empty: torch.Tensor, p: float, generator, start: int, total: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace each sample's prompt embeddings by the empty prompt's with probability p; returns them and
    which rows were dropped."""
    drop = (torch.rand(total, generator=generator, device=embeds.device) < p)[start : start + embeds.shape[0]]
    return torch.where(drop[:, None, None], empty.to(embeds.dtype).expand_as(embeds), embeds), drop


# ----------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------


def check_compiler(device: torch.device, stage_name: str) -> None:
    """On CPU, torch.compile (inductor) builds C++ kernels: say so in one line when no compiler works."""
    if device.type != "cpu":
        return
    from torch._inductor import cpp_builder, exc

    try:
        cpp_builder.get_cpp_compiler()
    except exc.InvalidCxxCompiler:
        raise VigUError(
            f"train.{stage_name}.compile needs a C++ compiler on CPU (g++ or clang++, or $CXX): install one, or pass "
            f"--set train.{stage_name}.compile=false"
        ) from None


def mixed_precision(stage: StageSection) -> str:
    if stage.mixed_precision != "auto":
        return stage.mixed_precision
    return "bf16" if fast_bfloat16(default_device()) else "no"


def dataset_folders(recipe: Recipe) -> list[Path]:
    """`train.dataset`: one `vigu build-dataset` folder or a list of them; empty: `data.out`."""
    given = recipe.train.dataset
    folders = [given] if isinstance(given, str) else given
    return [Path(folder) for folder in folders if folder] or [dataset_dir(recipe)]


def train(recipe: Recipe, stage_name: str, resume: bool = False) -> Path:
    """Run one stage; return the folder of its final model."""
    stage = stage_section(recipe, stage_name)
    root, folders = stage_dir(recipe, stage_name), dataset_folders(recipe)
    check_writable(root, "train.output_dir's stage folder", folder=True)
    data = folders[0]  # validation reads the first folder's held-out items
    accelerator = Accelerator(
        mixed_precision=mixed_precision(stage),
        gradient_accumulation_steps=stage.grad_accum,
        cpu=not torch.cuda.is_available(),
        log_with=None if recipe.train.report_to == "none" else recipe.train.report_to,
        project_dir=str(root),
        dataloader_config=DataLoaderConfiguration(split_batches=True, use_seedable_sampler=True),
    )
    sharding = accelerator_sharding(accelerator)
    check_stage(recipe, stage_name, sharding)
    sharded = sharding in SHARDS_PARAMETERS
    found = checkpoints(root)
    if accelerator.is_main_process and not resume and (found or (root / "model").exists()):
        raise VigUError(f"{root} already holds a run: pass --resume to continue it, or remove the folder")
    set_seed(stage.seed)

    pipe = initial_pipeline(recipe, stage_name)
    for folder in folders:
        check_compatible(folder, pipe)
    model = pipe.transformer.train()
    trained = configure_trainable(model, stage)
    if stage.gradient_checkpointing:
        model.enable_gradient_checkpointing()

    dataset = CachedDatasets(folders, split="train")
    global_batch = stage.batch_size * accelerator.num_processes
    if len(dataset) < global_batch:
        where = " + ".join(map(str, folders))
        raise VigUError(f"the dataset in {where} has {len(dataset)} training items, fewer than one batch "
                        f"({global_batch}): build more items, or lower train.{stage_name}.batch_size")
    loader = DataLoader(dataset, batch_size=global_batch, shuffle=True, drop_last=True, collate_fn=collate)
    optimizer = torch.optim.AdamW(
        optimizer_groups(model, trained, stage), lr=stage.learning_rate, betas=tuple(stage.betas),
        weight_decay=stage.weight_decay,
    )
    # split_batches: the prepared scheduler steps once per optimizer step, whatever the process count
    scheduler = get_scheduler(
        stage.lr_scheduler, optimizer, num_warmup_steps=stage.warmup_steps, num_training_steps=stage.max_steps
    )
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    core = accelerator.unwrap_model(model)
    trained = trained_parameters(core)  # FSDP's prepare puts sharded parameters in the model's place
    if sharding == "fsdp" and core.config.text_formulation == "embedding":
        register_fsdp_forward_method(core, "token_embeddings")  # the text flow reads the table outside the forward
    if stage.compile:  # here, not Accelerate's dynamo plugin: its state is per process, set by the first Accelerator
        check_compiler(accelerator.device, stage_name)
        model = torch.compile(model)
    ema = EMAModel(trained, decay=stage.ema_decay) if stage.ema_decay > 0 else None
    if ema is not None:
        accelerator.register_for_checkpointing(ema)
    text_flow = pipe.text_flow
    empty = dataset.empty_prompt_embeds.to(accelerator.device)
    video_prediction = video_loss_trains(stage, core.config.video_attends_text)

    step = 0
    metrics_path = root / "metrics.jsonl"
    if resume and not found:
        say(accelerator, f"--resume: {root} holds no checkpoint yet; starting from step 0")
    if resume and found:
        accelerator.load_state(str(found[-1]))
        step = json.loads((found[-1] / "trainer_state.json").read_text())["step"]
        if accelerator.is_main_process:
            truncate_jsonl(metrics_path, step)
            # validation at the checkpoint's step ran before it was saved, but the final one runs again
            truncate_jsonl(root / "validation.jsonl", min(step, stage.max_steps - 1))
    root.mkdir(parents=True, exist_ok=True)
    if accelerator.is_main_process:
        (root / "recipe.json").write_text(json.dumps(asdict(recipe), indent=1))
    accelerator.init_trackers(f"vigu-{recipe.name}-{stage_name}")
    cache = None
    if stage.cache_video and video_prediction:  # a speed-up where it applies, not a reason to stop
        say(accelerator, video_cache_unused(stage_name))
    elif stage.cache_video and step < stage.max_steps:
        cache = VideoContextCache.build(accelerator, core, dataset, empty, root / "video-cache", stage.batch_size)

    batches_per_epoch = len(loader) // stage.grad_accum
    rank_start = accelerator.process_index * stage.batch_size
    progress = Progress(
        TextColumn(f"[bold]{stage_name}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
        TimeRemainingColumn(), console=CONSOLE, disable=not accelerator.is_main_process,
    )
    with progress:
        task = progress.add_task(stage_name, total=stage.max_steps, completed=step, info="")
        while step < stage.max_steps:
            epoch, skip = divmod(step, batches_per_epoch)
            loader.set_epoch(epoch)
            batches = accelerator.skip_first_batches(loader, skip * stage.grad_accum) if skip else loader
            for micro, batch in enumerate(batches):
                started = time.perf_counter()
                generator = step_generator(stage.seed, step, micro % stage.grad_accum, accelerator.device)
                cond, dropped = drop_condition(
                    batch["prompt_embeds"], empty, stage.cond_dropout, generator, rank_start, global_batch
                )
                context = functools.partial(cache.context, core, batch["id"], dropped) if cache else None
                ids = None if stage.text_target == "none" else batch[f"{stage.text_target}_ids"]
                with accelerator.accumulate(model), accelerator.autocast():
                    loss, parts = unified_objective(
                        model, text_flow, recipe.flow, batch["latents"].float(), ids, cond, generator, core=core,
                        batch_slice=(rank_start, global_batch), video_prediction=video_prediction,
                        video_context=context,
                    )
                    if not torch.isfinite(loss):
                        last = checkpoints(root)
                        raise VigUError(
                            f"loss is {float(loss.detach())} at step {step + 1}; last good checkpoint: "
                            f"{last[-1] if last else 'none (nothing saved yet)'}: lower train.{stage_name}.learning_rate "
                            "and resume with --resume"
                        )
                    accelerator.backward(loss)
                    # max_grad_norm 0: no clipping (the norm is still measured and logged)
                    grad_norm = (accelerator.clip_grad_norm_(trained, stage.max_grad_norm or math.inf)
                                 if accelerator.sync_gradients else None)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad()
                if not accelerator.sync_gradients:
                    continue
                if ema is not None:
                    ema.step(trained)
                step += 1
                seconds = time.perf_counter() - started
                record = log_step(accelerator, parts, grad_norm, scheduler, step, seconds, batch, ids, global_batch)
                if accelerator.is_main_process and (step % stage.log_every == 0 or step == stage.max_steps):
                    with metrics_path.open("a") as f:
                        f.write(json.dumps(record) + "\n")
                    accelerator.log(record, step=step)
                progress.update(task, completed=step, info=f"loss {record['loss']:.4f}  {record['tokens_per_s']:.0f} tok/s")
                if stage.validate_every and step % stage.validate_every == 0 and step < stage.max_steps and not sharded:
                    with averaged(ema, trained):
                        validate(accelerator, pipe, core, recipe, stage, data, root, step)
                if step % stage.checkpoint_every == 0 or step == stage.max_steps:
                    save_checkpoint(accelerator, root, step, stage.keep_checkpoints)
                if step >= stage.max_steps:
                    break

    if ema is not None:
        ema.copy_to(trained)  # the model a stage hands on is the average
    if sharded:
        say(accelerator, NO_VALIDATION)
    else:
        validate(accelerator, pipe, core, recipe, stage, data, root, step)
    final = whole_model(accelerator, model, core, sharded)
    if accelerator.is_main_process:
        if stage.trainable == "lora":
            final.fuse_lora()
            final.unload_lora()
        pipe.transformer = final.eval()
        pipe.register_modules(transformer=final)
        save_folder(pipe, root / "model")
    accelerator.wait_for_everyone()
    if cache is not None and accelerator.is_main_process:
        shutil.rmtree(cache.folder)  # gigabytes, needed only to resume
    accelerator.end_training()
    return root / "model"


def accelerator_sharding(accelerator: Accelerator) -> str:
    """How the processes hold the parameters: none (each the whole model: one process, DDP, ZeRO-1/2), fsdp or zero3."""
    if accelerator.distributed_type == DistributedType.FSDP:
        if not accelerator.is_fsdp2:
            raise VigUError(FSDP1_REFUSED)
        return "fsdp"
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return f"zero{accelerator.state.deepspeed_plugin.zero_stage}"
    return "none"


def whole_model(accelerator: Accelerator, model, core, sharded: bool):
    """The trained transformer, whole, on the main process (None on the others): `core` itself, or, where the
    parameters are sharded, a copy loaded from the state dict that every process helps gather."""
    if not sharded:
        return core
    state = accelerator.get_state_dict(model)  # a collective: every process calls it
    if not accelerator.is_main_process:
        return None
    whole = type(core).from_config(core.config)
    whole.load_state_dict(state)
    return whole


@contextmanager
def averaged(ema, params):
    """Inside: the EMA weights (when there is an EMA); after: the trained weights again."""
    if ema is None:
        yield
        return
    ema.store(params)
    ema.copy_to(params)
    try:
        yield
    finally:
        ema.restore(params)


def validation_line(record: dict, items: int) -> str:
    """A validation record as one line: each score's macro, then its attributes."""
    def scores(name: str) -> str:
        if name not in record:
            return ""
        if record[name] is None:
            return f"; {name}: not scored (the world's judge does not read this data)"
        found = record[name]
        hidden = f", hidden {found['hidden']:.3f}" if "hidden" in found else ""
        parts = ", ".join(f"{k} {v:.2f}" for k, v in found.items() if k not in ("macro", "hidden"))
        return f"; {name} {found['macro']:.3f}{hidden} ({parts})"

    return f"validation at step {record['step']} on {items} held-out items" + scores("caption") + scores("generation")


def log_step(accelerator, parts, grad_norm, scheduler, step, seconds, batch, ids, global_batch) -> dict:
    """The step's metrics, averaged over processes."""
    values = torch.tensor([parts.get(k, float("nan")) for k in ("loss", "loss_video", "loss_text")], device=accelerator.device)
    loss, loss_video, loss_text = [None if math.isnan(v) else v for v in accelerator.reduce(values, reduction="mean").tolist()]
    latents = batch["latents"]
    tokens = global_batch * (math.prod(latents.shape[2:]) + (ids.shape[1] if ids is not None else 0))
    record = {"step": step, "loss": loss, "loss_video": loss_video, "loss_text": loss_text,
              "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm) if grad_norm is not None else None,
              "seconds_per_step": seconds, "tokens_per_s": tokens / max(seconds, 1e-9)}
    return record


# ----------------------------------------------------------------------------------------------------
# Validation on held-out items
# ----------------------------------------------------------------------------------------------------


@torch.no_grad()
def validate(accelerator, pipe, core, recipe: Recipe, stage: StageSection, data: Path, root: Path, step: int) -> None:
    """Caption and generate held-out items, `stage.batch_size` at a time (item i sampled with seed `stage.seed + i`),
    score them with the world's judge where it reads the data (world captions, world prompts; else the scores are
    null), save the first few as mp4 + txt."""
    held_out = []
    if accelerator.is_main_process and stage.val_items:
        held_out = split_lines(data, "val")[: stage.val_items]
        if not held_out:
            every = read_info(data)["split"]["val_every"]
            say(accelerator, f"validation at step {step}: {data} holds no held-out items (data.val_every {every}; 0 "
                             "holds none out): build it with more items or a smaller data.val_every; skipped")
    if held_out:
        was_training = core.training
        core.eval()
        pipe.transformer = core
        dataset = CachedVideoTextDataset(data, split="val")
        by_id = {item_id: i for i, (item_id, _) in enumerate(dataset.items)}
        prompts = [line.prompt for line in held_out]
        prompted = world_prompted(prompts)  # else the world's measurer has nothing to check the clips against
        text_stream = "none" if stage.text_target == "none" else None
        texts, measured = [], []
        samples = root / "samples" / f"step-{step:08d}"
        samples.mkdir(parents=True, exist_ok=True)
        for start in range(0, len(held_out), stage.batch_size):
            chunk = range(start, min(start + stage.batch_size, len(held_out)))
            seeded = lambda: [torch.Generator(accelerator.device).manual_seed(stage.seed + i) for i in chunk]  # noqa: E731
            with accelerator.autocast():  # sampled in the precision the stage trains in
                if stage.text_target != "none":  # what the text says of the clip: its prompt in recall, else a caption
                    latents = torch.stack([dataset[by_id[held_out[i].id]]["latents"] for i in chunk]).float()
                    clips = pipe.decode_latents(latents.to(accelerator.device))
                    texts += pipe.caption(clips, generator=seeded(), steps=stage.val_steps).texts
                videos = pipe.generate([prompts[i] for i in chunk], generator=seeded(), steps=stage.val_steps,
                                       text_stream=text_stream).videos
            for i, video in zip(chunk, videos):
                if prompted:
                    measured.append(world.measure_video(video))
                if i < 4:
                    write_video(samples / f"{i}-generated.mp4", video, pipe.config.fps)
                    caption = f"caption: {texts[i]}\n" if texts else ""
                    write_text(samples / f"{i}.txt", f"prompt: {prompts[i]}\n{caption}")
        record = {"step": step}
        if stage.text_target == "prompt":
            record["caption"] = prompt_accuracy(texts, prompts) if prompted else None
        elif stage.text_target == "caption":
            truths = [world_truth(line.caption) for line in held_out]
            record["caption"] = caption_accuracy(texts, truths) if None not in truths else None
        record["generation"] = prompt_following(measured, prompts) if prompted else None
        with (root / "validation.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")
        say(accelerator, validation_line(record, len(held_out)))
        core.train(was_training)
    accelerator.wait_for_everyone()
