"""ISAConfig(blocking="joint"): the released code's blocking of [source | context], emulated in the
PyTorch path to measure its difference from ours (docs/isa-semantics.md, "Joint blocking")."""

from __future__ import annotations

import math

import pytest
import torch

from liveditor.isa import ISAConfig, isa_attention
from liveditor.isa.config import block_counts

RELEASE = ISAConfig(sharpness="topk", count_rounding="floor")
RELEASE_JOINT = ISAConfig(sharpness="topk", count_rounding="floor", blocking="joint")
B, H, D = 1, 2, 16


def _inputs(seed: int, n_tokens: int, gated: bool = True):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, n_tokens, D, generator=g, dtype=torch.float64) for _ in range(3))
    gate = torch.randn(B, n_tokens, generator=g, dtype=torch.float64) if gated else None
    return q, k, v, gate


def _floor(ratio: float, n: int) -> int:
    return max(1, math.floor(ratio * n + 1e-9))


def _release_blocking_loop(q, k, v, num_source: int, gate, config: ISAConfig):
    """The released code's rule, token by token (float64): blocks of the concatenated sequence, the
    whole source blocks are "source", pooled means over real tokens, floor counts; kept keys are all
    source tokens then the 64 slots of each selected block (zeros past the end); sharp blocks attend
    to all kept keys; flat blocks re-block the kept keys (zero-padded), keep the top re-blocks by
    pooled q . pooled k exactly and the others as pooled keys weighted by the block size."""
    n_tokens, b = q.shape[2], config.block_size
    scale = 1.0 / math.sqrt(q.shape[-1])
    n_blocks = -(-n_tokens // b)
    n_src = num_source // b
    n_ctx = n_blocks - n_src
    out = torch.zeros_like(q)
    selected_all, sharp_all = [], []
    for bi in range(q.shape[0]):
        for h in range(q.shape[1]):
            qs, ks, vs = q[bi, h], k[bi, h], v[bi, h]
            spans = [range(i * b, min(n_tokens, (i + 1) * b)) for i in range(n_blocks)]
            qc = torch.stack([qs[list(s)].mean(0) for s in spans])
            kc = torch.stack([ks[list(s)].mean(0) for s in spans])
            vc = torch.stack([vs[list(s)].mean(0) for s in spans])
            coarse = torch.softmax(qc @ kc.T * scale, dim=-1)
            context_score = [float(coarse[:n_src, j].sum()) for j in range(n_src, n_blocks)]
            n_sel = _floor(config.select_ratio, n_ctx)
            selected = sorted(sorted(range(n_ctx), key=lambda j: -context_score[j])[:n_sel])
            k_sharp = _floor(config.exact_ratio, n_src)
            sharpness = [float(coarse[i, :n_src].sort(descending=True).values[:k_sharp].sum()) for i in range(n_blocks)]
            sharp = set(sorted(range(n_blocks), key=lambda i: -sharpness[i])[: _floor(config.full_ratio, n_blocks)])
            selected_all.append(selected)
            sharp_all.append(sharp)

            zero = torch.zeros(q.shape[-1], dtype=q.dtype)
            kept_k = [ks[t] for t in range(num_source)]
            kept_v = [vs[t] for t in range(num_source)]
            for j in selected:
                for slot in range((n_src + j) * b, (n_src + j + 1) * b):
                    kept_k.append(ks[slot] if slot < n_tokens else zero)
                    kept_v.append(vs[slot] if slot < n_tokens else zero)
            n_kept = len(kept_k)
            n_re = -(-n_kept // b)
            re_k = [(kept_k + [zero] * (n_re * b - n_kept))[r * b:(r + 1) * b] for r in range(n_re)]
            re_v = [(kept_v + [zero] * (n_re * b - n_kept))[r * b:(r + 1) * b] for r in range(n_re)]
            pooled_k = [sum(block) / b for block in re_k]
            pooled_v = [sum(block) / b for block in re_v]
            n_exact = _floor(config.exact_ratio, n_re)
            for i, span in enumerate(spans):
                if i in sharp:
                    keys, values, weights = torch.stack(kept_k), torch.stack(kept_v), None
                else:
                    score = [float(qc[i] @ pk) for pk in pooled_k]
                    exact = set(sorted(range(n_re), key=lambda r: -score[r])[:n_exact])
                    pooled = [r for r in range(n_re) if r not in exact]
                    keys = torch.stack([x for r in sorted(exact) for x in re_k[r]] + [pooled_k[r] for r in pooled])
                    values = torch.stack([x for r in sorted(exact) for x in re_v[r]] + [pooled_v[r] for r in pooled])
                    weights = torch.tensor([1.0] * (len(exact) * b) + [float(b)] * len(pooled), dtype=q.dtype)
                for t in span:
                    w = torch.exp(keys @ qs[t] * scale)
                    w = w if weights is None else w * weights
                    out[bi, h, t] = (w @ values) / w.sum()
                    if gate is not None:
                        out[bi, h, t] += gate[bi, t] * (coarse[i] @ vc)
    return out, selected_all, sharp_all


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("segments", [(128, 192), (192, 64)])
@pytest.mark.parametrize("config", [RELEASE, ISAConfig()], ids=["release", "default"])
def test_whole_blocks_make_joint_equal_separate(seed, segments, config):
    num_source, num_context = segments
    q, k, v, gate = _inputs(seed, num_source + num_context)
    joint = ISAConfig(**{**config.__dict__, "blocking": "joint"})
    out_sep, info_sep = isa_attention(q, k, v, num_source, config, gate=gate, backend="torch", return_info=True)
    out_joint, info_joint = isa_attention(q, k, v, num_source, joint, gate=gate, backend="torch", return_info=True)
    torch.testing.assert_close(out_joint, out_sep, rtol=0, atol=1e-12, msg=f"seed {seed}, segments {segments}")
    assert torch.equal(info_joint.exact_query_blocks, info_sep.exact_query_blocks), f"seed {seed}"
    assert torch.equal(info_joint.selected_context_blocks.sort(-1).values,
                       info_sep.selected_context_blocks.sort(-1).values), f"seed {seed}"
    assert info_joint.flop_fraction == pytest.approx(info_sep.flop_fraction), f"seed {seed}"


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("segments", [(150, 170), (100, 130), (200, 200)])
@pytest.mark.parametrize("gated", [True, False])
def test_partial_blocks_follow_the_release_rule(seed, segments, gated):
    num_source, num_context = segments
    q, k, v, gate = _inputs(seed, num_source + num_context, gated)
    out, info = isa_attention(q, k, v, num_source, RELEASE_JOINT, gate=gate, backend="torch", return_info=True)
    expected, selected, sharp = _release_blocking_loop(q, k, v, num_source, gate, RELEASE_JOINT)
    for head in range(H):
        assert sorted(info.selected_context_blocks[0, head].tolist()) == selected[head], f"seed {seed}, head {head}"
        assert set(torch.nonzero(info.exact_query_blocks[0, head]).flatten().tolist()) == sharp[head], f"seed {seed}"
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10, msg=f"seed {seed}, segments {segments}")
    separate = isa_attention(q, k, v, num_source, RELEASE, gate=gate, backend="torch")
    rel = float((out - separate).norm() / separate.norm())
    assert rel > 1e-3, f"seed {seed}, segments {segments}: joint and separate blocking agree ({rel:.2e})"


def test_joint_counts_on_the_release_example():
    """544x960, 81 frames: 42,840 tokens a segment -> 1,339 joint blocks, 669 whole source blocks;
    the counts the reference quotes (83 context blocks, 669 exact query blocks, 47 exact key blocks
    among ceil((42,840 + 83 x 64) / 64) = 753 re-blocks)."""
    counts = block_counts(42840, 42840, RELEASE_JOINT)
    assert (counts.num_source_blocks, counts.num_context_blocks) == (669, 670)
    assert (counts.num_selected, counts.num_full, counts.num_exact, counts.topk_sharpness) == (83, 669, 47, 41)


def test_config_and_input_errors():
    with pytest.raises(ValueError, match="blocking"):
        ISAConfig(blocking="concatenated")
    q, k, v, _ = _inputs(0, 100)
    with pytest.raises(ValueError, match="whole source block"):
        isa_attention(q, k, v, 40, RELEASE_JOINT, backend="torch")


def test_triton_refuses_joint_and_auto_falls_back(monkeypatch):
    pytest.importorskip("triton")
    from liveditor.isa.dispatch import resolve_backend
    from liveditor.isa.ops import triton_unsupported_reason
    from liveditor.isa.reference import isa_attention_torch

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # so that the CPU is not the reason
    q = torch.randn(1, 2, 200, 16, dtype=torch.float32, generator=torch.Generator().manual_seed(3))
    assert triton_unsupported_reason(q, RELEASE) is None
    assert "PyTorch path only" in triton_unsupported_reason(q, RELEASE_JOINT)
    with pytest.raises(ValueError, match="PyTorch path only"):
        resolve_backend("triton", q, RELEASE_JOINT)
    assert resolve_backend("auto", q, RELEASE_JOINT) is isa_attention_torch
