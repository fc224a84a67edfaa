"""Caption backends: the length rule, the openai backend against a scripted local server, an unreachable
endpoint, a tiny real VLM through the transformers backend, and the world's ground-truth captions."""

import base64
import json
import logging
import random
import re
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import imageio.v3 as iio
import numpy as np
import pytest
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from vigu_cli.data import world
from vigu_cli.errors import VigUError
from vigu_cli.synth import retry
from vigu_cli.synth.captioners import (
    Captioner,
    CaptionerConfig,
    CaptionItem,
    Reply,
    count_tokens,
    make_captioner,
)

LOGGER = "vigu_cli.synth"


def word_tokenizer(words=(), special=()):
    """A word-level tokenizer (words and punctuation are tokens; unknown words are [UNK])."""
    vocab = {token: i for i, token in enumerate(["[UNK]", *special, *words])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in ["[UNK]", *special]])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]")


def words(count):
    return " ".join(["red"] * count)  # a word of the world's vocabulary, one token


@pytest.fixture(autouse=True)
def no_proxies(monkeypatch):
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


# ----------------------------------------------------------------------------------------------------
# The length rule, with a scripted backend
# ----------------------------------------------------------------------------------------------------


class ScriptedCaptioner(Captioner):
    """Replies with each item's next scripted caption; keeps the notes it was given."""

    def __init__(self, config, tokenizer, scripts):
        super().__init__(config, tokenizer)
        self.scripts = {key: list(script) for key, script in scripts.items()}
        self.notes = []

    def draft(self, items, attempt, notes):
        self.notes.extend(notes)
        return [Reply(self.scripts[item.id].pop(0)) for item in items]


def test_length_rule_asks_again_then_accepts():
    config = CaptionerConfig(min_caption_tokens=5, max_caption_tokens=12, length_attempts=3)
    captioner = ScriptedCaptioner(config, word_tokenizer(), {"a": ["too brief.", words(10)], "b": [words(6)]})
    a, b = captioner.caption_batch([CaptionItem("a", "p"), CaptionItem("b", "p")])
    assert (a.caption, a.reason, a.attempts, a.requests, a.num_tokens) == (words(10), None, 2, 2, 10)
    assert (b.ok, b.attempts, b.num_tokens) == (True, 1, 6)
    assert captioner.notes[:2] == ["", ""]  # first attempts carry no note
    assert "had 3 tokens, too few" in captioner.notes[2] and "between 5 and 12 tokens" in captioner.notes[2]
    assert captioner.instruction(CaptionItem("a", "a red circle"), captioner.notes[2]).endswith(captioner.notes[2])


def test_length_rule_rejects_after_the_last_attempt(caplog):
    config = CaptionerConfig(min_caption_tokens=5, max_caption_tokens=12, length_attempts=3)
    captioner = ScriptedCaptioner(config, word_tokenizer(), {"long": [words(20)] * 3})
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        (result,) = captioner.caption_batch([CaptionItem("long", "p")])
    assert (result.caption, result.reason, result.attempts, result.num_tokens) == (None, "too_long", 3, 20)
    assert captioner.scripts["long"] == []  # all three attempts were asked for
    assert any("long" in r.getMessage() and "too_long" in r.getMessage() for r in caplog.records)


def test_tokens_are_counted_without_special_tokens():
    tokenizer = word_tokenizer(words=("a", "red", "circle"), special=("</s>",))
    tokenizer.add_special_tokens({"eos_token": "</s>"})
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", tokenizer.convert_tokens_to_ids("</s>"))]
    )
    assert len(tokenizer("a red circle.")["input_ids"]) == 5  # the post-processor adds </s>
    assert count_tokens(tokenizer, "a red circle.") == 4


@pytest.mark.parametrize(
    "change, key",
    [
        ({"prompt_template": "Describe the video."}, "prompt_template"),
        ({"prompt_template": "{prompt} in {words} words"}, "prompt_template"),
        ({"min_caption_tokens": 300}, "min_caption_tokens"),
        ({"backend": "openai", "max_new_tokens": 256}, "max_new_tokens"),
        ({"backend": "transformers"}, "model_path"),
        ({"concurrency": 0}, "concurrency"),
    ],
)
def test_config_problems_are_one_line_errors(change, key):
    with pytest.raises(VigUError) as info:
        CaptionerConfig(**change).validate()
    assert key in str(info.value) and "\n" not in str(info.value)


