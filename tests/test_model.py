"""UniViGUTransformer (DESIGN.md section 3) against the stock diffusers WanTransformer3DModel, tiny configs."""

import pytest
import torch
from diffusers import WanTransformer3DModel
from peft import LoraConfig

from vigu_cli.core.model import UniViGUTransformer, UniViGUTransformerOutput

WAN = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=32,
    in_channels=16,
    out_channels=16,
    text_dim=32,
    freq_dim=64,
    ffn_dim=256,
    num_layers=2,
)
VOCAB, D_T, L = 40, 8, 6
TEXT = {
    "embedding": dict(text_formulation="embedding", text_vocab_size=VOCAB, text_latent_dim=D_T, text_max_length=16),
    "discrete": dict(text_formulation="discrete", text_vocab_size=VOCAB, text_max_length=16),
}


def stock_wan(seed=0):
    torch.manual_seed(seed)
    return WanTransformer3DModel(**WAN).eval()


def unified(formulation="embedding", seed=0, **extra):
    """from_wan on a random stock model, with the zero-init text head randomised so text outputs carry signal."""
    model = UniViGUTransformer.from_wan(stock_wan(seed), **TEXT[formulation], **extra).eval()
    torch.nn.init.normal_(model.text_out.weight, std=0.1)
    return model


def inputs(batch=2, formulation="embedding", seed=1):
    g = torch.Generator().manual_seed(seed)
    text = (
        torch.randn(batch, L, D_T, generator=g)
        if formulation == "embedding"
        else torch.randint(0, VOCAB, (batch, L), generator=g)
    )
    return dict(
        hidden_states=torch.randn(batch, 16, 3, 8, 8, generator=g),  # 48 video tokens
        timestep=torch.tensor([700.0, 150.0])[:batch],
        encoder_hidden_states=torch.randn(batch, 7, 32, generator=g),
        text_states=text,
        timestep_text=torch.tensor([300.0, 900.0])[:batch],
    )


