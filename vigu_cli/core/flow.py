"""Flow matching for both streams, in diffusers' conventions, and the one solver used by every mode.

The paper writes tau in [0, 1] with tau = 0 noise, tau = 1 data, and a network predicting
u = data - noise. vigu follows diffusers Wan: `sigma = 1 - tau`, `timestep = 1000 * sigma`, and the
network predicts `noise - data` (= -u). This module is the only place that converts; everything else
speaks sigma.

Streams: the video stream is always continuous; the text stream is whatever `TextFlow` the model
uses (`core/text.py`). The solver never branches on the formulation: continuous text integrates like
video, and any text flow steps through `TextFlow.step`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.utils.torch_utils import randn_tensor

from ..recipe import FlowSection

# ----------------------------------------------------------------------------------------------------
# Time
# ----------------------------------------------------------------------------------------------------


def tau_to_sigma(tau: torch.Tensor | float) -> torch.Tensor | float:
    """Paper time (tau = 1 data) -> diffusers sigma (sigma = 1 noise)."""
    return 1.0 - tau


def sigma_to_timestep(sigma: torch.Tensor) -> torch.Tensor:
    """The transformer's timestep input: 0 = clean, 1000 = pure noise."""
    return sigma * 1000.0


def shift_sigma(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """The shift of diffusers' flow-matching schedulers: pushes sigmas towards noise for shift > 1."""
    return shift * sigma / (1.0 + (shift - 1.0) * sigma)


def _broadcast(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return sigma.to(like.dtype).view(-1, *([1] * (like.ndim - 1)))


def interpolate(data: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x_sigma = (1 - sigma) * data + sigma * noise, sigma per sample (paper eq. 6-7 with tau = 1 - sigma)."""
    s = _broadcast(sigma, data)
    return (1.0 - s) * data + s * noise


def velocity_target(data: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """What the network predicts: d x_sigma / d sigma = noise - data."""
    return noise - data


def predicted_data(x: torch.Tensor, prediction: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The clean sample implied by a prediction at x_sigma: data = x_sigma - sigma * (noise - data)."""
    return x - _broadcast(sigma, x) * prediction


def draw(fn, size: tuple[int, ...], batch_slice: Optional[tuple[int, int]] = None, **kwargs) -> torch.Tensor:
    """`fn(size=..., **kwargs)` (torch.rand, randn, randint) drawn for the whole global batch
    `batch_slice = (start, total)`, keeping this process's rows: N processes then see exactly the
    randomness of one process with the N-times batch."""
    start, total = batch_slice or (0, size[0])
    return fn(size=(total, *size[1:]), **kwargs)[start : start + size[0]]


def draw_per_sample(fn, size: tuple[int, ...], generator=None, **kwargs) -> torch.Tensor:
    """`fn(size=..., **kwargs)` with one generator for the batch, or (diffusers' convention) a list of
    generators, one per sample, each drawing its own row: a sample's draws then do not depend on the
    batch it is sampled in."""
    if isinstance(generator, list):
        if len(generator) != size[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {size[0]}")
        return torch.cat([fn(size=(1, *size[1:]), generator=g, **kwargs) for g in generator])
    return fn(size=size, generator=generator, **kwargs)


def sample_sigmas(
    batch: int, cfg: FlowSection, generator: Optional[torch.Generator] = None, device=None,
    batch_slice: Optional[tuple[int, int]] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent (sigma_v, sigma_t) per sample (paper: tau_v, tau_t ~ U(0, 1) independently).

    `cfg.tau_sampling`: `uniform`; `logit_normal` (sigma = sigmoid(N(logit_mean, logit_std)), SD3);
    `shifted` (uniform, then the scheduler shift `tau_shift`). With probability `cfg.corner_prob` a
    sample is put on a task corner instead: a share `cfg.understanding_share` of them understanding (video
    clean, sigma_v = 0), the rest generation (text clean, sigma_t = 0).
    """

    def uniform() -> torch.Tensor:
        return draw(torch.rand, (batch,), batch_slice, generator=generator, device=device)

    def sigma() -> torch.Tensor:
        if cfg.tau_sampling == "logit_normal":
            normal = draw(torch.randn, (batch,), batch_slice, generator=generator, device=device)
            return torch.sigmoid(cfg.logit_mean + cfg.logit_std * normal)
        return shift_sigma(uniform(), cfg.tau_shift) if cfg.tau_sampling == "shifted" else uniform()

    sigma_v, sigma_t = sigma(), sigma()
    corner = uniform() < cfg.corner_prob
    understanding = uniform() < cfg.understanding_share
    sigma_v = torch.where(corner & understanding, torch.zeros_like(sigma_v), sigma_v)
    sigma_t = torch.where(corner & ~understanding, torch.zeros_like(sigma_t), sigma_t)
    return sigma_v, sigma_t


# ----------------------------------------------------------------------------------------------------
# Loss
# ----------------------------------------------------------------------------------------------------


def per_sample_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error per sample, i.e. the per-token (per-element) mean of the paper's ||.||^2."""
    return (prediction.float() - target.float()).pow(2).flatten(1).mean(1)


def text_weight(lambda_text: str | float, num_video_tokens: int, num_text_tokens: int) -> float:
    """Weight of the text stream's per-token mean loss relative to the video stream's.

    The paper sums squared errors over tokens with lambda_v = 1 and lambda_t = |z_v| / |z_t|; divided by
    |z_v| that is `mean_v + mean_t`, so `auto` gives weight 1. A number is the paper's lambda_t on
    summed errors, i.e. weight lambda_t * |z_t| / |z_v| on the mean.
    """
    if lambda_text == "auto":
        return 1.0
    return float(lambda_text) * num_text_tokens / max(num_video_tokens, 1)


def unified_loss(
    video_loss: Optional[torch.Tensor],
    text_loss: Optional[torch.Tensor],
    cfg: FlowSection,
    num_video_tokens: int,
    num_text_tokens: int,
    video_weight: Optional[torch.Tensor] = None,
    text_weight_mask: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Paper eq. 11 on per-sample, per-token-mean losses `[B]` of each present stream.

    The weight masks zero the samples where a stream was clean (sigma = 0, a task corner): its target,
    noise - data, cannot be predicted from clean data and would only add noise to the gradient.
    """
    total = None
    parts: dict[str, float] = {}
    for name, loss, weight, lam in (
        ("video", video_loss, video_weight, cfg.lambda_video),
        ("text", text_loss, text_weight_mask, text_weight(cfg.lambda_text, num_video_tokens, num_text_tokens)),
    ):
        if loss is None:
            continue
        weighted = (loss * weight).mean() if weight is not None else loss.mean()
        parts[f"loss_{name}"] = float(weighted.detach())
        total = lam * weighted if total is None else total + lam * weighted
    if total is None:
        raise ValueError("unified_loss needs at least one stream")
    parts["loss"] = float(total.detach())
    return total, parts


# ----------------------------------------------------------------------------------------------------
# Solver
# ----------------------------------------------------------------------------------------------------


@dataclass
class Stream:
    """One stream's state for the solver. A frozen stream keeps `x` and is shown at `frozen_sigma`
    (0 = clean: the video of `caption`, the prompt tokens of `generate`)."""

    x: torch.Tensor
    frozen: bool = False
    frozen_sigma: float = 0.0


# model_fn(video_x, text_x, video_timestep[B], text_timestep[B], condition) -> (video_pred, text_pred)
ModelFn = Callable[..., tuple[Optional[torch.Tensor], Optional[torch.Tensor]]]


def time_grid(steps: int, shift: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """`(sigmas[steps + 1], timesteps[steps])` exactly as diffusers' `FlowMatchEulerDiscreteScheduler`
    (shift, last sigma 0) lays them out, i.e. the grid `WanPipeline` steps through."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(steps, device=device)
    return scheduler.sigmas, scheduler.timesteps


class FlowSolver:
    """Integrates whichever streams are not frozen from sigma = 1 to 0 (Euler or Heun), with
    classifier-free guidance on the prompt condition and a scale per stream. The streams take the same
    number of steps, each on its own time grid: `shift` for the video, `text_shift` (default: `shift`)
    for the text. `video_eta` > 0 (Euler only) makes the video's steps stochastic (`video_step`)."""

    def __init__(
        self, steps: int = 25, method: str = "euler", shift: float = 3.0, text_shift: Optional[float] = None,
        video_eta: float = 0.0,
    ):
        if method not in ("euler", "heun"):
            raise ValueError(f"unknown solver '{method}': use euler or heun")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if shift <= 0 or (text_shift is not None and text_shift <= 0):
            raise ValueError(f"the time grid's shift must be above 0, got {shift} (text: {text_shift})")
        if not 0.0 <= video_eta <= 1.0:
            raise ValueError(f"video_eta must be between 0 and 1, got {video_eta}")
        if video_eta > 0 and method != "euler":
            raise ValueError("video_eta needs the euler solver")
        self.steps, self.method, self.shift, self.video_eta = steps, method, shift, video_eta
        self.text_shift = shift if text_shift is None else text_shift

    def video_step(self, x: torch.Tensor, velocity: torch.Tensor, sigma, sigma_next, generator=None) -> torch.Tensor:
        """One step of the video from `sigma` to `sigma_next`: Euler, or with `video_eta` > 0 DDIM's stochastic
        step on the flow's path x = (1 - sigma) x0 + sigma eps. From the prediction's x0 = x - sigma v and eps =
        x + (1 - sigma) v it lands on (1 - sigma_next) x0 + sqrt(sigma_next^2 - c^2) eps + c fresh, with c = eta
        sigma_next sqrt(1 - ((1 - sigma) sigma_next / ((1 - sigma_next) sigma))^2): the share of fresh noise DDIM's
        eta gives (eta 1: the DDPM posterior's), which keeps every step on the path's marginals and shrinks with
        the step, so more steps converge rather than add noise. eta 0 is the Euler step. `generator`: as
        diffusers' `randn_tensor` takes it (the solver passes `video_noise_generators`, one per sample, so a seed
        gives the same clip in any batch)."""
        if self.video_eta == 0 or sigma_next == 0:
            return x + (sigma_next - sigma) * velocity
        data, noise = x - sigma * velocity, x + (1 - sigma) * velocity
        kept = (1 - sigma) * sigma_next / ((1 - sigma_next) * sigma)
        fresh_std = self.video_eta * sigma_next * torch.sqrt(torch.clamp(1 - kept**2, min=0.0))
        fresh = randn_tensor(tuple(x.shape), generator=generator, device=x.device, dtype=x.dtype)
        return (1 - sigma_next) * data + torch.sqrt(sigma_next**2 - fresh_std**2) * noise + fresh_std * fresh

    def __call__(
        self,
        model_fn: ModelFn,
        video: Optional[Stream],
        text: Optional[Stream],
        text_flow=None,
        condition=None,
        uncondition=None,
        guidance_video: float = 1.0,
        guidance_text: float = 1.0,
        generator: Optional[torch.Generator] = None,
        callback: Optional[Callable[[int, int], None]] = None,
        text_temperature: float = 1.0,
        text_order: str = "random",
        uncondition_text: bool = True,
    ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """`uncondition_text=False`: an unguided text (`guidance_text` 1) is left out of the unconditional
        pass, whose text prediction guidance would not use (for a video that does not read the text, the
        same video prediction for less work)."""
        some = video.x if video is not None else text.x
        # each stream has its own timestep input, so each walks its own grid (the same steps, its shift)
        sigmas_v, timesteps_v = time_grid(self.steps, self.shift, device=some.device)
        sigmas_t, timesteps_t = time_grid(self.steps, self.text_shift, device=some.device)
        batch = some.shape[0]
        guided = uncondition is not None and flowing_guides(video, text, guidance_video, guidance_text)

        def timestep_of(stream: Optional[Stream], timestep: torch.Tensor) -> Optional[torch.Tensor]:
            if stream is None:
                return None
            if stream.frozen:
                return sigma_to_timestep(torch.full((batch,), float(stream.frozen_sigma), device=some.device))
            return timestep.expand(batch)

        def predict(x_v, x_t, i):
            t_v, t_t = timestep_of(video, timesteps_v[i]), timestep_of(text, timesteps_t[i])
            pred_v, pred_t = model_fn(x_v, x_t, t_v, t_t, condition)
            if guided:
                with_text = uncondition_text or guides(guidance_text)
                un_v, un_t = model_fn(x_v, x_t if with_text else None, t_v, t_t if with_text else None, uncondition)
                pred_v, pred_t = _guide(pred_v, un_v, guidance_video), _guide(pred_t, un_t, guidance_text)
            return pred_v, pred_t

        x_v = video.x if video is not None else None
        x_t = text.x if text is not None else None
        flows_v = video is not None and not video.frozen
        flows_t = text is not None and not text.frozen
        video_generator = video_noise_generators(generator) if flows_v and self.video_eta > 0 else None
        for i in range(self.steps):
            dt_v, dt_t = sigmas_v[i + 1] - sigmas_v[i], sigmas_t[i + 1] - sigmas_t[i]
            d_v, d_t = predict(x_v, x_t, i)
            new_v = self.video_step(x_v, d_v, sigmas_v[i], sigmas_v[i + 1], video_generator) if flows_v else x_v
            if flows_t:
                new_t = text_flow.step(x_t, d_t, sigmas_t[i], sigmas_t[i + 1], generator, text_temperature, text_order)
            else:
                new_t = x_t
            if self.method == "heun" and i + 1 < self.steps:
                e_v, e_t = predict(new_v, new_t, i + 1)
                if flows_v:
                    new_v = x_v + dt_v * (d_v + e_v) / 2
                if flows_t and text_flow.continuous:
                    new_t = x_t + dt_t * (d_t + e_t) / 2
            x_v, x_t = new_v, new_t
            if callback is not None:
                callback(i + 1, self.steps)
        return x_v, x_t


VIDEO_NOISE_KEY = 0x7E5A  # mixes a sample's seed into the seed of its video noise generator


def derived_generators(generator, *key: int):
    """A generator seeded from each given generator's seed and `key` (a list for a list): draws of their own, which
    do not move the given generators. None: None (the global generator)."""
    if generator is None:
        return None
    own = lambda g: torch.Generator(g.device).manual_seed(  # noqa: E731
        int(np.random.SeedSequence([g.initial_seed(), *key]).generate_state(1, np.uint64)[0]))
    return [own(g) for g in generator] if isinstance(generator, list) else own(generator)


def video_noise_generators(generator):
    """Generators of the video's fresh noise (`video_eta`), one per given generator, seeded from its seed: what the
    text stream draws does not move them, so a video that does not read the text is the same clip in `joint` as in
    `generate`. None: the global generator."""
    return derived_generators(generator, VIDEO_NOISE_KEY)


def guides(*scales: float) -> bool:
    """Whether classifier-free guidance at these scales needs an unconditional pass: any scale but 1 (below 1
    leans toward the unconditional prediction, 0 is that prediction)."""
    return any(scale != 1.0 for scale in scales)


def flowing_guides(video: Optional[Stream], text: Optional[Stream], guidance_video: float, guidance_text: float) -> bool:
    """`guides` for the streams that flow: a frozen stream's scale does nothing (the given clip of `caption`, the
    prompt tokens of `generate`), so it asks for no unconditional pass."""
    flowing = [scale for stream, scale in ((video, guidance_video), (text, guidance_text))
               if stream is not None and not stream.frozen]
    return guides(*flowing)


def _guide(cond: Optional[torch.Tensor], uncond: Optional[torch.Tensor], scale: float) -> Optional[torch.Tensor]:
    """Classifier-free guidance (on velocities, or on logits for the discrete text flow); scale 1
    returns the conditional prediction itself."""
    if cond is None or not guides(scale):
        return cond
    return uncond + scale * (cond - uncond)