def test_retry_helper_backs_off_exponentially_and_stops_when_told(monkeypatch):
    delays = []
    monkeypatch.setattr(retry.time, "sleep", delays.append)
    failures = iter([retry.CallFailed(reason, True) for reason in ("http_503", "timeout", "http_429")])

    def flaky():
        failure = next(failures, None)
        if failure:
            raise failure
        return "done"

    policy = dict(backoff_s=1.0, rng=random.Random(0), label="test call")
    outcome = retry.call_with_retries(flaky, max_retries=3, **policy)
    assert (outcome.value, outcome.failure, outcome.tries) == ("done", None, 4)
    draws = random.Random(0)  # the jitter comes from the seeded RNG: base * 2**(k-1) * (0.5 + U[0, 1))
    assert delays == pytest.approx([2 ** k * (0.5 + draws.random()) for k in range(3)])

    def refused():
        raise retry.CallFailed("endpoint_unreachable", True)

    stopped = retry.call_with_retries(refused, max_retries=5, give_up=lambda: True, **policy)
    assert (stopped.failure.reason, stopped.tries) == ("endpoint_unreachable", 1)
    exhausted = retry.call_with_retries(refused, max_retries=2, **policy)
    assert exhausted.tries == 3

    def bad_request():
        raise retry.CallFailed("http_400", False)

    assert retry.call_with_retries(bad_request, max_retries=5, **policy).tries == 1


# ----------------------------------------------------------------------------------------------------
# openai: a local fake endpoint that plays a script per item
# ----------------------------------------------------------------------------------------------------

TIMEOUT = 0.4  # client timeout, seconds; a good reply takes milliseconds
CLIENT = dict(
    timeout_s=TIMEOUT, max_retries=2, backoff_s=0.01, length_attempts=2, concurrency=3,
    min_caption_tokens=8, max_caption_tokens=16, max_new_tokens=64, num_frames=4, image_size=48,
)
LENGTHS = {"short": 4, "good": 12, "long": 24}

# name: (the server's behaviour per request, expected reason (None: captioned), attempts, requests)
SCENARIOS = {
    "good": (["good"], None, 1, 1),
    "flaky": (["500", "429", "good"], None, 1, 3),
    "slow_once": (["hang", "good"], None, 1, 2),
    "garbled_once": (["not_json", "good"], None, 1, 2),
    "short_then_good": (["short", "good"], None, 2, 2),
    "always_500": (["500"] * 3, "http_500", 1, 3),
    "always_429": (["429"] * 3, "http_429", 1, 3),
    "always_hang": (["hang"] * 3, "timeout", 1, 3),
    "always_malformed": (["empty", "no_choices", "not_json"], "malformed_reply", 1, 3),
    "always_long": (["long", "long"], "too_long", 2, 2),
    "short_then_500s": (["short", "500", "500", "500"], "http_500", 2, 4),
    "bad_request": (["400"], "http_400", 1, 1),
}


# the world's 90 prompts: the build tests give item clip-NN the prompt WORLD_PROMPTS[NN], in the world's vocabulary
WORLD_PROMPTS = sorted({world.prompt_text(spec) for spec in world.every_spec()})


def world_prompt(name: str) -> str:
    return WORLD_PROMPTS[int(name.removeprefix("clip-"))]


def item_name(text: str) -> str:
    """The item a request is for: the `(clip-NN)` its prompt names, or clip-NN for the world prompt NN."""
    if tagged := re.search(r"\((clip-\d+)\)", text):
        return tagged.group(1)
    return next(f"clip-{i:02d}" for i, prompt in enumerate(WORLD_PROMPTS) if f'"{prompt}"' in text)


