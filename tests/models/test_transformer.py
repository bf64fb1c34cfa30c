import pytest
import torch

from liveditor.isa import ISAConfig
from liveditor.models import LIVEditorAttnProcessor, LIVEditorTransformer3DModel

ALL_ONES = ISAConfig(block_size=8, select_ratio=1.0, full_ratio=1.0, exact_ratio=1.0)


def _model(seed=0, **overrides):
    torch.manual_seed(seed)
    return LIVEditorTransformer3DModel.from_preset("liveditor-tiny", **overrides).eval()


def _inputs(seed=1, frames=3, height=8, width=12, batch=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, frames, height, width, generator=g)
    ctx = torch.randn(batch, 4, frames, height, width, generator=g)
    t = torch.rand(batch, generator=g) * 1000
    text = torch.randn(batch, 7, 32, generator=g)
    return x, t, text, ctx


@torch.no_grad()
def test_output_is_source_shaped_and_depends_on_context():
    model = _model()
    x, t, text, ctx = _inputs(batch=2)
    out = model(x, t, text, ctx).sample
    assert out.shape == x.shape
    assert torch.isfinite(out).all()
    out_other_ctx = model(x, t, text, torch.randn_like(ctx)).sample
    assert not torch.allclose(out, out_other_ctx, atol=1e-4)


@torch.no_grad()
def test_isa_with_all_ratios_one_and_closed_gate_equals_dense():
    model = _model()
    for block in model.blocks:
        torch.nn.init.zeros_(block.attn1.coarse_gate.weight)  # gate value 0: no coarse residual
    x, t, text, ctx = _inputs()
    model.set_attention_mode("isa", ALL_ONES)
    isa = model(x, t, text, ctx).sample
    model.set_attention_mode("dense")
    dense = model(x, t, text, ctx).sample
    torch.testing.assert_close(isa, dense, atol=2e-5, rtol=1e-5)


@torch.no_grad()
def test_open_gate_adds_the_coarse_residual_only_in_isa_mode():
    model = _model()
    x, t, text, ctx = _inputs()
    model.set_attention_mode("isa", ALL_ONES)
    isa = model(x, t, text, ctx).sample
    dense = model(x, t, text, ctx, attention_kwargs={"mode": "dense"}).sample
    assert (isa - dense).abs().max() > 1e-4
    assert model.attention_mode == "isa"  # a per-call override does not stick


@torch.no_grad()
def test_sparse_isa_differs_from_dense_but_stays_close():
    model = _model()
    x, t, text, ctx = _inputs(frames=4, height=8, width=16)
    model.set_attention_mode("isa", ISAConfig(block_size=8, select_ratio=0.25, full_ratio=0.5, exact_ratio=0.25))
    isa = model(x, t, text, ctx).sample
    dense = model(x, t, text, ctx, attention_kwargs={"mode": "dense"}).sample
    assert not torch.allclose(isa, dense, atol=1e-5)
    rel = (isa - dense).norm() / dense.norm()
    assert rel < 0.5


@torch.no_grad()
def test_context_restarts_rope_positions_on_the_same_grid():
    model = _model()
    captured = []

    class Spy(LIVEditorAttnProcessor):
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
            captured.append((rotary_emb, self.layout))
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)

    model.blocks[0].attn1.set_processor(Spy("isa", model.isa_config, model.attention_timer))
    x, t, text, ctx = _inputs(frames=3, height=6, width=10)
    model(x, t, text, ctx)
    (cos, sin), layout = captured[0]
    n = layout.num_source
    assert layout.grid == (3, 3, 5) and cos.shape[1] == 2 * n
    torch.testing.assert_close(cos[:, n:], cos[:, :n], rtol=0, atol=0)
    torch.testing.assert_close(sin[:, n:], sin[:, :n], rtol=0, atol=0)
    # The source alone gets Wan's own 3D RoPE, and positions are distinct.
    wan_cos, wan_sin = model.rope(x)
    torch.testing.assert_close(cos[:, :n], wan_cos)
    assert not torch.allclose(cos[:, 0], cos[:, 1])

    # Behaviour: a context token at grid position p gets the same rotation as a source token at p.
    from liveditor.models.attention_processor import apply_rotary_embedding

    vec = torch.randn(1, 1, 2, cos.shape[-1]).expand(1, 2 * n, 2, -1)
    rotated = apply_rotary_embedding(vec, cos, sin)
    p = torch.randint(0, n, (5,))
    torch.testing.assert_close(rotated[:, n + p], rotated[:, p])


@torch.no_grad()
def test_attention_mode_and_isa_config_survive_save_and_load(tmp_path):
    model = _model()
    config = ISAConfig(block_size=16, select_ratio=0.5, full_ratio=0.75, exact_ratio=0.25, token_order="tile", tile=(1, 2, 2))
    model.set_attention_mode("isa", config)
    model.save_pretrained(tmp_path / "m")
    loaded = LIVEditorTransformer3DModel.from_pretrained(tmp_path / "m").eval()
    assert loaded.attention_mode == "isa" and loaded.isa_config == config
    x, t, text, ctx = _inputs(frames=2, height=4, width=8)
    torch.testing.assert_close(loaded(x, t, text, ctx).sample, model(x, t, text, ctx).sample)
    model.set_attention_mode("dense")
    model.save_pretrained(tmp_path / "d")
    assert LIVEditorTransformer3DModel.from_pretrained(tmp_path / "d").attention_mode == "dense"


def test_attention_timer_counts_every_layer():
    model = _model()
    model.attention_timer.enabled = True
    with torch.no_grad():
        model(*_inputs())
    assert model.attention_timer.calls == model.config.num_layers
    assert model.attention_timer.seconds > 0
    model.attention_timer.reset()
    assert model.attention_timer.calls == 0


def test_gradients_flow_with_gradient_checkpointing():
    model = _model().train()
    model.enable_gradient_checkpointing()
    x, t, text, ctx = _inputs()
    model(x, t, text, ctx).sample.square().mean().backward()
    assert model.context_embedding.weight.grad is not None
    assert model.blocks[0].attn1.coarse_gate.weight.grad.abs().sum() > 0


def test_bad_inputs_raise_clear_errors():
    model = _model()
    x, t, text, ctx = _inputs()
    with pytest.raises(ValueError, match="context_latents"):
        model(x, t, text, ctx[:, :, :2])
    with pytest.raises(ValueError, match="patch size"):
        model(x[..., :7], t, text, ctx[..., :7])
    with pytest.raises(ValueError, match="attention mode"):
        model.set_attention_mode("sparse")
    with pytest.raises(ValueError, match="unknown attention_kwargs"):
        model(x, t, text, ctx, attention_kwargs={"scale": 2.0})
    with pytest.raises(ValueError, match="preset"):
        LIVEditorTransformer3DModel.from_preset("liveditor-7b")
    with pytest.raises(ValueError, match="attention must be"):
        LIVEditorTransformer3DModel.from_preset("liveditor-tiny", attention="flash")


def test_14b_preset_has_the_wan22_high_noise_expert_shape():
    with torch.device("meta"):
        model = LIVEditorTransformer3DModel.from_preset("liveditor-14b")
    cfg = model.config
    assert (cfg.num_attention_heads * cfg.attention_head_dim, cfg.num_layers, cfg.ffn_dim) == (5120, 40, 13824)
    n_params = sum(p.numel() for p in model.parameters())
    assert 14.0e9 < n_params < 14.5e9
    assert isinstance(model.blocks[39].attn1.processor, LIVEditorAttnProcessor)
    assert model.blocks[0].attn1.coarse_gate.weight.shape == (1, 5120)
