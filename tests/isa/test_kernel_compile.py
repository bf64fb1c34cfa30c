"""The kernels' tensor-core branch compiles for Hopper, on a machine without a GPU.

Triton's interpreter (CPU CI) runs every tl.dot on fp32 copies, so the bf16/fp16 branch the GPU
runs (UPCAST=False) and the compiler's own rules (only constexpr globals in kernels, operand
dtypes of tl.dot) are never exercised there. Compiling each attention kernel (ISA's and the
few-key cross-attention's) ahead of time for sm_90 in bf16 (fp16 takes the same branch), in a
process without the interpreter, checks both, and that the row-moving kernels compile at all. ISA's
kernels compile at the 14B model's tiles and at the bundled tiny model's, with the launch options the
package gives each (Triton's type rules can fail at one tile shape only);
test_isa_gpu.py and test_few_keys.py (on a GPU) check what the kernels compute.
"""

import json
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
from packaging.version import Version  # noqa: E402
from python_process import child_env, run_python  # noqa: E402

ISA_KERNELS = ("_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel", "_bwd_pooled_kernel")
KERNELS = ISA_KERNELS + ("_few_keys_fwd_kernel", "_few_keys_bwd_kernel")
MOVE_KERNELS = ("_move_rows_kernel", "_pack_kept_kernel", "_unpack_kept_kernel")  # no dot products

pytestmark = pytest.mark.skipif(Version(triton.__version__) < Version("3.9"),
                                reason="ahead-of-time compile uses the signature format of Triton >= 3.9")


def compile_report(dtype: str, tile: str, kernels) -> dict:
    script = Path(__file__).with_name("compile_for_hopper.py")
    result = run_python(str(script), dtype, tile, *kernels, env=child_env(drop=("TRITON_INTERPRET",)), timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module", params=["bf16"])
def compiled(request):
    """Every kernel at the 14B model's tiles."""
    return request.param, compile_report(request.param, "14b", KERNELS + MOVE_KERNELS)


@pytest.fixture(scope="module")
def compiled_tiny():
    """ISA's kernels at the bundled tiny model's tiles, with the launch options it trains and edits with."""
    return compile_report("bf16", "tiny", ISA_KERNELS)


@pytest.mark.parametrize("kernel", KERNELS)
def test_tensor_core_branch_compiles_for_sm90(compiled, kernel):
    dtype, report = compiled
    assert report[kernel]["ok"], f"{kernel} ({dtype}): {report[kernel]['error'][:2000]}"
    assert report[kernel]["wgmma"], f"{kernel} ({dtype}): no Hopper tensor-core instruction (wgmma) in the PTX"


@pytest.mark.parametrize("kernel", ISA_KERNELS)
def test_tiny_model_tiles_compile_for_sm90(compiled_tiny, kernel):
    # One-warp 16-row tiles use mma.sync, not wgmma: only that they compile is asserted.
    assert compiled_tiny[kernel]["ok"], f"{kernel} (tiny): {compiled_tiny[kernel]['error'][:2000]}"


@pytest.mark.parametrize("kernel", MOVE_KERNELS)
def test_row_moving_kernels_compile_for_sm90(compiled, kernel):
    dtype, report = compiled
    assert report[kernel]["ok"], f"{kernel} ({dtype}): {report[kernel]['error'][:2000]}"
