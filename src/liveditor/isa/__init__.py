"""In-context Sparse Attention (ISA): the operator.

    from liveditor.isa import ISAConfig, isa_attention, dense_attention
    out = isa_attention(q, k, v, num_source=L_src, config=ISAConfig())
"""

from .api import coarse_residual, dense_attention, few_key_attention, isa_attention
from .config import ISAConfig, ISAInfo
from .dense_kernels import dense_kernel_choices, dense_kernel_setting, set_dense_kernel

__all__ = [
    "ISAConfig",
    "ISAInfo",
    "coarse_residual",
    "dense_attention",
    "dense_kernel_choices",
    "dense_kernel_setting",
    "few_key_attention",
    "isa_attention",
    "set_dense_kernel",
]
