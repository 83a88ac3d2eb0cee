"""Fused multi-tensor optimizer steps (AdamW/Adam, Lion, SGD) on fp32, bf16 or block-quantized state.

One launch updates a whole list of parameters of one (parameter dtype, gradient dtype, master copy) group. The host
builds, once per list (cached by the tensors' addresses and sizes), two small device tables:

- ``tab int64 [T, NS]``: per tensor where ``p, g, m codes|m, m scales, v codes|v, v scales, v_max codes,
  v_max scales, master`` live (byte offsets from the row itself, in units of 16 bytes when all are 16-byte aligned),
  the addresses of ``step`` and ``skips``, and its ``numel`` (slot indices ``_P`` .. ``_N``);
- ``tiles int32 [P, 2]``: per program ``(tensor index, tile index)``; a tile is ``ROWS`` whole quantization blocks
  of ``BS`` elements of one tensor, so each program owns its blocks' absmax and codes outright.

A program turns the slots into typed pointers (``tab_t`` + offset, bitcast: unlike an ``int64 -> pointer`` cast
this keeps the 16-byte alignment the compiler needs to vectorize), loads ``p`` (or ``master``), ``g`` and the
dequantized moments (``fp32(c[code] * scale)``, codebook gathers), updates in fp32 in the op order of
``reference.py``, writes ``p`` (nearest, stochastic or via ``master``) and re-quantizes the moments with the
blockquant rule, reusing its cell-table code search (``_cell_codes``), so codes equal the reference's wherever the
fp32 values agree. Full tiles run the body with a constant length (masks known true: 16-byte vector loads and
stores); a tensor's last, partial tile runs it with the loaded length.

``step``: a tiny launch before the step (``_scalar_kernel``) reads each tensor's old ``step`` and writes its scalars for
this step (``lr``, the decay factor, the bias corrections for ``step + 1``) into ``sc float32 [T, NSC]``, which the tile
programs load; a second tiny launch after it (``_bump_kernel``) adds 1 to each ``step`` (and, under ``skip_nonfinite``,
adds 1 to ``skips`` instead for a skipped tensor and clears its flag). With ``skip_nonfinite`` a pre-pass
(``_finite_kernel``) counts each tensor's non-finite gradient elements into ``bad int32 [T]``; the step kernel masks
every load and store of a tensor whose count is not 0. Nothing syncs with the host, ``lr`` may be a device tensor, and
after the first call per list nothing is allocated: the launches can be captured in a CUDA graph (stochastic rounding
then replays the captured seed).

Scalars the reference computes in float64 (``1 - beta**step``, ``lr / bc1``, ``1 - lr * wd``) are computed in
float64 in ``_scalar_kernel``: each float64 host scalar is passed as an fp32 pair ``hi + lo`` (exact to ~2**-48)
and ``beta**step`` by repeated squaring.
"""

from __future__ import annotations

import collections
import dataclasses
import random
import struct
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from tilewise.ops.blockquant.triton import (
    _INTERPRET,
    _MIN_LUT_SCALE,
    _cell_codes,
    _gather,
    _max_nan,
    _on,
    _plan,
    _search_codes,
    _to_bf16_rne,
)
from tilewise.ops.optim_step.reference import QUANT_FORMATS, buffer_keys
from tilewise.quant.codebooks import _build as _codebook_table

__all__ = ["adam_step_triton", "lion_step_triton", "sgd_step_triton"]

# Slots of the per-tensor address table (constexpr: the kernels read them; the host indexes lists with them).
_P, _G, _M, _MS, _V, _VS, _X, _XS, _W, _STEP, _SKIPS, _N = (tl.constexpr(i) for i in range(12))
_NS = tl.constexpr(12)
# Columns of the per-tensor scalar table that _scalar_kernel writes each step.
_SC_LR, _SC_DECAY, _SC_STEP_SIZE, _SC_BC2_SQRT, _SC_INV_BC2_SQRT, _SC_FIRST = (tl.constexpr(i) for i in range(6))
_NSC = tl.constexpr(8)
# Which update OPT selects.
_ADAM, _LION, _SGD = 0, 1, 2
# Elements per program (whole quantization blocks), warps (8 elements a thread) and an optional register cap, by
# state format, or by "format/parameter bytes" where the parameter dtype changes the best choice. The quantized
# formats take small programs (one or two warps: few wait at each tile's reductions and barriers) capped at 56
# registers (36 warps an SM instead of 28): from the tile sweep on an H100 (BENCHMARKS.md).
_TILE, _WARPS = 2048, 8
_TILE_WARPS: dict[str, tuple[int, ...]] = {
    "q8": (256, 1, 56),
    "q4": (256, 1, 56),
    "q4/2": (512, 2, 56),
    "fp8": (512, 2, 56),
}


def _tiling(fmt: str, param_bytes: int) -> tuple[int, int, int | None]:
    """``(elements per program, warps, register cap or None)`` of the step kernel for state format ``fmt`` and
    parameters of ``param_bytes`` bytes an element."""
    tile, warps, *cap = _TILE_WARPS.get(f"{fmt}/{param_bytes}", _TILE_WARPS.get(fmt, (_TILE, _WARPS)))
    return tile, warps, cap[0] if cap else None


