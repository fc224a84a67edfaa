"""Building a stock Wan2.1 pipeline of a recipe's architecture from scratch.

The embedded world's "Wan2.1" is built here (the world's patch autoencoder, a small real
`UMT5EncoderModel`, a real `WanTransformer3DModel`), and so is every tiny Wan folder the tests use:
the same code path as a user's, only smaller. Real runs never come through here; they load a folder.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
from transformers import UMT5Config, UMT5EncoderModel

from ..data.world_text import build_world_tokenizer
from ..data.world_vae import WorldPatchAutoencoder, measure_latent_stats
from ..errors import VigUError
from ..recipe import ModelSection, Recipe, TransformerArch


def build_text_encoder(model: ModelSection, vocab_size: int) -> UMT5EncoderModel:
    arch = model.text_encoder
    if arch.vocab_size < vocab_size:
        raise VigUError(
            f"model.text_encoder.vocab_size={arch.vocab_size} is smaller than the tokenizer's {vocab_size} tokens: "
            f"raise it with --set model.text_encoder.vocab_size={vocab_size}"
        )
    config = UMT5Config(
        vocab_size=arch.vocab_size,
        d_model=arch.d_model,
        d_kv=arch.d_kv,
        d_ff=arch.d_ff,
        num_layers=arch.num_layers,
        num_heads=arch.num_heads,
        relative_attention_num_buckets=arch.relative_attention_num_buckets,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
    )
    return UMT5EncoderModel(config).eval()


def build_vae(model: ModelSection):
    """The world's exact patch autoencoder (latent statistics measured on world clips of the model's
    shape) or a small `AutoencoderKLWan` (its default config's statistics)."""
    vae = model.vae
    if vae.kind == "world":
        autoencoder = WorldPatchAutoencoder(temporal_fold=vae.temporal_fold, spatial_fold=vae.spatial_fold)
        mean, std = measure_latent_stats(autoencoder, model.height, model.width, model.num_frames)
        autoencoder.register_to_config(latents_mean=mean, latents_std=std)
        return autoencoder
    return AutoencoderKLWan(
        base_dim=vae.base_dim,
        z_dim=vae.z_dim,
        dim_mult=[1, 2, 4, 4],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.0] * vae.z_dim,
        latents_std=[1.0] * vae.z_dim,
    )


def build_transformer(arch: TransformerArch) -> WanTransformer3DModel:
    return WanTransformer3DModel(**vars(arch))


def build_wan_pipeline(recipe: Recipe, seed: int = 0) -> WanPipeline:
    """A fresh (untrained) stock `WanPipeline` of the recipe's architecture, with the world tokenizer."""
    if recipe.text.tokenizer != "world":
        raise VigUError(
            f"recipe '{recipe.name}' loads its model from a folder (model.base={recipe.model.base}); "
            "only world recipes build one from scratch"
        )
    torch.manual_seed(seed)
    tokenizer = build_world_tokenizer()
    vae = build_vae(recipe.model)
    if vae.config.z_dim != recipe.model.transformer.in_channels:
        raise VigUError(
            f"the autoencoder has {vae.config.z_dim} latent channels but model.transformer.in_channels="
            f"{recipe.model.transformer.in_channels}: set both in_channels and out_channels to {vae.config.z_dim}"
        )
    return WanPipeline(
        tokenizer=tokenizer,
        text_encoder=build_text_encoder(recipe.model, len(tokenizer)),
        vae=vae,
        transformer=build_transformer(recipe.model.transformer),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=recipe.sampling.shift),
    )
