"""The world's autoencoder: exact and fixed, not learned (DESIGN.md section 7).

Space-to-depth: `temporal_fold` frames x `spatial_fold` x `spatial_fold` pixels become the channels of
one latent voxel, and decoding is the exact inverse. Like Wan's causal VAE the first frame is encoded
alone (replicated across the temporal fold), so F = k * temporal_fold + 1 frames give 1 + k latent
frames. It has the interface of diffusers' `AutoencoderKLWan` (`encode(x).latent_dist`,
`decode(z).sample`, config `z_dim`, `latents_mean`, `latents_std`, `scale_factor_temporal`,
`scale_factor_spatial`), so `WanPipeline`, the cache and every command treat it as any VAE.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput, IdentityDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput

from vigu_cli.data.video_io import frames_to_tensor
from vigu_cli.data.world import render, sample_clip


class WorldPatchAutoencoder(ModelMixin, ConfigMixin):
    """Exact patch autoencoder: videos [B, 3, F, H, W] in [-1, 1] <-> latents
    [B, 3 * temporal_fold * spatial_fold**2, 1 + (F - 1) // temporal_fold, H / spatial_fold, W / spatial_fold].
    Latent channel index = ((colour * temporal_fold + frame) * spatial_fold + row) * spatial_fold + col.

    `z_dim`, `scale_factor_temporal` and `scale_factor_spatial` follow from the folds; they are accepted (and checked) so that a saved config loads back without warnings.
    """

    @register_to_config
    def __init__(
        self,
        temporal_fold: int = 4,
        spatial_fold: int = 4,
        latents_mean: list[float] | None = None,
        latents_std: list[float] | None = None,
        z_dim: int | None = None,
        scale_factor_temporal: int | None = None,
        scale_factor_spatial: int | None = None,
    ):
        super().__init__()
        if temporal_fold < 1 or spatial_fold < 1:
            raise ValueError(f"temporal_fold ({temporal_fold}) and spatial_fold ({spatial_fold}) must be >= 1")
        channels = 3 * temporal_fold * spatial_fold**2
        derived = {
            "z_dim": channels,
            "scale_factor_temporal": temporal_fold,
            "scale_factor_spatial": spatial_fold,
        }
        given = {
            "z_dim": z_dim,
            "scale_factor_temporal": scale_factor_temporal,
            "scale_factor_spatial": scale_factor_spatial,
        }
        for name, value in derived.items():
            if given[name] not in (None, value):
                raise ValueError(f"{name}={given[name]} contradicts the folds, which give {value}")
        latents_mean = [0.0] * channels if latents_mean is None else [float(v) for v in latents_mean]
        latents_std = [1.0] * channels if latents_std is None else [float(v) for v in latents_std]
        if len(latents_mean) != channels or len(latents_std) != channels:
            raise ValueError(f"latents_mean and latents_std need one value per latent channel ({channels})")
        self.register_to_config(**derived, latents_mean=latents_mean, latents_std=latents_std)
        self.z_dim = channels
        # No learnt state. This buffer gives the module a dtype and a device (WanPipeline casts latents
        # to `vae.dtype`) and a weights file, so save/from_pretrained work as for any diffusers model.
        self.register_buffer("folds", torch.tensor([float(temporal_fold), float(spatial_fold)]))

    def encode(self, x: torch.Tensor, return_dict: bool = True) -> AutoencoderKLOutput | tuple[IdentityDistribution]:
        t, s = self.config.temporal_fold, self.config.spatial_fold
        b, c, f, h, w = x.shape
        if c != 3 or (f - 1) % t or h % s or w % s:
            raise ValueError(
                f"the world autoencoder needs [B, 3, F, H, W] with F = k * {t} + 1 and H, W multiples of {s}; "
                f"got {list(x.shape)}"
            )
        x = torch.cat([x[:, :, :1].expand(-1, -1, t, -1, -1), x[:, :, 1:]], dim=2)  # the first frame alone
        n = x.shape[2] // t
        z = x.reshape(b, c, n, t, h // s, s, w // s, s).permute(0, 1, 3, 5, 7, 2, 4, 6)
        latent = IdentityDistribution(z.reshape(b, self.z_dim, n, h // s, w // s))
        return AutoencoderKLOutput(latent_dist=latent) if return_dict else (latent,)

    def decode(self, z: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple[torch.Tensor]:
        t, s = self.config.temporal_fold, self.config.spatial_fold
        b, channels, n, h, w = z.shape
        if channels != self.z_dim:
            raise ValueError(f"the world autoencoder decodes {self.z_dim} latent channels, got {channels}")
        x = z.reshape(b, 3, t, s, s, n, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, 3, n * t, h * s, w * s)
        # The first latent frame holds the first frame `t` times: decode their mean, computed in float64
        # so that identical copies give back exactly their value.
        first = x[:, :, :t].double().mean(dim=2, keepdim=True).to(x.dtype)
        x = torch.cat([first, x[:, :, t:]], dim=2).clamp(-1.0, 1.0)
        return DecoderOutput(sample=x) if return_dict else (x,)


def measure_latent_stats(
    vae: WorldPatchAutoencoder, height: int = 64, width: int = 64, num_frames: int = 17, num_clips: int = 64, seed: int = 0
) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of `vae`'s latents over `num_clips` sampled world clips, for its config's
    `latents_mean` / `latents_std` (e.g. `vae.register_to_config(latents_mean=..., latents_std=...)`)."""
    rng = np.random.default_rng(seed)
    videos = torch.stack([frames_to_tensor(render(sample_clip(rng, height, width, num_frames))) for _ in range(num_clips)])
    with torch.no_grad():
        z = vae.encode(videos.to(vae.dtype)).latent_dist.mode().float()
    return z.mean(dim=(0, 2, 3, 4)).tolist(), z.std(dim=(0, 2, 3, 4)).tolist()
