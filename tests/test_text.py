"""The text stream: both TextFlow formulations on a real (tiny) UniViGUTransformer, and tokens."""

import math

import pytest
import torch

from vigu_cli.core.flow import FlowSolver, Stream
from vigu_cli.core.model import UniViGUTransformer
from vigu_cli.core.text import (
    consensus,
    TEXT_ORDERS,
    DiscreteTextFlow,
    EmbeddingTextFlow,
    decode_ids,
    encode_texts,
    make_text_flow,
)
from vigu_cli.data.world_text import build_world_tokenizer
from vigu_cli.recipe import TextSection

V = 64


def tiny(formulation="embedding"):
    torch.manual_seed(0)
    return UniViGUTransformer(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=64, ffn_dim=128, num_layers=2,
        text_formulation=formulation, text_vocab_size=V, text_latent_dim=16, text_max_length=32,
    )


def test_embedding_round_trip_recovers_ids():
    """Test 6: ids -> clean latents -> decode gives the ids back, for every token of the vocabulary."""
    model, flow = tiny(), EmbeddingTextFlow()
    ids = torch.arange(V).view(4, 16)
    latents = flow.clean(model, ids)
    assert latents.shape == (4, 16, 16)
    assert torch.allclose(latents.norm(dim=-1), torch.full((4, 16), math.sqrt(16)), atol=1e-5)
    assert torch.equal(flow.decode(model, latents), ids)
    # and from a slightly noisy latent too: decoding is nearest-row, not exact match
    noisy = latents + 0.05 * torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))
    assert torch.equal(flow.decode(model, noisy), ids)


def test_embedding_loss_pulls_table_rows_apart_through_rounding():
    model = tiny()
    ids = torch.randint(0, V, (2, 8), generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.3, 0.7])
    with_rounding, without = EmbeddingTextFlow(1.0), EmbeddingTextFlow(0.0)
    sample = with_rounding.sample_noisy(model, ids, sigma, torch.Generator().manual_seed(1))
    prediction = torch.zeros_like(sample.x)
    loss_r = with_rounding.loss(model, prediction, sample, ids, sigma)
    loss_0 = without.loss(model, prediction, sample, ids, sigma)
    assert loss_r.shape == (2,) and torch.all(loss_r > loss_0)
    loss_r.sum().backward()
    assert model.text_embedding.weight.grad.abs().sum() > 0


def test_discrete_noising_follows_kappa():
    flow = DiscreteTextFlow(V, exponent=2.0)
    ids = torch.full((4000, 16), 5)
    sigma = torch.tensor([0.0, 0.5, 0.75, 1.0]).repeat_interleave(1000)
    sample = flow.sample_noisy(None, ids, sigma, torch.Generator().manual_seed(0))
    kept = (sample.x == 5).float().view(4, -1).mean(1)
    # clean with probability kappa = tau^2, plus a uniform draw that lands on 5 with probability 1/V
    expected = torch.tensor([1.0, 0.25, 0.0625, 0.0])
    expected = expected + (1 - expected) / V
    assert torch.allclose(kept, expected, atol=0.01)


@pytest.mark.parametrize("order", TEXT_ORDERS)
def test_discrete_solver_reaches_a_sharp_target(order):
    """With logits that put all mass on one sequence, the discrete Euler jumps end exactly on it, in
    either order."""
    flow = DiscreteTextFlow(V)
    target = torch.randint(0, V, (3, 10), generator=torch.Generator().manual_seed(0))

    def model_fn(x_v, x_t, t_v, t_t, condition):
        return None, torch.nn.functional.one_hot(target, V).float() * 50.0

    start = flow.noise(None, 3, 10, torch.Generator().manual_seed(1))
    solver = FlowSolver(8, "heun", 3.0)
    _, out = solver(model_fn, None, Stream(start), flow, generator=torch.Generator().manual_seed(2), text_order=order)
    assert torch.equal(out, target)


