import random

import pytest
import torch

from liveditor.data.shapes import ShapeEditConfig, generate_example
from liveditor.eval.activations import activation_fidelity, record_attention
from liveditor.isa import ISAConfig, coarse_residual, dense_attention

CONFIG = ShapeEditConfig(frames=8, height=32, width=32)


def test_recorded_qkv_reproduce_the_layer(shapeedit_pipeline):
    pipe = shapeedit_pipeline
    pipe.transformer.set_attention_mode("dense")
    ex = generate_example(random.randrange(1000), "test", config=CONFIG)
    outputs = []
    hook = pipe.transformer.blocks[1].attn1.register_forward_hook(lambda m, a, out: outputs.append(out.detach()))
    try:
        records = record_attention(pipe, ex.source, ex.instruction, layers=[1], steps=[0, 2],
                                   num_inference_steps=3, guidance_scale=1.0, output_type="latent", seed=1)
    finally:
        hook.remove()
    assert [(r.layer, r.step) for r in records] == [(1, 0), (1, 2)]
    attn = pipe.transformer.blocks[1].attn1
    for record, step in zip(records, (0, 2)):
        assert record.q.shape == (1, 2, 2 * 8 * 2 * 2, 16) and record.num_source == 32 and record.grid == (8, 2, 2)
        with torch.no_grad():
            # Dense mode: exact attention plus the layer's gated coarse residual.
            out = dense_attention(record.q, record.k, record.v)
            out = out + coarse_residual(record.q, record.k, record.v, record.num_source, record.gate,
                                        pipe.transformer.isa_config)
            out = out.transpose(1, 2).flatten(2)
            out = attn.to_out[1](attn.to_out[0](out))
        torch.testing.assert_close(out, outputs[step], rtol=1e-4, atol=1e-5)


def test_cfg_records_only_the_conditional_branch(shapeedit_pipeline):
    ex = generate_example(random.randrange(1000), "test", config=CONFIG)
    records = record_attention(shapeedit_pipeline, ex.source, ex.instruction, layers=[0, 1], steps=[1],
                               num_inference_steps=2, guidance_scale=3.0, output_type="latent")
    assert sorted((r.layer, r.step) for r in records) == [(0, 1), (1, 1)]
    with pytest.raises(ValueError, match="layers"):
        record_attention(shapeedit_pipeline, ex.source, ex.instruction, layers=[5], steps=[0], num_inference_steps=2)


def test_fidelity_on_records_picks_a_default(shapeedit_pipeline):
    ex = generate_example(random.randrange(1000), "test", config=CONFIG)
    records = record_attention(shapeedit_pipeline, ex.source, ex.instruction, layers=[0, 1], steps=[0],
                               num_inference_steps=1, guidance_scale=1.0, output_type="latent")
    configs = {
        "energy / raster (default)": ISAConfig(block_size=8),
        "topk / raster": ISAConfig(block_size=8, sharpness="topk"),
        "energy / tile": ISAConfig(block_size=8, token_order="tile", tile=(2, 2, 2)),
        "exact (all ratios 1)": ISAConfig(block_size=8, select_ratio=1.0, full_ratio=1.0, exact_ratio=1.0),
    }
    result = activation_fidelity(records, configs)
    assert len(result["per_record"]) == 2
    mean = {m["config"]: m for m in result["mean"]}
    assert mean["exact (all ratios 1)"]["rel_l2"] < 1e-5  # ISA with nothing dropped is exact attention
    assert mean["energy / raster (default)"]["rel_l2"] > 1e-4
    assert result["best_default"] in ("energy / raster (default)", "topk / raster", "energy / tile")
    with pytest.raises(ValueError, match="no recorded"):
        activation_fidelity([])
