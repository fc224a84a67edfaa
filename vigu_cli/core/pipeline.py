"""`UniViGUPipeline`: a diffusers `WanPipeline` whose transformer also reads and writes text.

Components: `tokenizer` + `text_encoder` (umT5, the prompt condition), `vae`, `transformer`
(`UniViGUTransformer`), `scheduler` (its shift is the default of the time grid) and `text_tokenizer`
(the text stream's tokenizer). The three modes are each one call of the same `FlowSolver` with a
different stream frozen (DESIGN.md section 6):

- `generate(prompt)`: text frozen (the clean prompt tokens, or no text stream), video from noise;
- `caption(video)`: video frozen at the clip's clean latent, text from noise, conditioned on the empty
  prompt or a hint (a video that does not attend to the text is computed once, `VideoContext`);
- `joint(prompt)`: both from noise, coupled through the shared attention.

Prompt encoding, latent preparation and the stock text-to-video `__call__` are WanPipeline's own.
`generator` is one `torch.Generator` or, as in diffusers, a list of one per sample: each sample's
noise (and discrete text jumps) then come from its own generator, whatever batch it is in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from diffusers import WanPipeline
from diffusers.utils import BaseOutput

# A vigu folder's model_index.json names these modules as the libraries of its transformer and (world) VAE, and
# diffusers loads a component only from a module already imported: importing the pipeline makes its folders load.
from ..data import world_vae  # noqa: F401
from ..data.video_io import tensor_to_frames
from . import model  # noqa: F401
from .flow import FlowSolver, Stream, derived_generators, flowing_guides
from .text import consensus, decode_ids, encode_texts, make_text_flow
from ..recipe import TextSection


@dataclass
class UniViGUPipelineOutput(BaseOutput):
    """`videos`: uint8 `[B, F, H, W, 3]` (or the latents with `output_type="latent"`); `texts`: the
    text stream decoded, one string per sample (None where the text stream was frozen or absent)."""

    videos: Optional[np.ndarray | torch.Tensor] = None
    texts: Optional[list[str]] = None


# The solver settings a call may override (`sampling_settings`); every other one comes from the model.
SAMPLING_SETTINGS = (
    "steps", "solver", "shift", "guidance_video", "guidance_text", "text_shift", "text_temperature", "text_order",
    "video_eta", "negative_prompt", "caption_candidates",
)
# the settings of one stream: inert in a mode where that stream does not flow (the recorded settings leave them out)
VIDEO_SETTINGS = ("shift", "guidance_video", "video_eta", "negative_prompt")
TEXT_SETTINGS = ("text_shift", "guidance_text", "text_temperature", "text_order")
CAPTION_SETTINGS = ("caption_candidates",)  # caption's alone: joint's caption is tied to its clip
CANDIDATE_KEY = 0xCA9D  # mixes a sample's seed into the seeds of its further caption candidates


class UniViGUPipeline(WanPipeline):
    model_cpu_offload_seq = "text_encoder->transformer->vae"

    def __init__(
        self,
        tokenizer,
        text_encoder,
        vae,
        scheduler,
        transformer,
        text_tokenizer,
        text_formulation: str = "embedding",
        text_max_length: int = 48,
        text_rounding_weight: float = 1.0,
        text_kappa_exponent: float = 1.0,
        text_discrete_source: str = "uniform",
        prompt_max_length: int = 512,
        normalize_latents: bool = True,
        height: int = 480,
        width: int = 832,
        num_frames: int = 81,
        fps: int = 16,
        steps: int = 50,
        solver: str = "euler",
        guidance_video: float = 5.0,
        guidance_text: float = 1.0,
        text_shift: Optional[float] = None,
        text_temperature: float = 1.0,
        text_order: str = "random",
        generate_text: str = "prompt",
        video_eta: float = 0.0,
        negative_prompt: str = "",
        caption_candidates: int = 1,
        transformer_2=None,
        boundary_ratio: Optional[float] = None,
        expand_timesteps: bool = False,
    ):
        # WanPipeline's Wan2.2 options stay in the config at Wan2.1's values, as a stock folder's model_index.json
        # keeps them, so that WanPipeline's own `__call__` (plain text-to-video with the stock transformer) runs
        if transformer_2 is not None or boundary_ratio is not None or expand_timesteps:
            raise ValueError("Wan2.2's options (transformer_2, boundary_ratio, expand_timesteps) are not supported: "
                             "vigu turns a Wan2.1 text-to-video model into Uni-ViGU")
        super().__init__(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler, transformer=transformer)
        self.register_modules(text_tokenizer=text_tokenizer)
        self.register_to_config(
            text_formulation=text_formulation,
            text_max_length=text_max_length,
            text_rounding_weight=text_rounding_weight,
            text_kappa_exponent=text_kappa_exponent,
            text_discrete_source=text_discrete_source,
            prompt_max_length=prompt_max_length,
            normalize_latents=normalize_latents,
            height=height,
            width=width,
            num_frames=num_frames,
            fps=fps,
            steps=steps,
            solver=solver,
            guidance_video=guidance_video,
            guidance_text=guidance_text,
            text_shift=text_shift,
            text_temperature=text_temperature,
            text_order=text_order,
            generate_text=generate_text,
            video_eta=video_eta,
            negative_prompt=negative_prompt,
            caption_candidates=caption_candidates,
        )

    # ------------------------------------------------------------------------------------------------
    # Pieces shared by every mode (and by training)
    # ------------------------------------------------------------------------------------------------

    @property
    def text_flow(self):
        cfg = self.config
        section = TextSection(
            formulation=cfg.text_formulation,
            rounding_weight=cfg.text_rounding_weight,
            kappa_exponent=cfg.text_kappa_exponent,
            discrete_source=cfg.text_discrete_source,
        )
        return make_text_flow(section, self.transformer.config.text_vocab_size, self.text_tokenizer.mask_token_id)

    def _latent_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, self.vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(self.vae.config.latents_mean).view(shape).to(like.device, like.dtype)
        std = torch.tensor(self.vae.config.latents_std).view(shape).to(like.device, like.dtype)
        return mean, std

    @torch.no_grad()
    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        """Pixels `[B, 3, F, H, W]` in [-1, 1] -> the transformer's latents (normalised as WanPipeline)."""
        latents = self.vae.encode(video.to(self.vae.device, self.vae.dtype)).latent_dist.mode().float()
        if self.config.normalize_latents:
            mean, std = self._latent_stats(latents)
            latents = (latents - mean) / std
        return latents

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """The transformer's latents -> pixels `[B, 3, F, H, W]` in [-1, 1]."""
        latents = latents.to(self.vae.device, self.vae.dtype)
        if self.config.normalize_latents:
            mean, std = self._latent_stats(latents)
            latents = latents * std + mean
        return self.vae.decode(latents, return_dict=False)[0].clamp(-1, 1)

    @torch.no_grad()
    def encode_condition(self, prompts: list[str], device) -> torch.Tensor:
        """umT5 prompt embeddings, padded as WanPipeline pads them."""
        embeds, _ = self.encode_prompt(
            prompts, do_classifier_free_guidance=False, max_sequence_length=self.config.prompt_max_length,
            device=device, dtype=(self.transformer or self.text_encoder).dtype,
        )
        return embeds

    def text_ids(self, texts: list[str]) -> torch.Tensor:
        return encode_texts(self.text_tokenizer, texts, self.config.text_max_length)

    def decode_text(self, state: torch.Tensor) -> list[str]:
        return decode_ids(self.text_tokenizer, self.text_flow.decode(self.transformer, state))

    def model_fn(self, x_v, x_t, t_v, t_t, condition, video_context=None):
        """One transformer evaluation in the solver's terms (fp32 state in, fp32 predictions out)."""
        dtype = self.transformer.dtype
        if x_t is not None and x_t.is_floating_point():
            x_t = x_t.to(dtype)
        video, text = self.transformer(
            hidden_states=x_v.to(dtype) if x_v is not None else None,
            timestep=t_v,
            encoder_hidden_states=condition,
            text_states=x_t,
            timestep_text=t_t,
            return_dict=False,
            video_context=video_context,
        )
        return (video.float() if video is not None else None, text.float() if text is not None else None)

    def frozen_video_model_fn(self):
        """`model_fn` for a frozen video that does not attend to the text (`video_attends_text=False`): the
        video's `VideoContext` (with the keys and values the text reads of it and of the prompt) is computed at the
        first step for each condition (prompt, empty prompt) and every step after runs the text stream alone; the
        same predictions as `model_fn`."""
        contexts = []  # (condition, its VideoContext): the solver passes the same condition tensors each step

        def model_fn(x_v, x_t, t_v, t_t, condition):
            context = next((c for cond, c in contexts if cond is condition), None)
            if context is None:
                context = self.transformer.video_context(x_v.to(self.transformer.dtype), t_v, condition,
                                                         keys_values=True)
                contexts.append((condition, context))
            return self.model_fn(None, x_t, None, t_t, condition, video_context=context)

        return model_fn

    def sampling_settings(self, **overrides) -> dict:
        """The solver settings a call uses: the model's defaults (its config and scheduler shift) with
        the overrides that are not None. Heun integrates the video's deterministic flow: a Heun call leaves out the
        model's default `video_eta` (a stochastic Euler step); one that asks for both is refused by the solver."""
        unknown = set(overrides) - set(SAMPLING_SETTINGS)
        if unknown:
            raise TypeError(f"unknown sampling setting(s): {', '.join(sorted(unknown))}")
        # each setting is the pipeline config's entry of its name, but the shift, which the scheduler holds
        merged = {name: self.scheduler.config.shift if name == "shift" else self.config[name] for name in SAMPLING_SETTINGS}
        merged.update({k: v for k, v in overrides.items() if v is not None})
        if merged["solver"] == "heun" and overrides.get("video_eta") is None:
            merged["video_eta"] = 0.0
        if merged["text_shift"] is None:  # the text stream walks the video's grid
            merged["text_shift"] = merged["shift"]
        return merged

    def recorded_settings(self, mode: Optional[str] = None, **overrides) -> dict:
        """`sampling_settings` as a sidecar or report records them, without those that do nothing: the discrete
        flow's token-draw settings (`text_temperature`, `text_order`) on a model whose text flow draws no tokens,
        the text's in `generate` (its text, if any, is the given prompt) and the video's in `caption` (its video is
        the given clip; `text_shift` says the grid the text walks)."""
        settings = self.sampling_settings(**overrides)
        inert = {"generate": TEXT_SETTINGS + CAPTION_SETTINGS, "joint": CAPTION_SETTINGS,
                 "caption": VIDEO_SETTINGS}.get(mode, ())
        if self.text_flow.continuous:
            inert = (*inert, "text_temperature", "text_order")
        return {k: v for k, v in settings.items() if k not in inert}

    def _solve(self, video, text, prompts, generator, callback, settings, model_fn=None):
        s = self.sampling_settings(**settings)
        device = self._execution_device
        condition = self.encode_condition(prompts, device)
        guided = flowing_guides(video, text, s["guidance_video"], s["guidance_text"])
        # the video's own settings act only on a video that flows (caption's is given): its negative prompt, what
        # its guidance steers away from, and its stochastic step
        video_flows = video is not None and not video.frozen
        negative = s["negative_prompt"] if video_flows else ""
        uncondition = self.encode_condition([negative] * len(prompts), device) if guided and any(prompts) else None
        solver = FlowSolver(s["steps"], s["solver"], s["shift"], s["text_shift"], s["video_eta"] if video_flows else 0.0)
        # a video that flows and does not read the text predicts the same without it
        one_way = video_flows and not self.transformer.config.video_attends_text
        return solver(
            model_fn or self.model_fn, video, text, self.text_flow, condition, uncondition,
            s["guidance_video"], s["guidance_text"], generator, callback, s["text_temperature"], s["text_order"],
            uncondition_text=not one_way,
        )

    def _noise_video(self, batch: int, generator, height=None, width=None, num_frames=None) -> torch.Tensor:
        return self.prepare_latents(
            batch, self.transformer.config.in_channels, height or self.config.height, width or self.config.width,
            num_frames or self.config.num_frames, torch.float32, self._execution_device, generator,
        )

    def _noise_text(self, batch: int, generator) -> torch.Tensor:
        return self.text_flow.noise(
            self.transformer, batch, self.config.text_max_length, generator, self._execution_device
        )

    def _videos(self, latents: torch.Tensor, output_type: str):
        if output_type == "latent":
            return latents
        return np.stack([tensor_to_frames(v) for v in self.decode_latents(latents).float().cpu()])

    # ------------------------------------------------------------------------------------------------
    # The three modes
    # ------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        prompt: str | list[str],
        generator: Optional[torch.Generator | list[torch.Generator]] = None,
        text_stream: Optional[str] = None,
        output_type: str = "np",
        callback: Optional[Callable[[int, int], None]] = None,
        height: Optional[int] = None,
        width: Optional[int] = None,
        num_frames: Optional[int] = None,
        **settings,
    ) -> UniViGUPipelineOutput:
        """Text-to-video. `text_stream`: `prompt` (the clean prompt tokens ride in the text stream, paper
        eq. 17) or `none` (plain Wan text-to-video); default from the pipeline config. A video that does not
        attend to the text (`video_attends_text=False`) is the same either way, so no text stream runs."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        video = Stream(self._noise_video(len(prompts), generator, height, width, num_frames))
        text = None
        if (text_stream or self.config.generate_text) == "prompt" and self.transformer.config.video_attends_text:
            ids = self.text_ids(prompts).to(self._execution_device)
            text = Stream(self.text_flow.clean(self.transformer, ids), frozen=True)
        latents, _ = self._solve(video, text, prompts, generator, callback, settings)
        return UniViGUPipelineOutput(videos=self._videos(latents, output_type))

    @torch.no_grad()
    def caption(
        self,
        video: torch.Tensor,
        hint: Optional[str | list[str]] = None,
        generator: Optional[torch.Generator | list[torch.Generator]] = None,
        callback: Optional[Callable[[int, int], None]] = None,
        **settings,
    ) -> UniViGUPipelineOutput:
        """Video understanding: `video` is pixels `[B, 3, F, H, W]` in [-1, 1] at the model's shape;
        `hint` an optional brief prompt to condition on (the paper's stage-2 setting)."""
        shape = (3, self.config.num_frames, self.config.height, self.config.width)
        if video.ndim != 5 or tuple(video.shape[1:]) != shape or not video.is_floating_point():
            raise ValueError(f"caption takes float pixels [B, {', '.join(map(str, shape))}] in [-1, 1], the model's "
                             f"shape, got {str(video.dtype).removeprefix('torch.')} {list(video.shape)}: "
                             "vigu_cli.data.video_io.load_clip fits a video file to a shape, frames_to_tensor converts")
        batch = video.shape[0]
        hints = [""] * batch if hint is None else ([hint] * batch if isinstance(hint, str) else list(hint))
        # `caption_candidates` K: K captions of each clip, the one that agrees most with the others kept (minimum
        # Bayes risk); the first is the caption K = 1 gives, the others draw from generators of their own
        k = self.sampling_settings(**settings)["caption_candidates"]
        latents = self.encode_video(video).repeat_interleave(k, 0)
        hints = [h for h in hints for _ in range(k)]
        if isinstance(generator, list) and k > 1:
            generator = [g for given in generator
                         for g in [given, *(derived_generators(given, CANDIDATE_KEY, j) for j in range(1, k))]]
        text = Stream(self._noise_text(batch * k, generator))
        one_way = not self.transformer.config.video_attends_text  # the video is then computed once
        model_fn = self.frozen_video_model_fn() if one_way else None
        _, state = self._solve(Stream(latents, frozen=True), text, hints, generator, callback, settings, model_fn)
        texts = self.decode_text(state)
        return UniViGUPipelineOutput(texts=[group[consensus(group)] for group in
                                            (texts[i : i + k] for i in range(0, len(texts), k))])

    @torch.no_grad()
    def joint(
        self,
        prompt: str | list[str],
        generator: Optional[torch.Generator | list[torch.Generator]] = None,
        output_type: str = "np",
        callback: Optional[Callable[[int, int], None]] = None,
        **settings,
    ) -> UniViGUPipelineOutput:
        """A video and its detailed caption together, both from noise (paper eq. 18)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        video = Stream(self._noise_video(len(prompts), generator))
        text = Stream(self._noise_text(len(prompts), generator))
        latents, state = self._solve(video, text, prompts, generator, callback, settings)
        return UniViGUPipelineOutput(videos=self._videos(latents, output_type), texts=self.decode_text(state))