class FakeChatServer:
    """A chat-completions endpoint on 127.0.0.1 that answers each item's k-th request with its script's
    k-th behaviour, and records what it received. Requests in flight are counted only while the client
    is surely still waiting (before the reply is written; a hang stops counting at 0.8 x the timeout),
    so `max_in_flight` never over-counts the client's concurrency."""

    def __init__(self, scripts):
        self.scripts = scripts
        self.requests = Counter()
        self.texts = {}  # (item, k) -> instruction text
        self.images = []  # per request: [(url header, shape, mean value)] of its images
        self.auth = set()
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake.lock:
                    fake.in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                behaviour = fake._record(self, body)
                if behaviour == "hang":
                    time.sleep(0.8 * TIMEOUT)
                    fake._leave()
                    time.sleep(1.2 * TIMEOUT)
                    try:
                        self._send(200, {"choices": [{"message": {"content": words(LENGTHS["good"])}}]})
                    except OSError:
                        pass  # the client has gone
                    return
                fake._leave()
                if behaviour in LENGTHS:
                    self._send(200, {"choices": [{"message": {"content": words(LENGTHS[behaviour])}}]})
                elif behaviour == "foreign":  # a good length, in words the world's vocabulary lacks
                    self._send(200, {"choices": [{"message": {"content": f"{words(9)} surfs a wave"}}]})
                elif behaviour == "not_json":
                    self._send(200, b"<html>upstream hiccup</html>")
                elif behaviour == "no_choices":
                    self._send(200, {"object": "chat.completion", "choices": []})
                elif behaviour == "empty":
                    self._send(200, {"choices": [{"message": {"content": "  "}}]})
                else:
                    self._send(int(behaviour), {"error": {"message": f"fake {behaviour}"}})

            def _send(self, status, payload):
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler

    def _record(self, handler, body):
        (message,) = body["messages"]
        text = next(part["text"] for part in message["content"] if part["type"] == "text")
        images = [part["image_url"]["url"] for part in message["content"] if part["type"] == "image_url"]
        decoded = []
        for url in images:
            header, data = url.split(",", 1)
            image = iio.imread(base64.b64decode(data), extension=".png")
            decoded.append((header, image.shape, float(image.mean())))
        item = item_name(text)
        with self.lock:
            k = self.requests[item]
            self.requests[item] += 1
            self.texts[item, k] = text
            self.images.append(decoded)
            self.auth.add(handler.headers.get("Authorization"))
        script = self.scripts[item]
        return script[k] if k < len(script) else "good"

    def _leave(self):
        with self.lock:
            self.in_flight -= 1


def clip_frames():
    """13 frames of 24 x 32 where frame k is filled with the value 10 k, so a PNG tells which frame it is."""
    return np.repeat(np.arange(13, dtype=np.uint8)[:, None, None, None] * 10, 24 * 32 * 3).reshape(13, 24, 32, 3)


def test_openai_backend_survives_a_flaky_endpoint(monkeypatch, caplog):
    rng = np.random.default_rng(7)
    names = list(rng.permutation(sorted(SCENARIOS) * 2))  # two items per scenario, in seeded order
    ids = [f"clip-{i:02d}" for i in range(len(names))]
    scenario = dict(zip(ids, names))
    monkeypatch.setenv("VIGU_TEST_KEY", "sk-not-for-logs")
    items = [CaptionItem(i, f"a red circle moving left ({i})", clip_frames()) for i in ids]

    with FakeChatServer({i: SCENARIOS[scenario[i]][0] for i in ids}) as server:
        config = CaptionerConfig(backend="openai", base_url=server.url, api_key_env="VIGU_TEST_KEY", **CLIENT)
        captioner = make_captioner(config, word_tokenizer())
        with caplog.at_level(logging.DEBUG, logger=LOGGER):
            results = captioner.caption_batch(items)

    assert [r.id for r in results] == ids  # one result per item, in order: none lost
    for r in results:
        _, reason, attempts, requests = SCENARIOS[scenario[r.id]]
        assert (r.reason, r.attempts, r.requests) == (reason, attempts, requests), scenario[r.id]
        assert r.ok == (reason is None) and (r.caption == words(12) if r.ok else r.caption is None)
        assert server.requests[r.id] == requests, scenario[r.id]  # the server saw exactly these tries
    assert sum(server.requests.values()) > len(items)  # retries happened
    assert captioner.error is None  # no failure here stops the run

    rejected = [r for r in results if not r.ok]
    reasons = {"http_500", "http_429", "http_400", "timeout", "malformed_reply", "too_long"}
    assert {r.reason for r in rejected} == reasons
    warnings = [rec.getMessage() for rec in caplog.records if rec.levelno == logging.WARNING]
    for r in rejected:
        assert sum(r.id in line and r.reason in line for line in warnings) == 1
    assert any("retry" in rec.getMessage() for rec in caplog.records if rec.levelno == logging.INFO)

    assert 2 <= server.max_in_flight <= CLIENT["concurrency"]
    # every request carried the 4 frames 0, 4, 8, 12 of 13 as PNGs, resized to a longer side of 48 pixels
    sent = [("data:image/png;base64", (36, 48, 3), value) for value in (0.0, 40.0, 80.0, 120.0)]
    assert len(server.images) == sum(server.requests.values()) and all(seen == sent for seen in server.images)
    assert server.auth == {"Bearer sk-not-for-logs"} and "sk-not-for-logs" not in caplog.text
    # the instruction names the prompt and the length; a re-ask says what was wrong
    first_short = next(i for i in ids if scenario[i] == "short_then_good")
    first_text = server.texts[first_short, 0]
    assert "a red circle moving left" in first_text and "between 8 and 16 tokens" in first_text
    assert "had 4 tokens, too few" in server.texts[first_short, 1]


