"""The `openai` captioner: any OpenAI-compatible chat-completions endpoint (vLLM, SGLang, TGI).

One request per item and attempt: `POST {base_url}/chat/completions` with one user message holding the
sampled frames as `data:image/png;base64` image parts and the instruction text. Up to `concurrency`
requests run at once; HTTP 429/5xx, timeouts, connection errors and malformed replies are retried
with backoff. Standard library only.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import random
import threading
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import imageio.v3 as iio

from ..errors import VigUError
from .captioners import Captioner, CaptionerConfig, CaptionItem, CaptionResult, Reply, item_seed, prepare_frames
from .retry import CallFailed, call_with_retries


class OpenAICaptioner(Captioner):
    def __init__(self, config: CaptionerConfig, tokenizer):
        super().__init__(config, tokenizer)
        self.url = config.base_url.rstrip("/") + "/chat/completions"
        self._headers = {"Content-Type": "application/json"}
        api_key = os.environ.get(config.api_key_env) if config.api_key_env else None
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._down = threading.Event()  # set once a failure means no request can succeed
        self._down_reason = ""
        self._lock = threading.Lock()

    def caption_batch(self, items: Sequence[CaptionItem]) -> list[CaptionResult]:
        """Items run concurrently, each through the length rule on its own."""
        self._down.clear()
        self.error = None
        with ThreadPoolExecutor(self.config.concurrency, thread_name_prefix="caption") as pool:
            return list(pool.map(lambda item: self._apply_length_rule([item])[0], items))

    def draft(self, items: Sequence[CaptionItem], attempt: int, notes: Sequence[str]) -> list[Reply]:
        return [self._ask(item, attempt, note) for item, note in zip(items, notes, strict=True)]

    def _ask(self, item: CaptionItem, attempt: int, note: str) -> Reply:
        if self._down.is_set():
            return Reply(None, self._down_reason, requests=0, detail="skipped: " + str(self.error))
        body = json.dumps(self._request_body(item, note)).encode()
        outcome = call_with_retries(
            lambda: self._post(body),
            max_retries=self.config.max_retries,
            backoff_s=self.config.backoff_s,
            rng=random.Random(item_seed(self.config.seed, f"{item.id}/{attempt}")),
            label=f"caption request for item {item.id}",
            give_up=self._down.is_set,
        )
        if outcome.failure is None:
            return Reply(outcome.value, requests=outcome.tries)
        failure = outcome.failure
        self._note_if_fatal(failure)
        return Reply(None, failure.reason, requests=outcome.tries, detail=failure.detail)

    def _request_body(self, item: CaptionItem, note: str) -> dict:
        if item.frames is None:
            raise VigUError(f"item {item.id} has no frames: the openai captioner needs each clip's frames")
        images = [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + _png_base64(frame)}}
            for frame in prepare_frames(item.frames, self.config.num_frames, self.config.image_size)
        ]
        content = [*images, {"type": "text", "text": self.instruction(item, note)}]
        return {
            "model": self.config.model,
            "messages": [{"role": "user", "content": content}],
            "temperature": self.config.temperature,
            "max_tokens": self.config.max_new_tokens,
        }

    def _post(self, body: bytes) -> str:
        """One request; returns the reply's text or raises `CallFailed`."""
        request = urllib.request.Request(self.url, data=body, headers=self._headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.config.timeout_s) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            detail = _error_detail(exc)
            exc.close()
            raise CallFailed(f"http_{exc.code}", exc.code == 429 or exc.code >= 500, detail) from None
        except urllib.error.URLError as exc:  # could not connect at all
            raise CallFailed("endpoint_unreachable", True, " ".join(str(exc.reason).split())) from None
        except TimeoutError:
            raise CallFailed("timeout", True, f"no reply within {self.config.timeout_s} s") from None
        except (ConnectionError, http.client.HTTPException) as exc:
            raise CallFailed("connection_error", True, f"{type(exc).__name__}: {exc}") from None
        return _reply_text(raw)

    def _note_if_fatal(self, failure: CallFailed) -> None:
        """When no request can succeed, keep a one-line error and stop every other request."""
        fix = self._fatal_fix(failure)
        if fix is None:
            return
        with self._lock:
            if not self._down.is_set():
                self._down_reason = failure.reason
                self.error = VigUError(f"caption endpoint {self.url} {fix}")
                self._down.set()

    def _fatal_fix(self, failure: CallFailed) -> str | None:
        """The problem and its fix for failures that every request would meet; None for the others."""
        config = self.config
        if failure.reason == "endpoint_unreachable":
            return (
                f"is unreachable ({failure.detail}): start the server (e.g. `vllm serve {config.model}`) "
                "or fix data.captioner.base_url"
            )
        if failure.reason in ("http_401", "http_403"):
            return (
                f"refused the API key ({failure.reason}: {failure.detail}): put a valid key in "
                f"${config.api_key_env} or fix data.captioner.api_key_env"
            )
        if failure.reason == "http_404":
            return (
                f"answered 404 ({failure.detail}): fix data.captioner.base_url (the OpenAI root, usually "
                f"ending in /v1) or data.captioner.model ('{config.model}')"
            )
        return None


def _png_base64(frame) -> str:
    return base64.b64encode(iio.imwrite("<bytes>", frame, extension=".png")).decode("ascii")


def _reply_text(raw: bytes) -> str:
    """`choices[0].message.content` of a chat-completions reply, or `CallFailed("malformed_reply")`."""
    try:
        text = json.loads(raw)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise CallFailed("malformed_reply", True, f"{type(exc).__name__} reading {raw[:80]!r}") from None
    if not isinstance(text, str) or not text.strip():
        raise CallFailed("malformed_reply", True, f"empty caption in {raw[:80]!r}")
    return text.strip()


def _error_detail(exc: urllib.error.HTTPError) -> str:
    """The server's error message (OpenAI style `{"error": {"message": ...}}` or `{"message": ...}`), short."""
    try:
        body = exc.read(2000)
        payload = json.loads(body)
        error = payload.get("error", payload)
        message = error.get("message", error) if isinstance(error, dict) else error
    except (OSError, ValueError, AttributeError):
        message = exc.reason
    return " ".join(str(message).split())[:200]