def test_confidence_order_gives_the_surest_tokens_their_draw_and_keeps_the_rest():
    """From sigma 0.75 to 0.5, kappa(0.5) * L = 5 of 10 positions jump: the five whose most likely token
    is most likely, whatever their place; the others keep their token; the last step takes every draw."""
    flow = DiscreteTextFlow(V)
    target = torch.randint(0, V, (2, 10), generator=torch.Generator().manual_seed(0))
    sureness = torch.rand(2, 10, generator=torch.Generator().manual_seed(1)) * 5
    logits = torch.nn.functional.one_hot(target, V).float() * sureness[..., None]
    x = (target + 1) % V  # every position holds another token
    out = flow.step(x, logits, torch.tensor(0.75), torch.tensor(0.5), temperature=0, order="confidence")
    surest = torch.zeros(2, 10, dtype=torch.bool).scatter_(1, sureness.topk(5, dim=1).indices, True)
    assert torch.equal(out, torch.where(surest, target, x))
    last = flow.step(out, logits, torch.tensor(0.5), torch.tensor(0.0), temperature=0, order="confidence")
    assert torch.equal(last, target)
    with pytest.raises(ValueError, match="unknown text_order 'sorted': use random or confidence"):
        flow.step(x, logits, torch.tensor(0.75), torch.tensor(0.5), order="sorted")


def test_discrete_temperature_zero_takes_the_most_likely_token_and_one_samples():
    """Temperature 0: every draw is the argmax, whatever the generator; 1: the softmax draws (of a flat
    distribution, many tokens); the embedding flow draws nothing, so a temperature changes nothing there."""
    flow = DiscreteTextFlow(V)
    logits = torch.randn(64, 10, V, generator=torch.Generator().manual_seed(0)) * 0.1
    x = flow.noise(None, 64, 10, torch.Generator().manual_seed(1))
    greedy = flow.step(x, logits, torch.tensor(0.2), torch.tensor(0.0), torch.Generator().manual_seed(2), temperature=0)
    assert torch.equal(greedy, logits.argmax(-1))
    sampled = flow.step(x, logits, torch.tensor(0.2), torch.tensor(0.0), torch.Generator().manual_seed(2))
    assert (sampled != greedy).float().mean() > 0.5
    with pytest.raises(ValueError, match="text_temperature must be >= 0"):
        flow.step(x, logits, torch.tensor(0.2), torch.tensor(0.0), temperature=-1)
    x, v = torch.randn(1, 2, 4), torch.randn(1, 2, 4)
    assert torch.equal(EmbeddingTextFlow().step(x, v, 1.0, 0.5, temperature=0), EmbeddingTextFlow().step(x, v, 1.0, 0.5))


def test_discrete_mask_source_and_factory():
    flow = make_text_flow(TextSection(formulation="discrete", discrete_source="mask"), V, mask_token_id=3)
    assert isinstance(flow, DiscreteTextFlow) and not flow.continuous
    assert torch.equal(flow.noise(None, 2, 5), torch.full((2, 5), 3))
    assert isinstance(make_text_flow(TextSection(), V), EmbeddingTextFlow)


@pytest.mark.parametrize("formulation", ["embedding", "discrete"])
def test_model_runs_each_formulation_through_the_solver(formulation):
    model = tiny(formulation).eval()
    flow = make_text_flow(TextSection(formulation=formulation), V)
    video = torch.randn(2, 16, 2, 4, 4)
    prompt = torch.randn(2, 7, 32)

    def model_fn(x_v, x_t, t_v, t_t, condition):
        out = model(hidden_states=x_v, timestep=t_v, encoder_hidden_states=condition, text_states=x_t, timestep_text=t_t)
        return out.sample, out.text_sample

    with torch.no_grad():
        _, state = FlowSolver(3, "euler", 3.0)(
            model_fn, Stream(video, frozen=True), Stream(flow.noise(model, 2, 12, torch.Generator().manual_seed(0))),
            flow, prompt, generator=torch.Generator().manual_seed(0),
        )
    ids = flow.decode(model, state)
    assert ids.shape == (2, 12) and ids.dtype == torch.long and int(ids.max()) < V


def test_encode_and_decode_texts_with_the_world_tokenizer():
    tokenizer = build_world_tokenizer()
    text = "A large red circle moves left quickly from the top right of a gray background."
    ids = encode_texts(tokenizer, [text, "a blue square staying still"], 32)
    assert ids.shape == (2, 32)
    assert int(ids[0, -1]) == tokenizer.pad_token_id and tokenizer.eos_token_id in ids[0].tolist()
    decoded = decode_ids(tokenizer, ids)
    assert decoded[1] == "a blue square staying still"
    assert decoded[0] == text.lower()
    # anything after the first EOS is ignored
    ids[1, 6:] = ids[0, :26]
    assert decode_ids(tokenizer, ids)[1] == "a blue square staying still"


def test_consensus_keeps_the_candidate_that_agrees_most_with_the_others():
    assert consensus(["A red circle moves left.", "a red square moves left", "a red circle moves left quickly"]) == 0
    assert consensus(["a blue square", "a red circle", "A red circle."]) == 1  # a tie: the first of the best
    assert consensus(["only one"]) == 0
