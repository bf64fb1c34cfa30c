"""Pruning transformer blocks of a pipeline folder (`liveditor.training.prune`, `liveditor prune-blocks`)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from liveditor.cli import main
from liveditor.errors import LIVEditorError
from liveditor.models import LIVEditorTransformer3DModel
from liveditor.training import train
from liveditor.training.prune import PRUNING_FILE, choose_blocks_to_keep, prune_blocks

from test_loop import tiny_config


def _load(folder):
    return LIVEditorTransformer3DModel.from_pretrained(str(folder), subfolder="transformer", torch_dtype=torch.float32)


@pytest.fixture(scope="module")
def three_blocks(tmp_path_factory):
    """A pipeline folder of a 3-block tiny model after one training step (the loop's own export)."""
    run = tmp_path_factory.mktemp("run")
    return train(tiny_config(run, "model.num_layers=3", "train.max_steps=1"), progress=False).pipeline_dir


def _transformer_output(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, model.config.in_channels, 4, 8, 8, generator=g)
    context = torch.randn(1, model.config.in_channels, 4, 8, 8, generator=g)
    text = torch.randn(1, 5, model.config.text_dim, generator=g)
    with torch.no_grad():
        return model(latents, torch.tensor([500.0]), text, context, attention_kwargs={"mode": "dense"},
                     return_dict=False)[0]


def test_pruned_model_computes_what_the_kept_blocks_compute(three_blocks, tmp_path):
    out = prune_blocks(three_blocks, [2, 0], tmp_path / "pruned")
    full, pruned = _load(three_blocks), _load(out)
    assert pruned.config.num_layers == 2

    whole = _transformer_output(full)
    full.blocks = torch.nn.ModuleList([full.blocks[0], full.blocks[2]])
    torch.testing.assert_close(_transformer_output(pruned), _transformer_output(full), rtol=0, atol=0)
    assert not torch.allclose(_transformer_output(pruned), whole, atol=1e-3)  # block 1 did something

    source = load_file(str(three_blocks / "transformer" / "diffusion_pytorch_model.safetensors"))
    kept = load_file(str(out / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert {k: v.dtype for k, v in kept.items()} == {k.replace("blocks.2.", "blocks.1."): v.dtype
                                                    for k, v in source.items() if not k.startswith("blocks.1.")}
    for name in ("model_index.json", "training.json", "text_encoder/model.safetensors", "vae/config.json",
                 "tokenizer/tokenizer.json", "scheduler/scheduler_config.json"):
        assert (out / name).read_bytes() == (three_blocks / name).read_bytes(), name
    assert json.loads((out / PRUNING_FILE).read_text())["kept_blocks"] == [0, 2]


def test_prune_refuses_bad_blocks_and_keeps_an_existing_folder(three_blocks, tmp_path):
    for keep, message in (([], "at least one"), ([0, 0], "repeat"), ([1, 3], "no block 3"), ([-1], "no block -1")):
        with pytest.raises(LIVEditorError, match=message):
            prune_blocks(three_blocks, keep, tmp_path / "x")
    assert not (tmp_path / "x").exists()

    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("keep me")
    with pytest.raises(LIVEditorError, match="already exists"):
        prune_blocks(three_blocks, [0], tmp_path / "taken")
    assert (tmp_path / "taken" / "mine.txt").read_text() == "keep me"
    prune_blocks(three_blocks, [0], tmp_path / "taken", overwrite=True)
    assert not (tmp_path / "taken" / "mine.txt").exists()
    assert json.loads((tmp_path / "taken" / "transformer" / "config.json").read_text())["num_layers"] == 1
    with pytest.raises(LIVEditorError, match="new folder"):
        prune_blocks(three_blocks, [0], three_blocks, overwrite=True)


def test_greedy_choice_drops_the_block_that_does_nothing(three_blocks, tmp_path):
    # Block 1 made the identity: its three residual branches end in zeroed output projections.
    model = _load(three_blocks)
    block = model.blocks[1]
    for layer in (block.attn1.to_out[0], block.attn2.to_out[0], block.ffn.net[2]):
        torch.nn.init.zeros_(layer.weight)
        torch.nn.init.zeros_(layer.bias)
    folder = tmp_path / "identity-block"
    prune_blocks(three_blocks, [0, 1, 2], folder)
    model.save_pretrained(str(folder / "transformer"))

    keep, full, rounds = choose_blocks_to_keep(folder, 1, tiny_config(tmp_path / "cfg"), clips=4, progress=False)
    assert keep == [0, 2] and rounds[0].dropped == 1
    # Without block 1 every hidden state is bitwise the same; without either other block the loss rises.
    assert rounds[0].losses[1] == full
    assert min(rounds[0].losses[0], rounds[0].losses[2]) > full


def test_cli_prunes_and_rejects_bad_input_in_one_line(three_blocks, tmp_path, capsys):
    assert main(["prune-blocks", "--model", str(three_blocks), "--keep", "0,2", "-o", str(tmp_path / "ok")]) == 0
    assert "kept blocks 0,2" in capsys.readouterr().out
    assert main(["prune-blocks", "--model", str(three_blocks), "--keep", "0,7", "-o", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no block 7" in err and not (tmp_path / "bad").exists()
    with pytest.raises(SystemExit) as exit_info:
        main(["prune-blocks", "--model", str(three_blocks), "--keep", "0,x", "-o", str(tmp_path / "bad")])
    assert exit_info.value.code == 2 and "block numbers separated by commas" in capsys.readouterr().err
