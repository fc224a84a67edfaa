"""Folders in and out: stock diffusers Wan2.1 <-> vigu (Uni-ViGU) pipeline folders.

- `vigu_from_wan`: a stock `WanPipeline` + a recipe -> `UniViGUPipeline` whose transformer holds the
  pretrained weights and new text parameters initialised as the recipe says.
- `wan_from_vigu`: the video path of a vigu pipeline as a stock `WanPipeline` (text parameters dropped).
- `load_pipeline`: any local folder (stock Wan: converted on the fly; vigu: loaded) as a
  `UniViGUPipeline`, offline.
- `save_folder`: `save_pretrained` to a temporary sibling, then rename: never a half-written folder.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from diffusers import WanPipeline, WanTransformer3DModel
from diffusers.utils import logging as diffusers_logging
from transformers import AutoTokenizer

from ..data.manifest import check_writable, umask_mode
from ..data.world_text import build_world_tokenizer
from ..errors import VigUError
from ..recipe import ModelSection, Recipe, available_recipes, load_recipe
from .components import build_wan_pipeline
from .model import UniViGUTransformer
from .pipeline import UniViGUPipeline


def text_stream_tokenizer(recipe: Recipe, prompt_tokenizer):
    """The text stream's tokenizer: the world's, the Wan folder's umT5 tokenizer, or a folder."""
    name = recipe.text.tokenizer
    if name == "world":
        return build_world_tokenizer()
    if name == "umt5":
        return prompt_tokenizer
    if not Path(name).is_dir():
        raise VigUError(f"text.tokenizer '{name}' is not world, umt5 or a tokenizer folder: fix text.tokenizer")
    return AutoTokenizer.from_pretrained(name, local_files_only=True)


def text_stream_config(recipe: Recipe, vocab_size: int) -> dict:
    """The `UniViGUTransformer` arguments of the recipe's `text` section (beyond the stock Wan config)."""
    text = recipe.text
    return dict(
        text_formulation=text.formulation,
        text_vocab_size=vocab_size,
        text_latent_dim=text.latent_dim,
        text_ffn_dim=None if text.ffn_text_init == "copy" or not text.ffn_text_dim else text.ffn_text_dim,
        text_max_length=text.max_length,
        text_attention=text.attention,
        video_attends_text=text.video_attends_text,
        text_video_keys=text.video_keys,
        text_cross_attention=text.cross_attention,
    )


def vigu_from_wan(wan: WanPipeline, recipe: Recipe) -> UniViGUPipeline:
    """Extend a stock Wan pipeline into Uni-ViGU (new text parameters as the recipe's `text` section says).
    A pipeline loaded without its transformer (`transformer=None`, e.g. to encode a dataset) stays without."""
    text_tokenizer = text_stream_tokenizer(recipe, wan.tokenizer)
    text = recipe.text
    transformer = None if wan.transformer is None else UniViGUTransformer.from_wan(
        wan.transformer, **text_stream_config(recipe, len(text_tokenizer))
    )
    model, sampling = recipe.model, recipe.sampling
    return UniViGUPipeline(
        tokenizer=wan.tokenizer,
        text_encoder=wan.text_encoder,
        vae=wan.vae,
        scheduler=wan.scheduler.__class__.from_config(wan.scheduler.config, shift=sampling.shift),
        transformer=transformer,
        text_tokenizer=text_tokenizer,
        text_formulation=text.formulation,
        text_max_length=text.max_length,
        text_rounding_weight=text.rounding_weight,
        text_kappa_exponent=text.kappa_exponent,
        text_discrete_source=text.discrete_source,
        prompt_max_length=model.prompt_max_length,
        normalize_latents=model.normalize_latents,
        height=model.height,
        width=model.width,
        num_frames=model.num_frames,
        fps=model.fps,
        steps=sampling.steps,
        solver=sampling.solver,
        guidance_video=sampling.guidance_video,
        guidance_text=sampling.guidance_text,
        text_shift=sampling.text_shift,
        text_temperature=sampling.text_temperature,
        text_order=sampling.text_order,
        generate_text=sampling.generate_text,
        video_eta=sampling.video_eta,
        negative_prompt=sampling.negative_prompt,
        caption_candidates=sampling.caption_candidates,
    )


