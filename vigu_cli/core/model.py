"""The unified transformer: diffusers' Wan DiT with a text stream (DESIGN.md section 3).

Every block runs the sequence `[video ; text]` through the shared self-attention `attn1` (video tokens
with Wan's 3-D RoPE, text tokens with a separate 1-D RoPE at positions 0..L-1), sends both streams
through the shared, ungated cross-attention to the prompt (`norm2` + `attn2`), and then routes video
tokens to `ffn` and text tokens to `ffn_text`. Both streams use the block's `scale_shift_table`, each
with its own timestep projection. The layout follows the official Uni-ViGU release
(`reference/official-uni-vigu.md`), so its checkpoint can be mapped onto these modules.

With `text_states=None` the forward pass is the stock `WanTransformer3DModel` forward, so a pretrained
Wan transformer produces exactly what it produced before it was extended.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from diffusers import ModelMixin  # noqa: F401  (diffusers finds a component's loadable base class in its module)
from diffusers.configuration_utils import register_to_config
from diffusers.models.attention import FeedForward
from diffusers.models.embeddings import TimestepEmbedding, apply_rotary_emb, get_1d_rotary_pos_embed
from diffusers.models.normalization import FP32LayerNorm
from diffusers.models.transformers.transformer_wan import (
    WanAttention,
    WanAttnProcessor,
    WanTransformer3DModel,
    WanTransformerBlock,
)
from diffusers.utils import BaseOutput
from diffusers.utils.peft_utils import apply_lora_scale
from torch import nn

# Top-level modules that the stock Wan transformer does not have; blocks add `ffn_text` (and `attn1_text`,
# `attn2_text`).
TEXT_MODULES = (
    "text_embedding",
    "text_in",
    "time_embedder_text",
    "time_proj_text",
    "scale_shift_table_text",
    "norm_out_text",
    "text_out",
)


@dataclass
class VideoContext:
    """What the text stream reads of a video that does not attend to the text (`video_attends_text=False`),
    computed once by `UniViGUTransformer.video_context`: per block, the video tokens as its self-attention
    takes them (normalised and modulated), and the video's RoPE. A frozen video (`caption`) then costs one
    video forward, and each solver step runs the text stream alone. `keys_values` (for weights that do not change
    while it is used, as in sampling): per block, the keys (normalised, with RoPE) and values the text's queries
    read of those tokens, so a step does not project them again; and `prompt_keys_values`, per block, those the
    text's cross-attention reads of the prompt the context was computed with, so a step does not embed and project
    the prompt again."""

    tokens: list[torch.Tensor]
    rotary_emb: tuple[torch.Tensor, torch.Tensor]
    keys_values: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    prompt_keys_values: list[tuple[torch.Tensor, torch.Tensor]] | None = None


class _Read(Exception):
    """Stops a stock forward once `video_context` has read the last block's attention input."""


@dataclass
class UniViGUTransformerOutput(BaseOutput):
    """`sample`: video prediction `[B, C, F, H, W]` (None without video); `text_sample`: text prediction,
    `[B, L, d_t]` (embedding) or logits `[B, L, V]` (discrete), None without text. Read the fields by
    name: like every `BaseOutput`, integer indexing skips fields that are None."""

    sample: torch.Tensor | None = None
    text_sample: torch.Tensor | None = None


class _PerModality:
    """One of WanAttention's projections or norms, applied with `video`'s weights to the first `num_video`
    tokens and with `text`'s to the rest."""

    def __init__(self, video: nn.Module, text: nn.Module, num_video: int):
        self.video, self.text, self.num_video = video, text, num_video

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.video(x[:, : self.num_video]), self.text(x[:, self.num_video :])], dim=1)


class _JointAttentionView:
    """WanAttention's interface over two self-attentions of one width: video tokens go through `video`'s
    projections and norms, text tokens through `text`'s, and every token attends to every token, so
    diffusers' `WanAttnProcessor` runs unchanged (SD3's joint attention, in Wan's layout)."""

    def __init__(self, video: WanAttention, text: WanAttention, num_video: int):
        self.heads, self.add_k_proj, self.fused_projections = video.heads, None, False
        for name in ("to_q", "to_k", "to_v", "norm_q", "norm_k"):
            setattr(self, name, _PerModality(getattr(video, name), getattr(text, name), num_video))
        self.to_out = [_PerModality(video.to_out[0], text.to_out[0], num_video), video.to_out[1]]


