"""The tiny LIVEditor shipped inside the package."""

import json
from pathlib import Path

import pytest
import torch

from liveditor.pipelines import check_pipeline_folder, default_model_path, load_pipeline

REPO = Path(__file__).resolve().parents[2]


def test_bundled_folder_is_complete_small_and_documented():
    path = check_pipeline_folder(default_model_path())
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert size <= 21 * 2**20
    card = (path / "README.md").read_text()
    for needed in ("ShapeEdit", "H200", "steps", "success", "PSNR", "ISA"):
        assert needed in card
    summary = json.loads((path / "training.json").read_text())
    assert summary["steps"] > 0 and summary["device"].startswith("NVIDIA") and summary["stages"][-1]["steps"] == summary["steps"]
    # Weight files small enough to host anywhere; diffusers reads the shards through the index.
    assert all(f.stat().st_size <= 16 * 10**6 for f in path.rglob("*.safetensors"))


def test_bundled_isa_config_computes_at_most_40_percent_of_dense_flops():
    from liveditor.isa import ISAConfig, isa_attention

    config = json.loads((default_model_path() / "transformer" / "config.json").read_text())
    isa = ISAConfig(**config["isa_config"])
    grid = (16, 8, 8)  # the 64x64 clips' latent grid: one 8x8 frame is 64 tokens
    assert 64 // isa.block_size >= 4  # at least 4 blocks per latent frame
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 2048, 64, generator=generator) for _ in range(3))
    gate = torch.rand(1, 2048, generator=generator)
    _, info = isa_attention(q, k, v, 1024, isa, gate=gate, grid=grid, return_info=True, backend="torch")
    assert info.flop_fraction <= 0.40


def test_bundled_architecture_matches_the_shipped_config():
    # So that `liveditor train --config configs/tiny-shapeedit.toml --set train.init_from=...` continues it.
    from liveditor.models import LIVEditorTransformer3DModel
    from liveditor.training import build_components, load_config

    config = load_config(REPO / "configs" / "tiny-shapeedit.toml")
    _, text_encoder, codec, transformer = build_components(config)
    shipped_model = LIVEditorTransformer3DModel.from_pretrained(default_model_path(), subfolder="transformer")
    assert shipped_model.isa_config.block_size == config.model.isa["block_size"]
    shipped = shipped_model.state_dict()
    ours = transformer.state_dict()
    assert shipped.keys() == ours.keys()
    assert all(shipped[k].shape == ours[k].shape for k in ours)


def test_bundled_sampling_defaults_are_the_recipes():
    # The benchmarked settings (guidance 2: docs/benchmarks.md) are what `liveditor edit` uses, and
    # a stage trained from the recipe exports the same.
    from liveditor.training import load_config

    export = load_config(REPO / "configs" / "tiny-shapeedit.toml").export
    index = json.loads((default_model_path() / "model_index.json").read_text())
    assert (index["default_num_inference_steps"], index["default_guidance_scale"]) == (
        export.num_inference_steps, export.guidance_scale)
    assert index["default_guidance_scale"] > 1.0  # CFG on: the instruction-dropout training supports it


@pytest.fixture(scope="module")
def bundled():
    pipe = load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_bundled_model_has_learned_the_edit(bundled):
    """From a half-noised target, the model's clean-video estimate is much closer to the target
    than the input video is (a random model scores far below the input)."""
    from liveditor.data.shapes import generate_example
    from liveditor.eval.metrics import psnr
    from liveditor.training import encode_instructions

    pipe = bundled
    example = generate_example(2, "test", "background")  # the input is far from the target here
    source = torch.from_numpy(example.source).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
    target = torch.from_numpy(example.target).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
    context = pipe.encode_video(source)
    x0 = pipe.encode_video(target)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    t = 0.5
    with torch.no_grad():
        text = encode_instructions(pipe.tokenizer, pipe.text_encoder, [example.instruction], pipe.config.max_sequence_length)
        flow = pipe.transformer((1 - t) * x0 + t * noise, torch.tensor([t * 1000]), text, context).sample
    estimate = pipe.decode_latents((1 - t) * x0 + t * noise - t * flow)[0].permute(1, 2, 3, 0)
    estimate = ((estimate.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    assert psnr(estimate, example.target) > psnr(example.source, example.target) + 5.0
