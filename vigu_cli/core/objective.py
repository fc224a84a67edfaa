"""The unified training objective (paper eq. 9-11): one function used by every training stage."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Callable, Optional

import torch

from ..recipe import FlowSection
from .flow import draw, interpolate, per_sample_mse, sample_sigmas, sigma_to_timestep, unified_loss, velocity_target
from .model import VideoContext
from .text import TextFlow


def unified_objective(
    model,
    text_flow: TextFlow,
    cfg: FlowSection,
    video_latents: Optional[torch.Tensor],
    text_ids: Optional[torch.Tensor],
    condition: torch.Tensor,
    generator: Optional[torch.Generator] = None,
    core=None,
    batch_slice: Optional[tuple[int, int]] = None,
    video_prediction: bool = True,
    video_context: Optional[Callable[..., VideoContext]] = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Noise both streams at independent sigmas, predict, and return the unified loss and its parts.

    `model` is what runs the forward (possibly wrapped by DDP/FSDP); `core` the unwrapped
    `UniViGUTransformer` the text flow reads its token table from (default: `model`). A stream that is
    None is absent (stage `base` trains video alone). `batch_slice = (start, total)`: this process's rows
    of the global batch, so every random draw equals one process's with the whole batch (`flow.draw`).
    `video_prediction=False` (with text): the noisy video runs only as far as the text reads it and has no
    loss: the same text gradient for less work, where the video loss would reach no trained parameter.
    """
    core = model if core is None else core
    some = video_latents if video_latents is not None else text_ids
    batch, device = some.shape[0], some.device
    if video_latents is None or text_ids is None:  # task corners exist only where both streams train
        cfg = replace(cfg, corner_prob=0.0)
    sigma_v, sigma_t = sample_sigmas(batch, cfg, generator, device, batch_slice)

    x_v = target_v = x_t = sample = None
    if video_latents is not None:
        noise = draw(torch.randn, video_latents.shape, batch_slice, generator=generator, device=device)
        x_v = interpolate(video_latents, noise, sigma_v)
        target_v = velocity_target(video_latents, noise)
    if text_ids is not None:
        sample = text_flow.sample_noisy(core, text_ids, sigma_t, generator, batch_slice)
        x_t = sample.x

    timestep_v = sigma_to_timestep(sigma_v) if x_v is not None else None
    context = None
    if video_context is not None and x_v is not None:
        if video_prediction:
            raise ValueError("a video context predicts no video: pass video_prediction=False with it")
        context = video_context(x_v, timestep_v, condition, sigma_v == 0)
    # a tuple, not the output dataclass: Accelerate's mixed-precision wrapper rebuilds a mapping output from its
    # non-None fields, and a UniViGUTransformerOutput rebuilt without `sample` (a one-way video) reads it back wrong
    prediction_v, prediction_t = model(
        hidden_states=x_v if context is None else None,
        timestep=timestep_v if context is None else None,
        encoder_hidden_states=condition,
        text_states=x_t,
        timestep_text=sigma_to_timestep(sigma_t) if x_t is not None else None,
        return_dict=False,
        video_prediction=video_prediction,
        video_context=context,
    )
    video_loss = per_sample_mse(prediction_v, target_v) if prediction_v is not None else None
    text_loss = text_flow.loss(core, prediction_t, sample, text_ids, sigma_t) if x_t is not None else None
    num_video = math.prod(video_latents.shape[2:]) // math.prod(core.config.patch_size) if x_v is not None else 0
    num_text = text_ids.shape[1] if x_t is not None else 0
    return unified_loss(
        video_loss, text_loss, cfg, num_video, num_text,
        video_weight=(sigma_v > 0).float(), text_weight_mask=(sigma_t > 0).float(),
    )
