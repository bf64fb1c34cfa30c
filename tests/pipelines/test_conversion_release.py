"""`liveditor convert`: every checkpoint layout the release's loader accepts, strict about the rest."""

import argparse
import json
import math

import pytest
import torch
from safetensors import safe_open
from release_layout import (
    HEADS_TINY,
    PARAMETERS_14B,
    SIZE_14B,
    SIZE_TINY,
    TENSORS_14B,
    UNUSED_PER_BLOCK,
    WANX,
    release_key_shapes,
    release_state_dict,
)

from liveditor.cli import main as cli_main
from liveditor.errors import LIVEditorError
from liveditor.models import MODEL_PRESETS, LIVEditorTransformer3DModel
from liveditor.pipelines import load_pipeline
from liveditor.pipelines.conversion import (
    build_transformer,
    convert_checkpoint,
    load_release_checkpoint,
    release_entries,
)
from tiny_models import TINY_BUCKETS, tiny_pipeline


def expected_parameter(model, key):
    """Where an original Wan weight must land in LIVEditorTransformer3DModel, spelled out module by
    module (independently of the converter's tables)."""
    top = {
        "patch_embedding": model.patch_embedding,
        "source_video_embedding_more_memory": model.context_embedding,
        "text_embedding.0": model.condition_embedder.text_embedder.linear_1,
        "text_embedding.2": model.condition_embedder.text_embedder.linear_2,
        "time_embedding.0": model.condition_embedder.time_embedder.linear_1,
        "time_embedding.2": model.condition_embedder.time_embedder.linear_2,
        "time_projection.1": model.condition_embedder.time_proj,
        "head.head": model.proj_out,
    }
    if key == "head.modulation":
        return model.scale_shift_table
    module, kind = key.rsplit(".", 1)
    if module in top:
        return getattr(top[module], kind)
    _, index, rest = key.split(".", 2)
    block = model.blocks[int(index)]
    if rest == "modulation":
        return block.scale_shift_table
    if rest.startswith("norm3."):
        return getattr(block.norm2, kind)  # the cross-attention norm
    if rest.startswith("ffn."):
        return getattr(block.ffn.net[0].proj if rest.split(".")[1] == "0" else block.ffn.net[2], kind)
    attn_name, proj, kind = rest.split(".")
    attn = block.attn1 if attn_name == "self_attn" else block.attn2
    named = {"q": attn.to_q, "k": attn.to_k, "v": attn.to_v, "o": attn.to_out[0], "norm_q": attn.norm_q,
             "norm_k": attn.norm_k, "alpha_1": getattr(attn, "coarse_gate", None)}
    return getattr(named[proj], kind)


def assert_holds(model, sd):
    """Every used weight of `sd` sits where it belongs, and every model parameter came from `sd`."""
    covered = set()
    for key, value in sd.items():
        if key.split(".", 2)[-1] in UNUSED_PER_BLOCK:
            continue
        param = expected_parameter(model, key)
        torch.testing.assert_close(param.detach().cpu(), value, rtol=0, atol=0, msg=key)  # any device
        covered.add(id(param))
    assert covered == {id(p) for p in model.parameters()}


def wrap(sd, prefix="", wrapper=None, extra=None):
    entries = {prefix + k: v for k, v in sd.items()}
    entries.update(extra or {})
    return {wrapper: entries} if wrapper else entries


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("base") / "wan-base"
    tiny_pipeline(seed=0).save_pretrained(path)
    return path


PREFIXES = ["", "model.", "model_ema.", WANX, "model_ema." + WANX, "model." + WANX, WANX + "model_ema."]


@pytest.mark.parametrize("wrapper", [None, "state_dict", "module", "weights"])
@pytest.mark.parametrize("prefix", PREFIXES)
def test_every_release_layout_converts(tmp_path, wrapper, prefix):
    seed = PREFIXES.index(prefix)
    sd = release_state_dict(seed=seed)
    extra = {"vae.encoder.conv1.weight": torch.randn(3, 3), "optimizer": {"state": {}, "lr": 1e-5},
             "lr_scheduler": {"last_epoch": 3}, "model.optimizer_step": torch.tensor(7)}
    torch.save(wrap(sd, prefix, wrapper, extra), tmp_path / "liveditor_ckpt.bin")
    release = load_release_checkpoint(tmp_path / "liveditor_ckpt.bin")
    assert release.skipped == len(extra), f"seed {seed}"
    model, report = build_transformer(release, num_heads=HEADS_TINY)
    assert_holds(model, sd)
    assert report.unused == len(UNUSED_PER_BLOCK) * SIZE_TINY["layers"]
    assert report.loaded == len(sd) - report.unused and not report.ignored_unknown
    assert model.config.isa_config["sharpness"] == "topk"  # the release's statistic
    assert model.config.isa_config["count_rounding"] == "floor"  # and its int() block counts


