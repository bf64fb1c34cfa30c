import json

import pytest

from liveditor.cli import main
from liveditor.data.shards import iter_examples


@pytest.fixture
def model_folder(shapeedit_model_folder):
    return shapeedit_model_folder


def test_make_data_cli(tmp_path, capsys):
    out = tmp_path / "shards"
    assert main(["make-data", "-o", str(out), "-n", "5", "--split", "val", "--frames", "4", "--height", "32",
                 "--width", "32", "--samples-per-shard", "2"]) == 0
    assert "5 val clips in 3 shards" in capsys.readouterr().out
    assert len(list(iter_examples(out))) == 5
    assert main(["make-data", "-o", str(out), "-n", "5"]) == 2
    assert "overwrite" in capsys.readouterr().err
    assert main(["make-data", "-o", str(tmp_path / "x"), "-n", "2", "--height", "8"]) == 2
    assert "height" in capsys.readouterr().err


def test_eval_shapeedit_cli(model_folder, tmp_path, capsys):
    path = tmp_path / "result.json"
    assert main(["eval", "shapeedit", "--model", str(model_folder), "--per-family", "1", "--families", "remove",
                 "add", "--steps", "1", "--json", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "| remove | 1 |" in printed and "| all | 2 |" in printed and "ISA vs dense PSNR" in printed
    result = json.loads(path.read_text())
    assert len(result["clips"]) == 2 and set(result["clips"][0]) >= {"isa", "dense", "isa_vs_dense_psnr"}
    assert result["settings"]["split"] == "test"
    val_path = tmp_path / "val.json"
    assert main(["eval", "shapeedit", "--model", str(model_folder), "--per-family", "1", "--families", "remove",
                 "--steps", "1", "--split", "val", "--attention", "isa", "--json", str(val_path)]) == 0
    val = json.loads(val_path.read_text())
    assert val["settings"]["split"] == "val" and val["settings"]["attentions"] == ["isa"]
    assert val["clips"][0]["input_psnr"] != result["clips"][0]["input_psnr"]  # other clips than test's
    assert main(["eval", "shapeedit", "--model", str(tmp_path / "nope")]) == 2
    capsys.readouterr()
    assert main(["eval", "shapeedit", "--model", str(model_folder), "--device", "cpu", "--fp8"]) == 2
    assert "--fp8 needs a CUDA GPU" in capsys.readouterr().err


def test_record_activations_cli(model_folder, tmp_path, capsys):
    path = tmp_path / "fid.json"
    saved = tmp_path / "qkv.pt"
    assert main(["record-activations", "--model", str(model_folder), "--clips", "1", "--layers", "1",
                 "--at-steps", "0", "--steps", "2", "--json", str(path), "--save", str(saved)]) == 0
    printed = capsys.readouterr().out
    assert "energy / raster (default)" in printed and "lowest error" in printed
    result = json.loads(path.read_text())
    assert len(result["per_record"]) == 1 and result["best_default"]
    assert saved.stat().st_size > 0
