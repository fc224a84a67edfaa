"""Detailed-caption backends for `vigu build-dataset` (paper section 4.1; DESIGN.md sections 1 and 7).

A captioner turns (brief prompt, clip) items into detailed captions. Four backends share one interface:

- `world`: the embedded world's ground truth written as a caption (`world.caption_text`);
- `measure`: what the world's measurer reads in the clip, written the same way (clips without ground truth);
- `openai`: any OpenAI-compatible chat-completions endpoint (vLLM, SGLang, TGI serving e.g. Qwen2.5-VL);
- `transformers`: a local vision-language model folder (`AutoModelForImageTextToText`).

Every item ends either captioned or rejected with a reason, never lost. The token-length rule (a caption of
`min_caption_tokens..max_caption_tokens` tokens of the given tokenizer, special tokens not counted) is
enforced here, once, for every backend: a caption outside the range is asked for again, with a note on
its length, up to `length_attempts` times, then rejected as `too_short` / `too_long`. Transport failures
come from the backends: `http_<code>`, `timeout`, `connection_error`, `malformed_reply`,
`endpoint_unreachable`. Each rejection is logged with its reason and carried in its `CaptionResult`.

Usage::

    captioner = make_captioner(config, tokenizer)
    results = captioner.caption_batch([CaptionItem("clip-0", "a red circle moving left", frames)])
    if captioner.error:          # e.g. the endpoint is down: every item was rejected, stop the run
        raise captioner.error
"""

from __future__ import annotations

import hashlib
import logging
import re
import string
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from PIL import Image

from ..errors import VigUError

if TYPE_CHECKING:
    from ..data.world import ClipSpec

log = logging.getLogger(__name__)

DEFAULT_PROMPT_TEMPLATE = (
    'These images are frames, in order, of a video generated from the prompt "{prompt}". '
    "Write a detailed caption of the video as one paragraph of plain prose. Cover everything the prompt "
    "says, then describe what the frames show beyond it: the subjects and their appearance, the setting "
    "and background, positions, motion and its speed and direction, camera, lighting and colours. "
    "Describe only what is visible. Write between {min_tokens} and {max_tokens} tokens "
    "(about three words for every four tokens). Reply with the caption only."
)
TEMPLATE_FIELDS = {"prompt", "min_tokens", "max_tokens"}


@dataclass
class CaptionerConfig:
    """Settings of every captioner backend; the recipe's `data.captioner` section."""

    backend: Literal["world", "measure", "openai", "transformers"] = "world"
    # openai: the server's OpenAI-compatible root (requests go to {base_url}/chat/completions)
    base_url: str = "http://127.0.0.1:8000/v1"
    model: str = "Qwen/Qwen2.5-VL-7B-Instruct"  # openai: the served model name
    api_key_env: str = "OPENAI_API_KEY"  # openai: name of the environment variable holding the key
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE  # placeholders: {prompt}, {min_tokens}, {max_tokens}
    num_frames: int = 8  # frames sampled evenly from each clip and shown to the model
    image_size: int = 448  # each frame's longer side is scaled to this many pixels (up or down); 0 keeps it
    concurrency: int = 8  # openai: requests in flight at once
    timeout_s: float = 120.0  # openai: per-request socket timeout
    max_retries: int = 4  # openai: retries of one request after 429/5xx, timeouts, connection errors
    backoff_s: float = 1.0  # openai: first retry delay; doubles each retry, with jitter
    min_caption_tokens: int = 128  # the length rule (paper: 128-256 tokens)
    max_caption_tokens: int = 256
    length_attempts: int = 3  # captions asked for per item before a length rejection
    temperature: float = 0.7  # 0: greedy
    max_new_tokens: int = 512  # must exceed max_caption_tokens so a runaway reply reads as too_long
    model_path: str = ""  # transformers: local VLM folder (e.g. Qwen2.5-VL-7B-Instruct)
    device: str = "auto"  # transformers: "auto" (cuda if available), "cpu", "cuda", "cuda:1", ...
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # transformers; auto: bf16 on GPU
    batch_size: int = 4  # transformers: items per generate call
    seed: int = 0  # world phrasings, retry jitter and sampled generation

    def validate(self) -> None:
        """Raise `VigUError` (one line naming the key) if the settings cannot work."""
        where = "data.captioner"
        fields = {name for _, name, _, _ in string.Formatter().parse(self.prompt_template) if name is not None}
        if "prompt" not in fields or not fields <= TEMPLATE_FIELDS:
            raise VigUError(
                f"{where}.prompt_template must contain {{prompt}} and no placeholders but {{prompt}}, "
                f"{{min_tokens}}, {{max_tokens}} (double literal braces); it has {sorted(fields)}"
            )
        if not 0 <= self.min_caption_tokens <= self.max_caption_tokens:
            raise VigUError(
                f"{where}: need 0 <= min_caption_tokens <= max_caption_tokens, "
                f"got {self.min_caption_tokens} and {self.max_caption_tokens}"
            )
        for name in ("num_frames", "concurrency", "length_attempts", "batch_size"):
            if getattr(self, name) < 1:
                raise VigUError(f"{where}.{name} must be at least 1, got {getattr(self, name)}")
        if self.backend not in ("world", "measure") and self.max_new_tokens <= self.max_caption_tokens:
            raise VigUError(
                f"{where}.max_new_tokens ({self.max_new_tokens}) must exceed max_caption_tokens "
                f"({self.max_caption_tokens}), or truncated replies could pass the length rule"
            )
        if self.backend == "transformers" and not self.model_path:
            raise VigUError(f"{where}.model_path is empty: set it to a local vision-language model folder")


