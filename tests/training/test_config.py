"""Training config files: formats, defaults, overrides, and errors that name the key."""

import json
from pathlib import Path

import pytest

from liveditor.cli import main
from liveditor.training import ConfigError, TrainConfig, load_config

REPO = Path(__file__).resolve().parents[2]


def test_shipped_config_loads():
    config = load_config(REPO / "configs" / "tiny-shapeedit.toml")
    assert config.model.attention == "isa"
    assert config.model.num_layers == 8 and config.text.max_length == 24
    assert config.model.absolute_position_embedding and config.data.renderer == "batch"
    assert config.train.max_steps == 20000 and config.train.dense_fraction == 0.25


def test_toml_yaml_json_agree(tmp_path):
    data = {"optim": {"lr": 0.002, "betas": [0.8, 0.95]}, "train": {"batch_size": 3, "gradient_checkpointing": True},
            "model": {"isa": {"sharpness": "topk", "tile": [2, 2, 2]}}}
    (tmp_path / "c.json").write_text(json.dumps(data))
    (tmp_path / "c.yaml").write_text(
        "optim:\n  lr: 0.002\n  betas: [0.8, 0.95]\ntrain:\n  batch_size: 3\n  gradient_checkpointing: true\n"
        "model:\n  isa:\n    sharpness: topk\n    tile: [2, 2, 2]\n"
    )
    (tmp_path / "c.toml").write_text(
        "[optim]\nlr = 0.002\nbetas = [0.8, 0.95]\n[train]\nbatch_size = 3\ngradient_checkpointing = true\n"
        "[model.isa]\nsharpness = \"topk\"\ntile = [2, 2, 2]\n"
    )
    configs = [load_config(tmp_path / f"c.{ext}").to_dict() for ext in ("json", "yaml", "toml")]
    assert configs[0] == configs[1] == configs[2]
    assert configs[0]["optim"]["lr"] == 0.002 and configs[0]["data"] == TrainConfig().to_dict()["data"]


def test_overrides_use_toml_values(tmp_path):
    config = load_config(None, ["optim.lr=1e-3", "model.attention=dense", 'train.output_dir="x y"',
                                "model.patch_size=[1, 2, 2]", "model.isa.block_size=32"])
    assert config.optim.lr == 1e-3 and config.model.attention == "dense"
    assert config.train.output_dir == "x y" and config.model.isa == {"block_size": 32}


@pytest.mark.parametrize(
    "text,key",
    [
        ("[optim]\nlrr = 1.0\n", "optim.lrr"),
        ("[optim]\nlr = \"fast\"\n", "optim.lr"),
        ("[train]\nbatch_size = 2.5\n", "train.batch_size"),
        ("[train]\ngradient_checkpointing = 1\n", "train.gradient_checkpointing"),
        ("[optim]\nbetas = [0.9, \"x\"]\n", "optim.betas[1]"),
        ("[trian]\nseed = 1\n", "trian"),
        ("optim = 3\n", "optim"),
        ("[model]\nattention = \"sparse\"\n", "model.attention"),
        ("[model.isa]\nselect_ratio = 2.0\n", "model.isa"),
        ("[model.isa]\nbogus = 1\n", "model.isa"),
        ("[data]\nheight = 60\n", "data.frames/height/width"),
        ("[train]\nmax_time_s = -1\n", "train.max_time_s"),
        ("[text]\ndrop_prob = 1.0\n", "text.drop_prob"),
        ("[data]\nrenderer = \"gpu\"\n", "data.renderer"),
        ("[data]\nfamily_weights = [1, 1]\n", "data.family_weights"),
        ("[data]\nmotion_weights = [1, 0, 0, 0, 0, 0, -1]\n", "data.motion_weights"),
        ("[train]\nseed = 70000\n", "train.seed"),
        ("[train]\nschedule = \"resume\"\n", "train.schedule"),
        ("[train]\nedit_loss_weight = -1.0\n", "train.edit_loss_weight"),
        ("[train]\nval_per_family = 0\n", "train.val_per_family"),
        ("[export]\ndtype = \"int8\"\n", "export.dtype"),
    ],
)
def test_errors_name_the_offending_key(tmp_path, text, key):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert key in str(info.value)


def test_unparsable_and_unknown_formats(tmp_path):
    (tmp_path / "a.toml").write_text("[optim\nlr=")
    with pytest.raises(ConfigError, match="cannot parse"):
        load_config(tmp_path / "a.toml")
    (tmp_path / "a.ini").write_text("x")
    with pytest.raises(ConfigError, match="unsupported config format"):
        load_config(tmp_path / "a.ini")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="section.key"):
        load_config(None, ["lr=1"])


def test_cli_reports_the_key_in_one_line(tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text("[optim]\nlr = 1e-4\nwarmup = 10\n")
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "optim.warmup" in err[0]
    assert main(["train", "--config", str(tmp_path / "none.toml")]) == 2
