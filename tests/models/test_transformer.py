import math

import pytest
import torch

from liveditor.isa import ISAConfig
from liveditor.isa import ISAInfo, dense_attention
from liveditor.models import AttentionEvent, LIVEditorAttnProcessor, LIVEditorTransformer3DModel

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
def test_dense_mode_keeps_the_gated_coarse_residual():
    """Dense mode is the trained function without sparsity: exact attention plus the gated residual,
    so it equals ISA with every ratio at 1 when the gate is open, and differs from bare attention."""
    model = _model()
    for block in model.blocks:
        torch.nn.init.normal_(block.attn1.coarse_gate.weight, std=2.0)  # a clearly open gate
    x, t, text, ctx = _inputs()
    model.set_attention_mode("isa", ALL_ONES)
    isa = model(x, t, text, ctx).sample
    dense = model(x, t, text, ctx, attention_kwargs={"mode": "dense"}).sample
    torch.testing.assert_close(dense, isa, atol=2e-5, rtol=1e-5)
    assert model.attention_mode == "isa"  # a per-call override does not stick

    events = []
    model(x, t, text, ctx, attention_kwargs={"mode": "dense", "callback": events.append})
    event = events[0]
    bare = dense_attention(event.query, event.key, event.value)
    closed = _model()
    closed.load_state_dict(model.state_dict())
    for block in closed.blocks:
        torch.nn.init.zeros_(block.attn1.coarse_gate.weight)
    closed_events = []
    closed(x, t, text, ctx, attention_kwargs={"mode": "dense", "callback": closed_events.append})
    assert (closed(x, t, text, ctx, attention_kwargs={"mode": "dense"}).sample - dense).abs().max() > 1e-4
    torch.testing.assert_close(closed_events[0].query, event.query)
    assert bare.shape == event.query.shape


@torch.no_grad()
def test_attention_callback_sees_every_layer_and_the_isa_decisions():
    model = _model()
    x, t, text, ctx = _inputs(frames=4, height=8, width=16)
    config = ISAConfig(block_size=8, select_ratio=0.25, full_ratio=0.5, exact_ratio=0.25)
    events: list[AttentionEvent] = []
    model(x, t, text, ctx, attention_kwargs={"isa_config": config, "callback": events.append})
    assert [e.layer for e in events] == list(range(model.config.num_layers))
    n = 4 * 4 * 8
    for event in events:
        assert isinstance(event.info, ISAInfo) and event.mode == "isa"
        assert event.num_source == n and event.grid == (4, 4, 8)
        assert event.query.shape == (1, model.config.num_attention_heads, 2 * n, model.config.attention_head_dim)
        assert event.info.selected_context_blocks.shape[-1] == 4  # ceil(0.25 * 16 context blocks)
        assert 0 < event.info.flop_fraction < 1
    events.clear()
    model(x, t, text, ctx, attention_kwargs={"mode": "dense", "callback": events.append})
    assert len(events) == model.config.num_layers and all(e.info is None for e in events)


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
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None,
                     call=None, layer=-1):
            captured.append((rotary_emb, call))
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb, call, layer)

    model.blocks[0].attn1.set_processor(Spy())
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

    g = torch.Generator().manual_seed(5)
    vec = torch.randn(1, 1, 2, cos.shape[-1], generator=g).expand(1, 2 * n, 2, -1)
    rotated, = apply_rotary_embedding(cos, sin, vec)
    p = torch.randint(0, n, (5,), generator=g)
    torch.testing.assert_close(rotated[:, n + p], rotated[:, p])


def test_rope_rotates_each_channel_pair_by_its_angle():
    """Channel pairs (2i, 2i+1) of every head turn by the angle of Wan's table at that token: the
    product of the pair as a complex number with exp(i theta), in fp32, rounded to the input dtype."""
    from liveditor.models.attention_processor import apply_rotary_embedding

    model = _model()
    x, _, _, _ = _inputs(frames=3, height=6, width=10)
    cos, sin = model.rope(x)  # [1, N, 1, D], each angle repeated over its pair
    g = torch.Generator().manual_seed(11)
    tokens = torch.randn(2, cos.shape[1], 3, cos.shape[-1], generator=g).to(torch.bfloat16)
    rotated, = apply_rotary_embedding(cos, sin, tokens)
    turn = torch.complex(cos[..., 0::2], sin[..., 0::2])
    expected = torch.view_as_real(torch.view_as_complex(tokens.float().unflatten(-1, (-1, 2))) * turn).flatten(-2)
    assert rotated.dtype == torch.bfloat16
    torch.testing.assert_close(rotated, expected.to(torch.bfloat16), rtol=0, atol=0)


@torch.no_grad()
@pytest.mark.parametrize("fused", [False, True], ids=["separate", "fused-projections"])
def test_cross_attention_processor_computes_wans_function(fused):
    """Every block's text cross-attention runs LIVEditorCrossAttnProcessor, which computes what
    diffusers' WanAttnProcessor computes (on a CPU through the same SDPA call: bitwise), with separate
    or fused k/v projections."""
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    from liveditor.models.attention_processor import LIVEditorCrossAttnProcessor

    model = _model()
    attn = model.blocks[0].attn2
    assert all(isinstance(block.attn2.processor, LIVEditorCrossAttnProcessor) for block in model.blocks)
    if fused:
        attn.fuse_projections()
        assert attn.fused_projections
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(2, 37, attn.inner_dim, generator=g)
    text = torch.randn(2, 9, attn.inner_dim, generator=g)
    ours = attn(hidden, text)
    attn.set_processor(WanAttnProcessor())
    torch.testing.assert_close(ours, attn(hidden, text), rtol=0, atol=0)


