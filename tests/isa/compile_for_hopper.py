"""Compile the Triton kernels ahead of time for sm_90 (no GPU needed); print a JSON report.

Run in a process of its own (the interpreter, TRITON_INTERPRET=1, replaces @triton.jit functions at
import, so this script drops it first):
    python tests/isa/compile_for_hopper.py bf16 14b _fwd_kernel _bwd_dq_kernel
Prints {kernel: {"ok": bool, "wgmma": bool, "error": str}}.
"""

import json
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from liveditor.isa import triton_common, triton_few_keys, triton_sparse  # noqa: E402

INT32_TABLES = ("KEPT", "QORDER", "ELIST", "USERS", "N_USERS", "SELECTED")
FP32_TENSORS = ("LSE", "DELTA", "DKP", "DVP", "DK_PART", "DV_PART")
SCALARS = ("B", "H", "N", "L")
# Tensor-core dots (no upcast, no IEEE fp32), the few-key kernels' 32-key tile, and ISA's tiles of one
# model: the 14B model's (64-token blocks, head dim 128) or the bundled tiny model's (16-token blocks,
# head dim 64). Each kernel takes the constants it declares.
COMMON = dict(UPCAST=False, IEEE=False, BLOCK_P=triton_sparse.POOLED_CHUNK, BLOCK_L=32, BLOCK_SEL=16)
TILES = {"14b": (64, 128), "tiny": (16, 64)}  # block size, head dim
# ISA's kernels compile with the launch options the package gives them at these tiles.
ISA_KERNEL_KINDS = {"_fwd_kernel": "forward", "_bwd_dq_kernel": "dq", "_bwd_dkdv_kernel": "dkdv",
                    "_bwd_pooled_kernel": "pooled"}


def signature(kernel, dtype: str, constexprs: dict) -> dict:
    """Argument types: ALL-CAPS names are pointers (tables int32, the mask uint8, softmax statistics
    and pooled gradients fp32, tensors `dtype`), the others int32 scalars but the two fp32 scales."""
    types = {}
    for name in kernel.arg_names:
        if name in constexprs:
            types[name] = "constexpr"
        elif name.isupper() and name not in SCALARS:
            types[name] = "*" + ("i32" if name in INT32_TABLES else "u8" if name == "EMASK"
                                 else "fp32" if name in FP32_TENSORS else dtype)
        else:
            types[name] = "fp32" if name in ("qk_scale", "scale") else "i32"
    return types


def compile_kernel(name: str, dtype: str, tile: str) -> dict:
    fn = getattr(triton_few_keys if name.startswith("_few_keys") else triton_sparse, name)
    block_size, head_dim = TILES[tile]
    tile_constants = dict(BLOCK_SIZE=block_size, BLOCK_M=triton_common.tile_rows(block_size),
                          BLOCK_D=triton_common.tile_dims(head_dim), HEAD_DIM=head_dim)
    constexprs = {arg: value for arg, value in {**COMMON, **tile_constants}.items() if arg in fn.arg_names}
    if "TO_TOKENS" in fn.arg_names:
        constexprs["TO_TOKENS"] = True
    options = (triton_sparse._launch_options(block_size, head_dim, ISA_KERNEL_KINDS[name]) if name in ISA_KERNEL_KINDS
               else dict(num_warps=8, num_stages=2))
    source = ASTSource(fn=fn, signature=signature(fn, dtype, constexprs), constexprs=constexprs)
    try:
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    except Exception as exc:  # report every kernel's outcome, not only the first failure
        return {"ok": False, "wgmma": False, "error": f"{type(exc).__name__}: {exc}"}
    return {"ok": True, "wgmma": "wgmma" in compiled.asm["ptx"], "error": ""}


if __name__ == "__main__":
    dtype, tile, kernels = sys.argv[1], sys.argv[2], sys.argv[3:]
    print(json.dumps({name: compile_kernel(name, dtype, tile) for name in kernels}))
