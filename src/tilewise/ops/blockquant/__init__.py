"""Block-wise quantize / dequantize kernels: one absmax scale per block, codes into a small sorted codebook.

The spec is ``reference.py`` (and README.md beside it); ``triton.py`` is the fused GPU path and equals it bit for
bit. Most users want the typed wrapper :func:`tilewise.quant.quantize`; these are the raw ops it calls.
"""

from __future__ import annotations

import torch

from tilewise._backend import resolve_backend
from tilewise.ops.blockquant.reference import (
    dequantize_blockwise_ref,
    midpoints,
    pack_nibbles,
    quantize_blockwise_ref,
    unpack_nibbles,
)

__all__ = [
    "dequantize_blockwise",
    "midpoints",
    "pack_nibbles",
    "quantize_blockwise",
    "unpack_nibbles",
]

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MIN_BLOCK, MAX_BLOCK = 32, 4096


def check_block_size(block_size: int) -> None:
    """Raise ``ValueError`` unless ``block_size`` is a power of two in [32, 4096]."""
    ok = isinstance(block_size, int) and not isinstance(block_size, bool)
    if not ok or not MIN_BLOCK <= block_size <= MAX_BLOCK or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two between {MIN_BLOCK} and {MAX_BLOCK}, got {block_size!r}")


def _check_code(code: torch.Tensor, bits: int) -> None:
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits!r}")
    if code.ndim != 1 or not 2 <= code.numel() <= 2**bits:
        raise ValueError(f"a {bits}-bit codebook is a 1-D tensor of 2..{2**bits} values, got shape {tuple(code.shape)}")