@torch.no_grad()
def test_absolute_position_embedding_starts_as_a_no_op_on_trained_weights():
    plain = _model()
    placed = _model(absolute_position_embedding=True)
    missing, unexpected = placed.load_state_dict(plain.state_dict(), strict=False)
    assert missing == ["position_embedding.weight"] and unexpected == []
    x, t, text, ctx = _inputs(frames=3, height=4, width=8)
    torch.testing.assert_close(placed(x, t, text, ctx).sample, plain(x, t, text, ctx).sample, rtol=0, atol=0)


def test_absolute_position_embedding_gives_each_grid_position_its_own_vector_in_source_and_context():
    model = _model(absolute_position_embedding=True)
    torch.nn.init.normal_(model.position_embedding.weight, generator=torch.Generator().manual_seed(3))
    captured = []
    model.blocks[0].register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    x, t, text, ctx = _inputs(frames=3, height=6, width=10)
    with torch.no_grad():
        model(x, t, text, ctx)
        weight = model.position_embedding.weight.clone()
        model.position_embedding.weight.zero_()
        model(x, t, text, ctx)
        model.position_embedding.weight.copy_(weight)
    added = captured[0] - captured[1]  # (tokens + position) - tokens: fp32 rounding of the tokens only
    n = 3 * 3 * 5
    torch.testing.assert_close(added[:, n:], added[:, :n])  # the context restarts on the same grid
    assert torch.cdist(added[0, :n], added[0, :n]).add(torch.eye(n)).min() > 1e-2  # 45 distinct positions
    # Trainable: the loss reaches the projection.
    model.position_embedding.weight.requires_grad_(True)
    model(x, t, text, ctx).sample.square().mean().backward()
    assert model.position_embedding.weight.grad.abs().sum() > 0


def test_absolute_position_features_follow_their_definition():
    # The bundled model's weights depend on these exact features.
    from liveditor.models.transformer_liveditor import POSITION_FREQUENCIES, grid_position_features

    grid = (3, 2, 5)
    features = grid_position_features(grid, torch.device("cpu"))
    assert features.shape == (30, 27)
    token = 1 * 10 + 1 * 5 + 3  # frame 1, row 1, column 3 in raster order
    expected = []
    for index, n in zip((1, 1, 3), grid):
        centre = (index + 0.5) / n * 2 - 1
        expected += [centre] + [math.sin(centre * k * math.pi / 2) for k in POSITION_FREQUENCIES]
        expected += [math.cos(centre * k * math.pi / 2) for k in POSITION_FREQUENCIES]
    torch.testing.assert_close(features[token], torch.tensor(expected, dtype=torch.float32))


def test_absolute_position_features_first_built_under_inference_mode_still_train():
    # The features are built once per grid and shared; an edit under inference mode must not leave
    # an inference tensor behind that a later training step cannot save for backward.
    model = _model(absolute_position_embedding=True)
    x, t, text, ctx = _inputs(frames=2, height=6, width=6)  # a grid no other test uses
    with torch.inference_mode():
        model(x, t, text, ctx)
    model(x, t, text, ctx).sample.square().mean().backward()
    assert model.position_embedding.weight.grad is not None


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


def _gradients(model, calls) -> dict[str, torch.Tensor]:
    """Gradients of the sum of several forwards' losses, taken with one backward."""
    model.zero_grad()
    loss = sum(model(*inputs, attention_kwargs=kwargs).sample.square().mean() for inputs, kwargs in calls)
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("seed", [0, 1])
def test_gradient_checkpointing_recomputes_each_forward_with_its_own_layout(seed):
    """Two forwards of the same token count on different grids in tile order, one of them in dense
    mode for that call only, then one backward: checkpointed gradients equal plain ones."""
    tile = ISAConfig(block_size=8, select_ratio=0.5, full_ratio=0.5, exact_ratio=0.5, token_order="tile", tile=(1, 2, 2))
    model = _model(seed).train()
    model.set_attention_mode("isa", tile)
    calls = [
        (_inputs(seed=seed + 10, frames=2, height=8, width=12), None),  # grid (2, 4, 6)
        (_inputs(seed=seed + 20, frames=3, height=8, width=8), None),  # grid (3, 4, 4): same 48 tokens
        (_inputs(seed=seed + 30, frames=2, height=4, width=8), {"mode": "dense"}),  # other token count
    ]
    plain = _gradients(model, calls)
    model.enable_gradient_checkpointing()
    checkpointed = _gradients(model, calls)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7, msg=f"seed {seed}: {name}")


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
    # ISA as the release runs it: top-k sharpness and block counts rounded down.
    assert (model.isa_config.sharpness, model.isa_config.count_rounding) == ("topk", "floor")
    cfg = model.config
    assert (cfg.num_attention_heads * cfg.attention_head_dim, cfg.num_layers, cfg.ffn_dim) == (5120, 40, 13824)
    n_params = sum(p.numel() for p in model.parameters())
    assert 14.0e9 < n_params < 14.5e9
    assert isinstance(model.blocks[39].attn1.processor, LIVEditorAttnProcessor)
    assert model.blocks[0].attn1.coarse_gate.weight.shape == (1, 5120)