@triton.jit
def _ptr(tab_t, SLOT: tl.constexpr, TY: tl.constexpr, ALIGNED: tl.constexpr):
    """The array in slot ``SLOT`` of a tensor's table row ``tab_t`` as a ``TY*`` pointer. The slot holds the
    array's byte offset from ``tab_t`` itself, divided by 16 when ``ALIGNED`` (every array is 16-byte aligned).
    Offsetting a kernel argument keeps the alignment the compiler knows (``tab_t`` is 16-byte aligned, and
    ``* 16`` says the offset is too), so the loads vectorize; an ``int64 -> pointer`` cast or a
    ``tl.multiple_of`` hint on a loaded scalar loses it (Triton 3.9: one-element loads)."""
    b_o = tl.load(tab_t + SLOT)
    if ALIGNED:
        b_o = b_o * 16
    return (tab_t.to(tl.pointer_type(tl.uint8), bitcast=True) + b_o).to(tl.pointer_type(TY), bitcast=True)


@triton.jit
def _f64(hi, lo):
    """A float64 host scalar passed as the fp32 pair ``hi + lo``."""
    return tl.cast(hi, tl.float64) + tl.cast(lo, tl.float64)


@triton.jit
def _pow64(b, n):
    """``b ** n`` in float64 for an integer ``0 <= n < 2**24`` (fp32 ``step`` counts exactly up to there), by
    repeated squaring: 24 scalar steps per program."""
    acc = tl.full((), 1.0, tl.float64)
    for k in tl.static_range(24):
        acc = tl.where(((n >> k) & 1) != 0, acc * b, acc)
        b = b * b
    return acc


@triton.jit
def _lerp(a, b, w):
    """``torch.lerp(a, b, w)`` for a scalar weight in torch's vectorized CPU form: ``fma(w, b - a, a)`` for
    ``|w| < 0.5``, else ``fma(w - 1, b - a, b)`` (the fma matters where ``a`` and ``b`` nearly cancel)."""
    w = tl.cast(w, tl.float32)
    small = tl.abs(w) < 0.5
    return tl.fma(tl.where(small, w, w - 1.0), b - a, tl.where(small, a, b))


