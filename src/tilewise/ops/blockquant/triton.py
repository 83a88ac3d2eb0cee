"""Fused Triton kernels for block-wise quantization; bit-exact with ``reference.py`` (nearest rounding).

One program owns a tile ``[ROWS, BS]`` of the flat input: ``ROWS`` whole blocks of ``BS`` elements. It reads the
tile once, takes each row's absmax, finds every element's code by the spec's threshold rule and writes the codes
(4-bit pairs packed in-kernel) and the scales. Dequantization reads codes and scales and writes
``fp32(c[code] * scale)`` in the output dtype.

Finding a code (README.md, "Nearest rounding"): ``code = #{ j : x > fp32(s * mid[j]) }``. A binary search over the
``2**bits - 1`` thresholds costs ``bits`` dependent gathers per element, which makes quantize gather-bound. The fast
path instead looks up a cell table built on the host for each codebook: the cell of ``t ~ x / s`` (an approximate
quotient: on a uniform grid of ``t`` from one fma, or on a log grid from the top bits of ``t``'s float encoding)
gives ``lo``, the number of thresholds certainly below every element of the cell, and the threshold ``mid[lo]``
packed into one 64-bit entry. The cell's width and a wide error band are chosen so that at most ``R`` thresholds
(1 for every built-in codebook) are uncertain, and those are decided by the exact rule ``x > fp32(s * mid[j])``,
so the approximation only ever picks which thresholds to test: the codes stay exact.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import math

import torch
import triton
import triton.language as tl

from tilewise._backend import interpreting
from tilewise.ops.blockquant.reference import midpoints

__all__ = ["dequantize_blockwise_triton", "quantize_blockwise_triton"]

# Search kinds (the SEARCH constexpr): binary search, uniform-grid cell table, log-grid cell table.
_BSEARCH, _UNIFORM, _LOG = 0, 1, 2
# Rows whose scale is below this use the binary search: there ``fp32(s * mid[j])`` may be subnormal and its
# rounding error, measured in units of t = x / s, could exceed the band the cell tables allow for.
_MIN_LUT_SCALE = tl.constexpr(2.0**-90)
# The error band (relative, absolute in units of t) around cell edges and thresholds; see _cells_lo_hi.
_BAND_REL, _BAND_ABS = 2.0**-16, 2.0**-60
# 1.5 * 2**23: adding it to a float in [-2**22, 2**22] leaves round(value) in the low mantissa bits.
_MAGIC = tl.constexpr(12582912.0)


@triton.jit
def _max_nan(a, b):
    """max that propagates NaN (``tl.max`` drops it), so a block holding NaN gets a NaN scale."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _to_bf16_rne(b_y):
    """fp32 -> bf16, round to nearest even, in integer ops. Triton's CPU interpreter truncates in ``.to(bf16)``
    (3.9), so the kernels take this path when ``INTERPRET``; on the GPU ``.to`` rounds correctly and is cheaper."""
    b_u = b_y.to(tl.uint32, bitcast=True)
    b_u = (b_u + 0x7FFF + ((b_u >> 16) & 1)) >> 16
    b_u = tl.where(b_y == b_y, b_u, 0x7FC0)
    return b_u.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _gather(base_ptr, b_i, INTERPRET: tl.constexpr):
    """``base[b_i]`` for a 4- or 8-byte table. On the GPU an inline-asm load: unlike ``tl.load``, which Triton
    gives a layout of its own for gathers (one element per thread, so the tile is converted through shared memory
    before and after), it keeps the layout of the tile it is computed from. The interpreter takes ``tl.load``."""
    if INTERPRET:
        return tl.load(base_ptr + b_i)
    elif base_ptr.dtype.element_ty.primitive_bitwidth == 64:
        b_a = base_ptr.to(tl.int64) + b_i.to(tl.int64) * 8
        return tl.inline_asm_elementwise(
            "ld.global.nc.b64 $0, [$1];", "=l,l", [b_a], dtype=base_ptr.dtype.element_ty, is_pure=True, pack=1
        )
    else:
        b_a = base_ptr.to(tl.int64) + b_i.to(tl.int64) * 4
        return tl.inline_asm_elementwise(
            "ld.global.nc.b32 $0, [$1];", "=r,l", [b_a], dtype=base_ptr.dtype.element_ty, is_pure=True, pack=1
        )