def wan_from_vigu(pipe: UniViGUPipeline) -> WanPipeline:
    """The video path of a vigu pipeline as a stock `WanPipeline` (text parameters dropped)."""
    wan_keys = inspect.signature(WanTransformer3DModel.__init__).parameters
    stock = WanTransformer3DModel.from_config({k: v for k, v in pipe.transformer.config.items() if k in wan_keys})
    stock.load_state_dict(pipe.transformer.wan_state_dict(), strict=True)
    return WanPipeline(
        tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, vae=pipe.vae,
        transformer=stock.to(pipe.transformer.dtype), scheduler=pipe.scheduler,
    )


def folder_class(path: str | Path) -> str:
    """The `_class_name` of a diffusers pipeline folder, with a clear error for anything else."""
    index = Path(path) / "model_index.json"
    if not index.is_file():
        raise VigUError(
            f"{path} is not a diffusers pipeline folder (no model_index.json): give a local Wan2.1 "
            "diffusers folder or a vigu folder"
        )
    try:
        return json.loads(index.read_text())["_class_name"]
    except (ValueError, KeyError, TypeError):
        raise VigUError(f"{index} is not a pipeline's model_index.json (no \"_class_name\" in a JSON object): the "
                        "folder is damaged; write it again") from None


@contextmanager
def reading(path: str | Path):
    """diffusers' errors for a folder with a missing or damaged file (OSError, ValueError) as one line."""
    try:
        yield
    except (OSError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise VigUError(f"{path} cannot be loaded: {first} (a file is missing or damaged: write the folder "
                        "again)") from None


@contextmanager
def torch_dtype_accepted():
    """`from_pretrained(torch_dtype=...)` without the FutureWarning: diffusers>=0.35 (our floor) reads
    `torch_dtype`; newer ones call it deprecated."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
        yield


def load_pipeline(path: str | Path, recipe: Recipe, **kwargs) -> UniViGUPipeline:
    """A local folder as a `UniViGUPipeline`, offline: vigu folders load, stock Wan folders convert."""
    with torch_dtype_accepted():
        return _load_pipeline(path, recipe, **kwargs)


def _load_pipeline(path: str | Path, recipe: Recipe, **kwargs) -> UniViGUPipeline:
    if Path(path).is_file():
        raise VigUError(f"model folder {path} is a file: give a local Wan2.1 diffusers folder or a vigu folder")
    if not Path(path).is_dir():
        raise VigUError(f"model folder {path} does not exist: give a local Wan2.1 diffusers folder or a vigu folder")
    kind = folder_class(path)
    if kind == "UniViGUPipeline":
        with reading(path):
            return UniViGUPipeline.from_pretrained(path, local_files_only=True, **kwargs)
    if kind == "WanPipeline":
        # The conversion makes a float32 transformer (`from_wan`): the stock one loads in float32 and the result
        # is cast to the asked dtype as `from_pretrained` casts a saved vigu folder (one rounding, not two).
        dtypes = kwargs.get("torch_dtype")
        dtype = dtypes.get("transformer", dtypes.get("default")) if isinstance(dtypes, dict) else dtypes
        if dtype is not None:
            given = dtypes if isinstance(dtypes, dict) else {"default": dtypes}
            kwargs = {**kwargs, "torch_dtype": {**given, "transformer": torch.float32}}
        # WanPipeline's signature names AutoencoderKLWan; the world's exact autoencoder has its interface,
        # so diffusers' "Expected types for vae" warning would be noise on every world command.
        type_check = diffusers_logging.get_logger("diffusers.pipelines.pipeline_utils")
        level = type_check.level
        type_check.setLevel(diffusers_logging.ERROR)
        try:
            with reading(path):
                wan = WanPipeline.from_pretrained(path, local_files_only=True, **kwargs)
        finally:
            type_check.setLevel(level)
        if wan.transformer is not None:
            check_architecture(recipe, path, wan.transformer.config)
        pipe = vigu_from_wan(wan, recipe)
        if dtype is not None and pipe.transformer is not None:
            cast_as_loaded(pipe.transformer, dtype)
        return pipe
    raise VigUError(f"{path} holds a {kind}, not a WanPipeline or UniViGUPipeline folder")


def cast_as_loaded(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """The parameters in `dtype` but those `from_pretrained(torch_dtype=dtype)` keeps in float32 (the class's
    `_keep_in_fp32_modules`), so a converted model samples as its saved folder does."""
    keep = model._keep_in_fp32_modules or []
    for name, param in model.named_parameters():
        if not any(module in name.split(".") for module in keep):
            param.data = param.data.to(dtype)


WORLD_PRETRAINED = Path(__file__).resolve().parents[1] / "assets" / "world-wan2.1"


def base_folder(model: ModelSection) -> Path | None:
    """`model.base` as a folder: None for `world` (an untrained world model, built from the recipe),
    the shipped pretrained world "Wan2.1" for `world-pretrained`, otherwise the path itself."""
    if model.base == "world":
        return None
    if model.base == "world-pretrained":
        if not (WORLD_PRETRAINED / "model_index.json").is_file():
            raise VigUError(
                f"the world's pretrained Wan2.1 is missing ({WORLD_PRETRAINED}): rebuild it with `make world-base`, "
                "or set model.base=world for an untrained one"
            )
        return WORLD_PRETRAINED
    return Path(model.base)


def pipeline_from_recipe(recipe: Recipe, **load_kwargs) -> UniViGUPipeline:
    """The recipe's model (`model.base`): the world built from the recipe (seeded, so the same
    everywhere), the shipped world "Wan2.1", or a local folder (loaded with `load_kwargs`)."""
    folder = base_folder(recipe.model)
    if folder is None:
        return vigu_from_wan(build_wan_pipeline(recipe, seed=0), recipe)
    pipe = load_pipeline(folder, recipe, **load_kwargs)
    # a stock folder's transformer is checked as it converts
    if folder_class(folder) == "UniViGUPipeline" and pipe.transformer is not None:
        check_architecture(recipe, folder, pipe.transformer.config)
    return pipe


def check_architecture(recipe: Recipe, folder: str | Path, config) -> None:
    """The recipe's `model.transformer` describes the folder it names: a folder's own config is what loads, so
    a recipe that says otherwise (an override meant for a model built from scratch, the wrong recipe for a
    checkpoint) would leave its memory estimates and benchmarks describing another model, and a stock Wan folder
    converted with it would take the recipe's text stream, shape and sampling settings for another model."""
    def differences(candidate: Recipe) -> list[str]:
        return [f"{key} is {config[key]} there, {value} in the recipe"
                for key, value in vars(candidate.model.transformer).items()
                if key in config and list(np.atleast_1d(config[key])) != list(np.atleast_1d(value))]

    if differ := differences(recipe):
        fits = [name for name in available_recipes() if not differences(load_recipe(name))]
        which = f"--recipe {' or '.join(fits)}" if fits else "the recipe of that model"
        raise VigUError(f"the model in {folder} is not the one recipe '{recipe.name}' describes ({'; '.join(differ)}): "
                        f"pass {which} or make model.transformer match the folder")