class _RotaryAfter:
    """A query or key norm, then RoPE (`(cos, sin)` `[1, L, 1, head_dim]`, Wan's interleaved layout) per head,
    on `[B, L, heads * head_dim]`: where `WanAttnProcessor` applies `norm_q` / `norm_k`, so that queries and
    keys of different lengths each carry their own positions."""

    def __init__(self, norm, rotary_emb: tuple[torch.Tensor, torch.Tensor], heads: int):
        self.norm, self.cos_sin, self.heads = norm, tuple(r[0, :, 0] for r in rotary_emb), heads

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        if x.shape[1] == 0:  # no tokens (a text stream of length 0): diffusers' reshape cannot size an empty tensor
            return x
        x = x.unflatten(2, (self.heads, -1))
        return apply_rotary_emb(x, self.cos_sin, use_real=True, use_real_unbind_dim=-1, sequence_dim=1).flatten(2)


class _TextQueryView(_JointAttentionView):
    """The `_JointAttentionView` for the text tokens' queries only, over the keys and values of `[video ; text]`:
    diffusers' `WanAttnProcessor` runs it as a cross-attention, with the RoPE applied by the norms
    (`_RotaryAfter`). `text_keys_video`: the video tokens' keys and values come from `text`'s projections too."""

    def __init__(self, video: WanAttention, text: WanAttention, num_video: int, rotary_emb, text_keys_video=False):
        super().__init__(video, text, num_video)
        self.to_q, self.to_out = text.to_q, text.to_out
        if text_keys_video:
            self.to_k, self.to_v, self.norm_k = text.to_k, text.to_v, text.norm_k
        self.norm_q = _RotaryAfter(text.norm_q, tuple(r[:, num_video:] for r in rotary_emb), video.heads)
        self.norm_k = _RotaryAfter(self.norm_k, rotary_emb, video.heads)


class _KeptVideoKeysView(_TextQueryView):
    """The `_TextQueryView` over `[video ; text]` keys and values whose video part was computed before
    (`VideoContext.keys_values`): it takes the text tokens alone and puts the kept video keys and values before
    theirs, as the processor projects and normalises them."""

    def __init__(self, video: WanAttention, text: WanAttention, rotary_emb, keys_values):
        key, value = keys_values
        num_video = key.shape[1]
        super().__init__(video, text, num_video, rotary_emb)
        text_rotary = _RotaryAfter(text.norm_k, tuple(r[:, num_video:] for r in rotary_emb), video.heads)
        self.to_k = text.to_k
        self.norm_k = lambda k: torch.cat([key.type_as(k), text_rotary(k)], dim=1)
        self.to_v = lambda x: torch.cat([value.type_as(x), text.to_v(x)], dim=1)


class _KeptKeysView:
    """WanAttention's interface for diffusers' `WanAttnProcessor` over keys (normalised) and values computed before:
    the queries of the tokens given are projected by `attn`, the keys and values are the kept ones."""

    def __init__(self, attn: WanAttention, key: torch.Tensor, value: torch.Tensor):
        self.heads, self.add_k_proj, self.fused_projections = attn.heads, None, False
        self.to_q, self.norm_q, self.to_out = attn.to_q, attn.norm_q, attn.to_out
        self.to_k, self.to_v = (lambda x: key.type_as(x)), (lambda x: value.type_as(x))
        self.norm_k = nn.Identity()


