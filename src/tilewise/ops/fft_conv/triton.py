"""Triton kernels for the causal FFT convolution, with every DFT a product of small DFT matrices.

A row of length ``N`` is zero-padded to ``L = N1 * N2 <= MAX_FUSED_L`` and viewed as ``A[n1, n2]`` (``t = N2 n1 +
n2``, ``N2`` contiguous). Its DFT in permuted order is ``C = ((F_N1 A) ∘ T) F_N2`` (``C[k1, k2] = X[k1 + N1 k2]``),
the inverse ``A = conj(F_N1) ((C conj(F_N2)) ∘ conj(T))``. Two batch rows of a channel travel as one complex
signal (the kernel is real); half of ``A`` (the padding) and half of the output (the truncated tail) are never
multiplied. Two paths (README.md has the derivations, bounds and measurements):

- the two-pass path (:func:`fft_conv_two_pass`, the op's default): float16 products with fp32 accumulation. Pass 1
  goes to the frequency domain, multiplies by the kernel's spectrum and back along the contiguous axis, storing
  ``D`` in float16; pass 2 is the complex matrix product ``conj(F_N1)[:N1/2] D``. Operands are scaled into
  float16's range; ~5e-4 relative error for fp32 I/O.
- the fused kernel (:func:`fft_conv_triton_fwd`): one program convolves whole rows, walking ``F_N1``'s rows in
  blocks and accumulating into the output tile as flash attention does, with ``tf32x3`` (fp32 / fp16 I/O) or
  ``tf32`` (bf16) products: ~1e-6 for fp32, but slower than cuFFT.
"""

from __future__ import annotations

import collections
import contextlib
import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl

from tilewise.ops._launch import first_that_fits
from tilewise.ops.fft_conv.monarch import dft_matrix, fft_length, twiddle
from tilewise.ops.fft_conv.reference import fft_conv_ref

__all__ = [
    "MAX_FUSED_L",
    "MAX_FUSED_N",
    "PATHS",
    "ConvConfig",
    "TwoPassConfig",
    "fft_conv_triton",
    "fft_conv_triton_fwd",
    "fft_conv_two_pass",
    "fft_corr_sum_triton",
    "fft_corr_sum_two_pass",
    "kernel_spectrum",
    "pair_spectrum_buffers",
    "reset_paths",
]

# Longest transform one program holds: 16384 = 256 x 64, so N <= 8192.
MAX_FUSED_L = 16384
MAX_FUSED_N = MAX_FUSED_L // 2
# Shortest transform: tl.dot needs every dimension >= 16, and N1 / 2 (the rows that hold the signal) is one.
_MIN_L = 512


