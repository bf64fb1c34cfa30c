"""The domain text encoder of the tiny LIVEditor: a word-level tokenizer and a small umT5 encoder.

The 14B model reads instructions with umT5-xxl. The tiny model keeps the same interfaces
(a `transformers` fast tokenizer and `UMT5EncoderModel`, so the pipeline calls
`tokenizer(...)` and `text_encoder(input_ids, attention_mask).last_hidden_state` unchanged) at
the size of its domain: one token per ShapeEdit word, built offline with the `tokenizers`
package, and a two-layer encoder trained jointly with the transformer. Words outside the
vocabulary become `<unk>`.
"""

from __future__ import annotations

from typing import Iterable

from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

PAD_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD_TOKEN, EOS_TOKEN, UNK_TOKEN)  # ids 0, 1, 2 as in T5


def domain_vocabulary() -> tuple[str, ...]:
    """The ShapeEdit words (every word an instruction of the domain can contain)."""
    from ..data.shapes import KNOWN_VOCABULARY

    return KNOWN_VOCABULARY


def build_word_tokenizer(words: Iterable[str] | None = None, model_max_length: int = 32) -> PreTrainedTokenizerFast:
    """A T5-style word-level tokenizer: lower-cases, keeps letters only, appends `</s>`.

    `words` default to the ShapeEdit vocabulary; ids 0/1/2 are `<pad>`, `</s>`, `<unk>`.
    """
    words = domain_vocabulary() if words is None else tuple(words)
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for word in words:
        if not word.isalpha() or word != word.lower():
            raise ValueError(f"vocabulary words must be lower-case letters, got {word!r}")
        vocab.setdefault(word, len(vocab))
    tokenizer = Tokenizer(WordLevel(vocab, unk_token=UNK_TOKEN))
    tokenizer.normalizer = normalizers.Lowercase()
    # Same word split as liveditor.data.shapes.instruction_words: runs of letters, all else dropped.
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("[^a-z]+"), behavior="removed")
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS_TOKEN}", special_tokens=[(EOS_TOKEN, vocab[EOS_TOKEN])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        model_max_length=model_max_length,
        padding_side="right",
    )


def build_text_encoder(
    vocab_size: int,
    d_model: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    d_ff: int = 256,
) -> UMT5EncoderModel:
    """A randomly initialised small umT5 encoder (the architecture Wan's text encoder uses)."""
    if d_model % num_heads:
        raise ValueError(f"d_model={d_model} must be divisible by num_heads={num_heads}")
    config = UMT5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=d_model // num_heads,
        d_ff=d_ff,
        num_layers=num_layers,
        num_decoder_layers=0,
        num_heads=num_heads,
        relative_attention_num_buckets=16,
        relative_attention_max_distance=32,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        tie_word_embeddings=False,
        is_encoder_decoder=False,
    )
    return UMT5EncoderModel(config)
