"""The world's exact patch autoencoder: round trip, shapes, Wan-compatible config, save/load, pipeline."""

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
from transformers import UMT5Config, UMT5EncoderModel

from vigu_cli.data.video_io import frames_to_tensor, tensor_to_frames
from vigu_cli.data.world import render, sample_clip
from vigu_cli.data.world_text import build_world_tokenizer
from vigu_cli.data.world_vae import WorldPatchAutoencoder, measure_latent_stats

FOLDS = [(4, 4), (2, 4), (1, 2), (4, 8), (1, 1)]


@pytest.mark.parametrize("temporal_fold, spatial_fold", FOLDS)
def test_round_trip_is_exact_with_the_right_shapes(temporal_fold, spatial_fold):
    vae = WorldPatchAutoencoder(temporal_fold, spatial_fold)
    video = torch.rand(2, 3, 2 * temporal_fold + 1, 16, 24, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latent = vae.encode(video).latent_dist
    z = latent.mode()
    assert z.shape == (2, 3 * temporal_fold * spatial_fold**2, 3, 16 // spatial_fold, 24 // spatial_fold)
    assert vae.config.z_dim == z.shape[1]
    assert torch.equal(latent.sample(generator=torch.Generator().manual_seed(1)), z)  # deterministic
    assert torch.equal(vae.decode(z).sample, video)
    assert torch.equal(vae.decode(z, return_dict=False)[0], video)


def test_latent_channels_fold_pixels_and_frames_as_documented():
    vae = WorldPatchAutoencoder(2, 2)
    video = torch.arange(3 * 5 * 4 * 4, dtype=torch.float32).reshape(1, 3, 5, 4, 4)
    z = vae.encode(video).latent_dist.mode()  # [1, 24, 3, 2, 2]
    # channel ((colour * 2 + frame) * 2 + row) * 2 + col; latent frame 1 holds frames 1 and 2
    assert z[0, ((1 * 2 + 1) * 2 + 0) * 2 + 1, 1, 1, 0] == video[0, 1, 2, 2, 1]
    # latent frame 0 holds the first frame alone, once per frame of the fold
    assert z[0, (0 * 2 + 1) * 2 + 0, 0, 1, 1] == video[0, 0, 0, 3, 2]
    assert torch.equal(z[0, 0:4, 0], z[0, 4:8, 0]) and torch.equal(z[0, 8:12, 0], z[0, 12:16, 0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_round_trip_is_exact_in_half_precision(dtype):
    vae = WorldPatchAutoencoder(4, 4).to(dtype)
    assert vae.dtype == dtype
    video = (torch.rand(1, 3, 9, 8, 8) * 2 - 1).to(dtype)
    assert torch.equal(vae.decode(vae.encode(video).latent_dist.mode()).sample, video)


def test_world_clips_round_trip_to_the_same_pixels():
    vae = WorldPatchAutoencoder(4, 4)
    frames = render(sample_clip(np.random.default_rng(0), 32, 32))
    z = vae.encode(frames_to_tensor(frames)[None]).latent_dist.sample()
    assert np.array_equal(tensor_to_frames(vae.decode(z).sample[0]), frames)


def test_bad_shapes_and_folds_are_refused_clearly():
    vae = WorldPatchAutoencoder(4, 4)
    with pytest.raises(ValueError, match=r"F = k \* 4 \+ 1"):
        vae.encode(torch.zeros(1, 3, 16, 32, 32))
    with pytest.raises(ValueError, match="multiples of 4"):
        vae.encode(torch.zeros(1, 3, 17, 30, 32))
    with pytest.raises(ValueError, match="192 latent channels"):
        vae.decode(torch.zeros(1, 16, 5, 8, 8))
    for folds in [(0, 4), (4, 0)]:
        with pytest.raises(ValueError, match="must be >= 1"):
            WorldPatchAutoencoder(*folds)
    with pytest.raises(ValueError, match="z_dim=16 contradicts"):
        WorldPatchAutoencoder(4, 4, z_dim=16)
    with pytest.raises(ValueError, match="one value per latent channel"):
        WorldPatchAutoencoder(4, 4, latents_mean=[0.0] * 16)


@pytest.mark.parametrize("temporal_fold, spatial_fold", FOLDS + [(4, 2), (3, 4)])
def test_scale_factors_give_wan_pipeline_the_folds(temporal_fold, spatial_fold):
    vae = WorldPatchAutoencoder(temporal_fold, spatial_fold)
    assert (vae.config.scale_factor_temporal, vae.config.scale_factor_spatial) == (temporal_fold, spatial_fold)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, transformer=None, vae=vae, scheduler=None)
    assert (pipe.vae_scale_factor_temporal, pipe.vae_scale_factor_spatial) == (temporal_fold, spatial_fold)


def test_save_and_from_pretrained_round_trip(tmp_path):
    mean, std = [float(i) for i in range(96)], [1.0 + i for i in range(96)]
    vae = WorldPatchAutoencoder(2, 4, latents_mean=mean, latents_std=std)
    vae.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file() and (tmp_path / "config.json").is_file()
    loaded = WorldPatchAutoencoder.from_pretrained(tmp_path)
    public = lambda config: {key: value for key, value in config.items() if not key.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(vae.config)
    assert loaded.config.latents_mean == mean and loaded.config.latents_std == std and loaded.config.z_dim == 96
    video = torch.rand(1, 3, 5, 8, 8) * 2 - 1
    assert torch.equal(loaded.decode(loaded.encode(video).latent_dist.mode()).sample, video)
    assert WorldPatchAutoencoder.from_pretrained(tmp_path, torch_dtype=torch.bfloat16).dtype == torch.bfloat16


def test_measured_latent_stats_normalise_world_latents():
    vae = WorldPatchAutoencoder(4, 4)
    mean, std = measure_latent_stats(vae, 32, 32, 17, num_clips=24, seed=3)
    assert len(mean) == len(std) == vae.config.z_dim
    rng = np.random.default_rng(3)  # the same clips the stats were measured on
    videos = torch.stack([frames_to_tensor(render(sample_clip(rng, 32, 32, 17))) for _ in range(24)])
    z = vae.encode(videos).latent_dist.mode()
    z = (z - torch.tensor(mean).view(1, -1, 1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1, 1)
    assert torch.allclose(z.mean(dim=(0, 2, 3, 4)), torch.zeros(192), atol=1e-4)
    assert torch.allclose(z.std(dim=(0, 2, 3, 4)), torch.ones(192), atol=1e-4)
    assert 0.2 < min(std) and max(std) < 1.0  # world pixels in [-1, 1] spread less than N(0, 1)


def test_wan_pipeline_generates_through_the_world_autoencoder():
    torch.manual_seed(0)
    transformer = WanTransformer3DModel(
        patch_size=(1, 1, 1), num_attention_heads=2, attention_head_dim=16, in_channels=192, out_channels=192,
        text_dim=32, freq_dim=32, ffn_dim=32, num_layers=1, rope_max_seq_len=32,
    )
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=64, d_model=32, d_kv=16, d_ff=32, num_layers=1, num_heads=2))
    pipe = WanPipeline(
        tokenizer=build_world_tokenizer(), text_encoder=text_encoder, transformer=transformer,
        vae=WorldPatchAutoencoder(4, 4), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )
    pipe.set_progress_bar_config(disable=True)
    video = pipe("a red circle moving left", height=32, width=32, num_frames=9, num_inference_steps=2,
                 max_sequence_length=16, guidance_scale=1.0, output_type="np").frames
    assert video.shape == (1, 9, 32, 32, 3) and 0 <= video.min() and video.max() <= 1
