import pytest
import torch

from liveditor.data.shapes import ShapeEditConfig, generate_example
from liveditor.eval.activations import activation_fidelity, record_attention
from liveditor.isa import ISAConfig, coarse_residual, dense_attention

CONFIG = ShapeEditConfig(frames=8, height=32, width=32)


@pytest.mark.parametrize("seed", [3, 412])
def test_recorded_qkv_reproduce_the_layer(shapeedit_pipeline, seed):
    pipe = shapeedit_pipeline
    pipe.transformer.set_attention_mode("dense")
    ex = generate_example(seed, "test", config=CONFIG)
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


@pytest.mark.parametrize("seed", [5, 871])
def test_cfg_records_only_the_conditional_branch(shapeedit_pipeline, seed):
    ex = generate_example(seed, "test", config=CONFIG)
    records = record_attention(shapeedit_pipeline, ex.source, ex.instruction, layers=[0, 1], steps=[1],
                               num_inference_steps=2, guidance_scale=3.0, output_type="latent")
    assert sorted((r.layer, r.step) for r in records) == [(0, 1), (1, 1)]
    with pytest.raises(ValueError, match="layers"):
        record_attention(shapeedit_pipeline, ex.source, ex.instruction, layers=[5], steps=[0], num_inference_steps=2)


def test_step_count_comes_from_the_pipeline(shapeedit_pipeline):
    pipe = shapeedit_pipeline
    pipe.register_to_config(default_num_inference_steps=3)
    ex = generate_example(7, "test", config=CONFIG)
    records = record_attention(pipe, ex.source, ex.instruction, layers=[0], steps=[2], guidance_scale=1.0,
                               output_type="latent")
    assert [(r.layer, r.step) for r in records] == [(0, 2)]
    assert records[0].timestep == float(pipe.scheduler.timesteps[2])
    with pytest.raises(ValueError, match=r"steps must be in \[0, 3\)"):
        record_attention(pipe, ex.source, ex.instruction, layers=[0], steps=[3], guidance_scale=1.0,
                         output_type="latent")


LOSSY = {
    "energy / raster (default)": ISAConfig(block_size=8),
    "topk / raster": ISAConfig(block_size=8, sharpness="topk"),
    "energy / tile": ISAConfig(block_size=8, token_order="tile", tile=(2, 2, 2)),
}
EXACT = ISAConfig(block_size=8, select_ratio=1.0, full_ratio=1.0, exact_ratio=1.0)


@pytest.fixture
def two_records(shapeedit_pipeline):
    ex = generate_example(11, "test", config=CONFIG)
    return record_attention(shapeedit_pipeline, ex.source, ex.instruction, layers=[0, 1], steps=[0],
                            num_inference_steps=1, guidance_scale=1.0, output_type="latent")


@pytest.mark.parametrize("winner", sorted(LOSSY))
def test_best_default_is_the_default_choice_with_the_lowest_error(two_records, winner):
    # One default choice computes exact attention (nothing dropped): it must win, whichever it is.
    configs = {**LOSSY, winner: EXACT}
    result = activation_fidelity(two_records, configs)
    assert len(result["per_record"]) == 2
    mean = {m["config"]: m for m in result["mean"]}
    assert mean[winner]["rel_l2"] < 1e-5
    assert all(mean[name]["rel_l2"] > 1e-4 for name in LOSSY if name != winner)
    assert result["best_default"] == winner


def test_best_default_ignores_configs_that_are_not_default_choices(two_records):
    configs = {**LOSSY, "exact (all ratios 1)": EXACT}
    result = activation_fidelity(two_records, configs)
    errors = {}
    for name in LOSSY:  # the mean over records, recomputed from the per-record rows
        rows = [r for entry in result["per_record"] for r in entry["rows"] if r["config"] == name]
        errors[name] = sum(r["rel_l2"] for r in rows) / len(rows)
    assert result["best_default"] == min(errors, key=errors.get)
    assert result["best_default"] != "exact (all ratios 1)"
    with pytest.raises(ValueError, match="no recorded"):
        activation_fidelity([])
