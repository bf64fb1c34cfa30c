"""Single-GPU acceleration: regional compile (no graph breaks with ISA), FP8 layer selection and
error report, offload modes and group offloading on a tiny pipeline."""

import sys

import numpy as np
import pytest
import torch

from liveditor.errors import LIVEditorError, MissingDependencyError
from liveditor.models import LIVEditorTransformer3DModel
from liveditor.pipelines.acceleration import (
    FP8ErrorReport,
    LinearSampler,
    compile_transformer,
    enable_fp8,
    fp8_config,
    enable_offload,
    fp8_linear_names,
    is_fp8_linear,
    linear_errors,
    measure_fp8_error,
    relative_l2,
)
from liveditor.pipelines.loading import load_pipeline, parse_offload
from tiny_models import tiny_pipeline

BLOCK_LINEARS = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                 "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ffn.net.0.proj", "ffn.net.2"]


def _tiny_model(seed, num_layers=3, **overrides):
    torch.manual_seed(seed)
    return LIVEditorTransformer3DModel.from_preset("liveditor-tiny", num_layers=num_layers, **overrides).eval()


def _inputs(seed, frames=3, size=8, text=5):
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(1, 4, frames, size, size, generator=g)
    context = torch.randn(1, 4, frames, size, size, generator=g)
    return latent, torch.tensor([700.0]), torch.randn(1, text, 32, generator=g), context


# ----- compile -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode,seed", [("isa", 0), ("isa", 1), ("dense", 2), ("isa-triton", 3)])
def test_regional_compile_has_no_graph_break_and_one_graph_for_all_blocks(mode, seed, monkeypatch):
    from torch._dynamo.utils import counters

    if mode == "isa-triton":  # the GPU's path (custom ops, fake kernels); on a CPU, Triton's interpreter
        pytest.importorskip("triton")
        import liveditor.isa.api as isa_api

        resolve = isa_api.resolve_backend
        monkeypatch.setattr(isa_api, "resolve_backend", lambda backend, q, config: resolve("triton", q, config))
    import liveditor.isa.dispatch as dispatch

    monkeypatch.setattr(dispatch, "_fallbacks_logged", set())  # a fresh process: nothing logged yet
    model = _tiny_model(seed, attention=mode.removesuffix("-triton"))
    inputs = _inputs(seed, size=16 if mode == "isa-triton" else 8)
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        # fullgraph=True raises on any graph break; aot_eager traces through AOTAutograd (fake
        # kernels included) without inductor's code generation, in seconds.
        compile_transformer(model, backend="aot_eager")
        compiled = model(*inputs, return_dict=False)[0]
        again = model(*inputs, return_dict=False)[0]
        reference = _tiny_model(seed, attention=mode.removesuffix("-triton"))(*inputs, return_dict=False)[0]
    assert counters["stats"]["unique_graphs"] == 1, (seed, dict(counters["stats"]))  # 3 blocks, one graph
    torch.testing.assert_close(compiled, reference, msg=f"seed {seed}")
    torch.testing.assert_close(again, reference, msg=f"seed {seed}")
    torch._dynamo.reset()


# ----- FP8 -----------------------------------------------------------------------------------


