"""The PyTorch ISA path against dense attention and an independent loop implementation.

Every random input is drawn from a generator seeded by the test's `seed` parameter (in the test id).
"""

import math

import pytest
import torch
import torch.nn.functional as F

from liveditor.isa import ISAConfig, coarse_residual, dense_attention, isa_attention
from liveditor.isa import reference
from liveditor.isa.config import block_counts
from liveditor.isa.layout import (
    block_layout,
    block_means,
    expand_blocks,
    sequence_tile_permutation,
    tile_permutation,
    token_blocks,
)


def qkv(B, H, N, D, dtype=torch.float32, *, seed: int):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, N, D, generator=g, dtype=torch.float32).to(dtype) for _ in range(3)]


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ---------------------------------------------------------------- degenerate configs equal dense


DEGENERATE = pytest.mark.parametrize(
    "config",
    [ISAConfig(block_size=32, select_ratio=1, full_ratio=1), ISAConfig(block_size=32, select_ratio=1, exact_ratio=1)],
    ids=["all-exact-queries", "all-exact-keys"],
)


@pytest.mark.parametrize("seed", [0])
@pytest.mark.parametrize("N,L_src", [(256, 128), (300, 170), (200, 37), (130, 130)])
@DEGENERATE
def test_degenerate_configs_equal_dense(N, L_src, config, seed):
    q, k, v = qkv(2, 3, N, 64, torch.float64, seed=seed)
    out = isa_attention(q, k, v, L_src, config)
    torch.testing.assert_close(out, dense_attention(q, k, v), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("seed", [0, 1])
def test_blockwise_constant_keys_values_make_taylor_exact(seed):
    """With K, V constant inside each block the 0th-order term is the exact block contribution."""
    B, H, D, L_src, L_ctx, b = 2, 2, 32, 150, 110, 32
    N = L_src + L_ctx
    layout = block_layout(L_src, L_ctx, b, "cpu")
    g = generator(seed)
    k_blocks, v_blocks = torch.randn(2, B, H, layout.num_blocks, D, dtype=torch.float64, generator=g)
    token_block = token_blocks(L_src, L_ctx, b, "cpu")
    k = k_blocks[:, :, token_block]
    v = v_blocks[:, :, token_block]
    q = torch.randn(B, H, N, D, dtype=torch.float64, generator=g)
    config = ISAConfig(block_size=b, select_ratio=1.0)  # pruning is not part of the identity
    out, info = isa_attention(q, k, v, L_src, config, return_info=True)
    assert (~info.exact_query_blocks).any(), "some query blocks must take the Taylor path"
    torch.testing.assert_close(out, dense_attention(q, k, v), rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------- pruning


@pytest.mark.parametrize("seed", [0])
def test_unselected_context_values_do_not_reach_output(seed):
    B, H, D, L_src, L_ctx, b = 1, 3, 64, 256, 512, 32
    q, k, v = qkv(B, H, L_src + L_ctx, D, seed=seed)
    g = generator(seed + 1000)
    config = ISAConfig(block_size=b)
    out, info = isa_attention(q, k, v, L_src, config, return_info=True)
    n_ctx = info.num_context_blocks
    for h in range(H):
        selected = set(info.selected_context_blocks[0, h].tolist())
        dropped = next(j for j in range(n_ctx) if j not in selected)
        kept = next(iter(selected))
        v_dropped = v.clone()
        v_dropped[0, h, L_src + dropped * b: L_src + (dropped + 1) * b] = torch.randn(b, D, generator=g) * 10
        assert torch.equal(isa_attention(q, k, v_dropped, L_src, config), out)
        v_kept = v.clone()
        v_kept[0, h, L_src + kept * b: L_src + (kept + 1) * b] = torch.randn(b, D, generator=g) * 10
        assert not torch.equal(isa_attention(q, k, v_kept, L_src, config)[0, h], out[0, h])


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("k", [1, 6, 8, 9, 20])
def test_top_indices_are_the_largest_entries_largest_first(k, seed):
    """The exact-key choice: the same positions, in the same order, as torch.topk on rows without
    ties, both below ARGMAX_TOP_LIMIT (repeated argmax) and above it; shape [B, H, rows, k]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 17, 96, generator=g)
    chosen = reference.top_indices(x, k)
    assert chosen.shape == (2, 3, 17, k) and chosen.dtype == torch.long
    assert torch.equal(chosen, x.topk(k, dim=-1).indices)


def test_top_indices_break_ties_toward_the_first_position():
    x = torch.tensor([[0.5, 2.0, 1.0, 2.0, 1.0, -3.0]])
    assert reference.top_indices(x, 4).tolist() == [[1, 3, 2, 4]]


def test_selection_size_and_ratio_counts():
    counts = block_counts(32640, 32640, ISAConfig())
    assert counts.num_source_blocks == counts.num_context_blocks == 510
    assert counts.num_selected == math.ceil(0.125 * 510)
    assert counts.num_full == 510
    assert counts.num_exact == int(0.0625 * (510 + 64))
    tiny = block_counts(10, 5, ISAConfig(block_size=64))
    assert (tiny.num_selected, tiny.num_full, tiny.num_exact, tiny.topk_sharpness) == (1, 1, 1, 1)
    floor = block_counts(10, 5, ISAConfig(block_size=64, count_rounding="floor"))
    assert (floor.num_selected, floor.num_full, floor.num_exact, floor.topk_sharpness) == (1, 1, 1, 1)


# The release's example (reference section 3): 544x960, 81 input frames -> (81 - 1) // 4 + 1 = 21 latent
# frames of (544/16) x (960/16) = 34 x 60 = 2,040 tokens: 42,840 tokens per segment, 64-token blocks.
RELEASE_SEGMENT = 21 * (544 // 16) * (960 // 16)
RELEASE = ISAConfig(sharpness="topk", count_rounding="floor")


def test_floor_rounding_reproduces_the_release_counts_on_its_blocks():
    """The release blocks [source | context] jointly: ceil(85,680 / 64) = 1,339 blocks, the first
    42,840 // 64 = 669 all source, 670 holding context. On those block numbers the floor rule gives
    every count the reference quotes: 83 context blocks, 669 exact query blocks, 47 exact key blocks."""
    assert RELEASE_SEGMENT == 42840
    joint_blocks = -(-2 * RELEASE_SEGMENT // 64)
    n_src = RELEASE_SEGMENT // 64
    assert (joint_blocks, n_src) == (1339, 669)
    counts = block_counts(n_src * 64, (joint_blocks - n_src) * 64, RELEASE)
    assert counts.num_selected == 83 == int(0.125 * 670)
    assert counts.num_full == 669 == int(0.5 * 1339)
    assert counts.num_exact == 47 == int(0.0625 * 752)
    assert counts.topk_sharpness == 41 == max(1, int(669 * 0.0625))


def test_floor_rounding_on_our_blocking_of_the_release_example():
    """We pad source and context to whole blocks apart: 670 + 670 blocks. Same selected, exact-key and
    top-k counts as the release; 670 of 1,340 exact query blocks where the release has 669 of 1,339."""
    counts = block_counts(RELEASE_SEGMENT, RELEASE_SEGMENT, RELEASE)
    assert (counts.num_source_blocks, counts.num_context_blocks) == (670, 670)
    assert counts.num_selected == 83
    assert counts.num_full == 670
    assert counts.num_exact == 47 == int(0.0625 * (670 + 83))
    assert counts.topk_sharpness == 41 == int(0.0625 * 670)
    # Today's default rounding keeps more: ceil(0.125 * 670) = 84 context blocks.
    assert block_counts(RELEASE_SEGMENT, RELEASE_SEGMENT, ISAConfig()).num_selected == 84


def test_whole_blocks_give_the_release_counts_exactly():
    """61 input frames = 16 latent frames = 32,640 tokens = 510 whole blocks per segment: joint and
    separate blocking coincide, so every floor count is the release's."""
    counts = block_counts(32640, 32640, RELEASE)
    assert (counts.num_source_blocks, counts.num_context_blocks) == (510, 510)
    assert (counts.num_selected, counts.num_full) == (int(0.125 * 510), int(0.5 * 1020)) == (63, 510)
    assert (counts.num_exact, counts.topk_sharpness) == (int(0.0625 * 573), int(0.0625 * 510)) == (35, 31)


@pytest.mark.parametrize("seed", [0])
def test_count_rounding_reaches_the_decisions(seed):
    """4 + 9 blocks: at select_ratio 0.125 of 9 context blocks ceil keeps 2, floor 1; at full_ratio 0.5
    of 13 blocks ceil routes 7 to exact attention, floor 6."""
    q, k, v = qkv(1, 2, 4 * 16 + 9 * 16 - 3, 16, seed=seed)  # 4 source blocks, 9 context (last partial)
    for rounding, n_sel, n_full in (("ceil", 2, 7), ("floor", 1, 6)):
        config = ISAConfig(block_size=16, count_rounding=rounding)
        _, info = isa_attention(q, k, v, 64, config, return_info=True)
        assert info.selected_context_blocks.shape[-1] == n_sel, rounding
        assert (info.exact_query_blocks.sum(-1) == n_full).all(), rounding


@pytest.mark.parametrize("seed", [0, 1])
@DEGENERATE
def test_fp16_large_logits_stay_finite(config, seed):
    """|q.k| beyond fp16's range with a small scale: scaled logits of order 10. SDPA stays finite and
    so must ISA, with an fp16 error at most twice SDPA's (both against fp32 attention on the same values)."""
    g = generator(seed)
    B, H, N, D, L_src = 1, 2, 160, 64, 96
    q, k = (80 * torch.randn(B, H, N, D, generator=g) for _ in range(2))
    v = torch.randn(B, H, N, D, generator=g)
    scale = 1e-4
    q16, k16, v16 = (x.half() for x in (q, k, v))
    assert (q16.float() @ k16.float().transpose(-1, -2)).abs().max() > torch.finfo(torch.float16).max
    reference_fp32 = F.scaled_dot_product_attention(q16.float(), k16.float(), v16.float(), scale=scale)
    sdpa16 = F.scaled_dot_product_attention(q16, k16, v16, scale=scale)
    out = isa_attention(q16, k16, v16, L_src, config, scale=scale, backend="torch")
    assert torch.isfinite(sdpa16).all()
    assert torch.isfinite(out).all(), f"seed {seed}: non-finite ISA output"
    isa_err, sdpa_err = rel_err(out, reference_fp32), rel_err(sdpa16, reference_fp32)
    assert isa_err <= 2 * sdpa_err, f"seed {seed}: ISA fp16 error {isa_err:.3g}, SDPA fp16 {sdpa_err:.3g}"


# ---------------------------------------------------------------- independent loop implementation


def loop_isa(q, k, v, L_src, config, gate=None):
    """Token-by-token ISA written from the spec with Python loops, for one small case."""
    B, H, N, D = q.shape
    b = config.block_size
    scale = 1.0 / math.sqrt(D)
    blocks = [list(range(s, min(s + b, L_src))) for s in range(0, L_src, b)]
    blocks += [list(range(s, min(s + b, N))) for s in range(L_src, N, b)]
    n_src = -(-L_src // b)
    n_ctx = len(blocks) - n_src
    nb = len(blocks)
    out = torch.zeros_like(q)
    for bi in range(B):
        for h in range(H):
            Q, K, V = q[bi, h], k[bi, h], v[bi, h]
            Qc = torch.stack([Q[ix].mean(0) for ix in blocks])
            Kc = torch.stack([K[ix].mean(0) for ix in blocks])
            Vc = torch.stack([V[ix].mean(0) for ix in blocks])
            S = Qc @ Kc.T * scale
            P = torch.softmax(S, -1)
            kept = list(range(n_src))
            if n_ctx:
                score = P[:n_src, n_src:].sum(0)
                n_sel = max(1, math.ceil(config.select_ratio * n_ctx - 1e-6))
                kept += sorted((n_src + j for j in score.argsort(descending=True)[:n_sel].tolist()))
            if config.sharpness == "energy":
                sharp = (P[:, :n_src] ** 2).sum(-1)
            else:
                kk = max(1, math.floor(config.exact_ratio * n_src + 1e-6))
                sharp = P[:, :n_src].sort(-1, descending=True).values[:, :kk].sum(-1)
            n_full = max(1, math.ceil(config.full_ratio * nb - 1e-6))
            exact_rows = set(sharp.argsort(descending=True)[:n_full].tolist())
            n_exact = max(1, math.floor(config.exact_ratio * len(kept) + 1e-6))
            for i, ix in enumerate(blocks):
                if i in exact_rows:
                    exact_blocks, pooled_blocks = kept, []
                else:
                    order = sorted(kept, key=lambda j: -S[i, j].item())
                    exact_blocks, pooled_blocks = order[:n_exact], order[n_exact:]
                keys = [K[t] for j in exact_blocks for t in blocks[j]] + [Kc[j] for j in pooled_blocks]
                vals = [V[t] for j in exact_blocks for t in blocks[j]] + [Vc[j] for j in pooled_blocks]
                bias = [0.0] * sum(len(blocks[j]) for j in exact_blocks) + [math.log(len(blocks[j])) for j in pooled_blocks]
                keys, vals, bias = torch.stack(keys), torch.stack(vals), torch.tensor(bias, dtype=q.dtype)
                for t in ix:
                    w = torch.softmax(keys @ Q[t] * scale + bias, 0)
                    out[bi, h, t] = w @ vals
                    if gate is not None:
                        out[bi, h, t] += gate[bi, t] * (P[i] @ Vc)
    return out


@pytest.mark.parametrize("seed", [0])
@pytest.mark.parametrize("sharpness", ["energy", "topk"])
@pytest.mark.parametrize("L_src,L_ctx", [(45, 61), (64, 0), (70, 20), (64, 40)])  # (64, 40): whole blocks, no masks
def test_matches_independent_loop_implementation(sharpness, L_src, L_ctx, seed):
    config = ISAConfig(block_size=8, select_ratio=0.4, full_ratio=0.4, exact_ratio=0.25, sharpness=sharpness)
    q, k, v = qkv(2, 2, L_src + L_ctx, 16, torch.float64, seed=seed)
    gate = torch.rand(2, L_src + L_ctx, dtype=torch.float64, generator=generator(seed + 1000)) - 0.5
    torch.testing.assert_close(isa_attention(q, k, v, L_src, config), loop_isa(q, k, v, L_src, config))
    torch.testing.assert_close(
        isa_attention(q, k, v, L_src, config, gate=gate[..., None]), loop_isa(q, k, v, L_src, config, gate)
    )


# ---------------------------------------------------------------- edge cases


@pytest.mark.parametrize("seed", [0])
def test_chunked_processing_matches_single_chunk(monkeypatch, seed):
    q, k, v = qkv(1, 2, 700, 32, seed=seed)
    config = ISAConfig(block_size=32, select_ratio=0.3)
    whole = isa_attention(q, k, v, 333, config)
    monkeypatch.setattr(reference, "_CHUNK_ELEMENTS", 1)  # one query block per chunk
    assert torch.equal(isa_attention(q, k, v, 333, config), whole)


@pytest.mark.parametrize("seed", [0])
def test_batch_entries_are_independent(seed):
    q, k, v = qkv(3, 2, 300, 64, seed=seed)
    gate = torch.rand(3, 300, generator=generator(seed + 1000))
    batched = isa_attention(q, k, v, 200, gate=gate)
    for i in range(3):
        single = isa_attention(q[i:i + 1], k[i:i + 1], v[i:i + 1], 200, gate=gate[i:i + 1])
        torch.testing.assert_close(batched[i:i + 1], single, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed", [0])
@pytest.mark.parametrize("D", [64, 128, 256, 40])
def test_head_dims(D, seed):
    q, k, v = qkv(1, 2, 200, D, seed=seed)
    out = isa_attention(q, k, v, 100)
    assert out.shape == q.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_close_to_fp32(dtype, seed):
    q, k, v = (x.to(dtype) for x in qkv(2, 2, 384, 64, seed=seed))
    # The reference sees the same rounded inputs: rounding q/k/v to 16 bits moves the pooled means
    # enough to flip a routing decision now and then, which is not what this test measures.
    ref, ref_info = isa_attention(q.double(), k.double(), v.double(), 192, return_info=True)
    out, info = isa_attention(q, k, v, 192, return_info=True)
    assert out.dtype == dtype
    assert torch.equal(info.exact_query_blocks, ref_info.exact_query_blocks), f"seed {seed}"
    assert torch.equal(info.selected_context_blocks, ref_info.selected_context_blocks), f"seed {seed}"
    # Same decisions (pooling and routing in fp32), so the error is attention rounding only: within
    # twice the error of SDPA at the same precision (FlashAttention's rule; measured about 1.2x).
    sdpa_err = rel_err(dense_attention(q, k, v), dense_attention(q.double(), k.double(), v.double()))
    assert rel_err(out, ref) <= 2 * sdpa_err, f"seed {seed}"


@pytest.mark.parametrize("seed", [0])
def test_no_context_is_sparse_self_attention(seed):
    q, k, v = qkv(1, 2, 200, 32, torch.float64, seed=seed)
    out, info = isa_attention(q, k, v, 200, ISAConfig(block_size=32), return_info=True)
    assert info.num_context_blocks == 0 and info.selected_context_blocks.shape[-1] == 0
    full = isa_attention(q, k, v, 200, ISAConfig(block_size=32, full_ratio=1.0))
    torch.testing.assert_close(full, dense_attention(q, k, v))


@pytest.mark.parametrize("seed", [0])
def test_fewer_blocks_than_ratios_imply(seed):
    q, k, v = qkv(1, 1, 20, 16, seed=seed)
    out, info = isa_attention(q, k, v, 12, ISAConfig(block_size=64), return_info=True)
    assert info.selected_context_blocks.shape[-1] == 1
    assert info.exact_query_blocks.sum() == 1
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("seed", [0])
def test_flop_fraction_at_defaults(seed):
    """L_src = L_ctx = 64 blocks: exact group 0.5 N x 72 blocks, Taylor 4 exact blocks + 68 means."""
    q, k, v = qkv(1, 1, 2 * 64 * 64, 64, seed=seed)
    _, info = isa_attention(q, k, v, 64 * 64, return_info=True)
    N, b = 8192, 64
    expected = 0.5 * (72 * b) / N + 0.5 * (4 * b + 68) / N + (128 * 128) / (2 * N * N)
    assert info.flop_fraction == pytest.approx(expected, rel=1e-6)
    assert 0.25 < info.flop_fraction < 0.35  # the spec's "about 30% of dense"


@pytest.mark.parametrize("seed", [0, 1])
def test_gate_adds_coarse_output(seed):
    q, k, v = qkv(1, 2, 96, 16, torch.float64, seed=seed)
    gate = torch.rand(1, 96, dtype=torch.float64, generator=generator(seed + 1000))
    config = ISAConfig(block_size=16, select_ratio=1, full_ratio=1)
    out = isa_attention(q, k, v, 48, config, gate=gate)
    qc, kc, vc = (x.reshape(1, 2, 6, 16, 16).mean(3) for x in (q, k, v))
    coarse = torch.softmax(qc @ kc.transpose(-1, -2) / 4.0, -1) @ vc
    expected = dense_attention(q, k, v) + gate[:, None, :, None] * coarse[:, :, token_blocks(48, 48, 16, "cpu")]
    torch.testing.assert_close(out, expected)


# ---------------------------------------------------------------- token order


def test_tile_permutation_makes_tiles_contiguous():
    f, h, w, tile = 4, 6, 10, (2, 3, 5)
    perm = tile_permutation(f, h, w, tile)
    assert torch.equal(perm.sort().values, torch.arange(f * h * w))
    coords = torch.stack(torch.meshgrid(torch.arange(f), torch.arange(h), torch.arange(w), indexing="ij"), -1)
    tiled = coords.reshape(-1, 3)[perm].reshape(-1, 30, 3)  # 30 tokens per tile
    for t in tiled:
        span = t.max(0).values - t.min(0).values + 1
        assert span.tolist() == [2, 3, 5]


@pytest.mark.parametrize("seed", [0])
def test_tile_order_is_exact_when_nothing_is_sparse_and_output_is_in_raster_order(seed):
    grid = (4, 6, 8)
    L = 4 * 6 * 8
    q, k, v = qkv(1, 2, 2 * L, 32, torch.float64, seed=seed)
    config = ISAConfig(block_size=16, select_ratio=1, full_ratio=1, token_order="tile", tile=(2, 2, 4))
    torch.testing.assert_close(isa_attention(q, k, v, L, config, grid=grid), dense_attention(q, k, v))
    # Sparse tile order equals raster-order ISA on explicitly permuted inputs, permuted back.
    sparse = ISAConfig(block_size=16, token_order="tile", tile=(2, 2, 4))
    perm = sequence_tile_permutation(L, L, grid, sparse.tile)
    raster = isa_attention(q[:, :, perm], k[:, :, perm], v[:, :, perm], L, ISAConfig(block_size=16))
    torch.testing.assert_close(isa_attention(q, k, v, L, sparse, grid=grid)[:, :, perm], raster)


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize("seed", [0])
def test_gradcheck_float64(seed):
    """Both groups, pruning, partial blocks and the gate; fast mode checks J u against random u."""
    q, k, v = (t.requires_grad_() for t in qkv(1, 2, 40, 8, torch.float64, seed=seed))
    gate = (torch.rand(1, 40, dtype=torch.float64, generator=generator(seed + 1000)) - 0.5).requires_grad_()
    config = ISAConfig(block_size=8, select_ratio=0.5, full_ratio=0.5, exact_ratio=0.25)
    assert torch.autograd.gradcheck(lambda *t: isa_attention(*t[:3], 24, config, gate=t[3]), (q, k, v, gate),
                                    fast_mode=True)


@pytest.mark.parametrize("seed", [0])
def test_gradients_flow_through_chunked_checkpointed_path(monkeypatch, seed):
    monkeypatch.setattr(reference, "_CHUNK_ELEMENTS", 1)
    q, k, v = (t.requires_grad_() for t in qkv(1, 2, 130, 16, seed=seed))
    isa_attention(q, k, v, 70, ISAConfig(block_size=16)).square().sum().backward()
    grads_chunked = [t.grad.clone() for t in (q, k, v)]
    monkeypatch.setattr(reference, "_CHUNK_ELEMENTS", 1 << 30)
    for t in (q, k, v):
        t.grad = None
    isa_attention(q, k, v, 70, ISAConfig(block_size=16)).square().sum().backward()
    for a, b in zip(grads_chunked, (q.grad, k.grad, v.grad)):
        assert b.abs().sum() > 0
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("blocking", ["separate", "joint"])
def test_training_under_autocast_routes_as_inference_does(blocking, seed):
    # Training runs under bf16 autocast, inference does not: the operator must compute in its own
    # precision either way, not let autocast round its coarse map and logits to bf16.
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 8, 512, 64, generator=g).to(torch.bfloat16) for _ in range(3))
    gate = torch.rand(2, 512, generator=g).to(torch.bfloat16)
    config = ISAConfig(block_size=16, select_ratio=0.5, full_ratio=0.4, exact_ratio=0.0625, blocking=blocking)
    out, info = isa_attention(q, k, v, 256, config, gate=gate, return_info=True)
    residual = coarse_residual(q, k, v, 256, gate, config)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast_out, autocast_info = isa_attention(q, k, v, 256, config, gate=gate, return_info=True)
        autocast_residual = coarse_residual(q, k, v, 256, gate, config)
    assert torch.equal(autocast_info.exact_query_blocks, info.exact_query_blocks)
    assert torch.equal(autocast_info.selected_context_blocks, info.selected_context_blocks)
    assert torch.equal(autocast_out, out)
    assert torch.equal(autocast_residual, residual)


@pytest.mark.parametrize("seed", [0])
@pytest.mark.parametrize("L_src,L_ctx,b", [(77, 50, 16), (64, 32, 16), (40, 0, 16), (5, 3, 8)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_block_means_and_expand_blocks_follow_the_block_layout(L_src, L_ctx, b, dtype, seed):
    """block_means is the mean of each block's real tokens (partial last blocks of either segment,
    no context, a segment shorter than a block) on the model's transposed [B, N, H, D] memory, in the
    decision dtype; expand_blocks gives every token its block's row; gradients of both match the
    formulation through the block layout's slots (a gather and a mask)."""
    B, H, D = 2, 3, 8
    N = L_src + L_ctx
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, H, D, generator=g).to(dtype).transpose(1, 2).requires_grad_()
    layout = block_layout(L_src, L_ctx, b, "cpu")
    means = block_means(x, L_src, b)
    slots = x[:, :, layout.token_index].to(means.dtype) * layout.slot_valid[:, :, None]  # [B, H, nb, b, D]
    expected = slots.sum(3) / layout.block_length[:, None]
    assert means.dtype == torch.promote_types(dtype, torch.float32) and means.shape == expected.shape
    torch.testing.assert_close(means, expected, rtol=1e-6, atol=1e-6)
    weights = torch.randn(means.shape, generator=g, dtype=means.dtype)
    got, = torch.autograd.grad((means * weights).sum(), x)
    want, = torch.autograd.grad((expected * weights).sum(), x)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)

    rows = torch.randn(B, H, layout.num_blocks, D, generator=g, dtype=torch.float64, requires_grad=True)
    spread = expand_blocks(rows, L_src, N, b)
    token_block = token_blocks(L_src, L_ctx, b, "cpu")
    assert torch.equal(spread, rows[:, :, token_block])
    token_weights = torch.randn(spread.shape, generator=g, dtype=torch.float64)
    got, = torch.autograd.grad((spread * token_weights).sum(), rows)
    want, = torch.autograd.grad((rows[:, :, token_block] * token_weights).sum(), rows)
    torch.testing.assert_close(got, want)
