"""The domain tokenizer and text encoder."""

import pytest
import torch
from transformers import AutoTokenizer

from liveditor.data.shapes import KNOWN_VOCABULARY, generate_example
from liveditor.models.tiny_text import build_text_encoder, build_word_tokenizer
from liveditor.training import encode_instructions


def test_every_domain_word_is_one_known_token():
    tok = build_word_tokenizer()
    ids = tok(list(KNOWN_VOCABULARY), add_special_tokens=False).input_ids
    assert all(len(i) == 1 for i in ids)
    flat = [i[0] for i in ids]
    assert len(set(flat)) == len(flat) and tok.unk_token_id not in flat


def test_instructions_split_like_the_domain_and_end_with_eos():
    tok = build_word_tokenizer()
    for seed in range(12):
        text = generate_example(seed, "train").instruction
        ids = tok(text).input_ids
        assert ids[-1] == tok.eos_token_id
        assert tok.convert_ids_to_tokens(ids[:-1]) == [w for w in text.lower().replace(",", " ").split()]
    # case, punctuation and unknown words
    assert tok("Remove the RED circle!").input_ids == tok("remove the red circle").input_ids
    assert tok.convert_ids_to_tokens(tok("paint the zebra blue").input_ids) == ["paint", "the", "<unk>", "blue", "</s>"]


def test_default_negative_prompt_is_a_null_prompt_of_training():
    # The pipeline's default negative prompt (Chinese) keeps one unknown word ("JPEG"); training
    # drops instructions to it as well as to "", so both serve as the unconditional CFG branch.
    from liveditor.pipelines import WAN_NEGATIVE_PROMPT
    from liveditor.training.loop import NULL_PROMPTS

    tok = build_word_tokenizer()
    assert tok(WAN_NEGATIVE_PROMPT).input_ids == [tok.unk_token_id, tok.eos_token_id]
    assert tok("").input_ids == [tok.eos_token_id]
    assert set(NULL_PROMPTS) == {"", WAN_NEGATIVE_PROMPT}


def test_tokenizer_round_trips_through_save_pretrained(tmp_path):
    tok = build_word_tokenizer(model_max_length=24)
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = ["make the blue star move left", "add a small red square at the top right"]
    kwargs = dict(padding="max_length", max_length=24, truncation=True, return_tensors="pt")
    assert torch.equal(loaded(text, **kwargs).input_ids, tok(text, **kwargs).input_ids)


def test_rejects_bad_vocabulary():
    with pytest.raises(ValueError, match="lower-case letters"):
        build_word_tokenizer(["Red"])


def test_encoded_instructions_zero_padding_like_the_pipeline():
    torch.manual_seed(0)
    tok = build_word_tokenizer()
    enc = build_text_encoder(len(tok), d_model=32, num_layers=1, num_heads=2, d_ff=64).eval()
    prompts = ["remove the red circle", "make the background gray stripes please"]
    with torch.no_grad():
        emb = encode_instructions(tok, enc, prompts, max_length=12)
    assert emb.shape == (2, 12, 32)
    lengths = [len(tok(p).input_ids) for p in prompts]
    for row, n in zip(emb, lengths):
        assert row[:n].abs().sum() > 0 and torch.all(row[n:] == 0)
    with pytest.raises(ValueError, match="divisible"):
        build_text_encoder(10, d_model=30, num_heads=4)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("max_length", [12, 4], ids=["padded", "no-padding"])
def test_encoded_instructions_equal_the_encoder_on_its_2d_padding_mask(implementation, max_length):
    """encode_instructions hands the text encoder its padding as a 4D additive mask (transformers reads
    a 2D one back to the host to look for padding: a GPU sync each call); the embeddings are those of
    the encoder on the tokenizer's 2D mask, bit for bit, with and without padding in the batch."""
    torch.manual_seed(0)
    tok = build_word_tokenizer()
    enc = build_text_encoder(len(tok), d_model=32, num_layers=2, num_heads=2, d_ff=64).eval()
    enc.set_attn_implementation(implementation)
    prompts = ["remove the red circle", "make the background gray stripes please", "add a blue star"]
    tokens = tok(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    assert bool((tokens.attention_mask == 0).any()) == (max_length == 12)
    with torch.no_grad():
        ours = encode_instructions(tok, enc, prompts, max_length=max_length)
        expected = enc(tokens.input_ids, tokens.attention_mask).last_hidden_state * tokens.attention_mask[..., None]
    assert torch.equal(ours, expected)