@triton.jit
def _load_state(
    tab_t, SLOT: tl.constexpr, code_ptr, K, i_b, o_r, o_x, m_x, m_r, m_p, FMT: tl.constexpr, BITS: tl.constexpr,
    BS: tl.constexpr, ROWS: tl.constexpr, ALIGNED: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    """One tile ``[ROWS, BS]`` of a moment as fp32: fp32 (``FMT`` 0), bf16 (1) or codes + scales (2) in slots
    ``SLOT, SLOT + 1``, dequantized as ``fp32(c[code] * scale)``; elements outside ``m_x`` read 0."""
    TILE: tl.constexpr = ROWS * BS
    if FMT == 0:
        b_y = tl.load(_ptr(tab_t, SLOT, tl.float32, ALIGNED) + i_b * TILE + o_x, mask=m_x, other=0.0)
    elif FMT == 1:
        b_y = tl.load(_ptr(tab_t, SLOT, tl.bfloat16, ALIGNED) + i_b * TILE + o_x, mask=m_x, other=0.0)
        b_y = b_y.to(tl.float32)
    else:
        p_s = _ptr(tab_t, SLOT + 1, tl.float32, ALIGNED)
        b_s = tl.load(p_s + i_b * ROWS + o_r, mask=m_r, other=0.0)[:, None]
        p_c = _ptr(tab_t, SLOT, tl.uint8, ALIGNED)
        if BITS == 8:
            b_q = tl.load(p_c + i_b * TILE + o_x, mask=m_x, other=0).to(tl.int32)
            b_y = _gather(code_ptr, tl.minimum(b_q, K - 1), INTERPRET) * b_s
        else:
            o_p = o_r[:, None] * (BS // 2) + tl.arange(0, BS // 2)[None, :]
            b_p = tl.load(p_c + i_b * (TILE // 2) + o_p, mask=m_p, other=0).to(tl.int32)
            b_hi = _gather(code_ptr, tl.minimum(b_p >> 4, K - 1), INTERPRET) * b_s
            b_lo = _gather(code_ptr, tl.minimum(b_p & 15, K - 1), INTERPRET) * b_s
            b_y = tl.reshape(tl.join(b_hi, b_lo), [ROWS, BS])
        b_y = tl.where(m_x, b_y, 0.0)
    return b_y


@triton.jit
def _store_bf16(ptr, b_y, mask, INTERPRET: tl.constexpr):
    """Store fp32 ``b_y`` as bf16, rounded to nearest even (the interpreter's ``.to`` truncates)."""
    if INTERPRET:
        tl.store(ptr, _to_bf16_rne(b_y), mask=mask)
    else:
        tl.store(ptr, b_y.to(tl.bfloat16), mask=mask)


@triton.jit
def _store_state(
    tab_t, SLOT: tl.constexpr, b_x, lut_ptr, thr_ptr, mid_ptr, i_b, o_r, o_x, m_x, m_r, m_p, FMT: tl.constexpr,
    BITS: tl.constexpr, BS: tl.constexpr, ROWS: tl.constexpr, SEARCH: tl.constexpr, G: tl.constexpr,
    M: tl.constexpr, E0: tl.constexpr, NT: tl.constexpr, R: tl.constexpr, ALIGNED: tl.constexpr,
    INTERPRET: tl.constexpr,
):  # fmt: skip
    """Write the fp32 tile ``b_x [ROWS, BS]`` (0 outside ``m_x``) into slot ``SLOT``: as fp32, bf16 (nearest) or
    re-quantized by the blockquant rule (absmax per row, NaN propagating; ``code = #{j : x > fp32(s * mid[j])}``)."""
    TILE: tl.constexpr = ROWS * BS
    if FMT == 0:
        tl.store(_ptr(tab_t, SLOT, tl.float32, ALIGNED) + i_b * TILE + o_x, b_x, mask=m_x)
    elif FMT == 1:
        _store_bf16(_ptr(tab_t, SLOT, tl.bfloat16, ALIGNED) + i_b * TILE + o_x, b_x, m_x, INTERPRET)
    else:
        if INTERPRET:  # the interpreter runs a custom combine element by element: slow
            b_s = tl.max(tl.where(b_x == b_x, tl.abs(b_x), float("inf")), axis=1)
        else:
            b_s = tl.reduce(tl.abs(b_x), 1, _max_nan)
        tl.store(_ptr(tab_t, SLOT + 1, tl.float32, ALIGNED) + i_b * ROWS + o_r, b_s, mask=m_r)
        b_s = tl.where(b_s > 0, b_s, 1.0)
        if SEARCH == 0:
            b_q = _search_codes(b_x, b_s[:, None], mid_ptr, BITS, INTERPRET)
        elif tl.min(b_s) >= _MIN_LUT_SCALE:
            b_q = _cell_codes(b_x, b_s[:, None], lut_ptr, thr_ptr, SEARCH, G, M, E0, NT, R, INTERPRET)
        else:
            b_q = _search_codes(b_x, b_s[:, None], mid_ptr, BITS, INTERPRET)
        p_c = _ptr(tab_t, SLOT, tl.uint8, ALIGNED)
        if BITS == 8:
            tl.store(p_c + i_b * TILE + o_x, b_q.to(tl.uint8), mask=m_x)
        else:
            # elements past n get code 0, so an odd n leaves the last low nibble 0
            b_q = tl.where(m_x, b_q, 0)
            b_hi, b_lo = tl.split(tl.reshape(b_q, [ROWS, BS // 2, 2]))
            o_p = o_r[:, None] * (BS // 2) + tl.arange(0, BS // 2)[None, :]
            tl.store(p_c + i_b * (TILE // 2) + o_p, ((b_hi << 4) | b_lo).to(tl.uint8), mask=m_p)


@triton.jit
def _store_param(tab_t, b_w, i_t, i_b, o_x, m_x, p0, seed, TILE: tl.constexpr, MASTER: tl.constexpr,
                 STOCHASTIC: tl.constexpr, ALIGNED: tl.constexpr, INTERPRET: tl.constexpr):  # fmt: skip
    """Write the updated fp32 weights: into ``master`` and rounded to nearest into ``p``; or to ``p`` directly,
    bf16 stochastically (``bits(w) + u16`` truncated, ``u16`` from Philox on (seed, element, tensor)) when
    ``STOCHASTIC`` and there is no master copy."""
    TY: tl.constexpr = p0.dtype.element_ty
    o_b = i_b * TILE
    if MASTER:
        tl.store(_ptr(tab_t, _W, tl.float32, ALIGNED) + o_b + o_x, b_w, mask=m_x)
    p_p = _ptr(tab_t, _P, TY, ALIGNED) + o_b + o_x
    if p0.dtype.element_ty == tl.bfloat16:
        if STOCHASTIC and not MASTER:
            c_0 = o_x.to(tl.uint32) * 0
            b_r, _, _, _ = tl.philox(seed, (o_b + o_x).to(tl.uint32), c_0 + i_t.to(tl.uint32), c_0, c_0)
            b_u = (b_w.to(tl.uint32, bitcast=True) + (b_r & 0xFFFF)) >> 16
            b_u = tl.where(b_w == b_w, b_u, 0x7FC0)
            tl.store(p_p, b_u.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=m_x)
        else:
            _store_bf16(p_p, b_w, m_x, INTERPRET)
    else:
        tl.store(p_p, b_w.to(TY), mask=m_x)


@triton.jit
def _tile_update(
    tab_t, i_t, i_b, n_left, sc_t, p0, g0, cm_ptr, lutm_ptr, thrm_ptr, midm_ptr, cv_ptr, lutv_ptr, thrv_ptr,
    midv_ptr, w1, beta2, w2, eps, wd, seed, KM, KV,
    OPT: tl.constexpr, FMT: tl.constexpr, BITS: tl.constexpr, BS: tl.constexpr, ROWS: tl.constexpr,
    SM: tl.constexpr, GM: tl.constexpr, MM: tl.constexpr, E0M: tl.constexpr, NTM: tl.constexpr, RM: tl.constexpr,
    SV: tl.constexpr, GV: tl.constexpr, MV: tl.constexpr, E0V: tl.constexpr, NTV: tl.constexpr, RV: tl.constexpr,
    HAS_M: tl.constexpr, DECOUPLED: tl.constexpr, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr,
    NESTEROV: tl.constexpr, MASTER: tl.constexpr, STOCHASTIC: tl.constexpr, ALIGNED: tl.constexpr,
    INTERPRET: tl.constexpr,
):  # fmt: skip
    """The update of tile ``i_b`` of tensor ``i_t`` (its table row ``tab_t``), whose first ``n_left`` elements
    exist; see :func:`_step_kernel`.

    ``x.add_(y, alpha=a)`` of the reference is ``fma(y, a, x)``, as torch's vectorized CPU kernels compute it.
    """
    TILE: tl.constexpr = ROWS * BS
    o_r = tl.arange(0, ROWS)
    o_x = o_r[:, None] * BS + tl.arange(0, BS)[None, :]
    m_x = o_x < n_left
    m_r = o_r * BS < n_left
    # packed 4-bit codes: byte j of a row holds elements 2j, 2j + 1
    m_p = 2 * (o_r[:, None] * (BS // 2) + tl.arange(0, BS // 2)[None, :]) < n_left
    # the tensor's scalars, computed once per tensor by _scalar_kernel (see there)
    lr = tl.load(sc_t + _SC_LR)

    b_g = tl.load(_ptr(tab_t, _G, g0.dtype.element_ty, ALIGNED) + i_b * TILE + o_x, mask=m_x, other=0.0)
    b_g = b_g.to(tl.float32)
    if MAXIMIZE:
        b_g = -b_g
    if MASTER:
        b_w = tl.load(_ptr(tab_t, _W, tl.float32, ALIGNED) + i_b * TILE + o_x, mask=m_x, other=0.0)
    else:
        b_w = tl.load(_ptr(tab_t, _P, p0.dtype.element_ty, ALIGNED) + i_b * TILE + o_x, mask=m_x, other=0.0)
        b_w = b_w.to(tl.float32)
    if HAS_M:
        b_m = _load_state(tab_t, _M, cm_ptr, KM, i_b, o_r, o_x, m_x, m_r, m_p, FMT, BITS, BS, ROWS, ALIGNED, INTERPRET)
    if OPT == 0 or OPT == 1:
        if DECOUPLED:
            b_w = b_w * tl.load(sc_t + _SC_DECAY)
        else:
            b_g = tl.fma(b_w, wd, b_g)
    if OPT == 0:
        b_v = _load_state(tab_t, _V, cv_ptr, KV, i_b, o_r, o_x, m_x, m_r, m_p, FMT, BITS, BS, ROWS, ALIGNED, INTERPRET)
        b_m = _lerp(b_m, b_g, w1)
        if INTERPRET:  # the reference's (torch CPU's) order: v * beta2 + (w2 * g) * g, no fma
            b_v = b_v * beta2 + w2 * b_g * b_g
        else:  # torch's CUDA foreach order: _foreach_mul_, then addcmul's fma(w2, g * g, v)
            b_v = tl.fma(b_g * b_g, w2, b_v * beta2)
        neg_step_size = tl.load(sc_t + _SC_STEP_SIZE)
        bc2_sqrt = tl.load(sc_t + _SC_BC2_SQRT)
        b_vh = b_v
        if AMSGRAD:
            b_x = _load_state(
                tab_t, _X, cv_ptr, KV, i_b, o_r, o_x, m_x, m_r, m_p, FMT, BITS, BS, ROWS, ALIGNED, INTERPRET
            )
            b_vh = tl.maximum(b_x, b_v)
            _store_state(tab_t, _X, b_vh, lutv_ptr, thrv_ptr, midv_ptr, i_b, o_r, o_x, m_x, m_r, m_p, FMT, BITS, BS,
                         ROWS, SV, GV, MV, E0V, NTV, RV, ALIGNED, INTERPRET)  # fmt: skip
        if FMT == 2:
            # quantized moments carry ~2**-8 relative error from their codes: approximate sqrt, reciprocal bias
            # correction and division (each <= 2 ulp) change the update by ~2**-21 relative, and save ~25
            # instructions an element (the exact forms branch to a slow path per element)
            b_d = tl.fma(tl.sqrt(b_vh), tl.load(sc_t + _SC_INV_BC2_SQRT), eps)
            b_w = b_w + tl.math.fdiv(neg_step_size * b_m, b_d)
        else:  # fp32/bf16 state: IEEE sqrt and division, as torch computes them
            b_d = tl.div_rn(tl.sqrt_rn(b_vh), bc2_sqrt) + eps
            if INTERPRET:  # torch CPU's addcdiv: w + (-step * m) / d
                b_w = b_w + tl.div_rn(neg_step_size * b_m, b_d)
            else:  # torch CUDA's foreach addcdiv: fma(-step, m / d, w)
                b_w = tl.fma(tl.div_rn(b_m, b_d), neg_step_size, b_w)
        _store_state(tab_t, _V, b_v, lutv_ptr, thrv_ptr, midv_ptr, i_b, o_r, o_x, m_x, m_r, m_p, FMT, BITS, BS, ROWS,
                     SV, GV, MV, E0V, NTV, RV, ALIGNED, INTERPRET)  # fmt: skip
    elif OPT == 1:
        b_c = _lerp(b_m, b_g, w1)
        b_u = tl.where(b_c > 0, 1.0, tl.where(b_c < 0, -1.0, b_c))  # sign, NaN stays NaN
        b_w = tl.fma(b_u, -lr, b_w)
        b_m = _lerp(b_m, b_g, w2)
    else:
        b_g = tl.fma(b_w, wd, b_g)
        if HAS_M:
            b_m = tl.where(tl.load(sc_t + _SC_FIRST) != 0, b_g, tl.fma(b_g, w2, b_m * beta2))
            if NESTEROV:
                b_g = tl.fma(b_m, beta2, b_g)
            else:
                b_g = b_m
        b_w = tl.fma(b_g, -lr, b_w)
    if HAS_M:
        _store_state(tab_t, _M, b_m, lutm_ptr, thrm_ptr, midm_ptr, i_b, o_r, o_x, m_x, m_r, m_p, FMT, BITS, BS, ROWS,
                     SM, GM, MM, E0M, NTM, RM, ALIGNED, INTERPRET)  # fmt: skip
    _store_param(tab_t, b_w, i_t, i_b, o_x, m_x, p0, seed, TILE, MASTER, STOCHASTIC, ALIGNED, INTERPRET)


# seed changes every call (the optimizers derive it from a step counter): unspecialized, or Triton compiles one
# variant for seeds divisible by 16 and another for the rest (seen on an H100: a second 2.4 s compile at step 1)
@triton.jit(do_not_specialize=["seed"])
def _step_kernel(
    tab, tiles, bad_ptr, sc_ptr, p0, g0, cm_ptr, lutm_ptr, thrm_ptr, midm_ptr, cv_ptr, lutv_ptr, thrv_ptr, midv_ptr,
    w1, beta2, w2, eps, wd, seed, KM, KV,
    OPT: tl.constexpr, FMT: tl.constexpr, BITS: tl.constexpr, BS: tl.constexpr, ROWS: tl.constexpr,
    SM: tl.constexpr, GM: tl.constexpr, MM: tl.constexpr, E0M: tl.constexpr, NTM: tl.constexpr, RM: tl.constexpr,
    SV: tl.constexpr, GV: tl.constexpr, MV: tl.constexpr, E0V: tl.constexpr, NTV: tl.constexpr, RV: tl.constexpr,
    HAS_M: tl.constexpr, DECOUPLED: tl.constexpr, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr,
    NESTEROV: tl.constexpr, MASTER: tl.constexpr, STOCHASTIC: tl.constexpr, SKIP: tl.constexpr,
    ALIGNED: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    """One tile ``[ROWS, BS]`` of one tensor: Adam (``OPT`` 0), Lion (1) or SGD (2) in place.

    Scalars: Adam ``w1 = 1 - beta1`` (lerp weight of m), ``beta2``, ``w2 = 1 - beta2``; Lion ``w1 = 1 - beta1``
    (of the update), ``w2 = 1 - beta2`` (of m); SGD ``beta2 = momentum``, ``w2 = 1 - dampening``. The per-tensor
    scalars (``lr``, the decay factor, Adam's bias corrections) are row ``i_t`` of ``sc_ptr`` (``_scalar_kernel``).

    A full tile takes the body with ``n_left = TILE`` as a constant: its masks are then known all-true in runs of
    16, so the loads and stores vectorize (a mask against a loaded length would cut them to one element).
    """
    TILE: tl.constexpr = ROWS * BS
    i_p = tl.program_id(0)
    i_t = tl.load(tiles + 2 * i_p).to(tl.int64)
    i_b = tl.load(tiles + 2 * i_p + 1).to(tl.int64)
    tab_t = tab + i_t * _NS
    sc_t = sc_ptr + i_t * _NSC
    n_left = tl.minimum(tl.load(tab_t + _N) - i_b * TILE, TILE).to(tl.int32)
    if SKIP:  # a tensor with a non-finite gradient: no element in range, so every load and store is masked off
        n_left = tl.where(tl.load(bad_ptr + i_t) == 0, n_left, 0)
    if n_left == TILE:
        _tile_update(
            tab_t, i_t, i_b, TILE, sc_t, p0, g0, cm_ptr, lutm_ptr, thrm_ptr, midm_ptr, cv_ptr, lutv_ptr, thrv_ptr,
            midv_ptr, w1, beta2, w2, eps, wd, seed, KM, KV, OPT, FMT, BITS, BS, ROWS, SM, GM, MM, E0M, NTM, RM, SV,
            GV, MV, E0V, NTV, RV, HAS_M, DECOUPLED, AMSGRAD, MAXIMIZE, NESTEROV, MASTER, STOCHASTIC, ALIGNED,
            INTERPRET,
        )  # fmt: skip
        # keeps LLVM from merging this branch's last (vector) stores with the other's (scalar) ones
        tl.debug_barrier()
    else:
        _tile_update(
            tab_t, i_t, i_b, n_left, sc_t, p0, g0, cm_ptr, lutm_ptr, thrm_ptr, midm_ptr, cv_ptr, lutv_ptr, thrv_ptr,
            midv_ptr, w1, beta2, w2, eps, wd, seed, KM, KV, OPT, FMT, BITS, BS, ROWS, SM, GM, MM, E0M, NTM, RM, SV,
            GV, MV, E0V, NTV, RV, HAS_M, DECOUPLED, AMSGRAD, MAXIMIZE, NESTEROV, MASTER, STOCHASTIC, ALIGNED,
            INTERPRET,
        )  # fmt: skip


@triton.jit
def _scalar_kernel(tab, sc_ptr, lr_ptr, T, lr_hi, lr_lo, wd_hi, wd_lo, b1_hi, b1_lo, b2_hi, b2_lo,
                   BT: tl.constexpr, LR_TENSOR: tl.constexpr, LR_ON_CPU: tl.constexpr):  # fmt: skip
    """Each tensor's scalars for this step, ``BT`` tensors per program, into row ``t`` of ``sc float32 [T, NSC]``:
    ``lr``, the decoupled decay factor ``1 - lr * wd``, Adam's ``-lr / (1 - beta1**n)`` and
    ``sqrt(1 - beta2**n)`` and its reciprocal for ``n = step + 1`` (float64, as the reference, then rounded to
    fp32), and whether ``step == 0`` (SGD's first momentum). Once per tensor here, rather than in every thread of
    every tile program: the float64 powers are ~200 scalar instructions the step kernel would repeat per program.

    A tensor ``lr`` (fp32) follows ``torch.optim``'s tensor arithmetic instead (README): ``decay = fp32(1 -
    fp32(lr * fp32(wd)))``; ``lr / bc1`` as ``fp32(lr / fp32(bc1))`` for a CPU ``lr`` (``LR_ON_CPU``) and
    ``fp32(lr * fp32(1 / bc1))`` (reciprocal in float64) for a CUDA one (what torch 2.11 gave on an H100).
    Launched with FMA contraction off, so each product rounds as torch's."""
    o_t = tl.program_id(0) * BT + tl.arange(0, BT)
    m_t = o_t < T
    p_step = tl.load(tab + o_t.to(tl.int64) * _NS + _STEP, mask=m_t, other=0).to(tl.pointer_type(tl.float32))
    step = tl.load(p_step, mask=m_t, other=0.0)
    n = (step + 1.0).to(tl.int32)
    bc1 = 1.0 - _pow64(_f64(b1_hi, b1_lo) + tl.zeros((BT,), tl.float64), n)
    bc2_sqrt = tl.sqrt(1.0 - _pow64(_f64(b2_hi, b2_lo) + tl.zeros((BT,), tl.float64), n))
    if LR_TENSOR:
        lr = tl.load(lr_ptr + o_t * 0).to(tl.float32)
        decay = 1.0 - lr * _f64(wd_hi, wd_lo).to(tl.float32)
        if LR_ON_CPU:
            step_size = tl.div_rn(lr, bc1.to(tl.float32))
        else:  # CUDA divides by a Python float through its reciprocal, taken in float64 (H100, torch 2.11)
            step_size = lr * (1.0 / bc1).to(tl.float32)
    else:
        lr64 = _f64(lr_hi, lr_lo) + tl.zeros((BT,), tl.float64)
        lr = lr64.to(tl.float32)
        decay = (1.0 - lr64 * _f64(wd_hi, wd_lo)).to(tl.float32)
        step_size = (lr64 / bc1).to(tl.float32)
    p_sc = sc_ptr + o_t * _NSC
    tl.store(p_sc + _SC_LR, lr, mask=m_t)
    tl.store(p_sc + _SC_DECAY, decay, mask=m_t)
    tl.store(p_sc + _SC_STEP_SIZE, -step_size, mask=m_t)
    tl.store(p_sc + _SC_BC2_SQRT, bc2_sqrt.to(tl.float32), mask=m_t)
    tl.store(p_sc + _SC_INV_BC2_SQRT, (1.0 / bc2_sqrt).to(tl.float32), mask=m_t)
    tl.store(p_sc + _SC_FIRST, (step == 0).to(tl.float32), mask=m_t)


@triton.jit
def _finite_kernel(tab, tiles, bad_ptr, g0, TILE: tl.constexpr, ALIGNED: tl.constexpr):
    """Count one tile's non-finite gradient elements into ``bad[t]`` (an atomic only when there are some)."""
    i_p = tl.program_id(0)
    i_t = tl.load(tiles + 2 * i_p).to(tl.int64)
    i_b = tl.load(tiles + 2 * i_p + 1).to(tl.int64)
    tab_t = tab + i_t * _NS
    n_left = tl.minimum(tl.load(tab_t + _N) - i_b * TILE, TILE).to(tl.int32)
    o_x = tl.arange(0, TILE)
    b_g = tl.load(_ptr(tab_t, _G, g0.dtype.element_ty, ALIGNED) + i_b * TILE + o_x, mask=o_x < n_left, other=0.0)
    b_g = b_g.to(tl.float32)
    n_bad = tl.sum((tl.abs(b_g) == float("inf")).to(tl.int32) + (b_g != b_g).to(tl.int32), axis=0)
    if n_bad > 0:
        tl.atomic_add(bad_ptr + i_t, n_bad)


@triton.jit
def _bump_kernel(tab, bad_ptr, T, k0, BT: tl.constexpr, SKIP: tl.constexpr):
    """After the step: ``step += 1`` for every tensor (``BT`` per program), or under ``SKIP`` ``skips += 1``
    instead where ``bad[t] != 0``, then ``bad[t] = 0`` for the next step."""
    o_t = tl.program_id(0) * BT + tl.arange(0, BT)
    m_t = o_t < T
    p_step = tl.load(tab + o_t.to(tl.int64) * _NS + _STEP, mask=m_t, other=0).to(tl.pointer_type(tl.float32))
    if SKIP:
        b_bad = tl.load(bad_ptr + o_t, mask=m_t, other=0) != 0
        tl.store(p_step, tl.load(p_step, mask=m_t) + 1.0, mask=m_t & ~b_bad)
        p_skip = tl.load(tab + o_t.to(tl.int64) * _NS + _SKIPS, mask=m_t, other=0)
        p_skip = p_skip.to(tl.pointer_type(k0.dtype.element_ty))
        tl.store(p_skip, tl.load(p_skip, mask=m_t & b_bad) + 1, mask=m_t & b_bad)
        tl.store(bad_ptr + o_t, 0, mask=m_t)
    else:
        tl.store(p_step, tl.load(p_step, mask=m_t) + 1.0, mask=m_t)


@dataclasses.dataclass(frozen=True)
class _Launch:
    """The cached device tables of one list: ``tab int64 [T, NS]``, ``tiles int32 [P, 2]``, ``bad int32 [T]``,
    ``sc float32 [T, NSC]`` (the step's per-tensor scalars)."""

    tab: torch.Tensor
    tiles: torch.Tensor
    bad: torch.Tensor
    sc: torch.Tensor
    aligned: bool


_LAUNCHES: collections.OrderedDict[tuple, _Launch] = collections.OrderedDict()
_LAUNCHES_MAX = 32


def _slots(p: torch.Tensor, g: torch.Tensor, st: dict[str, torch.Tensor], names: Sequence[str], fmt: str) -> list:
    """The tensors of one parameter in slot order (None for an unused slot)."""
    row: list[torch.Tensor | None] = [p, g]
    for name in (*names, *[None] * (3 - len(names))):
        if name is None:
            row += [None, None]
        else:
            keys = buffer_keys(name, fmt)
            row += [st[keys[0]], st[keys[1]] if len(keys) > 1 else None]
    return [*row, st.get("master"), st["step"], st.get("skips")]


def _check(row: list, i: int, device: torch.device) -> None:
    for t in row:
        if t is not None and (t.device != device or not t.is_contiguous()):
            raise ValueError(
                f"params[{i}]: every parameter, gradient and state tensor of one call must be contiguous and on "
                f"{device} (params[0]'s device); split the call by device, or use backend='reference' for "
                "non-contiguous tensors"
            )
    if row[_STEP].dtype != torch.float32 or row[_STEP].numel() != 1:
        raise ValueError(f"states[{i}]['step'] must be a float32 scalar tensor, got {row[_STEP].dtype}")


def _launch(rows: list[list], numels: list[int], tile: int, device: torch.device) -> _Launch:
    """The address and tile tables of ``rows`` (cached by addresses and sizes)."""
    key = (
        str(device),
        tile,
        *((*(0 if t is None else t.data_ptr() for t in r), n) for r, n in zip(rows, numels, strict=True)),
    )
    hit = _LAUNCHES.get(key)
    if hit is not None:
        _LAUNCHES.move_to_end(key)
        return hit
    tab = torch.empty((len(rows), _NS.value), dtype=torch.int64, device=device)
    addrs = [[0 if t is None else t.data_ptr() for t in r] for r in rows]
    # arrays (slots before _STEP): byte offsets from the row's own address, / 16 when all are 16-byte aligned
    # (see _ptr); step and skips: raw addresses; then numel
    aligned = all(a % 16 == 0 for r in addrs for a in r[:_STEP])
    table = []
    for t, (r, n) in enumerate(zip(addrs, numels, strict=True)):
        row_at = tab.data_ptr() + t * _NS.value * 8
        offsets = [0 if a == 0 else (a - row_at) >> 4 if aligned else a - row_at for a in r[:_STEP]]
        table.append([*offsets, *r[_STEP:], n])
    tab.copy_(torch.tensor(table, dtype=torch.int64))
    # (tensor, tile) per program, built without a Python loop over tiles (1 B parameters: 512 K programs)
    counts = (torch.tensor(numels, dtype=torch.int64) + tile - 1) // tile
    tensor_of = torch.repeat_interleave(torch.arange(len(rows)), counts)
    tile_of = torch.arange(tensor_of.numel()) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)
    launch = _Launch(
        tab=tab,
        tiles=torch.stack([tensor_of, tile_of], dim=1).to(device=device, dtype=torch.int32),
        bad=torch.zeros(len(rows), dtype=torch.int32, device=device),
        sc=torch.zeros((len(rows), _NSC.value), dtype=torch.float32, device=device),
        aligned=aligned,
    )
    _LAUNCHES[key] = launch
    if len(_LAUNCHES) > _LAUNCHES_MAX:
        _LAUNCHES.popitem(last=False)
    return launch


def _split(x: float) -> tuple[float, float]:
    """A float64 as an fp32 pair ``hi + lo``."""
    hi = struct.unpack("f", struct.pack("f", x))[0]
    return hi, struct.unpack("f", struct.pack("f", x - hi))[0]


def _plans(fmt: str, kind: int, device: torch.device) -> tuple:
    """``(m plan, v plan, bits, block)`` for a quantized format (else Nones, 0 bits, the fp tile)."""
    if fmt not in QUANT_FORMATS:
        return None, None, 0, _TILE
    signed, unsigned, block, bits = QUANT_FORMATS[fmt]
    pm = _plan(_codebook_table(signed), bits, device)
    pv = _plan(_codebook_table(unsigned), bits, device) if kind == _ADAM else pm
    return pm, pv, bits, block


def _run(
    kind: int, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], states: Sequence[dict], names: list,
    fmt: str, lr: float | torch.Tensor, sc: dict, flags: dict, seed: int | None,
) -> None:  # fmt: skip
    """Group the parameters by (param dtype, grad dtype, master) and launch the pre-pass, step and bump kernels
    of each group. ``sc``: the kernel's float scalars; ``flags``: its boolean constexprs."""
    if not params:
        return
    device = params[0].device
    pm, pv, bits, block = _plans(fmt, kind, device)
    groups: dict[tuple, list[int]] = {}
    for i, (p, g, st) in enumerate(zip(params, grads, states, strict=True)):
        groups.setdefault((p.dtype, g.dtype, "master" in st), []).append(i)
    lr_t = lr if isinstance(lr, torch.Tensor) else None
    lr_on_cpu = lr_t is not None and lr_t.device.type == "cpu"  # torch.optim's arithmetic follows lr's device
    if lr_t is not None and lr_t.device != device:  # a copy per call; keep a tensor lr on the parameters' device
        lr_t = lr_t.to(device, non_blocking=True)
    lr_hi, lr_lo = _split(0.0 if lr_t is not None else float(lr))
    if seed is None:
        seed = random.getrandbits(31) if flags["STOCHASTIC"] else 0
    for (p_dtype, _, master), idx in groups.items():
        tile, warps, maxnreg = _tiling(fmt, p_dtype.itemsize)
        if pm is None:
            block = tile  # fp32/bf16 state: a program's tile is one row
        rows = [_slots(params[i], grads[i], states[i], names, fmt) for i in idx]
        for i, r in zip(idx, rows, strict=True):
            _check(r, i, device)
        launch = _launch(rows, [params[i].numel() for i in idx], tile, device)
        p0, g0 = params[idx[0]], grads[idx[0]]
        k0 = rows[0][_SKIPS] if rows[0][_SKIPS] is not None else rows[0][_STEP]
        n_tiles = launch.tiles.shape[0]
        skip = flags["SKIP"]
        with _on(device):
            if skip and n_tiles:
                _finite_kernel[(n_tiles,)](launch.tab, launch.tiles, launch.bad, g0, TILE=tile, ALIGNED=launch.aligned)
            if n_tiles:
                _scalar_kernel[(triton.cdiv(len(idx), 128),)](
                    launch.tab, launch.sc, lr_t if lr_t is not None else launch.sc, len(idx), lr_hi, lr_lo,
                    *sc["wd64"], *sc["b1_64"], *sc["b2_64"], BT=128, LR_TENSOR=lr_t is not None,
                    LR_ON_CPU=lr_on_cpu, enable_fp_fusion=False,
                )  # fmt: skip
                cm = (pm.code, pm.lut, pm.thr, pm.mid) if pm else (p0,) * 4
                cv = (pv.code, pv.lut, pv.thr, pv.mid) if pv else (p0,) * 4
                qm = (pm.search, pm.g, pm.m, pm.e0, pm.nt, pm.r) if pm else (0, 0, 0, 0, 2, 1)
                qv = (pv.search, pv.g, pv.m, pv.e0, pv.nt, pv.r) if pv else (0, 0, 0, 0, 2, 1)
                _step_kernel[(n_tiles,)](
                    launch.tab, launch.tiles, launch.bad, launch.sc, p0, g0, *cm, *cv, sc["w1"], sc["beta2"], sc["w2"],
                    sc["eps"], sc["wd"], seed, pm.code.numel() if pm else 0, pv.code.numel() if pv else 0,
                    OPT=kind, FMT=2 if pm else (0 if fmt == "fp32" else 1), BITS=bits, BS=block, ROWS=tile // block,
                    SM=qm[0], GM=qm[1], MM=qm[2], E0M=qm[3], NTM=qm[4], RM=qm[5],
                    SV=qv[0], GV=qv[1], MV=qv[2], E0V=qv[3], NTV=qv[4], RV=qv[5],
                    MASTER=master, SKIP=skip, ALIGNED=launch.aligned,
                    INTERPRET=_INTERPRET, HAS_M=bool(names), DECOUPLED=flags["DECOUPLED"], AMSGRAD=flags["AMSGRAD"],
                    MAXIMIZE=flags["MAXIMIZE"], NESTEROV=flags["NESTEROV"], STOCHASTIC=flags["STOCHASTIC"],
                    num_warps=warps,
                    **({} if maxnreg is None else {"maxnreg": maxnreg}),
                )  # fmt: skip
            _bump_kernel[(triton.cdiv(len(idx), 1024),)](launch.tab, launch.bad, len(idx), k0, BT=1024, SKIP=skip)


def _scalars(*, w1: float, beta2: float, w2: float, eps: float, wd: float, b1_64: float, b2_64: float) -> dict:
    return {"w1": w1, "beta2": beta2, "w2": w2, "eps": eps, "wd": wd, "wd64": _split(wd), "b1_64": _split(b1_64),
            "b2_64": _split(b2_64)}  # fmt: skip


def _flags(**kw: bool) -> dict[str, bool]:
    base = {"DECOUPLED": False, "AMSGRAD": False, "MAXIMIZE": False, "NESTEROV": False, "STOCHASTIC": False}
    return {**base, **{k.upper(): bool(v) for k, v in kw.items()}}


def adam_step_triton(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    states: Sequence[dict[str, torch.Tensor]],
    *,
    lr: float | torch.Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled: bool = True,
    amsgrad: bool = False,
    maximize: bool = False,
    state_format: str,
    stochastic_round: bool = False,
    skip_nonfinite: bool = False,
    seed: int | None = None,
) -> None:
    """One fused AdamW (``decoupled``) / Adam step over the lists, in place; arguments as
    :func:`tilewise.ops.optim_step.adam_step`. One launch per (param dtype, grad dtype, master) group, plus the
    step-counter launch (and the finite-check pre-pass under ``skip_nonfinite``). ``seed`` (default: a fresh
    host random number per call) seeds the stochastic rounding of bf16 parameters."""
    names = ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if amsgrad else [])
    sc = _scalars(w1=1 - beta1, beta2=beta2, w2=1 - beta2, eps=eps, wd=weight_decay, b1_64=beta1, b2_64=beta2)
    flags = _flags(decoupled=decoupled, amsgrad=amsgrad, maximize=maximize, stochastic=stochastic_round,
                   skip=skip_nonfinite)  # fmt: skip
    _run(_ADAM, params, grads, states, names, state_format, lr, sc, flags, seed)


def lion_step_triton(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    states: Sequence[dict[str, torch.Tensor]],
    *,
    lr: float | torch.Tensor,
    beta1: float,
    beta2: float,
    weight_decay: float,
    maximize: bool = False,
    state_format: str,
    stochastic_round: bool = False,
    skip_nonfinite: bool = False,
    seed: int | None = None,
) -> None:
    """One fused Lion step over the lists, in place; arguments as :func:`tilewise.ops.optim_step.lion_step`."""
    sc = _scalars(w1=1 - beta1, beta2=beta2, w2=1 - beta2, eps=0.0, wd=weight_decay, b1_64=beta1, b2_64=beta2)
    flags = _flags(decoupled=True, maximize=maximize, stochastic=stochastic_round, skip=skip_nonfinite)
    _run(_LION, params, grads, states, ["exp_avg"], state_format, lr, sc, flags, seed)


def sgd_step_triton(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    states: Sequence[dict[str, torch.Tensor]],
    *,
    lr: float | torch.Tensor,
    momentum: float,
    dampening: float,
    nesterov: bool,
    weight_decay: float,
    maximize: bool = False,
    state_format: str,
    stochastic_round: bool = False,
    skip_nonfinite: bool = False,
    seed: int | None = None,
) -> None:
    """One fused SGD step over the lists, in place; arguments as :func:`tilewise.ops.optim_step.sgd_step`."""
    names = ["momentum_buffer"] if momentum != 0 else []
    sc = _scalars(w1=0.0, beta2=momentum, w2=1 - dampening, eps=0.0, wd=weight_decay, b1_64=0.0, b2_64=0.0)
    flags = _flags(nesterov=nesterov, maximize=maximize, stochastic=stochastic_round, skip=skip_nonfinite)
    _run(_SGD, params, grads, states, names, state_format, lr, sc, flags, seed)
