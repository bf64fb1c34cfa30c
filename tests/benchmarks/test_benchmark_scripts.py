"""The scripts under benchmarks/ are run by hand on a GPU, so nothing else notices when a refactor
breaks them (bench_train.py imported a class the training loop no longer had for several commits).
These tests import every script and run the training benchmark end to end on a small CPU config."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = sorted((REPO / "benchmarks").glob("*.py"))


def load_script(path: Path):
    """Import a benchmark script as running it does: its folder on sys.path, so siblings import."""
    spec = importlib.util.spec_from_file_location(f"benchmark_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    return module


@pytest.mark.parametrize("path", SCRIPTS, ids=[p.stem for p in SCRIPTS])
def test_benchmark_script_imports(path):
    module = load_script(path)
    assert path.stem == "transformer_step" or callable(getattr(module, "main", None))


@pytest.fixture(scope="module")
def bench_train():
    return load_script(REPO / "benchmarks" / "bench_train.py")


def test_bench_train_times_and_profiles_a_cpu_step(bench_train, tmp_path):
    out = tmp_path / "bench_train.json"
    result = bench_train.main([
        "--config", str(REPO / "configs" / "tiny-shapeedit-cpu.toml"), "--device", "cpu",
        "--attention", "isa", "--compile", "off", "--batch-sizes", "2", "--steps", "1", "--warmup", "1",
        "--pool", "4", "--loader-seconds", "0", "--profile-steps", "1", "--set", "data.num_workers=0",
        "--json", str(out)])
    (row,) = result["rows"]
    assert "error" not in row, row
    assert row["clips_per_s"] > 0 and row["step_s"] > 0 and row["host_s"] > 0
    assert row["alloc_retries"] == 0 and math.isnan(row["peak_reserved_gib"])  # CUDA allocator figures
    profile = row["profile"]
    assert profile["ms_per_step"]["matmul"] > 0 and profile["kernels_per_step"] > 0
    assert sum(profile["ms_per_step"].values()) >= max(t["ms_per_step"] for t in profile["top"])
    assert json.loads(out.read_text())["rows"][0]["clips_per_s"] == row["clips_per_s"]


@pytest.mark.cuda
def test_bench_train_attention_times_every_backend_on_a_small_shape(tmp_path):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    out = tmp_path / "attention.json"
    result = load_script(REPO / "benchmarks" / "bench_train_attention.py").main(
        ["--batch", "2", "--tokens", "256", "--iters", "2", "--json", str(out)])
    rows = result["rows"]
    assert len(rows) == 12 and json.loads(out.read_text())["rows"] == rows
    timed = [r for r in rows if "error" not in r]
    assert {r["backend"] for r in timed} >= {"flash", "efficient"}  # cuDNN may refuse a shape
    assert all(0 < r["fwd_ms"] <= r["fwd_bwd_ms"] for r in timed)


@pytest.mark.parametrize("name, category", [
    ("sm90_xmma_gemm_bf16bf16_bf16f32", "matmul"),
    ("triton_tem_fused_addmm_0", "matmul"),
    ("triton_poi_fused_add_mul_native_layer_norm_3", "fused elementwise (Inductor)"),
    ("_bwd_dkdv_kernel", "attention"),
    ("_unpack_kept_kernel", "attention"),
    ("_few_keys_bwd_kernel", "attention"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop", "attention"),
    ("multi_tensor_apply_kernel<FusedAdamMathFunctor>", "optimizer"),
    ("ncclDevKernel_AllReduce_Sum_f32_RING_LL", "communication"),
    ("aten::copy_", "other"),
])
def test_kernel_categories(bench_train, name, category):
    assert bench_train.kernel_category(name) == category


def test_kernel_bandwidth_joins_profiled_kernels_with_their_bytes(bench_train):
    events = [("triton_poi_fused_add_0", 2_000.0, 16), ("triton_red_fused_sum_1", 1_000.0, 8),
              ("nvjet_sm90_gemm", 5_000.0, 8), ("triton_poi_fused_mul_2", 0.0, 8)]
    kernel_bytes = {"triton_poi_fused_add_0": 1e9, "triton_red_fused_sum_1": 0.5e9, "triton_poi_fused_mul_2": 1e9}
    result = bench_train.kernel_bandwidth(events, kernel_bytes, steps=2)
    names = [k["name"] for k in result["kernels"]]
    assert names == ["triton_poi_fused_add_0", "triton_red_fused_sum_1"]  # no bytes or no time: left out
    add, reduce = result["kernels"]
    assert add["ms_per_step"] == pytest.approx(1.0) and add["calls_per_step"] == 8
    assert add["tb_per_s"] == pytest.approx(16 * 1e9 / 2e-3 / 1e12)  # 8 TB/s
    assert reduce["tb_per_s"] == pytest.approx(8 * 0.5e9 / 1e-3 / 1e12)  # 4 TB/s
    assert result["gb_per_step"] == pytest.approx(8 * 1 + 4 * 0.5)
    assert result["tb_per_s"] == pytest.approx(10 / 1.5)


def test_kernel_bandwidth_option_needs_a_gpu_profile(bench_train, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_train.main(["--device", "cpu", "--kernel-bandwidth", "--profile-steps", "1"])
    assert exit_info.value.code == 2
    assert "--kernel-bandwidth needs a CUDA device" in capsys.readouterr().err