class _TextAttnProcessor(WanAttnProcessor):
    """diffusers' `WanAttnProcessor` for a block with text tokens, so `attn1` stays the module that is called
    (and hooked). Given `text` (the text tokens' `WanAttention`: `attn1` itself when shared) and `num_video`:
    self-attention of every token to every token (over the `_JointAttentionView` when the text has its own
    projections); with `encoder_hidden_states` (`[video ; text]`), the queries of `hidden_states`, the text
    tokens, attend to it (`_TextQueryView`; `text_keys_video`: through `text`'s keys and values of the video
    tokens too); with `video_keys_values`, the text tokens attend to those kept keys and values of the video and
    to their own."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None,
                 text=None, num_video=0, text_keys_video=False, video_keys_values=None):
        if video_keys_values is not None:  # the video's keys and values kept: the text tokens attend to them and theirs
            view = _KeptVideoKeysView(attn, text, rotary_emb, video_keys_values)
            return super().__call__(view, hidden_states, hidden_states, attention_mask, None)
        if encoder_hidden_states is not None and text is not None:
            view = _TextQueryView(attn, text, num_video, rotary_emb, text_keys_video)
            return super().__call__(view, hidden_states, encoder_hidden_states, attention_mask, None)
        if text is not None and text is not attn:
            attn = _JointAttentionView(attn, text, num_video)
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)


class UniViGUTransformerBlock(WanTransformerBlock):
    """A Wan block with a second FFN, `ffn_text`, for text tokens, and with `text_attention="own"` the text
    tokens' own self-attention projections, `attn1_text`. `video_attends_text=False`: video tokens attend to
    video tokens only (text tokens still attend to all); `text_video_keys="text"` then has the text read the
    video tokens through `attn1_text`'s keys and values. `text_cross_attention="own"`: the text tokens read the
    prompt through their own cross-attention, `attn2_text`."""

    def __init__(
        self, dim, ffn_dim, num_heads, qk_norm, cross_attn_norm, eps, added_kv_proj_dim, text_ffn_dim,
        text_attention="shared", video_attends_text=True, text_video_keys="video", text_cross_attention="shared",
    ):
        super().__init__(dim, ffn_dim, num_heads, qk_norm, cross_attn_norm, eps, added_kv_proj_dim)
        self.ffn_text = FeedForward(dim, inner_dim=text_ffn_dim, activation_fn="gelu-approximate")
        self.video_attends_text = video_attends_text
        self.text_keys_video = text_video_keys == "text"
        if text_attention == "own":
            self.attn1_text = WanAttention(dim=dim, heads=num_heads, dim_head=dim // num_heads, eps=eps)
        if text_cross_attention == "own":
            self.attn2_text = WanAttention(dim=dim, heads=num_heads, dim_head=dim // num_heads, eps=eps,
                                           added_kv_proj_dim=added_kv_proj_dim, cross_attention_dim_head=dim // num_heads,
                                           processor=WanAttnProcessor())
        self.attn1.set_processor(_TextAttnProcessor())

    def forward(
        self,
        hidden_states: torch.Tensor | None,
        encoder_hidden_states: torch.Tensor,
        temb: torch.Tensor | None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor],
        text_hidden_states: torch.Tensor | None = None,
        temb_text: torch.Tensor | None = None,
        video_tokens: torch.Tensor | None = None,
        video_keys_values: tuple[torch.Tensor, torch.Tensor] | None = None,
        prompt_keys_values: tuple[torch.Tensor, torch.Tensor] | None = None,
        video_read_only: bool = False,
    ):
        """Without text: the stock block. With text: returns `(video or None, text)`; `rotary_emb` then
        covers `[video ; text]` and `temb`, `temb_text` are `[B, 6, D]` projections. `video_tokens` (with no
        `hidden_states`): this block's tokens of a `VideoContext`, which the text queries read;
        `video_keys_values`: its keys and values as they read them (`video_keys_values()`), used in their place;
        `prompt_keys_values` (with no video): those the text's cross-attention reads of the prompt
        (`prompt_keys_values()`), used in place of `encoder_hidden_states`. `video_read_only` (a video that does
        not attend to the text): the video runs only as far as the text reads it, its attention input, and the
        block returns no video."""
        if text_hidden_states is None:
            return super().forward(hidden_states, encoder_hidden_states, temb, rotary_emb)
        if video_read_only:
            video_tokens, hidden_states = self.attention_input(hidden_states, temb), None
        streams = [(hidden_states, temb, self.attn2, self.ffn),
                   (text_hidden_states, temb_text, getattr(self, "attn2_text", self.attn2), self.ffn_text)]
        streams = [stream for stream in streams if stream[0] is not None]
        xs = [x for x, *_ in streams]
        mods = [self._modulation(t) for _, t, *_ in streams]
        sizes = [x.shape[1] for x in xs]

        # 1. Self-attention over [video ; text] (shared, or per-modality projections); each stream modulated
        # and gated by its own timestep.
        norm_x = [self.attention_input(x, t) for x, t, *_ in streams]
        num_video = sum(sizes[:-1]) if video_tokens is None else video_tokens.shape[1]
        text = {"text": getattr(self, "attn1_text", self.attn1), "num_video": num_video,
                "text_keys_video": self.text_keys_video}
        if video_keys_values is not None:  # a video's keys and values computed before: text queries over them
            attn_output = (self.attn1(norm_x[0], None, None, rotary_emb, **text, video_keys_values=video_keys_values),)
        elif video_tokens is not None:  # a video computed before (VideoContext): text queries over [it ; text]
            keys = torch.cat([video_tokens.type_as(norm_x[0]), norm_x[0]], dim=1)
            attn_output = (self.attn1(norm_x[0], keys, None, rotary_emb, **text),)
        elif self.video_attends_text or hidden_states is None:
            attn_output = self.attn1(torch.cat(norm_x, dim=1), None, None, rotary_emb, **text).split(sizes, dim=1)
        else:  # the stock attention of the video tokens, then the text tokens' queries over [video ; text]
            video_rotary = tuple(r[:, : sizes[0]] for r in rotary_emb)
            attn_output = (self.attn1(norm_x[0], None, None, video_rotary),
                           self.attn1(norm_x[1], torch.cat(norm_x, dim=1), None, rotary_emb, **text))
        xs = [(x.float() + a * m[2]).type_as(x) for x, a, m in zip(xs, attn_output, mods)]

        # 2. Cross-attention to the prompt (shared, or the text's own), ungated, each stream on its own (the same
        # per token; video that does not attend to text then does not depend on it in autograd's graph either).
        if prompt_keys_values is not None:  # the text alone, over the prompt's keys and values computed before
            attn2 = streams[0][2]
            xs = [(xs[0] + attn2.processor(_KeptKeysView(attn2, *prompt_keys_values),
                                           self.norm2(xs[0].float()).type_as(xs[0]))).type_as(xs[0])]
        else:
            xs = [(x + attn2(self.norm2(x.float()).type_as(x), encoder_hidden_states, None, None)).type_as(x)
                  for x, (_, _, attn2, _) in zip(xs, streams)]

        # 3. One FFN per modality.
        out = []
        for x, m, (*_, ffn) in zip(xs, mods, streams):
            norm_x = (self.norm3(x.float()) * (1 + m[4]) + m[3]).type_as(x)
            out.append((x.float() + ffn(norm_x).float() * m[5]).type_as(x))
        return (out[0] if hidden_states is not None else None), out[-1]

    def video_keys_values(self, video_tokens: torch.Tensor, rotary_emb) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys (normalised, with the video's RoPE `rotary_emb`) and values that this block's text queries
        read of `video_tokens`, its self-attention input of a video (`VideoContext.tokens`)."""
        attn = self.attn1_text if self.text_keys_video else self.attn1
        key = _RotaryAfter(attn.norm_k, rotary_emb, attn.heads)(attn.to_k(video_tokens))
        return key, attn.to_v(video_tokens)

    def prompt_keys_values(self, prompt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys (normalised) and values that this block's text tokens read of `prompt`, the embedded prompt
        (`condition_embedder.text_embedder`'s output), through their cross-attention."""
        attn = getattr(self, "attn2_text", self.attn2)
        return attn.norm_k(attn.to_k(prompt)), attn.to_v(prompt)

    def _modulation(self, temb: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (self.scale_shift_table + temb.float()).chunk(6, dim=1)

    def attention_input(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """The tokens `x` as this block's self-attention takes them: normalised and modulated by their
        stream's timestep projection `temb` `[B, 6, D]` (what a `VideoContext` keeps of a video)."""
        shift, scale = self._modulation(temb)[:2]
        return (self.norm1(x.float()) * (1 + scale) + shift).type_as(x)


class UniViGUTransformer(WanTransformer3DModel):
    """`WanTransformer3DModel` extended with a text stream (paper section 3.2, official layout).

    Text config: `text_formulation` "embedding" (paper: text is a d_t-dim latent, the learnable matrix E is
    `text_embedding`) or "discrete" (official: text is token ids, the head gives vocabulary logits);
    `text_vocab_size` V; `text_latent_dim` d_t; `text_ffn_dim` (None: `ffn_dim`, and `ffn_text` starts as a copy
    of `ffn`; another width starts fresh); `text_max_length`, the most text positions; `text_attention` "shared"
    (the paper: text tokens use the block's `attn1` projections) or "own" (text tokens project with their own
    `attn1_text`, a copy of `attn1` at the start, in the same joint attention, so training text need not change
    the video stream's projections; README); `text_cross_attention` "shared" (the paper) or "own" (text tokens
    read the prompt through their own `attn2_text`, a copy of `attn2` at the start); `video_attends_text` True
    (the paper: every token attends to every token) or False (video tokens attend to video tokens only, so the
    video stream is the stock model's whatever the text; README); `text_video_keys` "video" (the text reads the
    video tokens' keys and values as the video's own `attn1` projects them) or "text" (through the text's
    `attn1_text`; needs "own" and video_attends_text False).

    Init: `time_embedder_text`, `time_proj_text`, `scale_shift_table_text` (and `ffn_text` at equal width)
    start as copies of their video counterparts; `text_out` starts at zero for both formulations, so the
    first prediction is the constant 0 (uniform logits; for the embedding velocity 0, the mean of
    noise - data when the rows of E are centred) and the new stream starts without random output noise.
    """

    _no_split_modules = ["UniViGUTransformerBlock"]
    _repeated_blocks = ["UniViGUTransformerBlock"]
    _keep_in_fp32_modules = WanTransformer3DModel._keep_in_fp32_modules + [
        "time_embedder_text",
        "scale_shift_table_text",
        "norm_out_text",
    ]
    _skip_layerwise_casting_patterns = WanTransformer3DModel._skip_layerwise_casting_patterns + [
        "text_embedding",
        "text_in",
        "time_proj_text",
    ]

    @register_to_config
    def __init__(
        self,
        patch_size: tuple[int, ...] = (1, 2, 2),
        num_attention_heads: int = 40,
        attention_head_dim: int = 128,
        in_channels: int = 16,
        out_channels: int = 16,
        text_dim: int = 4096,
        freq_dim: int = 256,
        ffn_dim: int = 13824,
        num_layers: int = 40,
        cross_attn_norm: bool = True,
        qk_norm: str | None = "rms_norm_across_heads",
        eps: float = 1e-6,
        image_dim: int | None = None,
        added_kv_proj_dim: int | None = None,
        rope_max_seq_len: int = 1024,
        pos_embed_seq_len: int | None = None,
        text_formulation: Literal["embedding", "discrete"] = "embedding",
        text_vocab_size: int = 256000,
        text_latent_dim: int = 64,
        text_ffn_dim: int | None = None,
        text_max_length: int = 256,
        text_attention: Literal["shared", "own"] = "shared",
        video_attends_text: bool = True,
        text_video_keys: Literal["video", "text"] = "video",
        text_cross_attention: Literal["shared", "own"] = "shared",
    ) -> None:
        if text_formulation not in ("embedding", "discrete"):
            raise ValueError(f"text_formulation must be 'embedding' or 'discrete', got {text_formulation!r}")
        if text_attention not in ("shared", "own"):
            raise ValueError(f"text_attention must be 'shared' or 'own', got {text_attention!r}")
        if text_video_keys == "text" and (text_attention != "own" or video_attends_text):
            raise ValueError("text_video_keys='text' needs text_attention='own' and video_attends_text=False: "
                             "the text's own projections, and video keys that the video's queries do not share")
        if text_video_keys not in ("video", "text"):
            raise ValueError(f"text_video_keys must be 'video' or 'text', got {text_video_keys!r}")
        if text_cross_attention not in ("shared", "own"):
            raise ValueError(f"text_cross_attention must be 'shared' or 'own', got {text_cross_attention!r}")
        # The parent builds everything but the blocks, which are built once, here, as the subclass.
        super().__init__(
            patch_size=patch_size,
            num_attention_heads=num_attention_heads,
            attention_head_dim=attention_head_dim,
            in_channels=in_channels,
            out_channels=out_channels,
            text_dim=text_dim,
            freq_dim=freq_dim,
            ffn_dim=ffn_dim,
            num_layers=0,
            cross_attn_norm=cross_attn_norm,
            qk_norm=qk_norm,
            eps=eps,
            image_dim=image_dim,
            added_kv_proj_dim=added_kv_proj_dim,
            rope_max_seq_len=rope_max_seq_len,
            pos_embed_seq_len=pos_embed_seq_len,
        )
        self.register_to_config(num_layers=num_layers)  # the parent registered 0
        dim = num_attention_heads * attention_head_dim
        text_ffn_dim = text_ffn_dim or ffn_dim
        self.blocks = nn.ModuleList(
            UniViGUTransformerBlock(
                dim, ffn_dim, num_attention_heads, qk_norm, cross_attn_norm, eps, added_kv_proj_dim, text_ffn_dim,
                text_attention, video_attends_text, text_video_keys, text_cross_attention,
            )
            for _ in range(num_layers)
        )

        if text_formulation == "embedding":
            self.text_embedding = nn.Embedding(text_vocab_size, text_latent_dim)
            self.text_in = nn.Linear(text_latent_dim, dim)
            self.text_out = nn.Linear(dim, text_latent_dim)
        else:
            self.text_in = nn.Embedding(text_vocab_size, dim)
            self.text_out = nn.Linear(dim, text_vocab_size)
        self.time_embedder_text = TimestepEmbedding(in_channels=freq_dim, time_embed_dim=dim)
        self.time_proj_text = nn.Linear(dim, 6 * dim)
        self.scale_shift_table_text = nn.Parameter(torch.empty(1, 2, dim))
        self.norm_out_text = FP32LayerNorm(dim, eps=1e-5, elementwise_affine=True, bias=False)
        nn.init.zeros_(self.text_out.weight)
        nn.init.zeros_(self.text_out.bias)
        self._copy_video_to_text()

    @torch.no_grad()
    def _copy_video_to_text(self) -> None:
        """Set the text copies of video modules from the video modules' current weights."""
        embedder = self.condition_embedder
        pairs = [
            (self.time_embedder_text, embedder.time_embedder),
            (self.time_proj_text, embedder.time_proj),
        ]
        if (self.config.text_ffn_dim or self.config.ffn_dim) == self.config.ffn_dim:
            pairs += [(block.ffn_text, block.ffn) for block in self.blocks]
        pairs += [(block.attn1_text, block.attn1) for block in self.blocks if hasattr(block, "attn1_text")]
        pairs += [(block.attn2_text, block.attn2) for block in self.blocks if hasattr(block, "attn2_text")]
        for text_module, video_module in pairs:
            text_module.load_state_dict(video_module.state_dict())
        self.scale_shift_table_text.copy_(self.scale_shift_table)

    @classmethod
    def from_wan(cls, stock: WanTransformer3DModel, seed: int = 0, **text_config: Any) -> "UniViGUTransformer":
        """Build from a stock Wan transformer: its config plus `text_config`, its weights, and the text
        copies of its modules. Parameters are fp32 (the training precision; use autocast) on its device.
        The new parameters that are not copies (the text embedding) are drawn from `seed`, so a conversion
        is the same every time, and the caller's random state is left as it was."""
        config = {k: v for k, v in stock.config.items() if not k.startswith("_")}
        devices = [stock.device] if stock.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.device(stock.device):
            torch.manual_seed(seed)
            model = cls.from_config({**config, **text_config})
        missing, unexpected = model.load_state_dict(stock.state_dict(), strict=False)
        if unexpected or set(missing) != set(model.text_parameter_names()):
            extra = sorted(set(missing) - set(model.text_parameter_names()))
            raise ValueError(f"stock Wan weights do not fit: missing {extra[:5]}, unexpected {unexpected[:5]}")
        model._copy_video_to_text()
        return model

    def token_embeddings(self) -> torch.Tensor:
        """The embedding flow's token table `[vocab, d_t]`, read through the embedding's forward: the text flow
        reads it outside the transformer's forward (the clean text it noises, the rounding loss), so training
        under FSDP registers this method as one of the root's forwards (`register_fsdp_forward_method`), which
        gathers the sharded rows the way a forward does."""
        return self.text_embedding(torch.arange(self.text_embedding.num_embeddings, device=self.text_embedding.weight.device))

    def text_parameter_names(self) -> list[str]:
        """State-dict names of the parameters a stock Wan transformer does not have."""
        return [
            n for n in self.state_dict()
            if n.split(".")[0] in TEXT_MODULES or any(f".{m}." in n for m in ("ffn_text", "attn1_text", "attn2_text"))
        ]

    def wan_state_dict(self) -> dict[str, torch.Tensor]:
        """The stock `WanTransformer3DModel` state dict (text parameters dropped), for export."""
        text = set(self.text_parameter_names())
        return {n: t for n, t in self.state_dict().items() if n not in text}

    @apply_lora_scale("attention_kwargs")
    def forward(
        self,
        hidden_states: torch.Tensor | None = None,
        timestep: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        text_states: torch.Tensor | None = None,
        timestep_text: torch.Tensor | None = None,
        encoder_hidden_states_image: torch.Tensor | None = None,
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
        video_context: VideoContext | None = None,
        video_prediction: bool = True,
    ) -> UniViGUTransformerOutput | tuple[torch.Tensor | None, torch.Tensor | None]:
        """Video `[B, C, F, H, W]` with `timestep` `[B]`; text `[B, L, d_t]` float (embedding) or `[B, L]`
        ids (discrete) with `timestep_text` `[B]`; either stream may be None. Diffusers time: 0..1000,
        1000 = noise; both predictions are `noise - data` (text logits for discrete). `video_context` (from
        `video_context()`, with no `hidden_states`): the text reads that video, as if it were given.
        `video_prediction=False` (with text): the video runs only as far as the text reads it (the last
        block's attention input) and `sample` is None; the text's prediction is the same."""
        if text_states is None:
            sample = super().forward(
                hidden_states,
                timestep,
                encoder_hidden_states,
                encoder_hidden_states_image,
                return_dict=False,
                attention_kwargs=attention_kwargs,
            )[0]
            text_sample = None
        else:
            sample, text_sample = self._joint_forward(
                hidden_states, timestep, encoder_hidden_states, text_states, timestep_text, encoder_hidden_states_image,
                video_context, video_prediction,
            )
        if not return_dict:
            return sample, text_sample
        return UniViGUTransformerOutput(sample=sample, text_sample=text_sample)

    @torch.no_grad()
    def video_context(self, hidden_states: torch.Tensor, timestep: torch.Tensor,
                      encoder_hidden_states: torch.Tensor, keys_values: bool = False) -> VideoContext:
        """One stock forward of a video that does not attend to the text, keeping what each block's text
        queries read of it (`VideoContext`): with it, `forward(video_context=...)` runs the text alone and
        predicts what a forward with this video would. `keys_values`: also keep the keys and values the text
        reads of it and of this prompt, which the forwards then read in place of the prompt they are given (for
        weights and a prompt that stay as they are while the context is used: sampling, not training)."""
        if self.config.video_attends_text:
            raise ValueError("the video attends to the text (video_attends_text=True): it changes with the text, "
                             "so there is no video context to keep")
        tokens = []

        def keep(module, args):
            tokens.append(args[0])
            if len(tokens) == len(self.blocks):
                raise _Read  # the rest of the forward is not read

        hooks = [block.attn1.register_forward_pre_hook(keep) for block in self.blocks]
        try:
            super().forward(hidden_states, timestep, encoder_hidden_states, return_dict=False)
        except _Read:
            pass
        finally:
            for hook in hooks:
                hook.remove()
        rotary_emb = self.rope(hidden_states)
        if not keys_values:
            return VideoContext(tokens, rotary_emb)
        prompt = self.condition_embedder.text_embedder(encoder_hidden_states)
        return VideoContext(tokens, rotary_emb,
                            [block.video_keys_values(x, rotary_emb) for block, x in zip(self.blocks, tokens)],
                            [block.prompt_keys_values(prompt) for block in self.blocks])

    def _joint_forward(self, hidden_states, timestep, encoder_hidden_states, text_states, timestep_text, image,
                       video_context=None, video_prediction=True):
        prompt = encoder_hidden_states
        text = self.text_in(text_states)
        rotary = [self._text_rotary_emb(text.shape[1], text.device)]
        if video_context is not None:
            if hidden_states is not None:
                raise ValueError("give the video (hidden_states) or its video_context, not both")
            rotary.insert(0, video_context.rotary_emb)
        video = temb = timestep_proj = None
        if hidden_states is not None:
            if timestep.ndim != 1:
                raise ValueError("with text tokens the video timestep must be one per sample, shape [B]")
            rotary.insert(0, self.rope(hidden_states))
            video = self.patch_embedding(hidden_states).flatten(2).transpose(1, 2).contiguous()
            temb, timestep_proj, encoder_hidden_states, image = self.condition_embedder(timestep, prompt, image)
            timestep_proj = timestep_proj.unflatten(1, (6, -1))
        elif video_context is None or video_context.prompt_keys_values is None:  # else kept by the context
            encoder_hidden_states = self.condition_embedder.text_embedder(prompt)
            if image is not None:
                image = self.condition_embedder.image_embedder(image)
        if image is not None:
            encoder_hidden_states = torch.concat([image, encoder_hidden_states], dim=1)
        rotary_emb = tuple(torch.cat(parts, dim=1) for parts in zip(*rotary))

        # The text timestep: the shared sinusoid, then the text stream's own embedder and projection.
        t = self.condition_embedder.timesteps_proj(timestep_text)
        temb_text = self.time_embedder_text(t.to(self.time_embedder_text.linear_1.weight.dtype)).type_as(prompt)
        timestep_proj_text = self.time_proj_text(self.condition_embedder.act_fn(temb_text)).unflatten(1, (6, -1))

        none = [None] * len(self.blocks)
        cached = ((video_context.tokens, video_context.keys_values or none, video_context.prompt_keys_values or none)
                  if video_context is not None else (none, none, none))
        for index, (block, video_tokens, keys_values, prompt_keys_values) in enumerate(zip(self.blocks, *cached)):
            read_only = video is not None and not video_prediction and index == len(self.blocks) - 1
            args = (video, encoder_hidden_states, timestep_proj, rotary_emb, text, timestep_proj_text, video_tokens,
                    keys_values, prompt_keys_values, read_only)
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                video, text = self._gradient_checkpointing_func(block, *args)
            else:
                video, text = block(*args)

        sample = None
        if video is not None:
            video = self.proj_out(_modulate_head(self.norm_out, self.scale_shift_table, temb, video))
            batch, _, frames, height, width = hidden_states.shape
            p_t, p_h, p_w = self.config.patch_size
            video = video.reshape(batch, frames // p_t, height // p_h, width // p_w, p_t, p_h, p_w, -1)
            sample = video.permute(0, 7, 1, 4, 2, 5, 3, 6).flatten(6, 7).flatten(4, 5).flatten(2, 3)
        text_sample = self.text_out(_modulate_head(self.norm_out_text, self.scale_shift_table_text, temb_text, text))
        return sample, text_sample

    def _text_rotary_emb(self, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """1-D RoPE at positions 0..length-1 as `(cos, sin)` `[1, L, 1, head_dim]`, in the interleaved
        layout that `WanAttnProcessor` applies (the video RoPE's layout)."""
        if length > self.config.text_max_length:
            raise ValueError(f"{length} text tokens exceed text_max_length={self.config.text_max_length}")
        freqs_dtype = torch.float32 if device.type == "mps" else torch.float64
        cos, sin = get_1d_rotary_pos_embed(
            self.config.attention_head_dim,
            torch.arange(length, device=device),
            use_real=True,
            repeat_interleave_real=True,
            freqs_dtype=freqs_dtype,
        )
        return cos[None, :, None], sin[None, :, None]


def _modulate_head(norm: nn.Module, table: torch.Tensor, temb: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Output-head modulation, as in the stock Wan head: norm(x) * (1 + scale) + shift, with
    (shift, scale) = table + temb."""
    shift, scale = (table.to(temb.device) + temb.unsqueeze(1)).chunk(2, dim=1)
    return (norm(x.float()) * (1 + scale.to(x.device)) + shift.to(x.device)).type_as(x)
