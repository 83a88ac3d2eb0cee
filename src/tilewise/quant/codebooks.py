"""Codebooks: the small sorted value tables that block-wise quantization rounds to.

Every codebook is a sorted (ascending) fp32 vector of distinct values in ``[-1, 1]`` (``[0, 1]`` for the unsigned
ones) with at most ``2**bits`` entries. A block's values are divided by the block's absmax scale and rounded to the
nearest entry; the stored code is the entry's index.
"""

from __future__ import annotations

import functools

import torch

__all__ = ["CODEBOOK_BITS", "codebook", "codebook_bits", "codebook_names"]

# name -> bits per code
CODEBOOK_BITS: dict[str, int] = {
    "int8": 8,
    "int4": 4,
    "dynamic8": 8,
    "udynamic8": 8,
    "dynamic4": 4,
    "ulinear4": 4,
    "nf4": 4,
    "fp4": 4,
    "fp8_e4m3": 8,
    "fp8_e5m2": 8,
}


def codebook_names() -> list[str]:
    """The names :func:`codebook` accepts.

    Example:
        >>> from tilewise.quant import codebook, codebook_bits, codebook_names
        >>> codebook_names()
        ['int8', 'int4', 'dynamic8', 'udynamic8', 'dynamic4', 'ulinear4', 'nf4', 'fp4', 'fp8_e4m3', 'fp8_e5m2']
        >>> all(codebook(name).numel() <= 2 ** codebook_bits(name) for name in codebook_names())
        True
    """
    return list(CODEBOOK_BITS)


def codebook_bits(name: str) -> int:
    """Bits per code of codebook ``name`` (8 or 4).

    Example:
        >>> from tilewise.quant import codebook, codebook_bits
        >>> codebook_bits("nf4"), codebook_bits("fp8_e4m3")
        (4, 8)
        >>> codebook("nf4").numel() == 2 ** codebook_bits("nf4")  # NF4 uses all 16 codes
        True
        >>> codebook_bits("nf3")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: unknown codebook 'nf3'; choose one of int8, int4, ...
    """
    _check_name(name)
    return CODEBOOK_BITS[name]


def _check_name(name: str) -> None:
    if not isinstance(name, str) or name not in CODEBOOK_BITS:
        raise ValueError(f"unknown codebook {name!r}; choose one of {', '.join(CODEBOOK_BITS)}")


def codebook(name: str) -> torch.Tensor:
    """Return codebook ``name`` as a new sorted fp32 CPU tensor.

    Names: ``"int8"``/``"int4"`` (symmetric linear, 255/15 values with an exact zero), ``"dynamic8"``/``"udynamic8"``
    (the signed/unsigned dynamic-tree maps of "8-bit Optimizers via Block-wise Quantization", 256 values each),
    ``"dynamic4"`` (the signed 4-bit dynamic-tree map, 16 values), ``"ulinear4"`` (unsigned linear without zero,
    ``(i + 1) / 16``, for second moments), ``"nf4"`` (QLoRA's NormalFloat), ``"fp4"`` (e2m1, 15 values scaled to
    max 1), ``"fp8_e4m3"``/``"fp8_e5m2"`` (every finite fp8 value, scaled to max 1).

    Example:
        >>> import torch
        >>> from tilewise.quant import codebook
        >>> nf4 = codebook("nf4")
        >>> nf4.shape, nf4.dtype
        (torch.Size([16]), torch.float32)
        >>> nf4[[0, 7, -1]].tolist()  # from -1 to 1, with an exact zero
        [-1.0, 0.0, 1.0]
        >>> bool((nf4.diff() > 0).all())  # sorted, distinct
        True
        >>> torch.equal(codebook("int4") * 7, torch.arange(-7.0, 8.0))  # int4: k / 7 for k in -7..7
        True
    """
    _check_name(name)
    return _build(name).clone()


@functools.cache
def _build(name: str) -> torch.Tensor:
    builders = {
        "int8": lambda: _linear_signed(127),
        "int4": lambda: _linear_signed(7),
        "dynamic8": lambda: _dynamic_tree(signed=True, decades=7),
        "udynamic8": lambda: _dynamic_tree(signed=False, decades=7),
        "dynamic4": lambda: _dynamic_tree(signed=True, decades=3),
        "ulinear4": lambda: torch.arange(1, 17, dtype=torch.float64) / 16,
        "nf4": _normal_float4,
        "fp4": _fp4_e2m1,
        "fp8_e4m3": lambda: _fp8_values(torch.float8_e4m3fn),
        "fp8_e5m2": lambda: _fp8_values(torch.float8_e5m2),
    }
    values = builders[name]().to(torch.float64)
    values = torch.unique(values)  # sorts and merges +0/-0
    if values.numel() > 2 ** CODEBOOK_BITS[name] or values.abs().max() > 1:
        raise AssertionError(f"codebook {name} is malformed")  # a bug in this file, not user input
    return values.to(torch.float32)


def _linear_signed(levels: int) -> torch.Tensor:
    return torch.arange(-levels, levels + 1, dtype=torch.float64) / levels


def _dynamic_tree(*, signed: bool, decades: int) -> torch.Tensor:
    """Dynamic-tree map: decade ``i`` (magnitudes ``10**(i - decades + 1) * [0.1, 1)``) holds ``2**i`` linearly
    spaced fraction values per sign when signed (the sign bit costs one fraction bit), ``2**(i+1)`` when unsigned;
    plus 0 and 1. Each fraction value is the centre of its bin of ``[0.1, 1]``."""
    values = [0.0, 1.0]
    for i in range(decades):
        bins = 2**i if signed else 2 ** (i + 1)
        centres = 0.1 + 0.9 * (torch.arange(bins, dtype=torch.float64) + 0.5) / bins
        mags = (10.0 ** (i - decades + 1)) * centres
        values += mags.tolist()
        if signed:
            values += (-mags).tolist()
    return torch.tensor(values, dtype=torch.float64)


def _normal_float4() -> torch.Tensor:
    """NF4 (QLoRA): quantiles of N(0, 1), 8 on the positive side and 7 on the negative side so that zero is exact,
    normalized to [-1, 1]. ``offset`` is the paper's choice, the mean of the two tail-probability settings."""
    offset = 0.5 * (1 - 1 / (2 * 15) + 1 - 1 / (2 * 16))
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    values = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg])
    return values / values.abs().max()


def _fp4_e2m1() -> torch.Tensor:
    mags = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64) / 6.0
    return torch.cat([-mags, mags])


def _fp8_values(dtype: torch.dtype) -> torch.Tensor:
    values = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(dtype).to(torch.float64)
    values = values[torch.isfinite(values)]
    return values / values.abs().max()
