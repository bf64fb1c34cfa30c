"""The fidelity report: metrics are right, the knobs order the error as promised, the command runs end to end."""

import json
from dataclasses import replace

import pytest
import torch

from liveditor.cli import main
from liveditor.isa import ISAConfig
from liveditor.isa.report import error_metrics, fidelity_table, synthetic_icl_qkv


@pytest.mark.parametrize("seed", [0, 1])
def test_error_metrics_values(seed):
    ref = torch.randn(2, 3, 50, 8, generator=torch.Generator().manual_seed(seed))
    assert error_metrics(ref, ref) == pytest.approx({"rel_l1": 0.0, "rel_l2": 0.0, "cosine": 1.0})
    m = error_metrics(ref * 1.1, ref)
    assert m["rel_l1"] == pytest.approx(0.1) and m["rel_l2"] == pytest.approx(0.1)
    assert m["cosine"] == pytest.approx(1.0)
    flipped = error_metrics(-ref, ref)
    assert flipped["rel_l2"] == pytest.approx(2.0) and flipped["cosine"] == pytest.approx(-1.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_synthetic_inputs_are_local_context_aligned_and_peaked(seed):
    """What the generator promises: logits decay with grid distance (the context key at a source
    query's own grid position scores above the other context keys on average), context keys get
    less mass than source keys, and the peaked head is sharper than the others."""
    q, k, v = synthetic_icl_qkv((2, 6, 8), heads=2, head_dim=32, seed=seed)
    L = 2 * 6 * 8
    assert q.shape == k.shape == v.shape == (1, 2, 2 * L, 32)
    energy = []
    for head in range(2):
        logits = (q[0, head, :L] @ k[0, head].T) / 32 ** 0.5  # source queries
        same_position = logits[:, L:].diagonal()
        others = (logits[:, L:].sum(-1) - same_position) / (L - 1)
        assert same_position.mean() > others.mean(), f"seed {seed}, head {head}"
        mass = logits.softmax(-1)
        assert mass[:, L:].sum() < mass[:, :L].sum(), f"seed {seed}, head {head}"
        energy.append(mass.square().sum(-1).mean())
    assert energy[0] > energy[1], f"seed {seed}: the peaked head (0) is not the sharper one"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fidelity_table_error_falls_as_isa_computes_more_exactly(seed):
    """Routing more query blocks to exact attention, or more key blocks of each Taylor block, costs
    FLOPs and lowers the error against dense attention; with nothing sparse the error is rounding
    only. (More context blocks is not in this chain: a kept block on the Taylor path can add error.)"""
    q, k, v = synthetic_icl_qkv((2, 8, 8), heads=2, head_dim=32, seed=seed)
    base = ISAConfig(block_size=16)
    chains = {
        "full_ratio": [base, replace(base, full_ratio=0.75), replace(base, full_ratio=1.0)],
        "exact_ratio": [base, replace(base, exact_ratio=0.25), replace(base, exact_ratio=0.5)],
    }
    for knob, configs in chains.items():
        rows = fidelity_table(q, k, v, 128, configs={str(i): c for i, c in enumerate(configs)})
        errors = [r["rel_l2"] for r in rows]
        flops = [r["flop_fraction"] for r in rows]
        assert flops == sorted(flops) and len(set(flops)) == len(flops), f"seed {seed}, {knob}: {flops}"
        assert errors == sorted(errors, reverse=True) and len(set(errors)) == len(errors), (
            f"seed {seed}, {knob}: errors {errors} do not fall as FLOPs {flops} rise"
        )
    exact = {"exact": replace(base, select_ratio=1.0, full_ratio=1.0)}
    row = fidelity_table(q, k, v, 128, configs=exact)[0]
    assert row["rel_l2"] < 1e-5 and row["cosine"] == pytest.approx(1.0), f"seed {seed}"
    # Nothing skipped and nothing sparse costs more than dense: the coarse map comes on top.
    assert row["flop_fraction"] > 1.0


def test_tile_configs_need_the_grid():
    q, k, v = synthetic_icl_qkv((2, 8, 8), heads=1, head_dim=16, seed=0)
    configs = {"tile": ISAConfig(block_size=16, token_order="tile")}
    assert "rel_l2" in fidelity_table(q, k, v, 128, grid=(2, 8, 8), configs=configs)[0]
    assert "skipped" in fidelity_table(q, k, v, 128, configs=configs)[0]


def test_isa_report_command_writes_json(tmp_path, capsys):
    out = tmp_path / "report.json"
    assert main(["isa-report", "--frames", "2", "--height", "8", "--width", "8", "--heads", "2",
                 "--head-dim", "32", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "energy / raster (default)" in printed and "topk / tile" in printed
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 10 and all(0 <= r["rel_l2"] < 1 for r in rows)


def test_isa_report_bad_arguments_exit_nonzero(capsys):
    with pytest.raises(SystemExit) as exit_info:  # argparse rejects the value while parsing
        main(["isa-report", "--heads", "0"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error" in err and "\n" == err[-1] and err.count("\n") == 1