def free_closed_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_endpoint_rejects_everything_quickly_with_one_line():
    url = f"http://127.0.0.1:{free_closed_port()}/v1"
    config = CaptionerConfig(backend="openai", base_url=url, **CLIENT)
    captioner = make_captioner(config, word_tokenizer())
    start = time.perf_counter()
    results = captioner.caption_batch([CaptionItem(f"clip-{i}", "a red circle", clip_frames()) for i in range(12)])
    assert time.perf_counter() - start < 3
    assert [r.reason for r in results] == ["endpoint_unreachable"] * 12
    # once one item has used its retries, the others stop instead of each retrying in turn
    assert sum(r.requests for r in results) <= CLIENT["concurrency"] * (CLIENT["max_retries"] + 1)
    message = str(captioner.error)
    assert isinstance(captioner.error, VigUError) and "\n" not in message
    assert url in message and "start the server" in message and "data.captioner.base_url" in message


def test_refused_api_key_stops_the_run_and_names_the_variable():
    with FakeChatServer({f"clip-{i}": ["401"] * 5 for i in range(6)}) as server:
        config = CaptionerConfig(backend="openai", base_url=server.url, api_key_env="VIGU_TEST_KEY", **CLIENT)
        captioner = make_captioner(config, word_tokenizer())
        items = [CaptionItem(f"clip-{i}", f"a circle (clip-{i})", clip_frames()) for i in range(6)]
        results = captioner.caption_batch(items)
    assert [r.reason for r in results] == ["http_401"] * 6
    assert sum(server.requests.values()) <= CLIENT["concurrency"]  # not retried; the rest never sent
    assert "$VIGU_TEST_KEY" in str(captioner.error) and "fake 401" in str(captioner.error)


# ----------------------------------------------------------------------------------------------------
# transformers: a tiny random LLaVA built here, saved, and loaded back offline
# ----------------------------------------------------------------------------------------------------

VLM_WORDS = "a the red blue circle square moves left right slowly quickly background describe video".split()
VLM_SPECIAL = ("<pad>", "<s>", "</s>", "<image>", "<|user|>", "<|assistant|>")
VLM_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>{% else %} {{ part['text'] }}{% endif %}{% endfor %}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    path = tmp_path_factory.mktemp("tiny-llava")
    tokenizer = word_tokenizer(VLM_WORDS + [".", ","], special=VLM_SPECIAL)
    tokenizer.add_special_tokens({"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>"})
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=14, vision_feature_select_strategy="full",
        num_additional_image_tokens=1, chat_template=VLM_TEMPLATE,  # CLIP's class token
    )
    ids = tokenizer.convert_tokens_to_ids
    config = LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, image_size=28, patch_size=14, projection_dim=32),
        text_config=dict(model_type="llama", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                         bos_token_id=ids("<s>"), eos_token_id=ids("</s>"), pad_token_id=ids("<pad>")),
        image_token_id=ids("<image>"), vision_feature_select_strategy="full", vision_feature_layer=-1,
    )
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(path)
    processor.save_pretrained(path)
    return path