@triton.jit
def _mm(a, b, acc, PREC: tl.constexpr):
    """``a @ b (+ acc)`` in fp32 at the dot precision ``PREC``: a ``tl.dot`` input precision (``"tf32"``,
    ``"tf32x3"``, ``"bf16x3"``, ``"ieee"``), or ``"bf16"``: both operands rounded to bfloat16 (tensor-core products,
    exact in fp32, and fp32 accumulation: twice tf32's rate, half its operand bytes), or ``"bf16emu"``: the same
    rounding followed by fp32 IEEE dots, what the host picks in Triton's interpreter, whose 16-bit dot is wrong;
    ``"fp16"`` / ``"fp16emu"`` likewise with float16 operands (11-bit significands like tf32, at bf16's rate), for
    the two-pass kernels, which keep their operands inside float16's range."""
    if PREC == "bf16":
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc)
    elif PREC == "bf16emu":
        return tl.dot(a.to(tl.bfloat16).to(tl.float32), b.to(tl.bfloat16).to(tl.float32), acc, input_precision="ieee")
    elif PREC == "fp16":
        return tl.dot(a.to(tl.float16), b.to(tl.float16), acc)
    elif PREC == "fp16emu":
        return tl.dot(a.to(tl.float16).to(tl.float32), b.to(tl.float16).to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def _to_operand(a, PREC: tl.constexpr):
    """``a`` rounded once to the dot operand type of ``PREC`` (float16 / its fp32 emulation), so a loop reuses it."""
    if PREC == "fp16":
        return a.to(tl.float16)
    elif PREC == "fp16emu":
        return a.to(tl.float16).to(tl.float32)
    else:
        return a


@triton.jit
def _cmul(ar, ai, br, bi):
    return ar * br - ai * bi, ar * bi + ai * br


@triton.jit
def _inverse_scale(m):
    """``1 / m`` for a row's largest magnitude ``m``; 0 for a zero row (whose output scale ``m`` is then 0 too)."""
    return tl.where(m > 0, 1.0 / tl.where(m > 0, m, 1.0), 0.0)


@triton.jit
def _twiddle(ar, ai, br, bi, HALF: tl.constexpr):
    """The fp32 tile ``a`` times the float16 tile ``b``, rounded to float16 (the next dot's operand): in fp32, or
    with ``HALF`` in float16 after rounding ``a`` (packed float16 instructions; two more roundings of 2^-11)."""
    if HALF:
        return _cmul(ar.to(tl.float16), ai.to(tl.float16), br, bi)
    else:
        cr, ci = _cmul(ar, ai, br.to(tl.float32), bi.to(tl.float32))
        return cr.to(tl.float16), ci.to(tl.float16)


@triton.jit
def _cdot(ar, ai, br, bi, PREC: tl.constexpr):
    """``(ar + i ai) @ (br + i bi)`` as four real dots."""
    b_r = _mm(ar, br, None, PREC)
    b_r = _mm(-ai, bi, b_r, PREC)
    b_i = _mm(ar, bi, None, PREC)
    b_i = _mm(ai, br, b_i, PREC)
    return b_r, b_i


@triton.jit
def _finish_spectrum(b_br, b_bi, b_tr, b_ti, b_f2r, b_f2i, PREC: tl.constexpr):
    """``(B ∘ T[k1]) @ F2``: the twiddle and the contiguous-axis DFT of a ``[BK, N2]`` block."""
    b_br, b_bi = _cmul(b_br, b_bi, b_tr, b_ti)
    return _cdot(b_br, b_bi, b_f2r, b_f2i, PREC)


@triton.jit
def _start_inverse(b_cr, b_ci, b_tr, b_ti, b_f2r, b_f2i, PREC: tl.constexpr):
    """``(C @ conj(F2)) ∘ conj(T[k1])`` for a ``[BK, N2]`` spectrum block."""
    b_dr, b_di = _cdot(b_cr, b_ci, b_f2r, -b_f2i, PREC)
    return _cmul(b_dr, b_di, b_tr, -b_ti)


@triton.jit
def _spectrum_block(b_x, b_f1r, b_f1i, b_tr, b_ti, b_f2r, b_f2i, PREC: tl.constexpr):
    """Rows ``k1`` of the permuted spectrum of the real row ``b_x [N1H, N2]``: ``((F1[k1, :N1H] @ A) ∘ T) @ F2``."""
    b_br = _mm(b_f1r, b_x, None, PREC)
    b_bi = _mm(b_f1i, b_x, None, PREC)
    return _finish_spectrum(b_br, b_bi, b_tr, b_ti, b_f2r, b_f2i, PREC)


@triton.jit
def _inverse_block(b_y, b_cr, b_ci, b_f1r, b_f1i, b_tr, b_ti, b_f2r, b_f2i, PREC: tl.constexpr):
    """``b_y += Re(conj(F1)[:N1H, k1] @ ((C conj(F2)) ∘ conj(T)))`` for the spectrum block ``C [BK, N2]``."""
    b_dr, b_di = _start_inverse(b_cr, b_ci, b_tr, b_ti, b_f2r, b_f2i, PREC)
    # F1 is symmetric: conj(F1)[n1, k1] = conj(F1[k1, n1]); Re(conj(F) D) = Fr Dr + Fi Di.
    b_y = _mm(tl.trans(b_f1r), b_dr, b_y, PREC)
    return _mm(tl.trans(b_f1i), b_di, b_y, PREC)


@triton.jit
def _load_f2(f2, N2: tl.constexpr):
    o_n2 = tl.arange(0, N2)
    p_f2 = f2 + o_n2[:, None] * N2 + o_n2[None, :]
    return tl.load(p_f2), tl.load(p_f2 + N2 * N2)


@triton.jit
def _load_block(f1, tw, i_k, N1: tl.constexpr, N1H: tl.constexpr, N2: tl.constexpr, BK: tl.constexpr):
    """``F1[k1, :N1H]`` and ``T[k1, :]`` (re, im) for the rows ``k1`` of block ``i_k``."""
    o_k1 = i_k * BK + tl.arange(0, BK)
    p_f1 = f1 + o_k1[:, None] * N1 + tl.arange(0, N1H)[None, :]
    p_tw = tw + o_k1[:, None] * N2 + tl.arange(0, N2)[None, :]
    return tl.load(p_f1), tl.load(p_f1 + N1 * N1), tl.load(p_tw), tl.load(p_tw + N1 * N2)


@triton.jit
def _fft_conv_kernel(
    x,
    khat,
    skip,
    y,
    f1,
    f2,
    tw,
    B,
    H,
    N,
    N1: tl.constexpr,
    N2: tl.constexpr,
    BK: tl.constexpr,
    CONJ: tl.constexpr,
    HAS_SKIP: tl.constexpr,
    PAIR: tl.constexpr,
    PREC: tl.constexpr,
):
    """``y[b, h] = IDFT(DFT(x[b, h]) ∘ khat[h])[:N] (+ skip[h] x[b, h])`` for ``x, y: [B, H, N]``.

    Each program takes two rows ``b, b + 1`` of one channel as one complex signal ``x[b] + i x[b + 1]``: the
    kernel is real, so the real and imaginary parts of the result are the two convolutions, at the cost of one
    (complex) transform. ``khat: [H, 2, N1, N2]`` is the kernel's permuted spectrum over ``L`` (1/L folded in);
    ``CONJ`` multiplies by its conjugate instead (the anti-causal correlation of the backward). Without
    ``PAIR`` a program takes one row ``b`` (real in, real out): a third more dot flops, but half the live input
    and output tiles, which is what lets ``L = 16384`` fit an H100's shared memory (README.md).
    """
    N1H: tl.constexpr = N1 // 2
    # The programs of a channel run next to each other, so its spectrum khat[h] is read from HBM once.
    i_p = tl.program_id(0).to(tl.int64)
    if PAIR:
        NB2 = (B + 1) // 2
        i_h, i_b = i_p // NB2, (i_p % NB2) * 2
    else:
        i_h, i_b = i_p // B, i_p % B
    o_t = tl.arange(0, N1H)[:, None] * N2 + tl.arange(0, N2)[None, :]
    m_t = o_t < N
    p_x = x + (i_b * H + i_h) * N + o_t
    b_xr = tl.load(p_x, mask=m_t, other=0.0).to(tl.float32)
    if PAIR:
        # the second row exists only when B is even or this is not the last pair
        m_t2 = o_t < tl.where(i_b + 1 < B, N, 0)
        b_xi = tl.load(p_x + H * N, mask=m_t2, other=0.0).to(tl.float32)
        b_yi = tl.zeros([N1H, N2], dtype=tl.float32)
    b_f2r, b_f2i = _load_f2(f2, N2)
    b_yr = tl.zeros([N1H, N2], dtype=tl.float32)
    o_c = tl.arange(0, BK)[:, None] * N2 + tl.arange(0, N2)[None, :]
    for i_k in range(0, N1 // BK):
        b_f1r, b_f1i, b_tr, b_ti = _load_block(f1, tw, i_k, N1, N1H, N2, BK)
        if PAIR:
            b_br, b_bi = _cdot(b_f1r, b_f1i, b_xr, b_xi, PREC)
        else:
            b_br = _mm(b_f1r, b_xr, None, PREC)
            b_bi = _mm(b_f1i, b_xr, None, PREC)
        b_cr, b_ci = _finish_spectrum(b_br, b_bi, b_tr, b_ti, b_f2r, b_f2i, PREC)
        p_k = khat + i_h * (2 * N1 * N2) + i_k * BK * N2 + o_c
        b_kr = tl.load(p_k)
        b_ki = tl.load(p_k + N1 * N2)
        if CONJ:
            b_ki = -b_ki
        b_cr, b_ci = _cmul(b_cr, b_ci, b_kr, b_ki)
        b_dr, b_di = _start_inverse(b_cr, b_ci, b_tr, b_ti, b_f2r, b_f2i, PREC)
        # Y += conj(F1)[:N1H, k1] @ D (F1 symmetric): re = Fr Dr + Fi Di, im = Fr Di - Fi Dr.
        b_f1rt, b_f1it = tl.trans(b_f1r), tl.trans(b_f1i)
        b_yr = _mm(b_f1rt, b_dr, b_yr, PREC)
        b_yr = _mm(b_f1it, b_di, b_yr, PREC)
        if PAIR:
            b_yi = _mm(b_f1rt, b_di, b_yi, PREC)
            b_yi = _mm(-b_f1it, b_dr, b_yi, PREC)
    if HAS_SKIP:
        b_s = tl.load(skip + i_h).to(tl.float32)
        b_yr += b_s * b_xr
        if PAIR:
            b_yi += b_s * b_xi
    p_y = y + (i_b * H + i_h) * N + o_t
    tl.store(p_y, b_yr.to(y.dtype.element_ty), mask=m_t)
    if PAIR:
        tl.store(p_y + H * N, b_yi.to(y.dtype.element_ty), mask=m_t2)


@triton.jit
def _forward_pass_kernel(
    x,
    c,
    cscale,
    kbound,
    skip,
    f1,
    f2,
    tw,
    B,
    H,
    N,
    N1: tl.constexpr,
    N2: tl.constexpr,
    BK: tl.constexpr,
    GP: tl.constexpr,
    PAIR: tl.constexpr,
    HAS_SKIP: tl.constexpr,
    PREC: tl.constexpr,
    other=None,
    dots=None,
):
    """Rows ``k1`` of block ``program_id(0)`` of the permuted spectrum ``C = ((F_N1 A) ∘ T) F_N2`` for up to ``GP``
    signals of channel ``h = program_id(1)`` (group ``program_id(2)``), stored in float16 to ``c [S, 2, N1, N2]``.

    With ``PAIR`` a signal is two rows ``b, b + 1`` as one complex signal (``S = H ceil(B / 2)``, signal
    ``s = h ceil(B / 2) + b / 2``): the spectra of the pairs of ``dy`` and ``u`` for the kernel's gradient
    (:func:`_corr_spectrum_kernel`). Without it one real row (``S = B H``, ``s = h B + b``): the kernel ``k``,
    launched as ``B = H`` rows of one channel, which also stores ``kbound[s] = sum |k[s]| + |skip[s]|`` (a bound
    on every component of ``DFT(k) + skip``). Each row is divided by its own largest magnitude, stored in
    ``cscale[s]`` (``cscale[s, 0]``, ``cscale[s, 1]`` for a pair's rows), so every component of ``C`` stays under
    ``sqrt(2) N1 N2 / 2`` (float16's range at
    ``L <= 16384``, README.md). The blocks of one group are adjacent in the launch order, so the signals' rows are
    read from HBM once; ``F_N1``'s block, the twiddles and ``F_N2`` are loaded once a program. With ``other``
    (pairs; a tensor shaped like ``x``) the programs of the first block also store each row's fp32
    ``sum_t x other`` to ``dots [B, H]`` (the skip weight's gradient, without a product tensor in memory)."""
    N1H: tl.constexpr = N1 // 2
    i_k = tl.program_id(0)
    i_h = tl.program_id(1).to(tl.int64)
    i_g = tl.program_id(2)
    NS = (B + 1) // 2 if PAIR else B
    b_f2r, b_f2i = _load_f2(f2, N2)
    b_f1r, b_f1i, b_tr, b_ti = _load_block(f1, tw, i_k, N1, N1H, N2, BK)
    b_tr = b_tr.to(tl.float16)
    b_ti = b_ti.to(tl.float16)
    o_t = tl.arange(0, N1H)[:, None] * N2 + tl.arange(0, N2)[None, :]
    o_c = (i_k * BK + tl.arange(0, BK))[:, None] * N2 + tl.arange(0, N2)[None, :]
    # masks, not a branch, for the signals past the last: the loop stays one block the compiler can pipeline
    for i_q in range(0, GP):
        i_sb = i_g * GP + i_q
        # a signal past the last: every mask empty
        n_live = tl.where(i_sb < NS, N, 0)
        i_b = i_sb * 2 if PAIR else i_sb
        p_x = x + (i_b * H + i_h) * N + o_t
        b_xr = tl.load(p_x, mask=o_t < n_live, other=0.0).to(tl.float32)
        b_m = tl.max(tl.max(tl.abs(b_xr), axis=1), axis=0)
        i_s = i_h * NS + i_sb
        if PAIR:
            m_t2 = o_t < tl.where(i_b + 1 < B, n_live, 0)
            b_xi = tl.load(p_x + H * N, mask=m_t2, other=0.0).to(tl.float32)
            b_m2 = tl.max(tl.max(tl.abs(b_xi), axis=1), axis=0)
            if other is not None:
                # the first block's programs only (the masks are empty elsewhere: no memory traffic)
                p_o = other + (i_b * H + i_h) * N + o_t
                n_first = tl.where(i_k == 0, n_live, 0)
                b_o = tl.load(p_o, mask=o_t < n_first, other=0.0).to(tl.float32)
                b_o2 = tl.load(p_o + H * N, mask=o_t < tl.where(i_b + 1 < B, n_first, 0), other=0.0).to(tl.float32)
                m_d = (i_k == 0) & (i_sb < NS)
                tl.store(dots + i_b * H + i_h, tl.sum(tl.sum(b_xr * b_o, axis=1), axis=0), mask=m_d)
                m_d2 = m_d & (i_b + 1 < B)
                tl.store(dots + (i_b + 1) * H + i_h, tl.sum(tl.sum(b_xi * b_o2, axis=1), axis=0), mask=m_d2)
        else:
            b_l1 = tl.sum(tl.sum(tl.abs(b_xr), axis=1), axis=0)
            if HAS_SKIP:
                b_l1 += tl.abs(tl.load(skip + i_sb, mask=i_sb < NS, other=0.0).to(tl.float32))
            tl.store(kbound + i_sb, b_l1, mask=(i_k == 0) & (i_sb < NS))
        b_xr = _to_operand(b_xr * _inverse_scale(b_m), PREC)
        b_br = _mm(b_f1r, b_xr, None, PREC)
        b_bi = _mm(b_f1i, b_xr, None, PREC)
        if PAIR:
            b_xi *= _inverse_scale(b_m2)
            # (F1r + i F1i)(xr + i xi): the sign goes on the signal's operand, not on a copy of F1i
            b_br = _mm(b_f1i, _to_operand(-b_xi, PREC), b_br, PREC)
            b_bi = _mm(b_f1r, _to_operand(b_xi, PREC), b_bi, PREC)
            tl.store(cscale + 2 * i_s + 1, b_m2, mask=(i_k == 0) & (i_sb < NS))
        b_cr, b_ci = _finish_spectrum(b_br, b_bi, b_tr.to(tl.float32), b_ti.to(tl.float32), b_f2r, b_f2i, PREC)
        p_c = c + i_s * (2 * N1 * N2) + o_c
        m_c = o_c < tl.where(i_sb < NS, N1 * N2, 0)
        tl.store(p_c, b_cr.to(c.dtype.element_ty), mask=m_c)
        tl.store(p_c + N1 * N2, b_ci.to(c.dtype.element_ty), mask=m_c)
        tl.store(cscale + (2 * i_s if PAIR else i_s), b_m, mask=(i_k == 0) & (i_sb < NS))


@triton.jit
def _conv_pass_kernel(
    x,
    d,
    cscale,
    kc,
    kscale,
    kbound,
    skip,
    f1,
    f2,
    tw,
    B,
    H,
    N,
    N1: tl.constexpr,
    N2: tl.constexpr,
    BK: tl.constexpr,
    GP: tl.constexpr,
    CONJ: tl.constexpr,
    HAS_SKIP: tl.constexpr,
    HALF: tl.constexpr,
    PREC: tl.constexpr,
    spec=None,
):
    """Pass 1 of the two-pass convolution, rows ``k1`` of block ``program_id(0)``, for up to ``GP`` pairs of rows
    ``b, b + 1`` (one complex signal ``A``, pair ``s = h ceil(B / 2) + b / 2``) of channel ``h = program_id(1)``
    (group ``program_id(2)``): ``C = ((F_N1 A) ∘ T) F_N2``, ``E = C ∘ K``, ``D = (E conj(F_N2)) ∘ conj(T) / DSCALE``,
    stored in float16 to ``d [S, 2, N1, N2]``, with the rows' scales ``cscale[s, 0:2]``: each row is divided by its own
    largest magnitude (``k`` is real, so the convolution keeps the real and imaginary parts apart, and a small row
    keeps float16's relative precision beside a large partner; a zero row has scale 0 and comes out zero).

    ``K = (C_k kscale[h] + skip[h]) / kbound[h]`` is the kernel's spectrum from :func:`_forward_pass_kernel`
    (``C_k = kc[h]``; ``skip`` times a unit impulse has the constant spectrum ``skip``; ``|K| <= 1``), ``conj(K)``
    for the correlation. ``f1 [3, N1, N1]`` (``F_N1``) and ``f2 [3, N2, N2]`` (``G``: ``F_N2`` with its columns
    in :func:`_mirror_order`, so ``C``, ``K`` and the stored spectra are in that order; the inverse multiplies by
    ``conj(G)^T``) hold ``(Re, Im, -Im)`` in float16, so no complex product negates a tile. The twiddle and kernel
    products are fp32 on fp32 accumulators, or with ``HALF`` (16-bit I/O, whose own rounding dominates) float16
    products on the float16 operands (packed instructions, a third of the elementwise work). ``F_N1``'s block, the
    twiddles, ``G`` and ``K`` are loaded once a program and the loop over pairs is pipelined; masks, not a branch,
    for the last group's empty slots.
    With ``spec`` (``[S, 2, N1, N2]`` float16) the pairs' spectra ``C`` are stored too, as
    :func:`_forward_pass_kernel` would store them (``du``'s pass keeps ``dy``'s spectra for ``dk``)."""
    N1H: tl.constexpr = N1 // 2
    DSCALE: tl.constexpr = N2 * 4
    i_k = tl.program_id(0)
    i_h = tl.program_id(1).to(tl.int64)
    i_g = tl.program_id(2)
    NS = (B + 1) // 2
    o_n2 = tl.arange(0, N2)
    p_f2 = f2 + o_n2[:, None] * N2 + o_n2[None, :]
    b_f2r = tl.load(p_f2)
    b_f2i = tl.load(p_f2 + N2 * N2)
    b_f2n = tl.load(p_f2 + 2 * N2 * N2)
    o_k1 = i_k * BK + tl.arange(0, BK)
    p_f1 = f1 + o_k1[:, None] * N1 + tl.arange(0, N1H)[None, :]
    b_f1r = tl.load(p_f1)
    b_f1i = tl.load(p_f1 + N1 * N1)
    b_f1n = tl.load(p_f1 + 2 * N1 * N1)
    o_c = o_k1[:, None] * N2 + o_n2[None, :]
    b_tr = tl.load(tw + o_c).to(tl.float16)
    b_ti = tl.load(tw + N1 * N2 + o_c).to(tl.float16)
    b_tn = -b_ti
    o_t = tl.arange(0, N1H)[:, None] * N2 + o_n2[None, :]
    b_bound = tl.load(kbound + i_h)
    b_bound = tl.where(b_bound > 0, b_bound, 1.0)
    b_ks = tl.load(kscale + i_h) / b_bound
    p_kc = kc + i_h * (2 * N1 * N2) + o_c
    b_kr = tl.load(p_kc).to(tl.float32) * b_ks
    if HAS_SKIP:
        b_kr += tl.load(skip + i_h).to(tl.float32) / b_bound
    b_kr = b_kr.to(tl.float16)
    b_ki = (tl.load(p_kc + N1 * N2).to(tl.float32) * tl.where(CONJ, -b_ks, b_ks)).to(tl.float16)
    for i_q in range(0, GP):
        i_sb = i_g * GP + i_q
        i_b = i_sb * 2
        # a pair past the last: every mask empty
        n_live = tl.where(i_sb < NS, N, 0)
        p_x = x + (i_b * H + i_h) * N + o_t
        b_xr = tl.load(p_x, mask=o_t < n_live, other=0.0).to(tl.float32)
        b_xi = tl.load(p_x + H * N, mask=o_t < tl.where(i_b + 1 < B, n_live, 0), other=0.0).to(tl.float32)
        # each row divided by its own largest magnitude: k is real, so the rows stay apart (the real and
        # imaginary parts) and a small row keeps float16's relative precision beside a large one
        b_m = tl.max(tl.max(tl.abs(b_xr), axis=1), axis=0)
        b_m2 = tl.max(tl.max(tl.abs(b_xi), axis=1), axis=0)
        b_xr = _to_operand(b_xr * _inverse_scale(b_m), PREC)
        b_xi = _to_operand(b_xi * _inverse_scale(b_m2), PREC)
        # B = F1 A: re = F1r xr - F1i xi, im = F1i xr + F1r xi
        b_br = _mm(b_f1n, b_xi, _mm(b_f1r, b_xr, None, PREC), PREC)
        b_bi = _mm(b_f1r, b_xi, _mm(b_f1i, b_xr, None, PREC), PREC)
        # C = (B ∘ T) F2
        b_br, b_bi = _twiddle(b_br, b_bi, b_tr, b_ti, HALF)
        b_cr = _mm(b_bi, b_f2n, _mm(b_br, b_f2r, None, PREC), PREC)
        b_ci = _mm(b_bi, b_f2r, _mm(b_br, b_f2i, None, PREC), PREC)
        i_s = i_h * NS + i_sb
        m_c = o_c < tl.where(i_sb < NS, N1 * N2, 0)
        if spec is not None:
            p_z = spec + i_s * (2 * N1 * N2) + o_c
            tl.store(p_z, b_cr.to(spec.dtype.element_ty), mask=m_c)
            tl.store(p_z + N1 * N2, b_ci.to(spec.dtype.element_ty), mask=m_c)
        # E = C ∘ K;  D = E conj(F2)[order, :] = E conj(G)^T: re = Er Gr^T + Ei Gi^T, im = Ei Gr^T - Er Gi^T
        b_cr, b_ci = _twiddle(b_cr, b_ci, b_kr, b_ki, HALF)
        b_dr = _mm(b_ci, tl.trans(b_f2i), _mm(b_cr, tl.trans(b_f2r), None, PREC), PREC)
        b_di = _mm(b_cr, tl.trans(b_f2n), _mm(b_ci, tl.trans(b_f2r), None, PREC), PREC)
        # D ∘ conj(T) / DSCALE (the fp32 accumulator is up to 64 x 11585: scaled before any float16 rounding)
        b_dr, b_di = _twiddle(b_dr * (1.0 / DSCALE), b_di * (1.0 / DSCALE), b_tr, b_tn, HALF)
        p_d = d + i_s * (2 * N1 * N2) + o_c
        tl.store(p_d, b_dr.to(d.dtype.element_ty), mask=m_c)
        tl.store(p_d + N1 * N2, b_di.to(d.dtype.element_ty), mask=m_c)
        m_s = (i_k == 0) & (i_sb < NS)
        tl.store(cscale + 2 * i_s, b_m, mask=m_s)
        tl.store(cscale + 2 * i_s + 1, b_m2, mask=m_s)


@triton.jit
def _load_mirror(p, o_cm, o_0m, o_k1, i_k, mask, N2: tl.constexpr, BK: tl.constexpr):
    """``Z[-f]`` (fp32) for a block of rows of a spectrum ``p [N1, N2]`` stored in :func:`_mirror_order`: rows
    ``N1 - k1`` (offsets ``o_cm``) loaded contiguously, adjacent pairs swapped in registers; row 0 (block 0 only)
    gathered at ``o_0m``."""
    x = tl.load(p + o_cm, mask=mask, other=0.0).to(tl.float32)
    x_even, x_odd = tl.split(tl.reshape(x, (BK, N2 // 2, 2)))
    x = tl.reshape(tl.join(x_odd, x_even), (BK, N2))
    if i_k == 0:
        m_0 = mask & (o_k1 == 0)[:, None]
        x_0 = tl.load(p + o_0m[None, :] + 0 * o_k1[:, None], mask=m_0, other=0.0).to(tl.float32)
        x = tl.where(m_0, x_0, x)
    return x


@triton.jit
def _corr_spectrum_kernel(
    za,
    sa,
    zb,
    sb,
    d,
    B,
    H,
    N1: tl.constexpr,
    N2: tl.constexpr,
    BK: tl.constexpr,
):
    """The kernel's gradient in the frequency domain: for the channels ``h = 2 q, 2 q + 1`` (``q = program_id(1)``)
    and rows ``k1`` of block ``program_id(0)``, ``P_h = sum_b DFT(a_b) conj(DFT(b_b))`` from the pass-1 spectra
    ``za, zb [H ceil(B/2), 2, N1, N2]`` (float16, pair ``(b, b + 1)`` as one complex signal ``Z``, scales ``sa, sb``):
    ``DFT(x_b)[f] = (Z[f] + conj(Z[-f])) / 2`` and ``DFT(x_{b+1})[f] = (Z[f] - conj(Z[-f])) / 2i``. The spectra
    hold ``k2`` in the interleaved order of :func:`_mirror_order` (``F_N2``'s columns permuted), where ``-f`` of row
    ``k1 > 0`` is row ``N1 - k1`` with adjacent pairs swapped: contiguous loads (reversed addresses load one
    2-byte element an instruction), row 0 gathered apart (:func:`_load_mirror`). ``Q = P_h + i P_{h+1}`` (both
    inverses are real) is stored in fp32
    to ``d [ceil(H/2), 2, N1, N2]`` for :func:`_spectrum_inverse_kernel` (``P`` has no float16 range bound). No dot
    here: the program stays small, so many run at once and keep the loads in flight (the inverse in the same
    kernel took 255 registers, 8 warps an SM)."""
    i_k = tl.program_id(0)
    i_q = tl.program_id(1).to(tl.int64)
    NB2 = (B + 1) // 2
    o_k1 = i_k * BK + tl.arange(0, BK)
    o_k2 = tl.arange(0, N2)
    o_c = o_k1[:, None] * N2 + o_k2[None, :]
    # row N1 - k1 (row 0 for k1 = 0), and row 0's mirrored positions: k2 -> (N2 - k2) % N2 in the interleaved order
    o_cm = ((N1 - o_k1) % N1)[:, None] * N2 + o_k2[None, :]
    o_k2m = (N2 - tl.where(o_k2 % 2 == 0, o_k2 // 2, N2 - 1 - o_k2 // 2)) % N2
    o_0m = tl.where(o_k2m < N2 // 2, 2 * o_k2m, 2 * (N2 - 1 - o_k2m) + 1)
    b_qr = tl.zeros([BK, N2], dtype=tl.float32)
    b_qi = tl.zeros([BK, N2], dtype=tl.float32)
    for i_c in range(0, 2):
        i_h = 2 * i_q + i_c
        live = i_h < H
        b_pr = tl.zeros([BK, N2], dtype=tl.float32)
        b_pi = tl.zeros([BK, N2], dtype=tl.float32)
        for i_pb in range(0, NB2):
            i_p = tl.where(live, i_h * NB2 + i_pb, 0)
            m_p = o_c < tl.where(live, N1 * N2, 0)
            base = i_p * (2 * N1 * N2)
            b_s = tl.load(sa + 2 * i_p) * tl.load(sb + 2 * i_p) * 0.25
            b_s2 = tl.load(sa + 2 * i_p + 1) * tl.load(sb + 2 * i_p + 1) * 0.25
            # the two rows of each pair from Z[f] and conj(Z[-f]), for a and for b (x 2 each: the 1/4 above)
            b_ar = tl.load(za + base + o_c, mask=m_p, other=0.0).to(tl.float32)
            b_ai = tl.load(za + base + N1 * N2 + o_c, mask=m_p, other=0.0).to(tl.float32)
            b_amr = _load_mirror(za + base, o_cm, o_0m, o_k1, i_k, m_p, N2, BK)
            b_ami = _load_mirror(za + base + N1 * N2, o_cm, o_0m, o_k1, i_k, m_p, N2, BK)
            b_br = tl.load(zb + base + o_c, mask=m_p, other=0.0).to(tl.float32)
            b_bi = tl.load(zb + base + N1 * N2 + o_c, mask=m_p, other=0.0).to(tl.float32)
            b_bmr = _load_mirror(zb + base, o_cm, o_0m, o_k1, i_k, m_p, N2, BK)
            b_bmi = _load_mirror(zb + base + N1 * N2, o_cm, o_0m, o_k1, i_k, m_p, N2, BK)
            # row b: X0 = (Z + conj Zm) ; row b + 1: X1 = (Z - conj Zm) / i  (each times 2)
            a0r, a0i = b_ar + b_amr, b_ai - b_ami
            a1r, a1i = b_ai + b_ami, b_amr - b_ar
            c0r, c0i = b_br + b_bmr, b_bi - b_bmi
            c1r, c1i = b_bi + b_bmi, b_bmr - b_br
            # P += X0a conj(X0b) + X1a conj(X1b)
            b_pr += b_s * (a0r * c0r + a0i * c0i) + b_s2 * (a1r * c1r + a1i * c1i)
            b_pi += b_s * (a0i * c0r - a0r * c0i) + b_s2 * (a1i * c1r - a1r * c1i)
        if i_c == 0:
            b_qr, b_qi = b_pr, b_pi
        else:
            # Q = P_h + i P_{h+1}
            b_qr -= b_pi
            b_qi += b_pr
    p_d = d + i_q * (2 * N1 * N2) + o_c
    tl.store(p_d, b_qr)
    tl.store(p_d + N1 * N2, b_qi)


@triton.jit
def _spectrum_inverse_kernel(d, f2, tw, N1: tl.constexpr, N2: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    """``D = (Q conj(F_N2)) ∘ conj(T)`` in place for rows ``k1`` of block ``program_id(0)`` of the spectrum
    ``d [., 2, N1, N2]`` (fp32) of channel pair ``program_id(1)``, with ``PREC`` products (tf32x3: a tf32 rounding
    here added 8e-4 on the H100)."""
    i_k = tl.program_id(0)
    i_q = tl.program_id(1).to(tl.int64)
    o_c = (i_k * BK + tl.arange(0, BK))[:, None] * N2 + tl.arange(0, N2)[None, :]
    b_f2r, b_f2i = _load_f2(f2, N2)
    p_d = d + i_q * (2 * N1 * N2) + o_c
    b_dr, b_di = _start_inverse(
        tl.load(p_d), tl.load(p_d + N1 * N2), tl.load(tw + o_c), tl.load(tw + N1 * N2 + o_c), b_f2r, b_f2i, PREC
    )
    tl.store(p_d, b_dr)
    tl.store(p_d + N1 * N2, b_di)


@triton.jit
def _inverse_pass_kernel(
    d,
    cscale,
    kbound,
    y,
    f1,
    B,
    H,
    N,
    N1: tl.constexpr,
    N2: tl.constexpr,
    BM: tl.constexpr,
    BK: tl.constexpr,
    PREC: tl.constexpr,
):
    """Pass 2: rows ``n1`` of block ``program_id(0)`` (``BM`` of the ``N1 / 2`` that hold output) of
    ``Y = conj(F_N1)[:N1/2, :] @ D`` for pair ``p = program_id(1)`` (channel ``h``), a complex matrix product over
    the ``N1`` rows ``k1`` of ``d`` in steps of ``BK``; ``Re Y`` and ``Im Y`` times
    ``cscale[p, 0 / 1] kbound[h] DSCALE / L`` are the pair's two rows."""
    DSCALE: tl.constexpr = N2 * 4
    i_m = tl.program_id(0)
    i_p = tl.program_id(1).to(tl.int64)
    NB2 = (B + 1) // 2
    i_h, i_b = i_p // NB2, (i_p % NB2) * 2
    o_m = i_m * BM + tl.arange(0, BM)
    o_n2 = tl.arange(0, N2)
    b_yr = tl.zeros([BM, N2], dtype=tl.float32)
    b_yi = tl.zeros([BM, N2], dtype=tl.float32)
    for i_k in range(0, N1 // BK):
        o_k = i_k * BK + tl.arange(0, BK)
        # conj(F1)[n1, k1] = F1[k1, n1]* (F1 symmetric): re = F1r, im = -F1i
        p_g = f1 + o_m[:, None] * N1 + o_k[None, :]
        b_gr = tl.load(p_g)
        b_gi = tl.load(p_g + N1 * N1)
        p_d = d + i_p * (2 * N1 * N2) + o_k[:, None] * N2 + o_n2[None, :]
        b_dr = tl.load(p_d)
        b_di = tl.load(p_d + N1 * N2)
        # Y = (Gr - i Gi)(Dr + i Di): re = Gr Dr + Gi Di, im = Gr Di - Gi Dr
        b_yr = _mm(b_gr, b_dr, b_yr, PREC)
        b_yr = _mm(b_gi, b_di, b_yr, PREC)
        b_yi = _mm(b_gr, b_di, b_yi, PREC)
        b_yi = _mm(-b_gi, b_dr, b_yi, PREC)
    b_bound = tl.load(kbound + i_h)
    b_s = tl.where(b_bound > 0, b_bound, 1.0) * (DSCALE / (N1 * N2))
    o_t = o_m[:, None] * N2 + o_n2[None, :]
    m_t = o_t < N
    p_y = y + (i_b * H + i_h) * N + o_t
    tl.store(p_y, (b_yr * (b_s * tl.load(cscale + 2 * i_p))).to(y.dtype.element_ty), mask=m_t)
    m_t2 = o_t < tl.where(i_b + 1 < B, N, 0)
    tl.store(p_y + H * N, (b_yi * (b_s * tl.load(cscale + 2 * i_p + 1))).to(y.dtype.element_ty), mask=m_t2)


@triton.jit
def _fft_corr_sum_kernel(
    a,
    b,
    out,
    dot_out,
    f1,
    f2,
    tw,
    B,
    H,
    N,
    scale,
    N1: tl.constexpr,
    N2: tl.constexpr,
    BK: tl.constexpr,
    HAS_DOT: tl.constexpr,
    PREC: tl.constexpr,
):
    """``out[h, s] += sum_b sum_t a[b, h, t] b[b, h, t - s]`` (``s < N``) and ``dot_out[h] = sum_{b,t} a b``.

    The sum over ``b`` is taken in the frequency domain, ``IDFT(sum_b DFT(a_b) ∘ conj(DFT(b_b)))``. Program
    ``(h, i_k)`` makes block ``i_k`` of that spectrum and adds its part of the inverse into ``out`` (zeroed fp32
    ``[H, N]``) atomically; the ``N1 / BK`` programs of a channel run together, so they share the rows through L2.
    ``a, b: [B, H, N]``; ``dot_out: [H]`` fp32; ``scale`` is ``1 / L``.
    """
    N1H: tl.constexpr = N1 // 2
    NK: tl.constexpr = N1 // BK
    i_p = tl.program_id(0).to(tl.int64)
    i_h, i_k = i_p // NK, i_p % NK
    o_t = tl.arange(0, N1H)[:, None] * N2 + tl.arange(0, N2)[None, :]
    m_t = o_t < N
    b_f2r, b_f2i = _load_f2(f2, N2)
    b_f1r, b_f1i, b_tr, b_ti = _load_block(f1, tw, i_k, N1, N1H, N2, BK)
    b_pr = tl.zeros([BK, N2], dtype=tl.float32)
    b_pi = tl.zeros([BK, N2], dtype=tl.float32)
    b_s = tl.zeros([N1H, N2], dtype=tl.float32)
    for i_b in range(0, B):
        o_row = (i_b * H + i_h) * N
        b_a = tl.load(a + o_row + o_t, mask=m_t, other=0.0).to(tl.float32)
        b_b = tl.load(b + o_row + o_t, mask=m_t, other=0.0).to(tl.float32)
        if HAS_DOT:
            b_s += b_a * b_b
        b_ar, b_ai = _spectrum_block(b_a, b_f1r, b_f1i, b_tr, b_ti, b_f2r, b_f2i, PREC)
        b_br, b_bi = _spectrum_block(b_b, b_f1r, b_f1i, b_tr, b_ti, b_f2r, b_f2i, PREC)
        # P += A conj(B)
        b_pr += b_ar * b_br + b_ai * b_bi
        b_pi += b_ai * b_br - b_ar * b_bi
    b_y = tl.zeros([N1H, N2], dtype=tl.float32)
    b_y = _inverse_block(b_y, b_pr, b_pi, b_f1r, b_f1i, b_tr, b_ti, b_f2r, b_f2i, PREC)
    tl.atomic_add(out + i_h * N + o_t, b_y * scale, mask=m_t, sem="relaxed")
    if HAS_DOT:
        tl.store(dot_out + i_h, tl.sum(tl.sum(b_s, axis=1), axis=0), mask=i_k == 0)


def _factors(length: int, n2: int | None = None) -> tuple[int, int]:
    """``(N1, N2)`` for a transform of ``length`` (``n2`` overrides the choice, for sweeps). Per row the convolution
    kernel does ``L (4 N1 + 8 N2)`` flops with rows in pairs (``L (4 N1 + 16 N2)`` one row a program) and the ``dk``
    kernel ``L (4 N1 + 16 N2) / 2`` per input row, so ``N1`` between ``2 N2`` and ``4 N2``; ``N2`` at least 16 for
    ``tl.dot``, ``N1 / 2`` too."""
    if n2 is None:
        n2 = 16 if length <= 1024 else 32 if length <= 8192 else 64
    if n2 < 16 or length // n2 < 32 or length % n2:
        raise ValueError(f"N2 = {n2} does not split L = {length} into N1 >= 32 and N2 >= 16")
    return length // n2, n2


class ConvConfig(NamedTuple):
    """A launch configuration of the convolution kernel: rows per program (2 = a pair as one complex signal),
    rows ``k1`` of ``F_N1`` per block, software-pipelining stages, warps."""

    pair: bool
    block_k: int
    num_stages: int
    num_warps: int

    def describe(self, length: int, precision: str) -> str:
        rows = "pair" if self.pair else "1 row"
        return f"triton L={length} {rows} BK={self.block_k} stages={self.num_stages} warps={self.num_warps} {precision}"


def _conv_configs(length: int, precision: str) -> tuple[ConvConfig, ...]:
    """The convolution kernel's configurations for ``length`` and a dot precision, best first; the host falls
    back along them when one does not fit the GPU (shared memory), then to ``torch.fft``.

    Chosen from sm_90 compiles (README.md has the table): ``BK = 16`` keeps ``tf32x3`` under the register file
    (``BK = 32`` spills kilobytes per thread from ``L = 8192``); at ``L = 16384`` a pair of rows needs 240-330 KB of
    shared memory with ``tf32x3`` (each operand is held as a tf32 high and low part), one row 176 KB.
    """
    n1, _ = _factors(length)
    warps = 4 if length <= 2048 else 8
    # tf32x3 / bf16x3 / ieee: operands split into parts, twice the shared memory (bf16: half of tf32's)
    split = precision not in ("tf32", "bf16", "bf16emu")
    if length <= 2048:
        first = [ConvConfig(True, min(n1, 32), 3, warps)]
    elif length <= 8192:
        first = [ConvConfig(True, 16, 3, warps)]
    elif split:
        first = [ConvConfig(False, 16, 1, warps)]
    else:
        first = [ConvConfig(True, 16, 2, warps), ConvConfig(False, 16, 2, warps)]
    # shared memory fallbacks: one row, the smallest block, no pipelining; then a larger block with 2 stages,
    # which the compiler lays out with less shared memory at L = 16384 (128 KB, spilling registers instead)
    fallbacks = [ConvConfig(False, 16, 1, warps), ConvConfig(False, min(n1, 64), 2, warps)]
    return tuple(dict.fromkeys(first + fallbacks))


# tl.dot input precision by I/O dtype: 3 tf32 products (~fp32) where the output keeps more than tf32's 11 bits;
# one tf32 product for bf16, whose 8-bit output rounding is 8x coarser than tf32's.
_PREC = {torch.float32: "tf32x3", torch.float16: "tf32x3", torch.bfloat16: "tf32"}

# Which path each launch took, "triton L=... pair BK=..." or "torch.fft ...", counted since the last
# reset_paths(): benchmarks print it, so a fallback (shared memory) never hides behind a fast-looking number.
PATHS: collections.Counter[str] = collections.Counter()
# (kernel, length, precision, dtypes, device) -> index of the first configuration that launched there
_CHOSEN: dict[tuple, int] = {}


def reset_paths() -> None:
    """Empty :data:`PATHS`."""
    PATHS.clear()


@functools.cache
def _constants(
    length: int, device: torch.device, dtype: torch.dtype = torch.float32, n2: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``F_N1``, ``F_N2`` (in ``dtype``: float16 for the float16 dots) and the fp32 twiddles for ``length``."""
    n1, n2 = _factors(length, n2)
    return dft_matrix(n1, device).to(dtype), dft_matrix(n2, device).to(dtype), twiddle(n1, n2, device)


def _mirror_order(n2: int) -> torch.Tensor:
    """The interleaved order of the contiguous frequency index of ``dk``'s spectra: position ``2j`` holds
    ``k2 = j``, ``2j + 1`` holds ``N2 - 1 - j``. The mirror ``-f`` of row ``k1 > 0`` (row ``N1 - k1``, ``k2 -> N2 - 1
    - k2``) is then the same row's adjacent pair swapped, instead of a reversed row."""
    j = torch.arange(n2 // 2)
    return torch.stack((j, n2 - 1 - j), dim=1).reshape(-1)


@functools.cache
def _mirror_order_constants(
    length: int, device: torch.device, n2: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``G = F_N2`` with its columns in :func:`_mirror_order` (float16: every two-pass spectrum is stored in that
    order) and ``F_N2`` with its rows in that order (``G^T``, ``F_N2`` is symmetric; fp32, for
    :func:`_spectrum_inverse_kernel`, whose input ``Q`` is in that order)."""
    _, f2h, _ = _constants(length, device, torch.float16, n2)
    _, f2, _ = _constants(length, device, torch.float32, n2)
    order = _mirror_order(f2.shape[-1]).to(device)
    return f2h[:, :, order].contiguous(), f2[:, order, :].contiguous()


@functools.cache
def _negated_constants(length: int, device: torch.device, n2: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``F_N1`` and ``G`` (``F_N2`` in :func:`_mirror_order`) as float16 ``[3, n, n]``: ``(Re F, Im F, -Im F)``, for
    :func:`_conv_pass_kernel`."""
    f1, _, _ = _constants(length, device, torch.float16, n2)
    f2, _ = _mirror_order_constants(length, device, n2)
    return torch.cat([f1, -f1[1:]]).contiguous(), torch.cat([f2, -f2[1:]]).contiguous()


def kernel_spectrum(k: torch.Tensor, length: int, n2: int | None = None) -> torch.Tensor:
    """``[H, 2, N1, N2]`` fp32 permuted spectrum of ``k [H, N]`` zero-padded to ``length``, times ``1 / length``:
    ``khat[h, :, k1, k2] = DFT_L(k[h])[k1 + N1 k2] / L`` (re, im). One ``torch.fft`` over ``H`` rows."""
    n1, n2 = _factors(length, n2)
    spec = torch.fft.fft(k.float(), n=length).view(k.shape[0], n2, n1).transpose(1, 2) / length
    return torch.stack((spec.real, spec.imag), dim=1).contiguous()


def _launch_options(u: torch.Tensor) -> tuple[int, contextlib.AbstractContextManager]:
    length = fft_length(u.shape[-1], _MIN_L)
    # Triton launches on the current CUDA device: make it u's.
    return length, torch.cuda.device(u.device) if u.is_cuda else contextlib.nullcontext()


def _first_that_fits(key: tuple, configs: Sequence, launch: Callable[[Any], None]) -> Any | None:
    """:func:`tilewise.ops._launch.first_that_fits` with this module's record of what fitted (``_CHOSEN``)."""
    return first_that_fits(_CHOSEN, key, configs, launch)


def _conv_torch(
    u: torch.Tensor, k: torch.Tensor, skip: torch.Tensor | None, correlate: bool, out: torch.Tensor
) -> torch.Tensor:
    """The convolution (or correlation) plus the skip term by ``torch.fft`` into ``out``: the launch fallbacks'
    last resort."""
    y = _corr_torch(u, k) if correlate else fft_conv_ref(u.float(), k.float())
    if skip is not None:
        y = y + skip.float()[:, None] * u.float()
    return out.copy_(y)


def _corr_torch(u: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``y[b, h, t] = sum_{s >= t} k[h, s - t] u[b, h, s]`` by ``torch.fft`` (fp32): the convolution of the
    time-reversed row, reversed back."""
    return fft_conv_ref(u.float().flip(-1), k.float()).flip(-1)


def fft_conv_triton_fwd(
    u: torch.Tensor,
    k: torch.Tensor,
    skip: torch.Tensor | None = None,
    *,
    correlate: bool = False,
    out: torch.Tensor | None = None,
    block_k: int | None = None,
    num_warps: int | None = None,
    precision: str | None = None,
    pair: bool | None = None,
    num_stages: int | None = None,
    n2: int | None = None,
) -> torch.Tensor:
    """Host side, no autograd: causal convolution (or, with ``correlate``, the anti-causal correlation
    ``y[t] = sum_{s >= t} k[s - t] u[s]``) of contiguous ``u [B, H, N]`` with ``k [H, N]``, ``N <= MAX_FUSED_N``.

    ``out``, if given, is a contiguous tensor like ``u`` that receives the result (tests poison it).
    ``block_k``, ``num_warps``, ``precision`` (a ``tl.dot`` input precision or ``"bf16"``, see :func:`_mm`),
    ``pair``, ``num_stages`` and ``n2`` (the contiguous factor ``N2`` of the transform length)
    override the tuned configuration, for benchmark sweeps; such a launch raises when it does not fit. Without
    them the kernel falls back along :func:`_conv_configs` and finally to ``torch.fft`` when the GPU lacks the
    shared memory; :data:`PATHS` records what ran.
    """
    b, h, n = u.shape
    if out is None:
        out = torch.empty_like(u)
    if u.numel() == 0:
        return out
    length, on_device = _launch_options(u)
    n1, n2 = _factors(length, n2)
    prec = precision or _PREC[u.dtype]
    if prec == "bf16" and u.device.type != "cuda":
        prec += "emu"  # Triton's interpreter: the same operand rounding, fp32 dots (see _mm)
    configs = _conv_configs(length, prec)
    overrides = (block_k, num_warps, pair, num_stages, n2 if n2 != _factors(length)[1] else None)
    if any(o is not None for o in overrides):
        c = configs[0]
        configs = (
            ConvConfig(
                c.pair if pair is None else pair,
                min(block_k or c.block_k, n1),
                num_stages or c.num_stages,
                num_warps or c.num_warps,
            ),
        )
    if prec in ("fp16", "fp16emu"):
        raise ValueError("float16 products run in the two-pass kernels (fft_conv_two_pass), not the fused one")
    khat = kernel_spectrum(k, length, n2)
    f1, f2, tw = _constants(length, u.device, torch.float32, n2)

    def launch(c: ConvConfig) -> None:
        grid = (h * ((b + 1) // 2 if c.pair else b),)
        _fft_conv_kernel[grid](
            u,
            khat,
            skip if skip is not None else u,
            out,
            f1,
            f2,
            tw,
            b,
            h,
            n,
            N1=n1,
            N2=n2,
            BK=c.block_k,
            CONJ=correlate,
            HAS_SKIP=skip is not None,
            PAIR=c.pair,
            PREC=prec,
            num_warps=c.num_warps,
            num_stages=c.num_stages,
        )

    with on_device:
        if len(configs) == 1:
            launch(configs[0])
            ran = configs[0]
        else:
            key = ("conv", length, prec, u.dtype, k.dtype, u.device)
            ran = _first_that_fits(key, configs, launch)
    if ran is not None:
        PATHS[ran.describe(length, prec) + ("" if n2 == _factors(length)[1] else f" N2={n2}")] += 1
        return out
    PATHS[f"torch.fft L={length} (no kernel configuration fits)"] += 1
    return _conv_torch(u, k, skip, correlate, out)


class TwoPassConfig(NamedTuple):
    """Launch configuration of the two-pass convolution: pass 1's rows ``k1`` a program, signals a program, warps
    and pipelining stages; pass 2's output rows a program, step over ``k1``, warps and stages; a register cap per
    thread for each (``maxnreg``, None: the compiler's choice), which can let two programs share an SM."""

    block_k: int = 128
    pairs: int = 4
    warps1: int = 8
    stages1: int = 2
    block_m: int = 64
    block_k2: int = 32
    warps2: int = 4
    stages2: int = 3
    maxnreg1: int | None = None
    maxnreg2: int | None = None


def fft_conv_two_pass(
    u: torch.Tensor,
    k: torch.Tensor,
    skip: torch.Tensor | None = None,
    *,
    correlate: bool = False,
    out: torch.Tensor | None = None,
    config: TwoPassConfig | None = None,
    n2: int | None = None,
    only_pass: int | None = None,
    spectrum: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Host side, no autograd: :func:`fft_conv_triton_fwd`'s convolution (or correlation) in two passes with
    float16 dot operands, for contiguous ``u [B, H, N]``, ``k [H, N]``, ``N <= MAX_FUSED_N``.

    The rows of ``k`` are first taken to their permuted spectra (:func:`_forward_pass_kernel`, ``H`` real rows).
    Pass 1 (the same kernel with ``CONVOLVE``) takes each pair of rows (one complex signal) to the frequency
    domain, multiplies by the kernel's spectrum and takes it back along the contiguous axis, storing the float16
    ``D`` (64 KB a pair at ``L = 16384``); pass 2 (:func:`_inverse_pass_kernel`) is the batched complex matrix
    product ``conj(F_N1)[:N1/2] @ D`` that finishes the inverse. Splitting there keeps pass 1 free of an output
    tile and pass 2 a plain pipelined matrix product. The skip term is folded into the kernel's spectrum, so ``u``
    is read once.

    ``config`` and ``n2`` (the contiguous factor of the transform length) override the defaults, and ``only_pass``
    (1 or 2) launches one pass alone (the output is then meaningless), for benchmark sweeps. ``spectrum``
    (:func:`pair_spectrum_buffers`) also receives ``u``'s pair spectra and row scales, for
    :func:`fft_corr_sum_two_pass`'s ``given``.
    """
    b, h, n = u.shape
    if out is None:
        out = torch.empty_like(u)
    if u.numel() == 0:
        return out
    cfg = config or TwoPassConfig()
    length, on_device = _launch_options(u)
    n1, n2 = _factors(length, n2)
    prec = "fp16" if u.device.type == "cuda" else "fp16emu"
    bk, bm, bk2 = min(cfg.block_k, n1), min(cfg.block_m, n1 // 2), min(cfg.block_k2, n1)
    f1, _, tw = _constants(length, u.device, torch.float16, n2)
    f1n, f2n = _negated_constants(length, u.device, n2)
    nb2 = (b + 1) // 2
    gp = min(cfg.pairs, nb2)
    gp_k = min(cfg.pairs, h)
    d = torch.empty((h * nb2, 2, n1, n2), dtype=torch.float16, device=u.device)
    cscale = spectrum[1] if spectrum is not None else torch.empty((h * nb2, 2), dtype=torch.float32, device=u.device)
    kc = torch.empty((h, 2, n1, n2), dtype=torch.float16, device=u.device)
    kscale = torch.empty((h,), dtype=torch.float32, device=u.device)
    kbound = torch.empty((h,), dtype=torch.float32, device=u.device)
    pass1 = {"N1": n1, "N2": n2, "BK": bk, "PREC": prec, "HAS_SKIP": skip is not None}
    pass1 |= {"num_warps": cfg.warps1, "num_stages": cfg.stages1}
    if cfg.maxnreg1 and u.is_cuda:
        pass1["maxnreg"] = cfg.maxnreg1
    skip_arg = skip if skip is not None else kbound
    with on_device:
        if only_pass != 2:
            # the kernel's rows as B = H rows of one channel, GP of them a program
            _forward_pass_kernel[(n1 // bk, 1, triton.cdiv(h, gp_k))](
                k, kc, kscale, kbound, skip_arg, f1, f2n, tw, h, 1, n, GP=gp_k, PAIR=False, **pass1
            )
            _conv_pass_kernel[(n1 // bk, h, triton.cdiv(nb2, gp))](
                u, d, cscale, kc, kscale, kbound, skip_arg, f1n, f2n, tw, b, h, n, GP=gp, CONJ=correlate,
                HALF=u.dtype != torch.float32 or TUNING["products"] == "float16",
                spec=spectrum[0] if spectrum is not None else None, **pass1,
            )  # fmt: skip
        if only_pass != 1:
            _inverse_pass_kernel[(n1 // 2 // bm, h * nb2)](
                d, cscale, kbound, out, f1, b, h, n, N1=n1, N2=n2, BM=bm, BK=bk2, PREC=prec, num_warps=cfg.warps2,
                num_stages=cfg.stages2, **({"maxnreg": cfg.maxnreg2} if cfg.maxnreg2 and u.is_cuda else {}),
            )  # fmt: skip
    PATHS[f"triton two-pass L={length} ({n1}x{n2}) {cfg} fp16"] += 1
    return out


# _corr_spectrum_kernel's launch (rows k1 a program, warps) and _spectrum_inverse_kernel's. H100, B=8 H=768 N=8192
# fp32, the whole dk (torch.fft's 2.45 ms): sum rows/warps 16/4 1.39 ms, 32/4 1.43, 32/8 1.43, 16/2 1.42, 8/2 1.38;
# inverse 128 rows / 8 warps 1.37 (with the inverse in the sum's kernel, before the mirror order: 1.88 - 2.27).
CORR_LAUNCH = {"block_k": 16, "warps": 4, "inverse_block_k": 64, "inverse_warps": 4}


def pair_spectrum_buffers(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty float16 pair spectra ``[H ceil(B/2), 2, N1, N2]`` and fp32 row scales ``[H ceil(B/2), 2]`` for the
    rows of ``x [B, H, N]``: what :func:`fft_conv_two_pass` can fill (``spectrum=``) and
    :func:`fft_corr_sum_two_pass` reuse (``given=``)."""
    bsz, h, n = x.shape
    n1, n2 = _factors(fft_length(n, _MIN_L))
    s = h * ((bsz + 1) // 2)
    z = torch.empty((s, 2, n1, n2), dtype=torch.float16, device=x.device)
    return z, torch.empty((s, 2), dtype=torch.float32, device=x.device)


def fft_corr_sum_two_pass(
    a: torch.Tensor,
    b: torch.Tensor,
    config: TwoPassConfig | None = None,
    given: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Host side, no autograd: :func:`fft_corr_sum_triton`'s ``out[h, s] = sum_{b, t} a[b, h, t] b[b, h, t - s]``
    (fp32 ``[H, N]``) and ``dot[h] = sum_{b, t} a b`` (fp32 ``[H]``) on the two-pass kernels, for contiguous ``a, b
    [B, H, N]`` (``N <= MAX_FUSED_N``): pass 1 without ``CONVOLVE`` takes the pairs of rows of ``a`` and of ``b``
    to their float16 spectra, :func:`_corr_spectrum_kernel` separates the rows and sums ``DFT(a_b) conj(DFT(b_b))``
    over the batch (two channels as one complex signal), and :func:`_inverse_pass_kernel` takes the channel pairs
    back to time with tf32x3 products. ``dot`` is an fp32 sum of products (from the spectra by Parseval it would
    carry their float16 rounding, ~1e-3), taken in the pass over ``b`` (over ``a`` when ``b``'s spectrum is given).
    ``given`` maps 0 (``a``) or 1 (``b``) to spectra already computed (:func:`pair_spectrum_buffers`, filled by
    :func:`fft_conv_two_pass`), whose pass is then skipped."""
    bsz, h, n = a.shape
    out = torch.zeros((h, n), dtype=torch.float32, device=a.device)
    if bsz == 0 or n == 0 or h == 0:
        return out, torch.zeros((h,), dtype=torch.float32, device=a.device)
    cfg = config or TwoPassConfig()
    length, on_device = _launch_options(a)
    n1, n2 = _factors(length)
    prec = "fp16" if a.device.type == "cuda" else "fp16emu"
    bk, bm, bk2 = min(cfg.block_k, n1), min(cfg.block_m, n1 // 2), min(cfg.block_k2, n1)
    f1h, _, tw = _constants(length, a.device, torch.float16)
    f1, _, _ = _constants(length, a.device, torch.float32)
    f2h, f2 = _mirror_order_constants(length, a.device)
    nb2 = (bsz + 1) // 2
    gp = min(cfg.pairs, nb2)
    h2 = (h + 1) // 2
    spectra = []
    pass1 = {"N1": n1, "N2": n2, "BK": bk, "PREC": prec, "HAS_SKIP": False}
    pass1 |= {"num_warps": cfg.warps1, "num_stages": cfg.stages1}
    d = torch.empty((h2, 2, n1, n2), dtype=torch.float32, device=a.device)
    dots = torch.empty((bsz, h), dtype=torch.float32, device=a.device)
    # pass 2's output scale is cscale[p, 0 / 1] kbound[0] DSCALE / L: 1 / L here (DSCALE = 4 N2)
    inv_dscale = torch.full((h2, 2), 1.0 / (4 * n2), dtype=torch.float32, device=a.device)
    one = torch.ones((1,), dtype=torch.float32, device=a.device)
    with on_device:
        given = given or {}
        # the dot in the pass over b (over a when b's spectrum is given)
        dot_in = 0 if 1 in given else 1
        for i, (x, y) in enumerate(((a, b), (b, a))):
            if i in given:
                spectra += list(given[i])
                continue
            z, s = pair_spectrum_buffers(x)
            other = y if i == dot_in else None
            _forward_pass_kernel[(n1 // bk, h, triton.cdiv(nb2, gp))](
                x, z, s, s, s, f1h, f2h, tw, bsz, h, n, GP=gp, PAIR=True, other=other, dots=dots, **pass1
            )
            spectra += [z, s]
        if len(given) == 2:
            dots.copy_((a.float() * b.float()).sum(2))
        exact = "tf32x3" if a.is_cuda else "ieee"
        bkc = min(CORR_LAUNCH["block_k"], n1)
        _corr_spectrum_kernel[(n1 // bkc, h2)](
            *spectra, d, bsz, h, N1=n1, N2=n2, BK=bkc, num_warps=CORR_LAUNCH["warps"]
        )
        bki = min(CORR_LAUNCH["inverse_block_k"], n1)
        _spectrum_inverse_kernel[(n1 // bki, h2)](
            d, f2, tw, N1=n1, N2=n2, BK=bki, PREC=exact, num_warps=CORR_LAUNCH["inverse_warps"]
        )
        _inverse_pass_kernel[(n1 // 2 // bm, h2)](
            d, inv_dscale, one, out, f1, h, 1, n, N1=n1, N2=n2, BM=bm, BK=bk2, PREC=exact, num_warps=cfg.warps2,
            num_stages=cfg.stages2,
        )  # fmt: skip
    PATHS[f"triton two-pass dk L={length} ({n1}x{n2})"] += 1
    return out, dots.sum(0)


def fft_corr_sum_triton(
    a: torch.Tensor, b: torch.Tensor, with_dot: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Host side, no autograd: ``out[h, s] = sum_{b, t} a[b, h, t] b[b, h, t - s]`` for contiguous ``a, b
    [B, H, N]`` (``N <= MAX_FUSED_N``), fp32 ``[H, N]``; with ``with_dot`` also fp32 ``sum_{b, t} a b`` ``[H]``.
    Falls back to fewer pipelining stages, then ``torch.fft``, when the GPU lacks the shared memory (:data:`PATHS`)."""
    bsz, h, n = a.shape
    out = torch.zeros((h, n), dtype=torch.float32, device=a.device)
    dot = torch.zeros((h,), dtype=torch.float32, device=a.device) if with_dot else None
    if bsz == 0 or n == 0 or h == 0:
        return out, dot
    length, on_device = _launch_options(a)
    n1, n2 = _factors(length)
    bk = min(n1, 32)
    prec = "tf32" if a.dtype == b.dtype == torch.bfloat16 else "tf32x3"
    f1, f2, tw = _constants(length, a.device)
    warps = 4 if length <= 2048 else 8

    def launch(stages: int) -> None:
        _fft_corr_sum_kernel[(h * (n1 // bk),)](
            a,
            b,
            out,
            dot if dot is not None else out,
            f1,
            f2,
            tw,
            bsz,
            h,
            n,
            1.0 / length,
            N1=n1,
            N2=n2,
            BK=bk,
            HAS_DOT=with_dot,
            PREC=prec,
            num_warps=warps,
            num_stages=stages,
        )

    with on_device:
        stages = _first_that_fits(("corr", length, prec, a.dtype, b.dtype, a.device), (3, 1), launch)
    if stages is not None:
        PATHS[f"triton dk L={length} BK={bk} stages={stages} warps={warps} {prec}"] += 1
        return out, dot
    PATHS[f"torch.fft dk L={length} (no kernel configuration fits)"] += 1
    return _corr_sum_torch(a, b, out, dot)


def _corr_sum_torch(
    a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None, dot: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`fft_corr_sum_triton`'s sums by ``torch.fft`` (fp32): the batch sum taken in the frequency domain."""
    n = a.shape[-1]
    af, bf = a.float(), b.float()
    spec = torch.fft.rfft(af, n=2 * n) * torch.fft.rfft(bf, n=2 * n).conj()
    corr = torch.fft.irfft(spec.sum(0), n=2 * n)[..., :n]
    prod = (af * bf).sum((0, 2))
    if out is None:
        return corr, prod
    out.copy_(corr)
    if dot is not None:
        dot.copy_(prod)
    return out, dot


# What the op (fft_conv's Triton backend) runs. "conv": "two-pass" (fft_conv_two_pass, float16 dots: ~5e-4
# relative RMS error, inside issue #5's 1e-3 for fp32; H100 B=8 H=768 N=8192 fp32 forward 0.70-0.74 ms against
# torch.fft's 2.31, BENCHMARKS.md) or "fused" (fft_conv_triton_fwd: tf32x3 / tf32 dots, ~1e-6 for fp32, but
# 0.31x torch.fft there). "dk": the kernel's gradient by "two-pass" (fft_corr_sum_two_pass: the same float16
# spectra, ~5e-4; 1.88 ms at that shape), "torch.fft" (rfft of both, the batch sum, one irfft: 2.45 ms) or
# "triton" (fft_corr_sum_triton, tf32x3 / tf32: slower than torch.fft, the fused kernel's partner).
# "products": pass 1's twiddle and kernel products in float16 for 16-bit I/O only ("auto"; fp32 products for fp32
# I/O, 6.0e-4 relative RMS at the headline shape on the H100) or for every dtype ("float16": 7.6e-4 there).
TUNING: dict[str, str] = {"conv": "two-pass", "dk": "two-pass", "products": "auto"}

# The two-pass launch configurations, best first (H100 sweep, benchmarks/gpu_fft_conv_sweep.py --two-pass: pass 1
# 0.56 ms, pass 2 0.18 ms at B=8 H=768 N=8192 fp32; 3 stages in pass 1 asks 232 KB there, over the H100's 227 KB);
# the second asks less shared memory (64 KB in pass 1 instead of 96 KB), then torch.fft.
_TWO_PASS_CONFIGS = (
    TwoPassConfig(),
    TwoPassConfig(block_k=64, pairs=4, warps1=4, stages1=1, block_m=64, block_k2=32, warps2=4, stages2=1),
)


def _conv(
    u: torch.Tensor,
    k: torch.Tensor,
    skip: torch.Tensor | None,
    correlate: bool,
    spectrum: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, bool]:
    """The op's forward: :data:`TUNING` ``"conv"``'s path, the two-pass one falling back along
    ``_TWO_PASS_CONFIGS`` and then to ``torch.fft`` where the GPU lacks the shared memory (:data:`PATHS`).
    ``spectrum`` receives ``u``'s pair spectra if the two-pass path ran, which the second value says."""
    if TUNING["conv"] == "fused":
        return fft_conv_triton_fwd(u, k, skip, correlate=correlate), False
    out = torch.empty_like(u)
    if u.numel() == 0:
        return out, False
    length, _ = _launch_options(u)
    key = ("two-pass", length, u.dtype, k.dtype, u.device)
    ran = _first_that_fits(
        key,
        _TWO_PASS_CONFIGS,
        lambda c: fft_conv_two_pass(u, k, skip, correlate=correlate, out=out, config=c, spectrum=spectrum),
    )
    if ran is not None:
        return out, True
    PATHS[f"torch.fft L={length} (no two-pass configuration fits)"] += 1
    return _conv_torch(u, k, skip, correlate, out), False


@torch.library.custom_op("tilewise::fft_conv", mutates_args=())
def _fft_conv_op(u: torch.Tensor, k: torch.Tensor, skip: torch.Tensor | None, correlate: bool) -> torch.Tensor:
    return _conv(u.contiguous(), k.contiguous(), skip.contiguous() if skip is not None else None, correlate)[0]


@_fft_conv_op.register_fake
def _(u: torch.Tensor, k: torch.Tensor, skip: torch.Tensor | None, correlate: bool) -> torch.Tensor:
    return u.new_empty(u.shape)


def _corr_sum(
    a: torch.Tensor, b: torch.Tensor, given: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``sum_b corr(a_b, b_b)`` and ``sum a b`` (fp32) by :data:`TUNING` ``"dk"``'s path; ``given`` spectra (for the
    two-pass path) skip their pass."""
    if TUNING["dk"] == "triton":
        return fft_corr_sum_triton(a, b, with_dot=True)
    if TUNING["dk"] == "two-pass" and a.numel():
        key = ("two-pass dk", fft_length(a.shape[-1], _MIN_L), a.dtype, b.dtype, a.device)
        done: list = []
        if _first_that_fits(key, _TWO_PASS_CONFIGS, lambda c: done.append(fft_corr_sum_two_pass(a, b, c, given))):
            return done[-1]
        PATHS["torch.fft dk (no two-pass configuration fits)"] += 1
    else:
        PATHS["torch.fft dk"] += 1
    return _corr_sum_torch(a, b)


@torch.library.custom_op("tilewise::fft_corr_sum", mutates_args=())
def _fft_corr_sum_op(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _corr_sum(a.contiguous(), b.contiguous())


def _conv_backward(
    dy: torch.Tensor, u: torch.Tensor, k: torch.Tensor, skip: torch.Tensor | None, correlate: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``du``, ``dk`` (fp32) and ``sum dy u`` (fp32) of the op in one go (no double backward): ``du``'s pass 1
    stores ``dy``'s pair spectra, which ``dk`` reuses instead of a pass of its own over ``dy``."""
    dy, u, k = dy.contiguous(), u.contiguous(), k.contiguous()
    skip = skip.contiguous() if skip is not None else None
    share = TUNING["conv"] == TUNING["dk"] == "two-pass" and dy.numel() > 0
    spectrum = pair_spectrum_buffers(dy) if share else None
    du, two_pass = _conv(dy, k, skip, not correlate, spectrum)
    if not two_pass:
        spectrum = None  # du fell back to torch.fft: nothing was stored
    # conv: dk[s] = sum_t dy[t] u[t - s]; correlation: dk[s] = sum_t u[t] dy[t - s]
    a, b, i_dy = (u, dy, 1) if correlate else (dy, u, 0)
    dk, dot = _corr_sum(a, b, {i_dy: spectrum} if spectrum is not None else None)
    return du, dk, dot


@torch.library.custom_op("tilewise::fft_conv_backward", mutates_args=())
def _fft_conv_backward_op(
    dy: torch.Tensor, u: torch.Tensor, k: torch.Tensor, skip: torch.Tensor | None, correlate: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_conv_backward` as an op."""
    return _conv_backward(dy, u, k, skip, correlate)


@_fft_conv_backward_op.register_fake
def _(dy: torch.Tensor, u: torch.Tensor, k: torch.Tensor, skip: torch.Tensor | None, correlate: bool):
    h = u.shape[1]
    return dy.new_empty(dy.shape), dy.new_empty(k.shape, dtype=torch.float32), dy.new_empty((h,), dtype=torch.float32)


@_fft_corr_sum_op.register_fake
def _(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return a.new_empty(a.shape[1:], dtype=torch.float32), a.new_empty(a.shape[1:2], dtype=torch.float32)


def _setup_context(ctx, inputs, output) -> None:
    u, k, skip, correlate = inputs
    ctx.save_for_backward(u, k, skip)
    ctx.correlate = correlate


def _backward(ctx, dy: torch.Tensor, eager: bool = False):
    """Adjoints: a causal convolution's is the anti-causal correlation with the same kernel (and back), the
    kernel's gradient a correlation summed over the batch, the skip's ``sum(dy * u)`` (README.md). ``eager``
    (:class:`_EagerFFTConv`): the same host functions without the custom ops."""
    u, k, skip = ctx.saved_tensors
    du = dk = dskip = None
    if ctx.needs_input_grad[0] and (ctx.needs_input_grad[1] or ctx.needs_input_grad[2]) and not torch.is_grad_enabled():
        # all at once, sharing dy's spectra (the combined op has no autograd: not under create_graph=True)
        du, dk32, dot = (_conv_backward if eager else _fft_conv_backward_op)(dy, u, k, skip, ctx.correlate)
        return du, dk32.to(k.dtype), dot.to(skip.dtype) if skip is not None else None, None
    if ctx.needs_input_grad[0]:
        # differentiable either way (under create_graph=True the correlation's own backward is the convolution)
        du = (_EagerFFTConv.apply if eager else _fft_conv_op)(dy, k, skip, not ctx.correlate)
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
        # conv: dk[s] = sum_t dy[t] u[t - s]; correlation: dk[s] = sum_t u[t] dy[t - s].
        a, b = (u, dy) if ctx.correlate else (dy, u)
        dk32, dot = _corr_sum(a.contiguous(), b.contiguous()) if eager else _fft_corr_sum_op(a, b)
        dk = dk32.to(k.dtype)
        dskip = dot.to(skip.dtype) if skip is not None else None
    return du, dk, dskip, None


_fft_conv_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerFFTConv(torch.autograd.Function):
    """The same forward and backward as :func:`_fft_conv_op` without the custom-op layers (dispatcher, fake-tensor
    wrapper, the compiler's disable guard), for eager calls, where at short lengths the GPU waits on the host. The
    custom op stays for ``torch.compile``."""

    @staticmethod
    def forward(ctx, u, k, skip, correlate):
        ctx.save_for_backward(u, k, skip)
        ctx.correlate = correlate
        return _conv(u.contiguous(), k.contiguous(), skip.contiguous() if skip is not None else None, correlate)[0]

    @staticmethod
    def backward(ctx, dy):
        return _backward(ctx, dy, eager=True)


# Tests set this to run the eager calls through the custom op as well (both paths share the host functions).
EAGER_VIA_CUSTOM_OP = False


def fft_conv_triton(u: torch.Tensor, k: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
    """Causal FFT convolution with the Triton kernels, differentiable (the ``tilewise::fft_conv`` op under
    ``torch.compile``, a plain autograd.Function in eager calls); ``u [B, H, N]``, ``k [H, N]``, ``skip [H]`` or
    None, ``N <= MAX_FUSED_N``; returns ``[B, H, N]`` in u's dtype."""
    if torch.compiler.is_compiling() or EAGER_VIA_CUSTOM_OP:
        return _fft_conv_op(u, k, skip, False)
    return _EagerFFTConv.apply(u, k, skip, False)