def test_without_text_bit_identical_to_stock_and_stock_weights_miss_only_text():
    stock = stock_wan()
    model = UniViGUTransformer.from_config({**WAN, **TEXT["embedding"]}).eval()
    missing, unexpected = model.load_state_dict(stock.state_dict(), strict=False)
    text_names = set(model.text_parameter_names())
    assert set(missing) == text_names and unexpected == []
    assert {f"blocks.{i}.ffn_text.net.2.weight" for i in range(2)} <= text_names
    assert {"text_embedding.weight", "text_in.weight", "time_proj_text.weight", "norm_out_text.weight"} <= text_names
    assert set(model.state_dict()) - text_names == set(stock.state_dict())

    x = inputs()
    video_only = {k: x[k] for k in ("hidden_states", "timestep", "encoder_hidden_states")}
    with torch.no_grad():
        expected = stock(**video_only).sample
        plain = model(**video_only).sample
        empty_text = model(**video_only, text_states=torch.zeros(2, 0, D_T), timestep_text=x["timestep_text"])
    assert torch.equal(plain, expected)
    assert torch.equal(empty_text.sample, expected)  # the joint block path with zero text tokens
    assert empty_text.text_sample.shape == (2, 0, D_T)

    exported = stock_wan(seed=5)
    exported.load_state_dict(model.wan_state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(exported(**video_only).sample, expected)


@pytest.mark.parametrize("extra", [dict(text_attention="own"), dict(video_attends_text=False),
                                   dict(text_attention="own", video_attends_text=False, text_video_keys="text")])
def test_zero_text_tokens_give_the_video_alone_in_every_attention(extra):
    """A text stream of length 0 (`benchmarks/model_overhead.py`'s "0 text" row) through the attention variants
    whose text queries carry their own rotary positions: the video of the model without text."""
    model = unified(**extra)
    x = inputs()
    video_only = {k: x[k] for k in ("hidden_states", "timestep", "encoder_hidden_states")}
    with torch.no_grad():
        empty = model(**video_only, text_states=torch.zeros(2, 0, D_T), timestep_text=x["timestep_text"])
        torch.testing.assert_close(empty.sample, model(**video_only).sample, atol=1e-6, rtol=1e-6)
    assert empty.text_sample.shape == (2, 0, D_T)


@pytest.mark.parametrize("formulation", ["embedding", "discrete"])
def test_streams_share_attention(formulation):
    model = unified(formulation)
    x = inputs(formulation=formulation)
    other_video = dict(x, hidden_states=x["hidden_states"] + 0.5)
    other_text = dict(x, text_states=x["text_states"].flip(0))  # swap the two samples' texts
    other_prompt = dict(x, encoder_hidden_states=x["encoder_hidden_states"] + 0.5)
    with torch.no_grad():
        base = model(**x)
        video_changed, text_changed, prompt_changed = model(**other_video), model(**other_text), model(**other_prompt)
        no_text = model(**{k: x[k] for k in ("hidden_states", "timestep", "encoder_hidden_states")})
        for block in model.blocks:
            for p in block.ffn_text.parameters():
                p.zero_()
        no_ffn_text, no_ffn_text_video_changed = model(**x), model(**other_video)
    assert not torch.allclose(base.text_sample, video_changed.text_sample)  # text reads the video
    assert not torch.allclose(base.sample, text_changed.sample)  # video reads the text
    assert not torch.allclose(base.sample, no_text.sample)
    assert not torch.allclose(base.text_sample, prompt_changed.text_sample)  # text cross-attends the prompt
    assert not torch.allclose(base.text_sample, no_ffn_text.text_sample)  # ffn_text acts on text
    assert not torch.allclose(base.sample, no_ffn_text.sample)  # block 1's video reads block 0's ffn_text output
    assert not torch.allclose(no_ffn_text.text_sample, no_ffn_text_video_changed.text_sample)


def test_gradient_checkpointing_gives_the_same_gradients():
    model = unified()
    model.train()
    x = inputs()

    def grads():
        model.zero_grad()
        out = model(**x)
        (out.sample.square().mean() + out.text_sample.square().mean()).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    calls = []

    def checkpoint(block, *args):
        calls.append(block)
        return torch.utils.checkpoint.checkpoint(block.__call__, *args, use_reentrant=False)

    model.enable_gradient_checkpointing(checkpoint)
    checkpointed = grads()
    assert len(calls) == WAN["num_layers"]
    assert plain.keys() == checkpointed.keys()
    assert {"blocks.0.ffn_text.net.2.weight", "text_in.weight", "blocks.1.attn1.to_q.weight"} <= plain.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("formulation", ["embedding", "discrete"])
def test_formulation_shapes_and_text_only_forward(formulation):
    model = UniViGUTransformer.from_wan(stock_wan(), **TEXT[formulation]).eval()
    x = inputs(formulation=formulation)
    width = D_T if formulation == "embedding" else VOCAB
    with torch.no_grad():
        out = model(**x)
        sample, text_sample = model(**x, return_dict=False)
        text_only = model(**dict(x, hidden_states=None, timestep=None))
    assert isinstance(out, UniViGUTransformerOutput)
    assert out.sample.shape == x["hidden_states"].shape and out.text_sample.shape == (2, L, width)
    assert torch.equal(sample, out.sample) and torch.equal(text_sample, out.text_sample)
    assert text_only.sample is None and text_only.text_sample.shape == (2, L, width)
    assert not torch.any(out.text_sample)  # zero-init head: uniform logits / zero velocity at the start
    assert hasattr(model, "text_embedding") == (formulation == "embedding")
    if formulation == "embedding":
        assert model.text_embedding.weight.shape == (VOCAB, D_T) and model.text_out.out_features == D_T
    else:
        assert model.text_in.weight.shape == (VOCAB, 32 * 2) and model.text_out.out_features == VOCAB
    with pytest.raises(ValueError, match="text_max_length"):
        model(**dict(x, text_states=torch.cat([x["text_states"]] * 3, dim=1)))


def test_save_pretrained_round_trip(tmp_path):
    model = unified("discrete")
    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    assert not list(tmp_path.glob("*.bin"))
    loaded = UniViGUTransformer.from_pretrained(tmp_path).eval()
    assert isinstance(loaded.blocks[0], type(model.blocks[0])) and len(loaded.blocks) == WAN["num_layers"]
    assert all(p.device.type == "cpu" for p in loaded.parameters())
    assert loaded.config.text_formulation == "discrete" and loaded.config.text_vocab_size == VOCAB
    x = inputs(formulation="discrete")
    with torch.no_grad():
        a, b = model(**x), loaded(**x)
    assert torch.equal(a.sample, b.sample) and torch.equal(a.text_sample, b.text_sample)

    half = UniViGUTransformer.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    assert half.text_in.weight.dtype == torch.bfloat16 and half.blocks[0].ffn_text.net[2].weight.dtype == torch.bfloat16
    for kept in (half.time_embedder_text.linear_1.weight, half.scale_shift_table_text, half.norm_out_text.weight):
        assert kept.dtype == torch.float32
    with torch.no_grad():
        out = half(**{k: v.bfloat16() if v.is_floating_point() else v for k, v in x.items()})
    assert out.sample.dtype == torch.bfloat16 and torch.isfinite(out.text_sample).all()


def test_from_wan_copies_video_modules_into_text():
    stock = stock_wan()
    model = UniViGUTransformer.from_wan(stock, **TEXT["embedding"])
    for name, tensor in stock.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    video, text = model.condition_embedder, model
    for a, b in [(text.time_embedder_text, video.time_embedder), (text.time_proj_text, video.time_proj)]:
        assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert torch.equal(model.scale_shift_table_text, stock.scale_shift_table)
    for block in model.blocks:
        assert all(torch.equal(p, q) for p, q in zip(block.ffn_text.parameters(), block.ffn.parameters()))
    assert torch.equal(model.norm_out_text.weight, torch.ones(64)) and model.norm_out_text.bias is None
    assert model.norm_out_text.eps == 1e-5

    state = torch.random.get_rng_state()
    again = UniViGUTransformer.from_wan(stock, **TEXT["embedding"])  # the new parameters come from the seed
    assert all(torch.equal(p, q) for p, q in zip(model.state_dict().values(), again.state_dict().values()))
    assert torch.equal(torch.random.get_rng_state(), state)  # and the caller's random state is untouched
    other = UniViGUTransformer.from_wan(stock, seed=1, **TEXT["embedding"])
    assert not torch.equal(other.text_embedding.weight, model.text_embedding.weight)

    narrow = UniViGUTransformer.from_wan(stock, **TEXT["embedding"], text_ffn_dim=64)
    assert narrow.blocks[0].ffn_text.net[2].weight.shape == (64, 64)
    assert narrow.blocks[0].ffn.net[2].weight.shape == (64, 256)
    assert torch.equal(narrow.blocks[0].ffn.net[2].weight, stock.blocks[0].ffn.net[2].weight)

    stock.add_adapter(LoraConfig(r=2, target_modules=["to_q"]))  # renames the wrapped weights
    with pytest.raises(ValueError, match="do not fit"):
        UniViGUTransformer.from_wan(stock, **TEXT["embedding"])


def test_per_sample_timesteps():
    model = unified()
    x = inputs()
    with torch.no_grad():
        batched = model(**x)
        swapped_text_t = model(**dict(x, timestep_text=x["timestep_text"].flip(0)))
        for i in range(2):
            single = model(**{k: v[i : i + 1] for k, v in x.items()})
            torch.testing.assert_close(single.sample, batched.sample[i : i + 1], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(single.text_sample, batched.text_sample[i : i + 1], rtol=1e-5, atol=1e-5)
    # The text timestep modulates the text stream per sample (and the video through shared attention).
    assert not torch.allclose(swapped_text_t.text_sample[0], batched.text_sample[0])
    assert not torch.allclose(swapped_text_t.sample[0], batched.sample[0])


def test_text_tokens_get_rotary_positions():
    model = unified()
    x = inputs()
    order = torch.tensor([1, 0, 2, 3, 4, 5])
    with torch.no_grad():
        base = model(**x).text_sample
        permuted = model(**dict(x, text_states=x["text_states"][:, order])).text_sample
    # Attention without positions is permutation-equivariant; with RoPE a token's output depends on its place.
    assert not torch.allclose(permuted, base[:, order], atol=1e-4)


def test_bf16_autocast_and_lora_scale():
    model = unified("discrete")
    x = inputs(formulation="discrete")
    with torch.no_grad():
        fp32 = model(**x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model(**x)
    assert bf16.sample.dtype == torch.bfloat16 and bf16.text_sample.dtype == torch.bfloat16
    for a, b in [(bf16.sample, fp32.sample), (bf16.text_sample, fp32.text_sample)]:
        assert torch.isfinite(a).all()
        assert (a.float() - b).norm() / b.norm() < 0.05

    model.add_adapter(LoraConfig(r=4, target_modules=["to_q", "to_v"], init_lora_weights=False))
    with torch.no_grad():
        lora = model(**x)
        lora_off = model(**x, attention_kwargs={"scale": 0.0})
    assert not torch.allclose(lora.text_sample, fp32.text_sample)
    torch.testing.assert_close(lora_off.text_sample, fp32.text_sample)
    torch.testing.assert_close(lora_off.sample, fp32.sample)


def shared_and_own(module, **config):
    """A model with the paper's shared attention and one with the text's own copy of each block's `module`
    (`config` asks for it), on the same weights, the copy taken from `module` as `from_wan` takes it. Checks that
    the copy is all the second model adds, that it counts as text parameters, and that the stock state dict
    is unchanged."""
    shared, own = unified("discrete", seed=4), unified("discrete", seed=4, **config)
    missing, _ = own.load_state_dict(shared.state_dict(), strict=False)  # the same weights, then the copy
    own._copy_video_to_text()
    assert missing and all(f".{module}_text." in name for name in missing)
    names = set(own.text_parameter_names())
    assert {f"blocks.{i}.{module}_text.{proj}.weight" for i in range(2) for proj in ("to_q", "to_k")} <= names
    assert set(own.wan_state_dict()) == set(shared.wan_state_dict())
    return shared, own


def assert_text_loss_trains_only(own, x, text_projection, video_projection):
    """A loss on the text tokens alone (no video tokens) gives `text_projection` a gradient and
    `video_projection` none."""
    out = own(hidden_states=None, timestep=None, encoder_hidden_states=x["encoder_hidden_states"],
              text_states=x["text_states"], timestep_text=x["timestep_text"])
    out.text_sample.square().mean().backward()
    video_grad = video_projection.weight.grad
    assert video_grad is None or not video_grad.any()
    assert text_projection.weight.grad.abs().sum() > 0


def test_own_text_attention_starts_as_shared_and_then_leaves_the_video_path_alone():
    x = inputs(formulation="discrete")
    shared, own = shared_and_own("attn1", text_attention="own")
    seen = []  # attn1 is still the module called, so hooks on it see [video ; text] as with shared attention
    hook = own.blocks[0].attn1.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    with torch.no_grad():  # a copy of attn1 at the start: the same outputs as shared attention
        a, b = shared(**x), own(**x)
    hook.remove()
    assert torch.allclose(a.sample, b.sample, atol=1e-5) and torch.allclose(a.text_sample, b.text_sample, atol=1e-5)
    assert seen == [(2, 48 + L, 64)]

    # A text loss trains attn1_text and leaves attn1 without gradient from text tokens alone (no video tokens).
    assert_text_loss_trains_only(own, x, own.blocks[0].attn1_text.to_q, own.blocks[0].attn1.to_q)

    # The video tokens' attention reads text keys made by attn1_text: changing it moves the joint video output
    own.zero_grad()
    with torch.no_grad():
        before = own(**x).sample
        own.blocks[0].attn1_text.to_k.weight.add_(0.5)
        assert not torch.allclose(own(**x).sample, before, atol=1e-4)


def test_own_text_cross_attention_starts_as_shared_and_is_what_the_text_reads_the_prompt_with():
    x = inputs(formulation="discrete")
    shared, own = shared_and_own("attn2", text_cross_attention="own")
    with torch.no_grad():  # a copy of attn2 at the start: the same outputs as the shared cross-attention
        a, b = shared(**x), own(**x)
    assert torch.allclose(a.sample, b.sample, atol=1e-5) and torch.allclose(a.text_sample, b.text_sample, atol=1e-5)

    # A text loss on text tokens alone trains attn2_text, and attn2 gets nothing from it.
    assert_text_loss_trains_only(own, x, own.blocks[0].attn2_text.to_k, own.blocks[0].attn2.to_k)
    with torch.no_grad():  # and the text's prediction reads the prompt through it
        own.blocks[0].attn2_text.to_v.weight.add_(0.5)
        assert not torch.allclose(own(**x).text_sample, b.text_sample, atol=1e-4)


@pytest.mark.parametrize("attention", ["shared", "own"])
def test_video_that_does_not_attend_to_text_is_the_stock_video_and_text_reads_all(attention):
    """`video_attends_text=False`: the video output is the stock model's whatever the text; the text output is
    joint attention with the video rows masked off the text keys; and with only text parameters trained the
    video stream stays out of autograd's graph (what makes `trainable: text` steps cheap)."""
    x = inputs(formulation="discrete")
    one_way = unified("discrete", seed=5, text_attention=attention, video_attends_text=False)
    both_ways = unified("discrete", seed=5, text_attention=attention)
    both_ways.load_state_dict(one_way.state_dict())
    num_video, total = 48, 48 + L
    mask = torch.ones(total, total, dtype=torch.bool)
    mask[:num_video, num_video:] = False

    def masked(module, args, kwargs):  # the reference: every token in one attention, video rows masked
        return (args[0], args[1], mask, *args[3:]), kwargs

    for block in both_ways.blocks:
        block.attn1.register_forward_pre_hook(masked, with_kwargs=True)
    with torch.no_grad():
        got, want = one_way(**x), both_ways(**x)
        video_alone = one_way(hidden_states=x["hidden_states"], timestep=x["timestep"],
                              encoder_hidden_states=x["encoder_hidden_states"]).sample
        other_text = one_way(**{**x, "text_states": (x["text_states"] + 1) % VOCAB})
    torch.testing.assert_close(got.sample, video_alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(other_text.sample, video_alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.text_sample, want.text_sample, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(other_text.text_sample, got.text_sample, atol=1e-3)

    text_names = set(one_way.text_parameter_names())
    for name, param in one_way.named_parameters():
        param.requires_grad_(name in text_names)
    out = one_way(**x)
    assert not out.sample.requires_grad and out.text_sample.requires_grad
    out.text_sample.square().mean().backward()
    trained = one_way.blocks[0].attn1_text.to_q if attention == "own" else one_way.blocks[0].ffn_text.net[0].proj
    assert trained.weight.grad.abs().sum() > 0


def test_text_that_reads_video_keys_of_its_own_starts_equal_and_trains_them_without_touching_the_video():
    """`text_video_keys="text"`: the text reads the video tokens through `attn1_text`'s keys and values. From a
    conversion (`attn1_text` a copy of `attn1`) it predicts what the video's keys give; its key projection
    then changes the text prediction and gets a gradient from the video tokens' keys, and the video stays the
    stock model's."""
    x = inputs(formulation="discrete")
    config = dict(text_attention="own", video_attends_text=False)
    video_keys = unified("discrete", seed=5, **config)
    text_keys = unified("discrete", seed=5, text_video_keys="text", **config)
    text_keys.load_state_dict(video_keys.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(text_keys(**x).text_sample, video_keys(**x).text_sample, atol=1e-5, rtol=1e-5)
        before = text_keys(**x)
        text_keys.blocks[0].attn1_text.to_k.weight.add_(0.5)
        after = text_keys(**x)
    assert torch.equal(after.sample, before.sample)
    assert not torch.allclose(after.text_sample, before.text_sample, atol=1e-3)
    with pytest.raises(ValueError, match="needs text_attention='own' and video_attends_text=False"):
        unified("discrete", text_attention="own", text_video_keys="text")


@pytest.mark.parametrize("attention, video_keys", [("shared", "video"), ("own", "video"), ("own", "text")])
def test_a_video_context_gives_the_text_prediction_of_the_video_itself(attention, video_keys):
    """A video that does not attend to the text, computed once (`video_context`, with or without the keys and
    values the text reads of it), then text-only forwards: the text prediction of a forward with the video, for
    any text; a video that reads the text has none."""
    x = inputs(formulation="discrete")
    one_way = unified("discrete", seed=5, text_attention=attention, video_attends_text=False,
                      text_video_keys=video_keys)
    if video_keys == "text":  # the text's keys of the video then differ from the video's own
        with torch.no_grad():
            one_way.blocks[0].attn1_text.to_k.weight.add_(0.5)
    video = {k: x[k] for k in ("hidden_states", "timestep", "encoder_hidden_states")}
    with torch.no_grad():
        context, kept = one_way.video_context(**video), one_way.video_context(**video, keys_values=True)
        assert context.keys_values is context.prompt_keys_values is None
        assert len(kept.keys_values) == len(kept.prompt_keys_values) == len(one_way.blocks)
        for text_states in (x["text_states"], (x["text_states"] + 3) % VOCAB):
            text = {"text_states": text_states, "timestep_text": x["timestep_text"]}
            want = one_way(**video, **text).text_sample
            for given in (context, kept):
                got = one_way(encoder_hidden_states=x["encoder_hidden_states"], video_context=given, **text)
                assert got.sample is None
                torch.testing.assert_close(got.text_sample, want, atol=1e-5, rtol=1e-5)
        # the kept context reads the prompt it was computed with, through its kept keys and values
        other_prompt = torch.zeros_like(x["encoder_hidden_states"])
        assert not torch.allclose(one_way(encoder_hidden_states=other_prompt, video_context=context, **text).text_sample,
                                  want, atol=1e-3)
        torch.testing.assert_close(one_way(encoder_hidden_states=other_prompt, video_context=kept, **text).text_sample,
                                   want, atol=1e-5, rtol=1e-5)
        kept.prompt_keys_values[0][1].add_(1.0)
        assert not torch.allclose(one_way(encoder_hidden_states=other_prompt, video_context=kept, **text).text_sample,
                                  want, atol=1e-3)
        with pytest.raises(ValueError, match="not both"):
            one_way(**x, video_context=context)
        with pytest.raises(ValueError, match="attends to the text"):
            unified("discrete", text_attention=attention).video_context(**video)


@pytest.mark.parametrize("video_attends_text, video_keys", [(True, "video"), (False, "video"), (False, "text")])
def test_without_the_video_prediction_the_text_prediction_and_its_gradients_are_the_same(video_attends_text, video_keys):
    """`video_prediction=False` stops the video at the last block's attention input: no `sample`, the same
    text prediction and the same gradients of every parameter the text prediction reaches."""
    x = inputs(formulation="discrete")
    model = unified("discrete", seed=6, text_attention="own", video_attends_text=video_attends_text,
                    text_video_keys=video_keys)
    outputs, grads = [], []
    for video_prediction in (True, False):
        model.zero_grad()
        out = model(**x, video_prediction=video_prediction)
        out.text_sample.float().square().mean().backward()
        outputs.append(out)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert outputs[0].sample is not None and outputs[1].sample is None
    torch.testing.assert_close(outputs[1].text_sample, outputs[0].text_sample, atol=1e-5, rtol=1e-5)
    assert any(".attn1_text." in n for n in grads[1])
    for name, param in model.named_parameters():  # missing is zero: the last block's video queries, unused by the text
        with_video, without = (g.get(name, torch.zeros_like(param)) for g in grads)
        torch.testing.assert_close(without, with_video, atol=1e-5, rtol=1e-4)
