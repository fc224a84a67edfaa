"""The `transformers` captioner: a local vision-language model folder (e.g. Qwen2.5-VL-7B-Instruct).

Loaded offline with `AutoProcessor` / `AutoModelForImageTextToText` (never `trust_remote_code`); each
item's sampled frames go in as images of one user turn of the model's chat template, followed by the
instruction. Items are generated `batch_size` at a time (left padding), greedy when `temperature` is 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from ..errors import VigUError
from ..precision import default_device, resolve_dtype
from .captioners import Captioner, CaptionerConfig, CaptionItem, Reply, item_seed, prepare_frames


class TransformersCaptioner(Captioner):
    def __init__(self, config: CaptionerConfig, tokenizer):
        super().__init__(config, tokenizer)
        path = Path(config.model_path)
        if not path.is_dir():
            raise VigUError(
                f"captioner model folder {path} not found: set data.captioner.model_path to a local "
                "vision-language model folder (e.g. a downloaded Qwen2.5-VL-7B-Instruct)"
            )
        self.device = torch.device(config.device) if config.device != "auto" else default_device()
        dtype = resolve_dtype(config.dtype, self.device)
        try:
            self.processor = AutoProcessor.from_pretrained(path, local_files_only=True)
            self.model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, local_files_only=True)
        except (OSError, ValueError, ImportError) as exc:  # e.g. no model there; Qwen-VL without torchvision
            reason = " ".join(str(exc).split())[:300] or type(exc).__name__
            raise VigUError(f"could not load the captioner model from {path}: {reason}") from None
        self.model.to(self.device).eval()
        self.processor.tokenizer.padding_side = "left"  # generation continues every row from its end

    def draft(self, items: Sequence[CaptionItem], attempt: int, notes: Sequence[str]) -> list[Reply]:
        size = self.config.batch_size
        replies = []
        for start in range(0, len(items), size):
            chunk, chunk_notes = items[start : start + size], notes[start : start + size]
            texts = self._generate(chunk, chunk_notes, seed=item_seed(self.config.seed, f"{chunk[0].id}/{attempt}"))
            replies.extend(Reply(text) for text in texts)
        return replies

    @torch.inference_mode()
    def _generate(self, items: Sequence[CaptionItem], notes: Sequence[str], seed: int) -> list[str]:
        config = self.config
        images, prompts = [], []
        for item, note in zip(items, notes, strict=True):
            if item.frames is None:
                raise VigUError(f"item {item.id} has no frames: the transformers captioner needs each clip's frames")
            frames = prepare_frames(item.frames, config.num_frames, config.image_size)
            content = [{"type": "image"} for _ in frames] + [{"type": "text", "text": self.instruction(item, note)}]
            messages = [{"role": "user", "content": content}]
            prompts.append(self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
            images.append(frames)
        inputs = self.processor(text=prompts, images=images, padding=True, return_tensors="pt")
        inputs = inputs.to(self.device, dtype=self.model.dtype)  # casts only the float tensors (pixels)
        sampling = config.temperature > 0
        if sampling:
            torch.manual_seed(seed % 2**63)
        output = self.model.generate(
            **inputs,
            max_new_tokens=config.max_new_tokens,
            do_sample=sampling,
            **({"temperature": config.temperature} if sampling else {}),
        )
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        return [text.strip() for text in self.processor.batch_decode(new_tokens, skip_special_tokens=True)]


