"""The world's tokenizer: word-level over every word a world prompt or caption can use.

Special ids match umT5's where both have them: pad 0 `<pad>`, eos 1 `</s>`, unk 2 `<unk>`; mask 3
`<mask>`. Text is lower-cased, `.` and `,` are tokens of their own, EOS is appended, padding is on the
right. A `transformers.PreTrainedTokenizerFast`: `save_pretrained` / `AutoTokenizer.from_pretrained`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from vigu_cli.data.world import capitalize_sentences, vocabulary

SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>", "<mask>")  # ids 0, 1, 2, 3


def build_world_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {token: index for index, token in enumerate([*SPECIAL_TOKENS, *vocabulary()])}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("isolated")]
    )
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", mask_token="<mask>",
        padding_side="right",
    )


def decode_text(tokenizer: PreTrainedTokenizerBase, ids: Iterable[int]) -> str:
    """Token ids -> text the world's parsers read: cut at the first EOS, drop special tokens, join the
    words, re-attach `.` and `,`, capitalise each sentence."""
    ids = [int(i) for i in ids]
    if tokenizer.eos_token_id in ids:
        ids = ids[: ids.index(tokenizer.eos_token_id)]
    text = tokenizer.decode(ids, skip_special_tokens=True)
    return capitalize_sentences(re.sub(r"\s+([.,])", r"\1", text).strip())