def quantize_blockwise(
    x: torch.Tensor,
    code: torch.Tensor,
    block_size: int = 256,
    *,
    bits: int = 8,
    stochastic: bool = False,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    check_finite: bool = True,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` (any shape, fp32/fp16/bf16, read flat: ``n`` elements) onto the sorted codebook ``code [K]``.

    Returns ``(codes, scales)``: ``uint8 [n]`` (8-bit) or packed ``uint8 [ceil(n/2)]`` (4-bit, first element in
    the high nibble), and fp32 absmax scales ``[ceil(n / block_size)]``. Nearest rounding by default (ties to the
    lower code); ``stochastic=True`` rounds unbiasedly (``generator`` drives the reference, ``seed`` the kernel).
    NaN/inf in ``x`` raise ``ValueError``; the check waits for the result (a device sync), so ``check_finite=False``
    skips it for callers that know their input is finite (a non-finite block then gets a non-finite scale).

    Example:
        >>> import torch
        >>> from tilewise.ops import quantize_blockwise
        >>> from tilewise.quant import codebook
        >>> x = torch.randn(1000, generator=torch.Generator().manual_seed(0))
        >>> codes, scales = quantize_blockwise(x, codebook("int8"), 256)
        >>> codes.dtype, codes.shape, scales.shape  # one code per element, one scale per block of 256
        (torch.uint8, torch.Size([1000]), torch.Size([4]))
        >>> torch.equal(scales[:3], x[:768].view(3, 256).abs().amax(dim=1))  # the scale is the block's absmax
        True
        >>> codes4, _ = quantize_blockwise(x, codebook("nf4"), 64, bits=4)
        >>> codes4.shape  # 4-bit codes packed two per byte
        torch.Size([500])
    """
    if not isinstance(x, torch.Tensor) or x.dtype not in FLOAT_DTYPES:
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"quantize: x must be a float32/float16/bfloat16 tensor, got {got}")
    check_block_size(block_size)
    _check_code(code, bits)
    x = x.contiguous()
    chosen = resolve_backend(backend, x)
    if not stochastic:
        # the registered op under torch.compile; eager calls skip its dispatch (~0.1 ms of host time per call)
        op = torch.ops.tilewise.quantize_blockwise if torch.compiler.is_compiling() else _quantize_impl
        return op(x, code, block_size, bits, check_finite, chosen)
    if chosen == "triton":
        from tilewise.ops.blockquant.triton import quantize_blockwise_triton

        if seed is None:
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator).item())
        return quantize_blockwise_triton(
            x, code, block_size, bits=bits, stochastic=True, seed=seed, check_finite=check_finite
        )
    return quantize_blockwise_ref(
        x, code, block_size, bits=bits, stochastic=True, generator=generator, check_finite=check_finite
    )


def dequantize_blockwise(
    codes: torch.Tensor,
    scales: torch.Tensor,
    code: torch.Tensor,
    block_size: int,
    numel: int,
    *,
    bits: int = 8,
    dtype: torch.dtype = torch.float32,
    backend: str = "auto",
) -> torch.Tensor:
    """Rebuild the flat tensor ``[numel]`` from ``codes`` and ``scales`` (see :func:`quantize_blockwise`).

    Example:
        >>> import torch
        >>> from tilewise.ops import dequantize_blockwise, quantize_blockwise
        >>> from tilewise.quant import codebook
        >>> x = torch.randn(1000, generator=torch.Generator().manual_seed(0))
        >>> code = codebook("int8")  # the 255 values i / 127
        >>> codes, scales = quantize_blockwise(x, code, 256)
        >>> y = dequantize_blockwise(codes, scales, code, 256, x.numel())
        >>> y.shape, y.dtype
        (torch.Size([1000]), torch.float32)
        >>> step = scales.repeat_interleave(256)[:1000] / 127  # each element's codebook step
        >>> bool(((y - x).abs() <= step / 2 + 1e-6).all())  # nearest rounding: off by at most half a step
        True
        >>> dequantize_blockwise(codes, scales, code, 256, x.numel(), dtype=torch.bfloat16).dtype
        torch.bfloat16
    """
    check_block_size(block_size)
    _check_code(code, bits)
    if codes.dtype != torch.uint8:
        raise TypeError(f"dequantize: codes must be uint8, got {codes.dtype}")
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dequantize: dtype must be float32/float16/bfloat16, got {dtype}")
    need_codes = (numel + 1) // 2 if bits == 4 else numel
    need_scales = -(-numel // block_size)
    if codes.numel() < need_codes or scales.numel() < need_scales:
        raise ValueError(
            f"dequantize: {numel} elements need {need_codes} code bytes and {need_scales} scales, "
            f"got {codes.numel()} and {scales.numel()}"
        )
    codes, scales = codes.contiguous(), scales.contiguous().to(torch.float32)
    chosen = resolve_backend(backend, codes, scales)
    op = torch.ops.tilewise.dequantize_blockwise if torch.compiler.is_compiling() else _dequantize_impl
    return op(codes, scales, code, block_size, numel, bits, dtype, chosen)


# torch.library ops, so torch.compile keeps them as single opaque nodes instead of breaking the graph. The public
# functions above validate and pick the backend; these run it. Stochastic rounding (it takes a torch.Generator)
# stays outside the op.
def _quantize_impl(
    x: torch.Tensor, code: torch.Tensor, block_size: int, bits: int, check_finite: bool, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    if backend == "triton":
        from tilewise.ops.blockquant.triton import quantize_blockwise_triton

        # the codebook goes as it is: the kernel's lookup tables are cached per codebook, a CPU one by contents
        return quantize_blockwise_triton(x, code, block_size, bits=bits, check_finite=check_finite)
    codes, scales = quantize_blockwise_ref(x, code, block_size, bits=bits, check_finite=check_finite)
    return codes.clone() if codes._base is not None else codes, scales  # an op's outputs may not be views


_quantize_op = torch.library.custom_op("tilewise::quantize_blockwise", _quantize_impl, mutates_args=())


@_quantize_op.register_fake
def _(x, code, block_size, bits, check_finite, backend):
    n = x.numel()
    codes = x.new_empty(n if bits == 8 else (n + 1) // 2, dtype=torch.uint8)
    return codes, x.new_empty(-(-n // block_size), dtype=torch.float32)


def _dequantize_impl(
    codes: torch.Tensor,
    scales: torch.Tensor,
    code: torch.Tensor,
    block_size: int,
    numel: int,
    bits: int,
    dtype: torch.dtype,
    backend: str,
) -> torch.Tensor:
    if backend == "triton":
        from tilewise.ops.blockquant.triton import dequantize_blockwise_triton

        return dequantize_blockwise_triton(codes, scales, code, block_size, numel, bits=bits, dtype=dtype)
    return dequantize_blockwise_ref(codes, scales, code, block_size, numel, bits=bits, dtype=dtype)


_dequantize_op = torch.library.custom_op("tilewise::dequantize_blockwise", _dequantize_impl, mutates_args=())


@_dequantize_op.register_fake
def _(codes, scales, code, block_size, numel, bits, dtype, backend):
    return codes.new_empty(numel, dtype=dtype)
