"""Tiny stock Wan folders built with the same code that builds the world's "Wan2.1"."""

import pytest
import torch

from vigu_cli.core.components import build_wan_pipeline
from vigu_cli.core.convert import load_pipeline
from vigu_cli.recipe import load_recipe

torch.set_num_threads(1)

# world-tiny, shrunk: a 16x16x9 canvas folded 4 x 2 x 2 (48 latent channels, below the width 64), two layers.
TINY = [
    "model.base=world",  # built from this recipe, untrained (world-tiny itself starts from the shipped world model)
    "model.height=16", "model.width=16", "model.num_frames=9", "model.vae.spatial_fold=2",
    "model.transformer.in_channels=48", "model.transformer.out_channels=48",
    "model.transformer.num_attention_heads=2", "model.transformer.attention_head_dim=32",
    "model.transformer.ffn_dim=128", "model.transformer.num_layers=2",
    "text.max_length=32", "text.latent_dim=16", "sampling.steps=4", "text.formulation=embedding",
    "flow.tau_sampling=uniform", "flow.corner_prob=0.0",
    "text.video_attends_text=true", "text.video_keys=video",  # the paper's attention (world-tiny's video does not
                                                              # read the text, which reads it with its own keys)
    # fp32 whatever `auto` means on this machine, so resume and multi-process runs compare exactly
    "train.base.mixed_precision=no", "train.recall.mixed_precision=no", "train.refine.mixed_precision=no",
    "data.text_encoder_dtype=float32", "data.generator.dtype=float32",
    "train.recall.ema_decay=0", "train.refine.ema_decay=0",  # the trained weights themselves, unless a test asks
    "train.recall.compile=false", "train.refine.compile=false",  # eager: exact comparisons, no compile time
    "sampling.caption_candidates=1",  # one caption per clip unless a test asks for more (world-tiny draws 5)
]
# The same with diffusers' real AutoencoderKLWan (random, tiny) instead of the world's patch autoencoder.
TINY_WAN_VAE = TINY + [
    "model.height=32", "model.width=32", "model.vae.kind=wan", "model.vae.base_dim=8", "model.vae.z_dim=16",
    "model.transformer.in_channels=16", "model.transformer.out_channels=16", "model.transformer.patch_size=[1,2,2]",
]


def tiny_recipe(*extra, base=TINY):
    return load_recipe("world-tiny", [*base, *extra])


def nudged_pipeline(wan_dir, *extra):
    """The tiny Wan folder converted with `tiny_recipe(*extra)`, every weight nudged off its init (seed 1), so
    that the text stream, whose head starts at zero, says something."""
    pipe = load_pipeline(wan_dir, tiny_recipe(*extra))
    torch.manual_seed(1)
    for p in pipe.transformer.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    return pipe


@pytest.fixture(scope="session")
def tiny_wan_dir(tmp_path_factory):
    """A stock WanPipeline folder with the world's autoencoder and tokenizer."""
    path = tmp_path_factory.mktemp("wan-world")
    build_wan_pipeline(tiny_recipe(), seed=0).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_wan_vae_dir(tmp_path_factory):
    """A stock WanPipeline folder with a tiny random AutoencoderKLWan."""
    path = tmp_path_factory.mktemp("wan-kl")
    build_wan_pipeline(tiny_recipe(base=TINY_WAN_VAE), seed=0).save_pretrained(path)
    return path
