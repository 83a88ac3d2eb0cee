"""Block-wise quantization in plain PyTorch: the spec (see README.md beside this file).

Every function here works on any device and any size. The Triton kernels in ``triton.py`` must reproduce the codes,
scales and dequantized values of this file bit for bit (nearest rounding).
"""

from __future__ import annotations

import torch

__all__ = ["dequantize_blockwise_ref", "midpoints", "pack_nibbles", "quantize_blockwise_ref", "unpack_nibbles"]

# Blocks handled per step of the reference, so the [blocks, K-1] threshold table stays small.
_CHUNK_ELEMENTS = 1 << 22


def midpoints(code: torch.Tensor) -> torch.Tensor:
    """Rounding thresholds of a sorted codebook ``[K]``: ``fp32((c[j] + c[j+1]) / 2)``, ``[K-1]``, computed in
    float64 and rounded once so every backend uses the same fp32 numbers."""
    c = code.to(torch.float64)
    return ((c[:-1] + c[1:]) / 2).to(torch.float32)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes ``uint8 [n]`` (values < 16) two per byte: element ``2j`` in the high nibble of byte ``j``,
    element ``2j+1`` in the low nibble; an odd ``n`` leaves the last low nibble 0. Returns ``uint8 [ceil(n/2)]``."""
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_zeros(1)])
    pairs = codes.view(-1, 2)
    return (pairs[:, 0] << 4) | pairs[:, 1]


def unpack_nibbles(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: ``uint8 [ceil(n/2)]`` -> ``uint8 [n]``."""
    return torch.stack([packed >> 4, packed & 15], dim=1).view(-1)[:numel]


def _blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """Flat fp32 view of ``x`` zero-padded to ``[nb, block_size]``."""
    flat = x.reshape(-1).to(torch.float32)
    pad = -flat.numel() % block_size
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, block_size)


def quantize_blockwise_ref(
    x: torch.Tensor,
    code: torch.Tensor,
    block_size: int,
    *,
    bits: int = 8,
    stochastic: bool = False,
    generator: torch.Generator | None = None,
    check_finite: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` (any shape, read flat, ``n`` elements) block by block onto the sorted codebook ``code [K]``.

    Returns ``(codes, scales)``: ``codes`` is ``uint8 [n]`` for ``bits=8`` or packed ``uint8 [ceil(n/2)]`` for
    ``bits=4``; ``scales`` is the fp32 absmax of each block, ``[ceil(n / block_size)]``. Raises ``ValueError`` if
    ``x`` holds NaN or inf (unless ``check_finite=False``: then that block's scale is non-finite).
    """
    n = x.numel()
    code = code.to(device=x.device, dtype=torch.float32)
    blocks = _blocks(x, block_size)
    scales = blocks.abs().amax(dim=1) if n else blocks.new_zeros(0)
    if check_finite and not bool(torch.isfinite(scales).all()):
        raise ValueError("quantize: input contains NaN or inf")
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    mids = midpoints(code)
    rows = max(1, _CHUNK_ELEMENTS // block_size)
    out = torch.empty(blocks.shape, dtype=torch.uint8, device=x.device)
    for start in range(0, blocks.shape[0], rows):
        b, s = blocks[start : start + rows], safe[start : start + rows, None]
        if stochastic:
            out[start : start + rows] = _stochastic_codes(b, s, code, generator)
        else:
            # code = #{ j : x > fp32(s * mid[j]) }: searchsorted(left) counts the thresholds strictly below x
            out[start : start + rows] = torch.searchsorted((s * mids).contiguous(), b, side="left").to(torch.uint8)
    codes = out.view(-1)[:n]
    return (pack_nibbles(codes) if bits == 4 else codes), scales


def _stochastic_codes(
    b: torch.Tensor, s: torch.Tensor, code: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    """Round each element of ``b [rows, bs]`` to one of its two neighbouring scaled codebook values, up with
    probability proportional to the distance from the lower one (unbiased)."""
    levels = (s * code).contiguous()  # [rows, K]
    top = code.numel() - 1
    lo = (torch.searchsorted(levels, b, side="right") - 1).clamp_(0, top)
    hi = (lo + 1).clamp_(max=top)
    v_lo, v_hi = levels.gather(1, lo), levels.gather(1, hi)
    u = torch.rand(b.shape, generator=generator, device=b.device, dtype=torch.float32)
    up = u * (v_hi - v_lo) < (b - v_lo)
    return torch.where(up, hi, lo).to(torch.uint8)


def dequantize_blockwise_ref(
    codes: torch.Tensor,
    scales: torch.Tensor,
    code: torch.Tensor,
    block_size: int,
    numel: int,
    *,
    bits: int = 8,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Rebuild the flat tensor ``[numel]``: ``fp32(code[c_i] * scale[block(i)])`` cast to ``dtype``."""
    idx = unpack_nibbles(codes, numel) if bits == 4 else codes[:numel]
    values = code.to(device=codes.device, dtype=torch.float32)[idx.long()]
    per_elem = scales.to(torch.float32).repeat_interleave(block_size)[:numel]
    return (values * per_elem).to(dtype)