@dataclass
class CaptionItem:
    """One clip to caption. `frames` (uint8 [F, H, W, 3]) feed the model backends; `spec` the world's."""

    id: str
    prompt: str
    frames: np.ndarray | None = None
    spec: ClipSpec | None = None


@dataclass
class CaptionResult:
    """An item's outcome: `caption` set and `reason` None, or `caption` None and `reason` saying why.

    `attempts`: captions asked for (length rule); `requests`: calls made, retries included;
    `num_tokens`: tokens of the last caption received (None if none arrived)."""

    id: str
    caption: str | None
    reason: str | None
    attempts: int
    requests: int
    num_tokens: int | None = None

    @property
    def ok(self) -> bool:
        return self.caption is not None


@dataclass(frozen=True)
class Reply:
    """What a backend got for one item on one attempt: a text, or a failure reason."""

    text: str | None
    reason: str | None = None
    requests: int = 1
    detail: str = ""


def count_tokens(tokenizer: Any, text: str) -> int:
    """Tokens of `text` under a Hugging Face tokenizer, special tokens not counted."""
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def unknown_words(tokenizer: Any, text: str) -> list[str]:
    """Words (and punctuation) of `text` that the tokenizer maps to its unknown token."""
    unk = tokenizer.unk_token_id
    if unk is None or unk not in tokenizer(text, add_special_tokens=False).input_ids:  # one call for most texts
        return []
    words = dict.fromkeys(re.findall(r"\w+|[^\w\s]", text))
    return [w for w in words if unk in tokenizer(w, add_special_tokens=False).input_ids]


def item_seed(seed: int, key: str) -> int:
    """A stable 64-bit seed for one item (or one item's attempt), independent of order and threads."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{key}".encode()).digest()[:8], "little")


def prepare_frames(frames: np.ndarray, num_frames: int, image_size: int) -> list[np.ndarray]:
    """`num_frames` frames sampled evenly over the clip (all of them if it is shorter), each resized
    so that its longer side is `image_size` pixels (0: unchanged)."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise VigUError(f"caption frames must be uint8 [F, H, W, 3], got {frames.dtype} {list(frames.shape)}")
    count = min(num_frames, len(frames))
    picked = [frames[i] for i in np.linspace(0, len(frames) - 1, count).round().astype(int)]
    if not image_size:
        return picked
    height, width = frames.shape[1:3]
    scale = image_size / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return [np.asarray(Image.fromarray(frame).resize(size, Image.Resampling.BICUBIC)) for frame in picked]