def save_folder(pipeline, out_dir: str | Path) -> Path:
    """`save_pretrained` (safetensors) into a temporary sibling, then swap it in by rename."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        pipeline.save_pretrained(tmp, safe_serialization=True)
        umask_mode(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def convert_folder(src: str | Path, dst: str | Path, recipe: Recipe, overwrite: bool = False) -> str:
    """`vigu convert`: stock Wan -> vigu, or vigu -> stock Wan (by what `src` holds). Returns the new kind. An
    existing `dst` is replaced only with `overwrite`, and never when it is `src`."""
    kind = folder_class(src)
    source, target = Path(src).resolve(), Path(dst).resolve()
    if target == source or target in source.parents:
        raise VigUError(f"{dst} {'is' if target == source else 'holds'} the folder being converted: write the "
                        "conversion to another folder")
    check_writable(dst, "DST", folder=True)
    if Path(dst).exists() and not overwrite:
        raise VigUError(f"{dst} already exists: choose a new folder, or pass --overwrite to replace it")
    if Path(dst).exists() and not (Path(dst) / "model_index.json").is_file():
        raise VigUError(f"{dst} is not a model folder (no model_index.json): --overwrite replaces model folders "
                        "only; choose a new folder")
    if kind == "WanPipeline":
        save_folder(load_pipeline(src, recipe), dst)
        return "UniViGUPipeline"
    if kind == "UniViGUPipeline":
        save_folder(wan_from_vigu(load_pipeline(src, recipe)), dst)
        return "WanPipeline"
    raise VigUError(f"{src} holds a {kind}: vigu convert takes a WanPipeline or UniViGUPipeline folder")
