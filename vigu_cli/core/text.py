"""The text stream: tokenizer handling and the two text-flow formulations behind one interface.

- `embedding` (paper, section 3.1): tokens -> rows of a learnable matrix E (the model's
  `text_embedding`), a linear flow from N(0, I) in that space, the model predicts the velocity
  (noise - data in diffusers' sign), decode = argmax_v <z, E_v>. Rows are used at norm sqrt(d_t) (ours:
  the paper's "align token embeddings with the continuous video manifold"), and Diffusion-LM's rounding
  cross-entropy on the predicted clean latent keeps E from collapsing (ours; `text.rounding_weight`).
- `discrete` (official release): each token is clean with probability kappa(tau) = tau ** n, else a
  draw from the source (uniform over the vocabulary, or the mask token); the model outputs vocabulary
  logits; loss = cross-entropy; sampling = the discrete Euler jump of the mixture path, in random order
  (the official CTMC sampler) or most confident tokens first (MaskGIT's order; `text_order`).

The solver, the training loop and the pipeline only call `TextFlow` methods, never branch on which.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .flow import _broadcast, draw, draw_per_sample, interpolate, per_sample_mse, predicted_data, velocity_target

TEXT_ORDERS = ("random", "confidence")  # which tokens of the discrete flow jump at a solver step


def words(text: str) -> list[str]:
    """Lower-cased alphanumeric words (punctuation dropped, as coco-caption's PTB tokenizer does)."""
    return re.findall(r"[a-z0-9]+", text.lower())


def consensus(texts: list[str]) -> int:
    """Minimum Bayes risk decoding's choice among candidate texts: the index of the one whose words agree most with
    the others' (unigram F1, summed over them); the first on a tie."""
    bags = [Counter(words(text)) for text in texts]

    def f1(a: Counter, b: Counter) -> float:
        common = sum((a & b).values())
        return 2 * common / (sum(a.values()) + sum(b.values())) if common else 0.0

    agreement = [sum(f1(bag, other) for j, other in enumerate(bags) if j != i) for i, bag in enumerate(bags)]
    return max(range(len(texts)), key=lambda i: (agreement[i], -i))


# ----------------------------------------------------------------------------------------------------
# Tokens
# ----------------------------------------------------------------------------------------------------


def encode_texts(tokenizer, texts: list[str], max_length: int) -> torch.Tensor:
    """Token ids `[B, max_length]`: lower-cased, EOS added, right-padded with pad, truncated."""
    batch = tokenizer(
        [t.lower() for t in texts],
        padding="max_length",
        truncation=True,
        max_length=max_length,
        add_special_tokens=True,
        return_tensors="pt",
    )
    return batch.input_ids


def decode_ids(tokenizer, ids: torch.Tensor) -> list[str]:
    """Text of each row: everything before the first EOS, special tokens dropped."""
    texts = []
    for row in ids.tolist():
        if tokenizer.eos_token_id in row:
            row = row[: row.index(tokenizer.eos_token_id)]
        text = tokenizer.decode(row, skip_special_tokens=True, clean_up_tokenization_spaces=True)
        texts.append(" ".join(text.split()))
    return texts


# ----------------------------------------------------------------------------------------------------
# Formulations
# ----------------------------------------------------------------------------------------------------


@dataclass
class NoisyText:
    """A training sample of the text stream: the model input `x` at sigma, its clean value and noise."""

    x: torch.Tensor
    clean: torch.Tensor
    noise: torch.Tensor


class TextFlow:
    """Interface of a text-flow formulation. `model` is the (unwrapped) `UniViGUTransformer`."""

    name: str
    continuous: bool

    def clean(self, model, ids: torch.Tensor) -> torch.Tensor:
        """The stream's clean state for token ids (the frozen prompt of `generate`)."""
        raise NotImplementedError

    def noise(self, model, batch: int, length: int, generator=None, device=None) -> torch.Tensor:
        """A draw from the source distribution (sigma = 1)."""
        raise NotImplementedError

    def sample_noisy(self, model, ids: torch.Tensor, sigma: torch.Tensor, generator=None, batch_slice=None) -> NoisyText:
        """The training input at sigma; randomness drawn as `flow.draw` does (global batch, this slice)."""
        raise NotImplementedError

    def loss(self, model, prediction: torch.Tensor, sample: NoisyText, ids: torch.Tensor, sigma: torch.Tensor):
        """Per-sample loss `[B]` (a per-token mean)."""
        raise NotImplementedError

    def step(self, x, prediction, sigma, sigma_next, generator=None, temperature: float = 1.0,
             order: str = "random") -> torch.Tensor:
        """One solver step from sigma to sigma_next; `temperature` scales the discrete flow's draws and
        `order` says which of its tokens jump."""
        raise NotImplementedError

    def decode(self, model, x: torch.Tensor) -> torch.Tensor:
        """Token ids `[B, L]` of a final state."""
        raise NotImplementedError


class EmbeddingTextFlow(TextFlow):
    """The paper's continuous flow in a learned token-embedding space."""

    name, continuous = "embedding", True

    def __init__(self, rounding_weight: float = 1.0):
        self.rounding_weight = rounding_weight

    @staticmethod
    def table(model) -> torch.Tensor:
        """E with every row at norm sqrt(d_t), the scale of a N(0, I) draw (`token_embeddings`, which a sharded
        model gathers)."""
        rows = model.token_embeddings()
        return F.normalize(rows.float(), dim=-1) * math.sqrt(rows.shape[-1])

    def clean(self, model, ids):
        return self.table(model)[ids]

    def noise(self, model, batch, length, generator=None, device=None):
        dim = model.config.text_latent_dim
        return draw_per_sample(torch.randn, (batch, length, dim), generator, device=device)

    def sample_noisy(self, model, ids, sigma, generator=None, batch_slice=None):
        clean = self.clean(model, ids)
        noise = draw(torch.randn, clean.shape, batch_slice, generator=generator, device=clean.device)
        return NoisyText(x=interpolate(clean, noise, sigma), clean=clean, noise=noise)

    def loss(self, model, prediction, sample, ids, sigma):
        loss = per_sample_mse(prediction, velocity_target(sample.clean, sample.noise))
        if self.rounding_weight:
            logits = predicted_data(sample.x, prediction.float(), sigma) @ self.table(model).T
            rounding = F.cross_entropy(logits.transpose(1, 2), ids, reduction="none").mean(1)
            loss = loss + self.rounding_weight * rounding
        return loss

    def step(self, x, prediction, sigma, sigma_next, generator=None, temperature=1.0, order="random"):
        """An Euler step of the ODE; it draws nothing, so `temperature` and `order` have no effect."""
        return x + (sigma_next - sigma) * prediction

    def decode(self, model, x):
        return (x.float() @ self.table(model).T).argmax(-1)


class DiscreteTextFlow(TextFlow):
    """The official release's discrete flow matching: mixture path with kappa(tau) = tau ** n."""

    name, continuous = "discrete", False

    def __init__(self, vocab_size: int, exponent: float = 1.0, mask_token_id: Optional[int] = None):
        self.vocab_size, self.exponent, self.mask_token_id = vocab_size, exponent, mask_token_id

    def kappa(self, sigma: torch.Tensor) -> torch.Tensor:
        """Probability that a token is already clean at sigma (tau = 1 - sigma)."""
        return (1.0 - sigma).clamp(0.0, 1.0) ** self.exponent

    def clean(self, model, ids):
        return ids

    def noise(self, model, batch, length, generator=None, device=None):
        if self.mask_token_id is not None:
            return torch.full((batch, length), self.mask_token_id, dtype=torch.long, device=device)
        return draw_per_sample(torch.randint, (batch, length), generator, low=0, high=self.vocab_size, device=device)

    def sample_noisy(self, model, ids, sigma, generator=None, batch_slice=None):
        if self.mask_token_id is not None:
            noise = torch.full_like(ids, self.mask_token_id)
        else:
            noise = draw(torch.randint, ids.shape, batch_slice, low=0, high=self.vocab_size, generator=generator, device=ids.device)
        keep = draw(torch.rand, ids.shape, batch_slice, generator=generator, device=ids.device) < _broadcast(self.kappa(sigma), ids.float())
        return NoisyText(x=torch.where(keep, ids, noise), clean=ids, noise=noise)

    def loss(self, model, prediction, sample, ids, sigma):
        return F.cross_entropy(prediction.float().transpose(1, 2), ids, reduction="none").mean(1)

    def step(self, x, prediction, sigma, sigma_next, generator=None, temperature=1.0, order="random"):
        """Euler jump of the mixture path: draw x1 ~ softmax(logits / temperature) (temperature 0: the
        argmax). `random` (the official sampler): a token that differs jumps to it with probability
        1 - exp(-h * kappa' / (1 - kappa)). `confidence` (MaskGIT's order): the kappa(tau_next) * L tokens
        whose draws are most likely take them and the others keep their value, so a sentence is fixed
        from its surest words outwards. The last step takes the draw."""
        if temperature < 0:
            raise ValueError(f"text_temperature must be >= 0, got {temperature}")
        if order not in TEXT_ORDERS:
            raise ValueError(f"unknown text_order '{order}': use {' or '.join(TEXT_ORDERS)}")
        if temperature == 0:
            draw = prediction.argmax(-1)
        else:
            draw = self._draw(prediction.double() / temperature, generator)
        if float(sigma_next) <= 0.0:
            return draw
        if order == "confidence":
            confidence = prediction.float().log_softmax(-1).gather(-1, draw[..., None])[..., 0]
            count = math.ceil(float(self.kappa(sigma_next)) * x.shape[1])
            surest = confidence.argsort(dim=-1, descending=True, stable=True)[:, :count]
            return torch.where(torch.zeros_like(x, dtype=torch.bool).scatter_(1, surest, True), draw, x)
        tau, h = 1.0 - float(sigma), float(sigma - sigma_next)
        kappa = tau**self.exponent
        rate = self.exponent * tau ** (self.exponent - 1) / max(1.0 - kappa, 1e-12)
        jump = draw_per_sample(torch.rand, tuple(x.shape), generator, device=x.device) < 1.0 - math.exp(-h * rate)
        return torch.where(jump & (draw != x), draw, x)

    @staticmethod
    def _draw(logits: torch.Tensor, generator) -> torch.Tensor:
        """One token per position from softmax(logits), drawn with the sample's generator."""
        probs = logits.softmax(-1)
        if isinstance(generator, list):  # one generator per sample
            return torch.stack([torch.multinomial(p, 1, generator=g)[:, 0] for p, g in zip(probs, generator, strict=True)])
        return torch.multinomial(probs.flatten(0, 1), 1, generator=generator).view(probs.shape[:-1])

    def decode(self, model, x):
        return x


def make_text_flow(text_cfg, vocab_size: int, mask_token_id: Optional[int] = None) -> TextFlow:
    """The recipe's `text.formulation` as a `TextFlow`."""
    if text_cfg.formulation == "embedding":
        return EmbeddingTextFlow(text_cfg.rounding_weight)
    mask = mask_token_id if text_cfg.discrete_source == "mask" else None
    return DiscreteTextFlow(vocab_size, text_cfg.kappa_exponent, mask)