class Captioner(ABC):
    """The interface the dataset builder uses: `caption_batch(items) -> results`, one per item, in order.

    A backend implements `draft`; the length rule, the bookkeeping and the logging live here.
    `error` is set when a failure means no item can succeed (the endpoint is unreachable, the key is
    refused): a one-line `VigUError` for the CLI to raise; None otherwise. It describes the last call."""

    def __init__(self, config: CaptionerConfig, tokenizer: Any):
        config.validate()
        self.config = config
        self.tokenizer = tokenizer
        self.error: VigUError | None = None

    def caption_batch(self, items: Sequence[CaptionItem]) -> list[CaptionResult]:
        """One result per item, in the items' order; every item ends captioned or rejected."""
        return self._apply_length_rule(items)

    @abstractmethod
    def draft(self, items: Sequence[CaptionItem], attempt: int, notes: Sequence[str]) -> list[Reply]:
        """One caption (or failure) per item. `attempt` counts from 1; `notes[i]` is "" on the first
        attempt, then a sentence on why the last caption was refused, to be added to the instruction."""

    def instruction(self, item: CaptionItem, note: str) -> str:
        """The text sent with the frames: the recipe's template filled in, plus the length note."""
        config = self.config
        text = config.prompt_template.format(
            prompt=item.prompt, min_tokens=config.min_caption_tokens, max_tokens=config.max_caption_tokens
        )
        return f"{text} {note}" if note else text

    def _apply_length_rule(self, items: Sequence[CaptionItem]) -> list[CaptionResult]:
        config = self.config
        results: list[CaptionResult | None] = [None] * len(items)
        requests = [0] * len(items)
        notes = [""] * len(items)
        pending = list(range(len(items)))
        for attempt in range(1, config.length_attempts + 1):
            replies = self.draft([items[i] for i in pending], attempt, [notes[i] for i in pending])
            still_pending = []
            for i, reply in zip(pending, replies, strict=True):
                requests[i] += reply.requests
                if reply.text is None:
                    results[i] = self._reject(items[i], reply.reason, attempt, requests[i], None, reply.detail)
                    continue
                tokens = count_tokens(self.tokenizer, reply.text)
                verdict = self._length_verdict(tokens)
                if verdict is None:
                    results[i] = CaptionResult(items[i].id, reply.text, None, attempt, requests[i], tokens)
                elif attempt == config.length_attempts:
                    results[i] = self._reject(items[i], verdict, attempt, requests[i], tokens, f"{tokens} tokens")
                else:
                    notes[i] = self._length_note(tokens, verdict)
                    still_pending.append(i)
            pending = still_pending
        return results  # type: ignore[return-value]  # every slot is filled by the last attempt

    def _length_verdict(self, tokens: int) -> str | None:
        if tokens < self.config.min_caption_tokens:
            return "too_short"
        if tokens > self.config.max_caption_tokens:
            return "too_long"
        return None

    def _length_note(self, tokens: int, verdict: str) -> str:
        amount = "too few" if verdict == "too_short" else "too many"
        return (
            f"Your previous caption had {tokens} tokens, {amount}: this time write between "
            f"{self.config.min_caption_tokens} and {self.config.max_caption_tokens} tokens."
        )

    @staticmethod
    def _reject(
        item: CaptionItem, reason: str, attempts: int, requests: int, tokens: int | None, detail: str
    ) -> CaptionResult:
        log.warning(
            "caption rejected: item %s: %s after %d attempt(s), %d request(s)%s",
            item.id, reason, attempts, requests, f" ({detail})" if detail else "",
        )
        return CaptionResult(item.id, None, reason, attempts, requests, tokens)


def make_captioner(config: CaptionerConfig, tokenizer: Any) -> Captioner:
    """The backend `config.backend` names. `tokenizer` counts tokens for the length rule (the tokenizer
    of the model that will learn the captions: umT5 for Wan, the world tokenizer for the world).
    Backends are imported on demand, so only `transformers` pulls in torch and transformers."""
    if config.backend == "world":
        from .captioner_world import WorldCaptioner

        return WorldCaptioner(config, tokenizer)
    if config.backend == "measure":
        from .captioner_world import MeasureCaptioner

        return MeasureCaptioner(config, tokenizer)
    if config.backend == "openai":
        from .captioner_openai import OpenAICaptioner

        return OpenAICaptioner(config, tokenizer)
    if config.backend == "transformers":
        from .captioner_transformers import TransformersCaptioner

        return TransformersCaptioner(config, tokenizer)
    raise VigUError(f"data.captioner.backend must be world, measure, openai or transformers, got {config.backend!r}")
