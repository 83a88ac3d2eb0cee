"""Kernel families: each ``ops/<name>/`` holds a PyTorch reference and a Triton fast path.

The public functions are imported here eagerly: a lazy ``__getattr__`` would be shadowed by the subpackage of the
same name (``tilewise.ops.hadamard``) once that is imported. No op module imports Triton at import time; each loads
its ``triton.py`` only when the Triton backend runs.
"""

from tilewise.ops.block_sparse_attention import block_sparse_attention, select_blocks
from tilewise.ops.blockquant import dequantize_blockwise, quantize_blockwise
from tilewise.ops.fft_conv import fft_conv
from tilewise.ops.hadamard import hadamard
from tilewise.ops.linear_attention import linear_attention, linear_attention_step

__all__ = [
    "block_sparse_attention",
    "dequantize_blockwise",
    "fft_conv",
    "hadamard",
    "linear_attention",
    "linear_attention_step",
    "quantize_blockwise",
    "select_blocks",
]