def test_fp8_converts_the_block_projections_and_ffn_only():
    model = _tiny_model(0, num_layers=2)
    names = fp8_linear_names(model)
    assert names == [f"blocks.{i}.{n}" for i in range(2) for n in BLOCK_LINEARS]
    linears = {name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    left = linears - set(names)
    assert {"blocks.0.attn1.coarse_gate", "blocks.1.attn1.coarse_gate", "proj_out"} <= left
    assert any(name.startswith("condition_embedder.") for name in left)
    assert not is_fp8_linear(model.patch_embedding, "patch_embedding")
    assert not is_fp8_linear(model.blocks[0].attn1, "blocks.0.attn1")  # a Linear is needed, not a name


def test_fp8_selection_through_torchaos_filter_fn():
    """The same filter drives torchao's quantize_: with a config that runs on the CPU (int8 weights),
    exactly the selected linears have their weight replaced."""
    quantization = pytest.importorskip("torchao.quantization")
    model = _tiny_model(1, num_layers=2)
    before = {name: type(m.weight) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    quantization.quantize_(model, quantization.Int8WeightOnlyConfig(), filter_fn=is_fp8_linear)
    changed = {name for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and type(m.weight) is not before[name]}
    assert changed == set(fp8_linear_names(model))


def test_fp8_needs_an_fp8_gpu_and_names_the_extra_when_torchao_is_missing(monkeypatch):
    model = _tiny_model(0, num_layers=1)
    if not torch.cuda.is_available():
        # The device is checked first, with or without torchao: installing it would not help.
        for torchao in (sys.modules.get("torchao"), None):
            monkeypatch.setitem(sys.modules, "torchao", torchao)
            with pytest.raises(LIVEditorError, match="compute capability 8.9") as info:
                enable_fp8(model)
            assert "\n" not in str(info.value)
    monkeypatch.setitem(sys.modules, "torchao", None)  # import torchao -> ImportError
    with pytest.raises(MissingDependencyError, match=r"pip install 'liveditor\[fp8\]'") as info:
        fp8_config()  # what enable_fp8 builds on an FP8 GPU
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("seed", [0, 3])
def test_linear_sampler_reports_the_error_of_the_changed_layer_only(seed):
    model = _tiny_model(seed, num_layers=2)
    names = fp8_linear_names(model)
    inputs = _inputs(seed)
    with torch.no_grad(), LinearSampler(model, names, rows=16, seed=seed) as sampler:
        model(*inputs)
        model(*inputs)  # only the first call of each layer is kept
    assert set(sampler.samples) == set(names)
    x, y = sampler.samples["blocks.0.ffn.net.2"]
    assert x.shape == (16, 64) and y.shape == (16, 32)  # ffn_dim 64 -> dim 2 heads * 16
    text_x, _ = sampler.samples["blocks.1.attn2.to_k"]
    assert text_x.shape == (5, 32)  # fewer text tokens than rows: all of them
    assert all(not m._forward_hooks for m in model.modules())  # hooks removed on exit
    with torch.no_grad():
        target = model.blocks[1].attn1.to_v.weight
        target.add_(0.01 * torch.randn(target.shape, generator=torch.Generator().manual_seed(seed)))
    errors = linear_errors(model, sampler.samples)
    assert errors["blocks.1.attn1.to_v"] > 1e-3, seed
    # The others: float32 rounding only (a GEMM over fewer rows may sum in another order).
    assert max(v for k, v in errors.items() if k != "blocks.1.attn1.to_v") < 1e-6, seed
    report = FP8ErrorReport(layers=errors, output=0.5)
    assert report.worst_layer == "blocks.1.attn1.to_v" and report.median_layer < 1e-6
    assert "whole output 0.5000" in report.summary()


def test_relative_l2():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(100, generator=g)
    assert relative_l2(a, a) == 0.0
    assert relative_l2(1.1 * a, a) == pytest.approx(0.1, rel=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("seed", [0, 1])
def test_fp8_error_against_bf16_is_small_on_the_gpu(seed):
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("needs compute capability 8.9+")
    model = _tiny_model(seed, num_layers=2).to("cuda", torch.bfloat16)
    inputs = [t.to("cuda", torch.bfloat16) if t.dim() > 1 else t.cuda() for t in _inputs(seed, size=16)]
    with torch.no_grad():
        report = measure_fp8_error(model, lambda: model(*inputs, return_dict=False)[0], rows=64)
    assert set(report.layers) == set(fp8_linear_names(model))
    assert 0 < report.max_layer < 0.1, (seed, report.summary())
    assert 0 < report.output < 0.1, (seed, report.summary())


# ----- offloading ----------------------------------------------------------------------------


def test_offload_modes_parse():
    assert parse_offload(None) is None and parse_offload(False) is None
    assert parse_offload(True) == "model"
    for mode in ("model", "group", "sequential"):
        assert parse_offload(mode) == mode
    with pytest.raises(LIVEditorError, match="one of model, group, sequential"):
        parse_offload("disk")


def test_cli_offload_flag_bare_means_model():
    from liveditor.cli import build_parser

    base = ["edit", "in.mp4", "make it red", "-o", "out.mp4"]
    parser = build_parser()
    assert parser.parse_args(base).offload is None
    assert parser.parse_args(base + ["--offload"]).offload == "model"
    assert parser.parse_args(base + ["--offload", "group"]).offload == "group"
    args = parser.parse_args(base + ["--offload", "sequential", "--compile", "--fp8"])
    assert (args.offload, args.compile, args.fp8) == ("sequential", True, True)
    assert not parser.parse_args(base).compile and not parser.parse_args(base).fp8
    with pytest.raises(SystemExit):
        parser.parse_args(base + ["--offload", "disk"])
    with pytest.raises(SystemExit):  # a bare --offload takes the next word as its mode
        parser.parse_args(["edit", "--offload", "in.mp4", "x", "-o", "o.mp4"])


def test_offload_and_fp8_on_the_cpu_are_one_line_errors():
    with pytest.raises(LIVEditorError, match="--offload needs a CUDA device"):
        load_pipeline(device="cpu", offload="group")
    for mode in ("group", "sequential"):  # their hooks would run the blocks outside the compiled graph
        with pytest.raises(LIVEditorError, match=f"--compile cannot be combined with --offload {mode}"):
            load_pipeline(device="cpu", offload=mode, compile=True)
    with pytest.raises(LIVEditorError, match="--fp8 cannot be combined with --offload"):
        load_pipeline(device="cpu", offload="model", fp8=True)
    if not torch.cuda.is_available():
        with pytest.raises(LIVEditorError, match="--fp8 needs a CUDA GPU"):
            load_pipeline(device="cpu", fp8=True)


def _frames(seed):
    g = np.random.default_rng(seed)
    return g.integers(0, 256, size=(5, 64, 64, 3), dtype=np.uint8)


def _group_hooked(module) -> bool:
    from diffusers.hooks import HookRegistry

    return HookRegistry.check_if_exists_or_initialize(module).get_hook("group_offloading") is not None


def _edit(pipe, seed):
    return pipe(_frames(seed), "make it red", num_inference_steps=2, guidance_scale=2.0, seed=seed).frames


@pytest.mark.parametrize("mode,seed", [("group", 0), ("model", 1), ("sequential", 2)])
def test_offload_modes_hook_the_components_and_keep_the_output(mode, seed):
    """Every mode applies its hooks and leaves the edit unchanged, here with the CPU as the onload
    device (no streams). Sequential offload's output is compared on a GPU only: with the CPU as
    execution device, accelerate turns the umT5 encoder's tied embedding into a plain tensor and
    fails on it."""
    plain = tiny_pipeline(seed=seed)
    plain.set_progress_bar_config(disable=True)
    expected = _edit(plain, seed)

    pipe = tiny_pipeline(seed=seed)
    pipe.set_progress_bar_config(disable=True)
    enable_offload(pipe, mode, "cpu")
    if mode == "group":
        assert all(_group_hooked(block) for block in pipe.transformer.blocks), seed
        for component in (pipe.text_encoder, pipe.vae):
            assert any(_group_hooked(m) for m in component.modules()), (seed, type(component).__name__)
    elif mode == "model":  # one hook per component, chained text encoder -> transformer -> VAE
        for component in (pipe.text_encoder, pipe.transformer, pipe.vae):
            assert type(component._hf_hook).__name__ == "CpuOffload", seed
        assert not any(_group_hooked(m) for m in pipe.transformer.modules())
    else:  # a hook on every leaf that holds weights
        assert hasattr(pipe.transformer.blocks[0].attn1.to_q, "_hf_hook"), seed
        assert hasattr(pipe.transformer.blocks[-1].ffn.net[2], "_hf_hook"), seed
    assert pipe._execution_device.type == "cpu"
    if mode != "sequential":
        np.testing.assert_allclose(_edit(pipe, seed), expected, rtol=0, atol=1e-6, err_msg=f"{mode}, seed {seed}")


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["model", "group", "sequential"])
def test_offload_modes_on_the_gpu_keep_the_output(mode):
    seed = 3
    plain = tiny_pipeline(seed=seed).to("cuda")
    plain.set_progress_bar_config(disable=True)
    expected = _edit(plain, seed)
    pipe = tiny_pipeline(seed=seed)
    pipe.set_progress_bar_config(disable=True)
    enable_offload(pipe, mode, "cuda")
    assert pipe._execution_device.type == "cuda"
    np.testing.assert_allclose(_edit(pipe, seed), expected, rtol=0, atol=1e-5, err_msg=mode)


# ----- command line --------------------------------------------------------------------------


def test_cli_edit_with_compile_writes_the_video_of_the_uncompiled_edit(tmp_path, capsys, monkeypatch):
    """`edit --compile` runs compiled blocks end to end (the attention timer, which would break the
    graph, is off) and gives the uncompiled edit. Traced with aot_eager (fullgraph as always) to
    stay quick; inductor's code generation is the benchmark's part."""
    import liveditor.pipelines.acceleration as acceleration
    from liveditor.cli import main as cli_main
    from liveditor.data.video_io import read_video, write_video

    compile_blocks = acceleration.compile_transformer
    monkeypatch.setattr(acceleration, "compile_transformer", lambda t: compile_blocks(t, backend="aot_eager"))

    model = tmp_path / "tiny"
    tiny_pipeline(seed=0).save_pretrained(model)
    video = write_video(tmp_path / "in.mp4", _frames(4)[:, :48, :48], fps=16)
    args = [video, "make the ball blue", "--model", model, "--steps", "2", "--seed", "3", "--device", "cpu"]
    torch._dynamo.reset()
    assert cli_main(["edit", *map(str, args), "-o", str(tmp_path / "eager.mp4")]) == 0
    assert "% of the edit" in capsys.readouterr().out
    assert cli_main(["edit", *map(str, args), "-o", str(tmp_path / "compiled.mp4"), "--compile"]) == 0
    assert "attention (isa) time not measured (compiled blocks)" in capsys.readouterr().out
    eager, compiled = read_video(tmp_path / "eager.mp4").frames, read_video(tmp_path / "compiled.mp4").frames
    assert eager.shape == compiled.shape
    assert np.abs(eager.astype(int) - compiled.astype(int)).mean() < 1.0  # rounding, through the H.264 codec
    torch._dynamo.reset()
