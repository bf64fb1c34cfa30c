"""Tiny randomly initialised pipeline components for tests (importable as `tiny_models`: pytest
puts this folder on sys.path because tests/conftest.py lives here).

Every component has the real class and interface of the 14B pipeline's (AutoencoderKLWan, a
transformers umT5 encoder and fast tokenizer, UniPC, LIVEditorTransformer3DModel), only small.
Nothing is downloaded. Weights are drawn under `torch.random.fork_rng`, so building them never
changes the global random state.
"""

from __future__ import annotations

import torch

from liveditor.models import LIVEditorTransformer3DModel
from liveditor.pipelines.pipeline_liveditor import LIVEditorPipeline, flow_unipc_scheduler

TINY_BUCKETS = ((64, 64), (64, 96), (96, 64))


def tiny_tokenizer():
    """A byte-level BPE tokenizer with no merges: any text (any script) maps to its UTF-8 bytes."""
    from tokenizers import Tokenizer, decoders, models, processors
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>"]
    vocab = {token: i for i, token in enumerate(specials)}
    for char in sorted(ByteLevel.alphabet()):
        vocab[char] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def tiny_text_encoder(vocab_size: int, d_model: int = 32, seed: int = 0):
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UMT5EncoderModel(config).eval()


def tiny_vae(z_dim: int = 4, seed: int = 0):
    """AutoencoderKLWan with Wan's strides (4x temporal, 8x spatial) and a few thousand weights."""
    from diffusers import AutoencoderKLWan

    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKLWan(
            base_dim=8,
            z_dim=z_dim,
            dim_mult=[1, 1, 1, 1],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
            latents_mean=(torch.randn(z_dim, generator=g) * 0.1).tolist(),
            latents_std=(torch.rand(z_dim, generator=g) + 0.5).tolist(),
        ).eval()


def tiny_components(seed: int = 0, resolution_buckets=TINY_BUCKETS, max_sequence_length: int = 32, **transformer_overrides):
    """Keyword arguments of LIVEditorPipeline with tiny random components."""
    tokenizer = tiny_tokenizer()
    text_encoder = tiny_text_encoder(len(tokenizer), seed=seed)
    vae = tiny_vae(seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        transformer = LIVEditorTransformer3DModel.from_preset(
            "liveditor-tiny",
            **{"in_channels": vae.config.z_dim, "out_channels": vae.config.z_dim,
               "text_dim": text_encoder.config.d_model, **transformer_overrides},
        ).eval()
    return dict(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        scheduler=flow_unipc_scheduler(),
        transformer=transformer,
        resolution_buckets=resolution_buckets,
        max_sequence_length=max_sequence_length,
        max_num_frames=17,
    )


def tiny_pipeline(seed: int = 0, **kwargs):
    """A LIVEditorPipeline of tiny random components (CPU, float32)."""
    return LIVEditorPipeline(**tiny_components(seed=seed, **kwargs))