def test_prefix_is_removed_wherever_it_appears():
    sd = release_state_dict(seed=3)
    # The release removes the prefix anywhere in a key, not only at the start.
    entries = {(k.replace(".", "." + WANX, 1) if i % 2 else k): v for i, (k, v) in enumerate(sd.items())}
    assert sum(WANX in k for k in entries) == len(sd) // 2
    release = release_entries({"model." + k: v for k, v in entries.items()})
    assert set(release.entries) == set(sd)


@pytest.mark.parametrize("order, prefer, taken", [
    (("model.", "model_ema."), "last", "model_ema."),
    (("model_ema.", "model."), "last", "model."),
    (("model_ema.", "model."), "model_ema", "model_ema."),
    (("model.", "model_ema."), "model", "model."),
])
def test_model_and_ema_copies_take_the_chosen_one_and_say_so(tmp_path, order, prefer, taken):
    copies = {"model.": release_state_dict(seed=1), "model_ema.": release_state_dict(seed=2)}
    entries = {}
    for prefix in order:
        entries.update(wrap(copies[prefix], prefix))
    torch.save(entries, tmp_path / "c.bin")
    release = load_release_checkpoint(tmp_path / "c.bin", prefer=prefer)
    model, _ = build_transformer(release, num_heads=HEADS_TINY)
    assert_holds(model, copies[taken])
    assert release.copies_taken == {taken: len(copies[taken])}
    summary = release.copies_summary()
    assert f"took {taken} for {len(copies[taken])}" in summary
    assert ("as the release does" in summary) == (prefer == "last")


def test_unknown_keys_are_errors_unless_ignored(tmp_path):
    sd = release_state_dict(seed=4)
    sd["blocks.0.self_attn.alpha_3.weight"] = torch.randn(1, SIZE_TINY["dim"])
    sd["step"] = 1200  # training metadata the release would ignore silently
    release = release_entries(wrap(sd, "model_ema."))
    with pytest.raises(LIVEditorError) as info:
        build_transformer(release, num_heads=HEADS_TINY)
    message = str(info.value)
    assert "\n" not in message and "--ignore-unknown-keys" in message
    assert "blocks.0.self_attn.alpha_3.weight" in message and "step" in message
    model, report = build_transformer(release, num_heads=HEADS_TINY, ignore_unknown_keys=True)
    assert report.ignored_unknown == ["blocks.0.self_attn.alpha_3.weight", "step"]
    assert_holds(model, {k: v for k, v in sd.items() if k not in report.ignored_unknown})


def test_lora_entries_are_renamed_as_the_release_does_and_named(tmp_path):
    sd = release_state_dict(seed=5)
    sd["blocks.1.self_attn.q.weight.lora_down"] = torch.randn(4, SIZE_TINY["dim"])
    with pytest.raises(LIVEditorError, match=r"blocks\.1\.self_attn\.q\.lora\._down .*LoRA"):
        build_transformer(release_entries(sd), num_heads=HEADS_TINY)


@pytest.mark.parametrize("damage", ["missing", "shape"])
def test_missing_or_misshaped_weight_is_a_one_line_error(damage):
    sd = release_state_dict(seed=6)
    if damage == "missing":
        del sd["blocks.1.ffn.2.bias"]
        expected = "lacks 1 weight(s) of the model: blocks.1.ffn.net.2.bias"
    else:
        sd["blocks.0.self_attn.alpha_1.weight"] = torch.randn(1, SIZE_TINY["dim"] + 1)
        expected = "blocks.0.attn1.coarse_gate.weight (1, 33) (model: (1, 32))"
    with pytest.raises(LIVEditorError) as info:
        build_transformer(release_entries(sd), num_heads=HEADS_TINY)
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_full_14b_key_list_maps_onto_the_preset():
    """The whole release layout at 14B size, on the meta device: no unknown, missing or mis-shaped key."""
    shapes = release_key_shapes(**SIZE_14B)
    assert len(shapes) == TENSORS_14B
    assert sum(math.prod(s) for s in shapes.values()) == PARAMETERS_14B
    entries = {"model_ema." + WANX + k: torch.empty(s, device="meta") for k, s in shapes.items()}
    model, report = build_transformer(release_entries(entries))  # head count: Wan's 128-wide heads
    preset = MODEL_PRESETS["liveditor-14b"]
    assert {k: model.config[k] for k in preset} == {k: tuple(v) if isinstance(v, list) else v
                                                     for k, v in preset.items()}
    unused = len(UNUSED_PER_BLOCK) * SIZE_14B["layers"]
    assert report.unused == unused and report.loaded == TENSORS_14B - unused
    # Our model is the release minus the unused alphas: 1137 tensors.
    assert report.parameters == PARAMETERS_14B - unused * SIZE_14B["dim"]
    with torch.device("meta"):
        reference = LIVEditorTransformer3DModel.from_preset("liveditor-14b")
    shapes = {k: v.shape for k, v in reference.state_dict().items()}
    assert {k: v.shape for k, v in model.state_dict().items()} == shapes


