import argparse
import json

import pytest
import torch

from liveditor.cli import main as cli_main
from liveditor.errors import LIVEditorError
from liveditor.models.conversion import convert_checkpoint, load_original_checkpoint
from liveditor.pipelines import load_pipeline
from tiny_models import TINY_BUCKETS, tiny_pipeline

DIM, HEADS, IN_CH, TEXT_DIM, FREQ_DIM, FFN, LAYERS = 32, 2, 4, 32, 32, 64, 2


def original_checkpoint(seed=0):
    """A tiny transformer state dict in the released (original Wan) layout, written out by hand."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    sd = {
        "patch_embedding.weight": r(DIM, IN_CH, 1, 2, 2),
        "patch_embedding.bias": r(DIM),
        "source_video_embedding_more_memory.weight": r(DIM, IN_CH, 1, 2, 2),
        "source_video_embedding_more_memory.bias": r(DIM),
        "text_embedding.0.weight": r(DIM, TEXT_DIM),
        "text_embedding.0.bias": r(DIM),
        "text_embedding.2.weight": r(DIM, DIM),
        "text_embedding.2.bias": r(DIM),
        "time_embedding.0.weight": r(DIM, FREQ_DIM),
        "time_embedding.0.bias": r(DIM),
        "time_embedding.2.weight": r(DIM, DIM),
        "time_embedding.2.bias": r(DIM),
        "time_projection.1.weight": r(6 * DIM, DIM),
        "time_projection.1.bias": r(6 * DIM),
        "head.head.weight": r(IN_CH * 4, DIM),
        "head.head.bias": r(IN_CH * 4),
        "head.modulation": r(1, 2, DIM),
    }
    for i in range(LAYERS):
        b = f"blocks.{i}."
        sd[b + "modulation"] = r(1, 6, DIM)
        sd[b + "norm3.weight"] = r(DIM)
        sd[b + "norm3.bias"] = r(DIM)
        for attn in ("self_attn", "cross_attn"):
            for proj in ("q", "k", "v", "o"):
                sd[f"{b}{attn}.{proj}.weight"] = r(DIM, DIM)
                sd[f"{b}{attn}.{proj}.bias"] = r(DIM)
            sd[f"{b}{attn}.norm_q.weight"] = r(DIM)
            sd[f"{b}{attn}.norm_k.weight"] = r(DIM)
        sd[b + "self_attn.alpha_1.weight"] = r(1, DIM)
        sd[b + "self_attn.alpha_2.weight"] = r(1, DIM)
        sd[b + "ffn.0.weight"] = r(FFN, DIM)
        sd[b + "ffn.0.bias"] = r(FFN)
        sd[b + "ffn.2.weight"] = r(DIM, FFN)
        sd[b + "ffn.2.bias"] = r(DIM)
    return sd


# The expected home of every original tensor, spelled out independently of the converter.
def expected_parameter(model, key):
    top = {
        "patch_embedding.weight": model.patch_embedding.weight,
        "patch_embedding.bias": model.patch_embedding.bias,
        "source_video_embedding_more_memory.weight": model.context_embedding.weight,
        "source_video_embedding_more_memory.bias": model.context_embedding.bias,
        "text_embedding.0.weight": model.condition_embedder.text_embedder.linear_1.weight,
        "text_embedding.0.bias": model.condition_embedder.text_embedder.linear_1.bias,
        "text_embedding.2.weight": model.condition_embedder.text_embedder.linear_2.weight,
        "text_embedding.2.bias": model.condition_embedder.text_embedder.linear_2.bias,
        "time_embedding.0.weight": model.condition_embedder.time_embedder.linear_1.weight,
        "time_embedding.0.bias": model.condition_embedder.time_embedder.linear_1.bias,
        "time_embedding.2.weight": model.condition_embedder.time_embedder.linear_2.weight,
        "time_embedding.2.bias": model.condition_embedder.time_embedder.linear_2.bias,
        "time_projection.1.weight": model.condition_embedder.time_proj.weight,
        "time_projection.1.bias": model.condition_embedder.time_proj.bias,
        "head.head.weight": model.proj_out.weight,
        "head.head.bias": model.proj_out.bias,
        "head.modulation": model.scale_shift_table,
    }
    if key in top:
        return top[key]
    _, index, rest = key.split(".", 2)
    block = model.blocks[int(index)]
    if rest == "modulation":
        return block.scale_shift_table
    if rest.startswith("norm3."):
        return getattr(block.norm2, rest.split(".")[1])
    if rest.startswith("ffn."):
        _, layer, kind = rest.split(".")
        return getattr(block.ffn.net[0].proj if layer == "0" else block.ffn.net[2], kind)
    attn_name, proj, kind = rest.split(".")
    attn = block.attn1 if attn_name == "self_attn" else block.attn2
    module = {"q": attn.to_q, "k": attn.to_k, "v": attn.to_v, "o": attn.to_out[0], "norm_q": attn.norm_q,
              "norm_k": attn.norm_k, "alpha_1": getattr(attn, "coarse_gate", None)}[proj]
    return getattr(module, kind)


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("base") / "wan-base"
    tiny_pipeline(seed=0).save_pretrained(path)
    return path


def _save(sd, path, prefix="model."):
    torch.save({prefix + k: v for k, v in sd.items()}, path)
    return path


def test_converter_round_trip_places_every_weight(tmp_path, base_folder):
    sd = original_checkpoint()
    ckpt = {"model." + k: v for k, v in sd.items()}
    ckpt["vae.encoder.conv1.weight"] = torch.randn(3, 3)
    ckpt["optimizer"] = {"step": 10, "lr": 1e-5}
    torch.save(ckpt, tmp_path / "liveditor_ckpt.bin")

    out = convert_checkpoint(tmp_path / "liveditor_ckpt.bin", base_folder, tmp_path / "converted",
                             resolution_buckets=TINY_BUCKETS)
    assert (out / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    assert not list((out / "transformer").glob("*.bin"))
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "LIVEditorPipeline"

    pipe = load_pipeline(out)
    model = pipe.transformer
    covered = set()
    for key, value in sd.items():
        if key.endswith("alpha_2.weight"):
            continue
        param = expected_parameter(model, key)
        torch.testing.assert_close(param.detach(), value, rtol=0, atol=0, msg=key)
        covered.add(id(param))
    assert covered == {id(p) for p in model.parameters()}
    assert model.config.num_layers == LAYERS and model.config.num_attention_heads == HEADS

    # The converted folder is a working pipeline.
    pipe.set_progress_bar_config(disable=True)
    video = torch.rand(5, 3, 64, 64)
    result = pipe(video, "make it green", num_inference_steps=1, seed=0)
    assert result.frames.shape == (1, 5, 64, 64, 3)


@pytest.mark.parametrize("prefix", ["", "model_ema.", "wanx_unimodel.guidance_model.feedforward_model."])
def test_prefixes_are_stripped(tmp_path, prefix):
    sd = original_checkpoint(seed=1)
    loaded = load_original_checkpoint(_save(sd, tmp_path / "c.bin", prefix))
    assert set(loaded) == set(sd)
    torch.testing.assert_close(loaded["blocks.1.self_attn.alpha_1.weight"], sd["blocks.1.self_attn.alpha_1.weight"])


def test_ema_weights_win_over_raw_ones(tmp_path):
    raw, ema = original_checkpoint(seed=1), original_checkpoint(seed=2)
    both = {**{"model_ema." + k: v for k, v in ema.items()}, **{"model." + k: v for k, v in raw.items()}}
    torch.save(both, tmp_path / "c.bin")
    loaded = load_original_checkpoint(tmp_path / "c.bin")
    torch.testing.assert_close(loaded["head.head.weight"], ema["head.head.weight"])


def test_missing_and_unexpected_keys_are_listed(tmp_path, base_folder):
    sd = original_checkpoint()
    del sd["blocks.1.ffn.2.bias"]
    sd["blocks.0.self_attn.alpha_3.weight"] = torch.randn(1, DIM)
    _save(sd, tmp_path / "c.bin")
    with pytest.raises(LIVEditorError) as info:
        convert_checkpoint(tmp_path / "c.bin", base_folder, tmp_path / "out")
    message = str(info.value)
    assert "missing keys: blocks.1.ffn.net.2.bias" in message
    assert "unexpected keys: blocks.0.self_attn.alpha_3.weight" in message
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["c.bin"]  # no temporary folder left behind


def test_refuses_non_weight_pickles_and_existing_output(tmp_path, base_folder):
    # Arbitrary objects (here an argparse.Namespace) are refused by the weights-only unpickler.
    torch.save({"model.patch_embedding.weight": argparse.Namespace(code="x")}, tmp_path / "evil.bin")
    with pytest.raises(LIVEditorError, match="weights-only"):
        convert_checkpoint(tmp_path / "evil.bin", base_folder, tmp_path / "out")
    (tmp_path / "junk.bin").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(LIVEditorError, match="cannot load checkpoint"):
        load_original_checkpoint(tmp_path / "junk.bin")
    _save(original_checkpoint(), tmp_path / "c.bin")
    (tmp_path / "exists").mkdir()
    with pytest.raises(LIVEditorError, match="already exists"):
        convert_checkpoint(tmp_path / "c.bin", base_folder, tmp_path / "exists")
    with pytest.raises(LIVEditorError, match="base folder"):
        convert_checkpoint(tmp_path / "c.bin", tmp_path / "no-base", tmp_path / "out")


def test_convert_cli(tmp_path, base_folder, capsys):
    _save(original_checkpoint(), tmp_path / "c.bin")
    rc = cli_main(["convert", "--checkpoint", str(tmp_path / "c.bin"), "--base", str(base_folder),
                   "--out", str(tmp_path / "out"), "--dtype", "bf16"])
    assert rc == 0 and (tmp_path / "out" / "model_index.json").is_file()
    pipe = load_pipeline(tmp_path / "out")
    assert pipe.transformer.blocks[0].attn1.to_q.weight.dtype == torch.float32  # CPU default dtype
    rc = cli_main(["convert", "--checkpoint", str(tmp_path / "missing.bin"), "--base", str(base_folder),
                   "--out", str(tmp_path / "out2")])
    assert rc == 2 and "does not exist" in capsys.readouterr().err