@triton.jit
def _mul_rn(a, b, INTERPRET: tl.constexpr):
    """``fp32(a * b)`` that the compiler may not fuse into an fma with a following add (``mul.rn``)."""
    if INTERPRET:
        return a * b
    else:
        return tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=r,r,r", [a, b], tl.float32, True, 1)


@triton.jit
def _search_codes(b_x, b_s, mid_ptr, BITS: tl.constexpr, INTERPRET: tl.constexpr):
    """``#{ j : x > fp32(s * mid[j]) }`` by a branch-free binary search over ``mid [2**BITS]`` (``+inf`` padded):
    ``BITS`` gathers per element. ``b_x [ROWS, BS]``, ``b_s [ROWS, 1]``."""
    b_q = tl.zeros(b_x.shape, dtype=tl.int32)
    for k in tl.static_range(BITS):
        step = 1 << (BITS - 1 - k)
        b_m = _gather(mid_ptr, b_q + (step - 1), INTERPRET)
        b_q = tl.where(b_x > b_s * b_m, b_q + step, b_q)
    return b_q


@triton.jit
def _cell_codes(
    b_x, b_s, lut_ptr, thr_ptr, SEARCH: tl.constexpr, G: tl.constexpr, M: tl.constexpr, E0: tl.constexpr,
    NT: tl.constexpr, R: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    """``#{ j : x > fp32(s * mid[j]) }`` from the cell table ``lut [NT]`` (int64: ``lo | bits(mid[lo]) << 32``)
    and ``thr [R-1, NT]`` (``mid[lo+1+k]``), then ``R`` exact threshold tests. ``b_x [ROWS, BS]``, ``b_s [ROWS, 1]``.

    Uniform grid (``G`` cells over [-1, 1]): cell = round(t * G/2 + G/2) read from the bits of one fma.
    Log grid (``2**M`` cells per binade from ``2**E0``, one half per sign): cell from the exponent and top ``M``
    mantissa bits of t. Garbage t (a NaN row) still gives an in-range cell.
    """
    if SEARCH == 1:  # _UNIFORM
        b_f = tl.fma(b_x, (G // 2) / b_s, _MAGIC + G // 2)
        b_c = b_f.to(tl.int32, bitcast=True) & (NT - 1)
    else:
        b_u = (b_x * (1.0 / b_s)).to(tl.uint32, bitcast=True)
        b_v = ((b_u & 0x7FFFFFFF) >> (23 - M)).to(tl.int32) - ((127 + E0) << M)
        b_v = tl.minimum(tl.maximum(b_v, 0), NT // 2 - 1)
        b_c = b_v + (b_u >> 31).to(tl.int32) * (NT // 2)
    b_w = _gather(lut_ptr, b_c, INTERPRET)
    b_m = (b_w >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    b_q = b_w.to(tl.int32) + (b_x > b_s * b_m).to(tl.int32)
    for k in tl.static_range(R - 1):
        b_m = _gather(thr_ptr, b_c + k * NT, INTERPRET)
        b_q += (b_x > b_s * b_m).to(tl.int32)
    return b_q


@triton.jit
def _stochastic_codes(b_x, b_s, val_ptr, o_g, seed, K, BITS: tl.constexpr, INTERPRET: tl.constexpr):
    """The spec's stochastic rounding: ``lo`` = the largest ``j`` with ``x >= fp32(s * c[j])`` (0 if none),
    ``hi = min(lo + 1, K - 1)``; round up when ``u * (v_hi - v_lo) < x - v_lo``, ``u ~ U[0, 1)`` drawn by Philox
    from ``(seed, global element index o_g)``. ``val [2**BITS]`` is ``c`` padded with ``+inf``."""
    # lo = #{ j >= 1 : x >= fp32(s * c[j]) }: a binary search over c[1:]
    b_lo = tl.zeros(b_x.shape, dtype=tl.int32)
    for k in tl.static_range(BITS):
        step = 1 << (BITS - 1 - k)
        b_v = _gather(val_ptr, b_lo + step, INTERPRET)
        b_lo = tl.where(b_x >= b_s * b_v, b_lo + step, b_lo)
    b_hi = tl.minimum(b_lo + 1, K - 1)
    b_vlo = _mul_rn(b_s, _gather(val_ptr, b_lo, INTERPRET), INTERPRET)
    b_vhi = _mul_rn(b_s, _gather(val_ptr, b_hi, INTERPRET), INTERPRET)
    c_lo = o_g.to(tl.uint32)
    c_hi = (o_g >> 32).to(tl.uint32)
    c_0 = c_lo * 0
    b_r, _, _, _ = tl.philox(seed, c_lo, c_hi, c_0, c_0)
    b_u = tl.uint_to_uniform_float(b_r)
    return tl.where(b_u * (b_vhi - b_vlo) < b_x - b_vlo, b_hi, b_lo)


@triton.jit
def _quantize_kernel(
    x_ptr, q_ptr, s_ptr, bad_ptr, lut_ptr, thr_ptr, mid_ptr, val_ptr, n, K, seed,
    BS: tl.constexpr, ROWS: tl.constexpr, BITS: tl.constexpr, SEARCH: tl.constexpr, G: tl.constexpr,
    M: tl.constexpr, E0: tl.constexpr, NT: tl.constexpr, R: tl.constexpr, STOCHASTIC: tl.constexpr,
    CHECK: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    """One tile of ``ROWS`` blocks: ``x [n]`` -> codes ``q`` (uint8, ``[n]`` or packed ``[ceil(n/2)]``) and
    fp32 absmax scales ``s [ceil(n / BS)]``."""
    TILE: tl.constexpr = ROWS * BS
    i_t = tl.program_id(0).to(tl.int64)
    # int64 for the tile's base only: offsets inside a tile and the count of elements left fit in int32
    o_base = i_t * TILE
    n_left = tl.minimum(n - o_base, TILE).to(tl.int32)
    o_r = tl.arange(0, ROWS)
    o_x = o_r[:, None] * BS + tl.arange(0, BS)[None, :]
    m_x = o_x < n_left
    b_x = tl.load(x_ptr + o_base + o_x, mask=m_x, other=0.0).to(tl.float32)
    if INTERPRET:  # the interpreter runs a custom combine element by element: slow
        b_s = tl.max(tl.where(b_x == b_x, tl.abs(b_x), float("inf")), axis=1)
    else:
        b_s = tl.reduce(tl.abs(b_x), 1, _max_nan)
    tl.store(s_ptr + i_t * ROWS + o_r, b_s, mask=o_r * BS < n_left)
    if CHECK:  # count the tile's non-finite scales into bad_ptr[0]; the atomic runs only when there are some
        n_bad = tl.sum(((b_s != b_s) | (b_s == float("inf"))).to(tl.int32), axis=0)
        if n_bad > 0:
            tl.atomic_add(bad_ptr, n_bad)
    b_s = tl.where(b_s > 0, b_s, 1.0)
    if STOCHASTIC:
        b_q = _stochastic_codes(b_x, b_s[:, None], val_ptr, o_base + o_x, seed, K, BITS, INTERPRET)
    elif SEARCH == 0:
        b_q = _search_codes(b_x, b_s[:, None], mid_ptr, BITS, INTERPRET)
    elif tl.min(b_s) >= _MIN_LUT_SCALE:
        b_q = _cell_codes(b_x, b_s[:, None], lut_ptr, thr_ptr, SEARCH, G, M, E0, NT, R, INTERPRET)
    else:
        b_q = _search_codes(b_x, b_s[:, None], mid_ptr, BITS, INTERPRET)
    if BITS == 8:
        tl.store(q_ptr + o_base + o_x, b_q.to(tl.uint8), mask=m_x)
    else:
        # elements past n get code 0, so an odd n leaves the last low nibble 0
        b_q = tl.where(m_x, b_q, 0)
        b_hi, b_lo = tl.split(tl.reshape(b_q, [ROWS, BS // 2, 2]))
        o_p = o_r[:, None] * (BS // 2) + tl.arange(0, BS // 2)[None, :]
        tl.store(q_ptr + i_t * (TILE // 2) + o_p, ((b_hi << 4) | b_lo).to(tl.uint8), mask=2 * o_p < n_left)


@triton.jit
def _dequantize_kernel(
    q_ptr, s_ptr, c_ptr, y_ptr, n, K, BS: tl.constexpr, ROWS: tl.constexpr, BITS: tl.constexpr,
    CLAMP: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    """One tile of ``ROWS`` blocks: ``y = fp32(c[code] * scale)`` cast to ``y``'s dtype, ``y [n]``. With ``CLAMP``
    (``K < 2**BITS``) a code ``>= K``, which quantize never writes, reads ``c[K-1]`` rather than out of bounds."""
    TILE: tl.constexpr = ROWS * BS
    i_t = tl.program_id(0).to(tl.int64)
    o_base = i_t * TILE
    n_left = tl.minimum(n - o_base, TILE).to(tl.int32)
    o_r = tl.arange(0, ROWS)
    b_s = tl.load(s_ptr + i_t * ROWS + o_r, mask=o_r * BS < n_left, other=0.0)[:, None]
    o_x = o_r[:, None] * BS + tl.arange(0, BS)[None, :]
    m_x = o_x < n_left
    if BITS == 8:
        b_q = tl.load(q_ptr + o_base + o_x, mask=m_x, other=0).to(tl.int32)
        if CLAMP:
            b_q = tl.minimum(b_q, K - 1)
        b_y = tl.load(c_ptr + b_q) * b_s
    else:
        o_p = o_r[:, None] * (BS // 2) + tl.arange(0, BS // 2)[None, :]
        b_p = tl.load(q_ptr + i_t * (TILE // 2) + o_p, mask=2 * o_p < n_left, other=0).to(tl.int32)
        b_qhi, b_qlo = b_p >> 4, b_p & 15
        if CLAMP:
            b_qhi, b_qlo = tl.minimum(b_qhi, K - 1), tl.minimum(b_qlo, K - 1)
        b_y = tl.reshape(tl.join(tl.load(c_ptr + b_qhi) * b_s, tl.load(c_ptr + b_qlo) * b_s), [ROWS, BS])
    if INTERPRET and y_ptr.dtype.element_ty == tl.bfloat16:
        b_o = _to_bf16_rne(b_y)
    else:
        b_o = b_y.to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + o_base + o_x, b_o, mask=m_x)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Device tables and kernel constants for one codebook: ``mid``/``val`` ``[2**bits]`` (``+inf`` padded) for
    the binary searches, ``lut [NT]``/``thr [R-1, NT]`` for the cell search, ``code`` as fp32 on the device;
    ``owner`` is the device codebook the plan was keyed on (kept alive so its storage is not reused)."""

    code: torch.Tensor
    mid: torch.Tensor
    val: torch.Tensor
    lut: torch.Tensor
    thr: torch.Tensor
    search: int
    g: int
    m: int
    e0: int
    nt: int
    r: int
    owner: torch.Tensor | None = None


def _cells_lo_hi(mids: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For cells ``[a, b]`` of t = x / s (float64): ``lo`` = #thresholds certainly below every element of the
    cell, ``hi`` = #thresholds possibly below one. The band covers the approximate t (a few ulp), the rounding of
    ``fp32(s * mid)`` (half an ulp, or 2**-150 / s >= 2**-60 when subnormal, as s >= 2**-90), and then some."""
    m_up = mids + mids.abs() * _BAND_REL + _BAND_ABS
    m_down = mids - mids.abs() * _BAND_REL - _BAND_ABS
    lo = torch.searchsorted(m_up, a - a.abs() * _BAND_REL - _BAND_ABS, right=False)
    hi = torch.searchsorted(m_down, b + b.abs() * _BAND_REL + _BAND_ABS, right=True)
    return lo, hi


def _uniform_cells(mids: torch.Tensor, g: int) -> tuple[torch.Tensor, int]:
    """Cell ``c`` in ``[0, g]`` holds t with ``round(t * g/2 + g/2) = c``; ``lo [2g]`` (cells past g: 0)."""
    c = torch.arange(g + 1, dtype=torch.float64)
    a, b = (c - 0.5) / (g / 2) - 1, (c + 0.5) / (g / 2) - 1
    a[0], b[-1] = -math.inf, math.inf
    lo, hi = _cells_lo_hi(mids, a, b)
    return torch.cat([lo, lo.new_zeros(g - 1)]), int((hi - lo).max())


def _log_cells(mids: torch.Tensor, m: int, e0: int) -> tuple[torch.Tensor, int]:
    """Cell ``v`` in ``[0, vmax]`` of ``|t|``: ``2**m`` per binade from ``2**e0`` (cell 0 also holds everything
    below, cell ``vmax`` everything from 2 up); negative t use cells ``vmax + 1 + v``. ``lo [2 (vmax + 1)]``."""
    vmax = (1 - e0) << m
    v = torch.arange(vmax + 1, dtype=torch.float64)
    e = e0 + torch.div(v, 2**m, rounding_mode="floor")
    frac = v % 2**m
    a, b = 2.0**e * (1 + frac / 2**m), 2.0**e * (1 + (frac + 1) / 2**m)
    a[0], b[-1] = 0.0, math.inf
    lo_pos, hi_pos = _cells_lo_hi(mids, a, b)
    lo_neg, hi_neg = _cells_lo_hi(mids, -b, -a)
    r = max(int((hi_pos - lo_pos).max()), int((hi_neg - lo_neg).max()))
    return torch.cat([lo_pos, lo_neg]), r


def _best_cells(mids: torch.Tensor) -> tuple[int, int, int, int, torch.Tensor, int]:
    """The cheapest cell grid for thresholds ``mids`` (float64): fewest exact tests ``R``, then uniform over log
    (fewer integer ops), then the smallest table. Returns ``(search, g, m, e0, lo, R)``."""
    nonzero = mids.abs()[mids != 0]
    e0 = max(math.floor(math.log2(float(nonzero.min()))) - 1, -40) if nonzero.numel() else -1
    best = None
    for g in (32, 64, 128, 256, 512, 1024):
        lo, r = _uniform_cells(mids, g)
        cand = (r, 0, lo.numel(), _UNIFORM, g, 0, 0, lo)
        best = cand if best is None or cand[:3] < best[:3] else best
    for m in range(2, 8):
        lo, r = _log_cells(mids, m, e0)
        cand = (r, 1, lo.numel(), _LOG, 0, m, e0, lo)
        best = cand if cand[:3] < best[:3] else best
    r, _, _, search, g, m, e0, lo = best
    return search, g, m, e0, lo, r


def _build_plan(code: torch.Tensor, bits: int, device: torch.device) -> _Plan:
    """Tables for codebook ``code [K]`` (fp32, CPU), in float64 where the spec says so, moved to ``device``."""
    p = 1 << bits
    k = code.numel()
    inf = torch.tensor([math.inf], dtype=torch.float32)
    mid = torch.cat([midpoints(code), inf.expand(p - k + 1)])
    val = torch.cat([code, inf.expand(p - k)])
    search, g, m, e0, lo, r = _best_cells(midpoints(code).double())
    if r > 4:  # a codebook with dense clusters no grid resolves: the binary search is cheaper
        search, r, lo = _BSEARCH, 1, torch.zeros(2, dtype=torch.int64)
    # thresholds mid[lo .. lo + R - 1], +inf past the last one
    padded = torch.cat([mid, inf.expand(r)])
    bits_lo = padded[lo].view(torch.int32).to(torch.int64)
    lut = lo.to(torch.int64) | (bits_lo << 32)
    thr = torch.stack([padded[lo + 1 + j] for j in range(r - 1)]) if r > 1 else padded.new_empty(1)
    code, mid, val, lut, thr = (t.to(device) for t in (code, mid, val, lut, thr))
    return _Plan(code, mid, val, lut, thr, search, g, m, e0, lo.numel(), r)


# Triton reads TRITON_INTERPRET when this module defines its kernels, so the flag is read once here too.
_INTERPRET = interpreting()
_PLANS: collections.OrderedDict[tuple, _Plan] = collections.OrderedDict()
_PLANS_MAX = 64


def _remember(key: tuple, plan: _Plan) -> _Plan:
    _PLANS[key] = plan
    if len(_PLANS) > _PLANS_MAX:
        _PLANS.popitem(last=False)
    return plan


def _plan(code: torch.Tensor, bits: int, device: torch.device) -> _Plan:
    """The cached :class:`_Plan` of ``code`` for ``device``.

    A CPU codebook is keyed by its contents: no device sync, ever. A device codebook is keyed by its storage and
    version (the plan holds a reference, so the storage cannot be reused while cached); a new device tensor costs
    one copy to the CPU (a sync) and is then matched by contents, so its tables are not rebuilt.
    """
    # any codebook tensor is first looked up by storage and version (the plan keeps it alive, so the address is not
    # reused while cached): no hashing of contents on the hot path
    ptr_key = (bits, str(device), code.device, code.data_ptr(), code._version, code.numel(), code.dtype)
    plan = _PLANS.get(ptr_key)
    if plan is not None:
        _PLANS.move_to_end(ptr_key)
        return plan
    host = code.detach()
    if host.device.type != "cpu" or host.dtype != torch.float32 or not host.is_contiguous():
        host = host.to(device="cpu", dtype=torch.float32).contiguous()
    key = (bits, str(device), host.numpy().tobytes())
    plan = _PLANS.get(key)
    if plan is None:
        plan = _remember(key, _build_plan(host, bits, device))
    else:
        _PLANS.move_to_end(key)
    return _remember(ptr_key, dataclasses.replace(plan, owner=code))


def _tile(block_size: int, per_thread: int, min_tile: int) -> tuple[int, int]:
    """``(ROWS, num_warps)``: whole blocks per program, at least ``min_tile`` elements, ``per_thread`` each.

    Measured on an H100 at 256M bf16 elements: quantize is fastest with 32 elements a thread for 8-bit codes
    (2048-element tiles of 2 warps beat 4 warps by 4%) and 16 for 4-bit (32 spill into more registers and lose
    up to 15%); dequantize with 2048-element tiles of 4 warps (1024 lose 7%).
    """
    tile = max(block_size, min_tile)
    return tile // block_size, max(1, min(8, tile // (32 * per_thread)))


def _on(device: torch.device) -> contextlib.AbstractContextManager:
    """Launch on ``device`` (Triton launches on the current CUDA device)."""
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def quantize_blockwise_triton(
    x: torch.Tensor,
    code: torch.Tensor,
    block_size: int,
    *,
    bits: int = 8,
    stochastic: bool = False,
    seed: int | None = None,
    check_finite: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize the contiguous ``x`` (fp32/fp16/bf16, read flat, ``n`` elements) onto the sorted codebook
    ``code [K]`` in blocks of ``block_size``.

    ``code`` may live on the CPU or on ``x``'s device: its tables are cached by storage, then by contents (the first
    call with a new device codebook tensor copies it to the CPU).
    Returns ``(codes, scales)``: ``uint8 [n]`` (``bits=8``) or packed ``uint8 [ceil(n/2)]`` (``bits=4``, element
    ``2j`` in the high nibble), and fp32 absmax scales ``[ceil(n / block_size)]``. ``stochastic=True`` rounds
    unbiasedly with Philox numbers from ``seed`` (default 0).

    Raises:
        ValueError: ``x`` holds NaN or inf (checked once after the launch: a device sync on every call;
            ``check_finite=False`` skips it, and a non-finite input then leaves its block's scale non-finite).
    """
    n = x.numel()
    nb = -(-n // block_size)
    codes = torch.empty(n if bits == 8 else (n + 1) // 2, dtype=torch.uint8, device=x.device)
    scales = torch.empty(nb, dtype=torch.float32, device=x.device)
    if n == 0:
        return codes, scales
    plan = _plan(code, bits, x.device)
    rows, warps = _tile(block_size, 32, 2048) if bits == 8 else _tile(block_size, 16, 1024)
    # the kernel counts non-finite scales into `bad`: the check is then one 4-byte copy, no reduction kernel
    bad = torch.zeros(1, dtype=torch.int32, device=x.device) if check_finite else scales
    with _on(x.device):
        _quantize_kernel[(triton.cdiv(nb, rows),)](
            x.reshape(-1), codes, scales, bad, plan.lut, plan.thr, plan.mid, plan.val, n, code.numel(),
            0 if seed is None else seed, BS=block_size, ROWS=rows, BITS=bits, SEARCH=plan.search, G=plan.g,
            M=plan.m, E0=plan.e0, NT=plan.nt, R=plan.r, STOCHASTIC=stochastic, CHECK=check_finite,
            INTERPRET=_INTERPRET, num_warps=warps,
        )  # fmt: skip
    if check_finite and bad.item():  # waits for the kernel: a device sync
        raise ValueError("quantize: input contains NaN or inf")
    return codes, scales


def dequantize_blockwise_triton(
    codes: torch.Tensor,
    scales: torch.Tensor,
    code: torch.Tensor,
    block_size: int,
    numel: int,
    *,
    bits: int = 8,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Rebuild the flat tensor ``[numel]`` of ``dtype``: ``fp32(code[c_i] * scales[i // block_size])``, from codes
    (``uint8 [numel]`` or packed ``[ceil(numel/2)]``) and fp32 scales ``[ceil(numel / block_size)]``. Never syncs.
    """
    y = torch.empty(numel, dtype=dtype, device=codes.device)
    if numel == 0:
        return y
    if code.device == codes.device:
        table = code.to(torch.float32).contiguous()
    else:
        table = _plan(code, bits, codes.device).code
    rows, warps = _tile(block_size, 16, 2048)
    with _on(codes.device):
        _dequantize_kernel[(triton.cdiv(-(-numel // block_size), rows),)](
            codes, scales, table, y, numel, table.numel(), BS=block_size, ROWS=rows, BITS=bits,
            CLAMP=table.numel() < 1 << bits, INTERPRET=_INTERPRET, num_warps=warps,
        )  # fmt: skip
    return y