def test_converted_folder_loads_and_edits(tmp_path, base_folder):
    sd = release_state_dict(seed=7)
    torch.save(wrap(sd, "model.", "state_dict", {"vae.decoder.conv1.weight": torch.randn(2)}), tmp_path / "ckpt.bin")
    report = convert_checkpoint(tmp_path / "ckpt.bin", base_folder, tmp_path / "converted",
                                resolution_buckets=TINY_BUCKETS)
    out = report.out
    assert (out / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    assert not list(out.rglob("*.bin"))
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "LIVEditorPipeline" and index["fps"] == 16.0 and index["max_num_frames"] == 81
    assert index["default_num_inference_steps"] == 32 and index["default_guidance_scale"] == 2.5
    summary = report.summary()
    assert f"ignored {len(UNUSED_PER_BLOCK) * SIZE_TINY['layers']} present-but-unused" in summary
    assert "1 non-model" in summary and "diffusers Wan2.2 folder" in summary

    pipe = load_pipeline(out, dtype=torch.float32)  # fp32 on every device, so the weights compare exactly
    assert_holds(pipe.transformer, sd)
    assert pipe.transformer.isa_config.sharpness == "topk"
    assert pipe.transformer.isa_config.count_rounding == "floor"
    pipe.set_progress_bar_config(disable=True)
    result = pipe(torch.rand(5, 3, 64, 64, generator=torch.Generator().manual_seed(4)), "make it green", num_inference_steps=1, seed=0)
    assert result.frames.shape == (1, 5, 64, 64, 3) and result.frames.std() > 0


def test_refuses_foreign_files_and_never_overwrites(tmp_path, base_folder):
    # Arbitrary objects (here an argparse.Namespace) are refused by the weights-only unpickler.
    torch.save({"model.patch_embedding.weight": argparse.Namespace(code="x")}, tmp_path / "evil.bin")
    with pytest.raises(LIVEditorError, match="weights-only"):
        convert_checkpoint(tmp_path / "evil.bin", base_folder, tmp_path / "out")
    (tmp_path / "junk.bin").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(LIVEditorError, match="cannot load checkpoint"):
        load_release_checkpoint(tmp_path / "junk.bin")
    torch.save({"state_dict": [1, 2]}, tmp_path / "list.bin")
    with pytest.raises(LIVEditorError, match="'state_dict' holds a list"):
        load_release_checkpoint(tmp_path / "list.bin")
    torch.save(release_state_dict(), tmp_path / "c.bin")
    (tmp_path / "exists").mkdir()
    with pytest.raises(LIVEditorError, match="already exists"):
        convert_checkpoint(tmp_path / "c.bin", base_folder, tmp_path / "exists")
    with pytest.raises(LIVEditorError, match="base folder .* does not exist"):
        convert_checkpoint(tmp_path / "c.bin", tmp_path / "no-base", tmp_path / "out")
    (tmp_path / "empty-base").mkdir()
    with pytest.raises(LIVEditorError, match="neither a diffusers Wan2.2 folder"):
        convert_checkpoint(tmp_path / "c.bin", tmp_path / "empty-base", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.bin", "empty-base", "evil.bin", "exists", "junk.bin",
                                                          "list.bin"]  # no temporary folder left behind


def test_convert_cli(tmp_path, base_folder, capsys):
    sd = release_state_dict(seed=8)
    sd["blocks.0.extra.weight"] = torch.randn(3)
    torch.save(wrap(sd, "model_ema."), tmp_path / "c.bin")
    args = ["convert", "--checkpoint", str(tmp_path / "c.bin"), "--base", str(base_folder)]
    assert cli_main(args + ["--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "blocks.0.extra.weight" in err and "--ignore-unknown-keys" in err
    assert not (tmp_path / "out").exists()

    assert cli_main(args + ["--out", str(tmp_path / "out"), "--dtype", "bf16", "--ignore-unknown-keys"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"wrote {tmp_path / 'out'}: transformer: ") and "dropped 1 unknown" in line
    with safe_open(str(tmp_path / "out" / "transformer" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        dtypes = {name: f.get_slice(name).get_dtype() for name in f.keys()}
    # --dtype bf16 was written, except the modules diffusers keeps in fp32 (norms, time embedding, tables).
    keep_fp32 = LIVEditorTransformer3DModel._keep_in_fp32_modules
    assert dtypes["blocks.0.attn1.to_q.weight"] == "BF16"
    assert {name for name, d in dtypes.items() if d != "BF16"} == {
        name for name in dtypes if any(part in keep_fp32 for part in name.split("."))}
    pipe = load_pipeline(tmp_path / "out", device="cpu")
    assert pipe.transformer.blocks[0].attn1.to_q.weight.dtype == torch.float32  # the CPU's default load dtype

    assert cli_main(["convert", "--checkpoint", str(tmp_path / "missing.bin"), "--base", str(base_folder),
                     "--out", str(tmp_path / "out2")]) == 2
    assert "does not exist" in capsys.readouterr().err
