"""The fidelity report: metrics are right and the command runs end to end."""

import json

import pytest
import torch

from liveditor.cli import main
from liveditor.isa import ISAConfig
from liveditor.isa.report import error_metrics, fidelity_table, synthetic_icl_qkv


def test_error_metrics_values():
    ref = torch.randn(2, 3, 50, 8)
    assert error_metrics(ref, ref) == pytest.approx({"rel_l1": 0.0, "rel_l2": 0.0, "cosine": 1.0})
    m = error_metrics(ref * 1.1, ref)
    assert m["rel_l1"] == pytest.approx(0.1) and m["rel_l2"] == pytest.approx(0.1)
    assert m["cosine"] == pytest.approx(1.0)


def test_synthetic_inputs_are_local_and_context_aligned():
    q, k, v = synthetic_icl_qkv((2, 6, 8), heads=2, head_dim=32, seed=torch.seed() % 1000)
    L = 2 * 6 * 8
    assert q.shape == (1, 2, 2 * L, 32)
    for head, min_hits in ((0, 0.1), (1, 0.04)):  # chance is 1/96; head 0 is the peaked one
        logits = (q[0, head, :L] @ k[0, head].T) / 32 ** 0.5
        # A source query scores the context key at its own grid position highest far above chance.
        hits = (logits[:, L:].argmax(-1) == torch.arange(L)).float().mean()
        assert hits > min_hits
    # Context keys receive less attention mass than source keys.
    mass = logits.softmax(-1)
    assert mass[:, L:].sum() < mass[:, :L].sum()


def test_fidelity_table_orders_configs_sensibly():
    q, k, v = synthetic_icl_qkv((2, 8, 8), heads=2, head_dim=32, seed=3)
    configs = {
        "exact": ISAConfig(block_size=16, select_ratio=1.0, full_ratio=1.0),
        "sparse": ISAConfig(block_size=16),
        "tile": ISAConfig(block_size=16, token_order="tile"),
    }
    rows = {r["config"]: r for r in fidelity_table(q, k, v, 128, grid=(2, 8, 8), configs=configs)}
    assert rows["exact"]["rel_l2"] < 1e-5 and rows["exact"]["flop_fraction"] > 1.0
    assert 0.0 < rows["sparse"]["rel_l2"] < 0.6 and rows["sparse"]["flop_fraction"] < 1.0
    assert "rel_l2" in rows["tile"]
    no_grid = {r["config"]: r for r in fidelity_table(q, k, v, 128, configs=configs)}
    assert "skipped" in no_grid["tile"]


def test_isa_report_command_writes_json(tmp_path, capsys):
    out = tmp_path / "report.json"
    assert main(["isa-report", "--frames", "2", "--height", "8", "--width", "8", "--heads", "2",
                 "--head-dim", "32", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "energy / raster (default)" in printed and "topk / tile" in printed
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 10 and all(0 <= r["rel_l2"] < 1 for r in rows)


def test_isa_report_bad_arguments_exit_nonzero(capsys):
    assert main(["isa-report", "--heads", "0"]) == 2
    err = capsys.readouterr().err
    assert "error" in err and "\n" == err[-1] and err.count("\n") == 1
