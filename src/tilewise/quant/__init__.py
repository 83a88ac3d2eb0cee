"""Block-wise quantization: codebooks, the ``QuantizedTensor`` type and :func:`quantize`.

Example:
    >>> import torch
    >>> import tilewise
    >>> _ = torch.manual_seed(0)
    >>> w = torch.randn(256, 256, dtype=torch.bfloat16)
    >>> q = tilewise.quant.quantize(w, "nf4", block_size=64, double_quant=True)
    >>> round(q.nbytes / (w.numel() * w.element_size()), 2)  # of bf16's bytes
    0.26
    >>> w_hat = q.dequantize()
    >>> w_hat.dtype, w_hat.shape
    (torch.bfloat16, torch.Size([256, 256]))
    >>> bool((w_hat - w).float().norm() / w.float().norm() < 0.1)  # relative error
    True
"""

from __future__ import annotations

import torch

from tilewise.ops.blockquant import check_block_size, quantize_blockwise
from tilewise.quant.codebooks import _build as _codebook_table  # cached, shared: read only
from tilewise.quant.codebooks import codebook, codebook_bits, codebook_names
from tilewise.quant.tensor import SCALE_BLOCK, SCALE_CODEBOOK, QuantizedTensor

__all__ = ["QuantizedTensor", "codebook", "codebook_bits", "codebook_names", "quantize"]


def quantize(
    x: torch.Tensor,
    codebook: str = "int8",
    block_size: int = 256,
    *,
    rotate: bool = False,
    stochastic: bool = False,
    double_quant: bool = False,
    generator: torch.Generator | None = None,
    check_finite: bool = True,
    backend: str = "auto",
) -> QuantizedTensor:
    """Quantize ``x`` block by block: one fp32 absmax scale per ``block_size`` consecutive elements (of the
    flattened tensor) and a code per element into the named codebook (see :func:`codebook`).

    Args:
        x: a float32/float16/bfloat16 tensor of any shape (empty and one-element tensors too).
        codebook: codebook name, e.g. ``"int8"``, ``"dynamic8"``, ``"nf4"``, ``"fp4"``, ``"fp8_e4m3"``.
        block_size: elements per scale, a power of two in [32, 4096].
        rotate: multiply each block by the orthonormal Hadamard matrix first, spreading outliers over the block
            (the input is zero-padded to a whole number of blocks; ``dequantize`` undoes it).
        stochastic: round to one of the two neighbouring codebook values at random, unbiased, instead of the
            nearest one (``generator`` seeds it).
        double_quant: also quantize the scales (dynamic8 codes in blocks of 256 around their mean, as in QLoRA),
            0.5 -> ~0.127 bits per element at block 64.
        check_finite: raise ``ValueError`` on NaN/inf in ``x`` (default). The check waits for the kernel (one
            device sync per call); pass ``False`` where the input is known finite and the sync matters. A
            non-finite element then leaves its block's scale NaN/inf, which dequantizes to NaN/inf.
        backend: ``"auto"`` (Triton on CUDA tensors when available), ``"triton"`` or ``"reference"``.

    Returns:
        A :class:`QuantizedTensor`; ``.dequantize()`` rebuilds ``x``'s shape and dtype.

    Raises:
        TypeError: ``x`` is not a floating-point tensor of a supported dtype.
        ValueError: unknown codebook, bad block size, or ``x`` contains NaN or inf.

    Example:
        More bits per element, less error; ``double_quant`` shrinks the scales' share:

        >>> import torch
        >>> from tilewise.quant import quantize
        >>> _ = torch.manual_seed(0)
        >>> x = torch.randn(64, 256)
        >>> def report(q):  # bits per element; relative error below 1%, below 10%
        ...     error = float((q.dequantize() - x).norm() / x.norm())
        ...     return round(q.nbytes * 8 / x.numel(), 3), error < 0.01, error < 0.1
        >>> report(quantize(x, "int8"))
        (8.125, True, True)
        >>> report(quantize(x, "nf4", block_size=64))
        (4.5, False, True)
        >>> report(quantize(x, "nf4", block_size=64, double_quant=True))
        (4.129, False, True)

        Non-finite input is refused:

        >>> quantize(torch.tensor([1.0, float("nan")]))
        Traceback (most recent call last):
        ...
        ValueError: quantize: x contains NaN or inf (first at flat index 1); clean or mask it before quantizing
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"quantize: x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"quantize: x has integer dtype {x.dtype}; only float32, float16 and bfloat16 can be quantized")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"quantize: x has dtype {x.dtype}; convert it to float32, float16 or bfloat16 first")
    bits = codebook_bits(codebook)  # raises ValueError for an unknown name
    check_block_size(block_size)
    values = _codebook_table(codebook)
    data = _rotate_blocks(x, block_size, backend) if rotate else x
    try:
        codes, scales = quantize_blockwise(
            data, values, block_size, bits=bits, stochastic=stochastic, generator=generator,
            check_finite=check_finite, backend=backend,
        )  # fmt: skip
    except ValueError as err:
        if "NaN or inf" not in str(err):
            raise
        bad = torch.nonzero(~torch.isfinite(x.reshape(-1)))
        where = f" (first at flat index {int(bad[0])})" if bad.numel() else ""
        raise ValueError(f"quantize: x contains NaN or inf{where}; clean or mask it before quantizing") from None
    fields = {"scales": scales}
    if double_quant:
        fields = _quantize_scales(scales, backend)
    return QuantizedTensor(
        codes=codes, codebook=codebook, block_size=block_size, shape=x.shape, dtype=x.dtype, rotate=rotate, **fields
    )


def _rotate_blocks(x: torch.Tensor, block_size: int, backend: str) -> torch.Tensor:
    """``x`` flattened, zero-padded to whole blocks, each block multiplied by the Hadamard matrix; fp32 ``[nb, bs]``."""
    from tilewise.ops import hadamard

    flat = x.reshape(-1).to(torch.float32)
    pad = -flat.numel() % block_size
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return hadamard(flat.view(-1, block_size), backend=backend)


def _quantize_scales(scales: torch.Tensor, backend: str) -> dict[str, torch.Tensor]:
    """QLoRA's double quantization: ``scales - mean`` as dynamic8 codes in blocks of 256. The mean is taken in
    float64 so that every backend rounds it to the same fp32 number."""
    offset = scales.to(torch.float64).mean().to(torch.float32).reshape(1) if scales.numel() else scales.new_zeros(1)
    codes, scale_scales = quantize_blockwise(
        scales - offset, _codebook_table(SCALE_CODEBOOK), SCALE_BLOCK, bits=8, check_finite=False, backend=backend
    )
    return {"scales": None, "scale_codes": codes, "scale_scales": scale_scales, "scale_offset": offset}