def test_transformers_backend_generates_from_the_frames(tiny_vlm):
    from transformers import AutoTokenizer

    config = CaptionerConfig(
        backend="transformers", model_path=str(tiny_vlm), num_frames=2, image_size=28, batch_size=2,
        temperature=0.0, max_new_tokens=6, min_caption_tokens=2, max_caption_tokens=4, length_attempts=2,
        device="cpu", dtype="float32",
    )
    tokenizer = AutoTokenizer.from_pretrained(tiny_vlm, local_files_only=True)
    captioner = make_captioner(config, tokenizer)
    assert type(captioner.model).__name__ == "LlavaForConditionalGeneration"
    images_seen = []

    def count_images(module, args, kwargs, output):
        images_seen.append(len(kwargs["pixel_values"] if "pixel_values" in kwargs else args[0]))

    captioner.model.model.vision_tower.register_forward_hook(count_images, with_kwargs=True)
    rng = np.random.default_rng(0)
    clips = rng.integers(0, 256, (3, 5, 40, 40, 3), dtype=np.uint8)
    items = [CaptionItem(f"clip-{i}", "a red circle moving left", frames) for i, frames in enumerate(clips)]
    results = captioner.caption_batch(items)

    assert [r.id for r in results] == [item.id for item in items]
    for r in results:
        assert r.requests == r.attempts and 1 <= r.attempts <= 2
        if r.ok:
            assert r.num_tokens == count_tokens(tokenizer, r.caption) and 2 <= r.num_tokens <= 4
        else:
            assert r.attempts == 2 and r.reason == ("too_short" if r.num_tokens < 2 else "too_long")
    # generation ran on the frames: the vision tower saw num_frames images per item and attempt
    assert sum(images_seen) == config.num_frames * sum(r.attempts for r in results)
    assert len(images_seen) >= 2  # batch_size 2 splits three items


def test_transformers_backend_explains_a_missing_or_broken_folder(tmp_path):
    for path, words_expected in [(tmp_path / "absent", "not found"), (tmp_path, "could not load")]:
        config = CaptionerConfig(backend="transformers", model_path=str(path))
        with pytest.raises(VigUError) as info:
            make_captioner(config, word_tokenizer())
        assert words_expected in str(info.value) and str(path) in str(info.value) and "\n" not in str(info.value)


# ----------------------------------------------------------------------------------------------------
# world: ground-truth captions (needs vigu_cli.data.world, built on the world branch)
# ----------------------------------------------------------------------------------------------------


def test_world_captions_parse_back_to_the_spec():

    rng = np.random.default_rng(0)
    specs = [world.sample_clip(rng) for _ in range(8)]
    items = [CaptionItem(f"clip-{i}", world.prompt_text(spec), spec=spec) for i, spec in enumerate(specs)]
    tokenizer = word_tokenizer()
    rule = dict(backend="world", min_caption_tokens=8, max_caption_tokens=40)
    results = make_captioner(CaptionerConfig(**rule), tokenizer).caption_batch(items)
    assert all(r.ok and r.attempts == 1 for r in results)
    for spec, r in zip(specs, results):
        assert world.parse_caption(r.caption) == spec.attributes()
    again = make_captioner(CaptionerConfig(**rule), tokenizer).caption_batch(items)
    assert [r.caption for r in again] == [r.caption for r in results]  # deterministic per item
    reseeded = make_captioner(CaptionerConfig(**rule, seed=1), tokenizer).caption_batch(items)
    assert [r.caption for r in reseeded] != [r.caption for r in results]  # varied wording


def test_measure_captions_say_what_the_clip_shows_and_reject_a_clip_without_its_shape():
    """The `measure` backend reads the frames, not a ClipSpec: a rendered clip's caption parses back to its ground
    truth, a clip drawn for another spec is captioned as what it shows, and a frame without the shape (nothing
    to say where it went) rejects the clip as `unmeasurable`."""

    rng = np.random.default_rng(1)
    specs = [world.sample_clip(rng) for _ in range(6)]
    frames = [world.render(spec) for spec in specs]
    blank = frames[0].copy()
    blank[3] = blank[3, 0, 0]  # the background only, in frame 3
    items = [CaptionItem(f"clip-{i}", world.prompt_text(spec), clip) for i, (spec, clip) in enumerate(zip(specs, frames))]
    items.append(CaptionItem("swapped", world.prompt_text(specs[0]), frames[1], spec=specs[0]))  # the spec is ignored
    items.append(CaptionItem("blank", world.prompt_text(specs[0]), blank))
    rule = dict(backend="measure", min_caption_tokens=8, max_caption_tokens=40)
    results = make_captioner(CaptionerConfig(**rule), word_tokenizer()).caption_batch(items)
    for spec, r in zip([*specs, specs[1]], results):
        assert r.ok and world.parse_caption(r.caption) == spec.attributes()
    assert (results[-1].caption, results[-1].reason) == (None, "unmeasurable")
    with pytest.raises(VigUError, match="has no frames: the measure captioner reads the clip"):
        make_captioner(CaptionerConfig(**rule), word_tokenizer()).caption_batch([CaptionItem("x", "a", spec=specs[0])])
