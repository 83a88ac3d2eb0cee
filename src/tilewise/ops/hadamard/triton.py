"""Triton kernels for the orthonormal Walsh-Hadamard transform along the last dimension.

``H_n = H_a ⊗ H_b`` (Sylvester ordering), so a row ``x`` of length ``n = a * b`` seen as an ``[a, b]`` matrix ``X``
transforms as ``H_a X H_b``: one ``tl.dot`` with ``H_b`` along the contiguous axis, a transpose in registers /
shared memory, one ``tl.dot`` with ``H_a``. The ±1 matrices are built in registers from bit parity, never loaded.
Tensor cores multiply bf16, so an fp32 operand is split into bf16 pieces (``x = hi + mid + lo``) whose products
with ±1 are exact and whose sums accumulate in fp32 (bf16 outputs keep 16 bits of the intermediates, see
``_SPLIT_MID``). README.md has the derivation; n above ``MAX_FUSED_N`` takes two passes (inner transform, then
``H_A`` across the strided axis).
"""

from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl

__all__ = ["MAX_FUSED_N", "hadamard_triton", "hadamard_triton_fwd"]

# Largest n transformed in one pass (one program holds whole rows); larger n use two passes.
MAX_FUSED_N = 16384
# Largest factor applied with one tl.dot: H_128 is a 128 x 128 operand.
_MAX_FACTOR = 128
# tl.dot needs every dimension >= 16; factors below that are applied as I_{16/N} ⊗ H_N on a [*, 16] view.
_MIN_K = 16
# Columns per program in the outer pass.
_BJ = 256


@triton.jit
def _parity(v):
    """Parity of the set bits of ``v`` (< 256)."""
    v = v ^ (v >> 4)
    v = v ^ (v >> 2)
    v = v ^ (v >> 1)
    return v & 1


@triton.jit
def _hadamard_block(K: tl.constexpr, N: tl.constexpr, DOT: tl.constexpr):
    """``[K, K]`` matrix ``I_{K/N} ⊗ H_N`` with entries 0 and ±1: ``H_N[i, j] = (-1)^popcount(i & j)``."""
    o_i = tl.arange(0, K)[:, None]
    o_j = tl.arange(0, K)[None, :]
    b_h = tl.where((o_i ^ o_j) < N, 1 - 2 * _parity(o_i & o_j & (N - 1)), 0)
    return b_h.to(DOT)


@triton.jit
def _dot_split(b_x, b_h, SPLIT: tl.constexpr):
    """``b_x @ b_h`` for fp32 ``b_x [M, K]`` and exact ``b_h [K, K]``, as ``SPLIT`` bf16 pieces of ``b_x``.

    Each piece holds the next 8 significant bits, so products with 0/±1 are exact and the fp32 accumulator sees
    ``8 * SPLIT`` bits of ``b_x``: 1 piece is exact for bf16 input, 2 for fp16, 3 for fp32. Pieces are rounded
    through bf16 and then cast to the dot dtype ``b_h.dtype`` (bf16 on GPUs; fp32 in the interpreter, whose bf16
    dot is not supported), so both run the same arithmetic.
    """
    b_p = b_x.to(tl.bfloat16)
    b_y = tl.dot(b_p.to(b_h.dtype), b_h)
    if SPLIT > 1:
        b_r = b_x - b_p.to(tl.float32)
        b_p = b_r.to(tl.bfloat16)
        b_y = tl.dot(b_p.to(b_h.dtype), b_h, acc=b_y)
        if SPLIT > 2:
            b_r = b_r - b_p.to(tl.float32)
            b_y = tl.dot(b_r.to(tl.bfloat16).to(b_h.dtype), b_h, acc=b_y)
    return b_y


@triton.jit
def _stage(b_x, b_h, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr, SPLIT: tl.constexpr):
    """Apply ``H_N`` along the last axis of fp32 ``b_x [M, N]``; ``b_h`` is ``I_{K/N} ⊗ H_N`` with ``K >= N``."""
    if N < K:
        # Consecutive rows of length N share one K-wide row; the block-diagonal b_h keeps them apart.
        b_y = _dot_split(tl.reshape(b_x, (M * N // K, K)), b_h, SPLIT)
        return tl.reshape(b_y, (M, N))
    else:
        return _dot_split(b_x, b_h, SPLIT)


@triton.jit
def _hadamard_fused_kernel(
    x,
    y,
    T,
    scale,
    N: tl.constexpr,
    NA: tl.constexpr,
    NB: tl.constexpr,
    KA: tl.constexpr,
    KB: tl.constexpr,
    BT: tl.constexpr,
    SPLIT_IN: tl.constexpr,
    SPLIT_MID: tl.constexpr,
    DOT: tl.constexpr,
):
    """``y[t] = scale * H_N x[t]`` for rows ``x, y: [T, N]``; ``BT`` rows per tile, persistent over tiles.

    A row is an ``[NA, NB]`` matrix (``N = NA * NB``, NB contiguous, NA may be 1) and ``H_N = H_NA ⊗ H_NB``:
    one dot with ``H_NB`` along the rows, a transpose, one dot with ``H_NA``. ``KA, KB = max(NA, 16), max(NB, 16)``.
    """
    i_p = tl.program_id(0).to(tl.int64)
    NT = tl.cdiv(T, BT)
    b_hb = _hadamard_block(KB, NB, DOT)
    b_ha = _hadamard_block(KA, NA, DOT)
    o_n = tl.arange(0, N)
    for i_t in range(i_p, NT, tl.num_programs(0)):
        o_t = i_t * BT + tl.arange(0, BT).to(tl.int64)
        m_t = (o_t < T)[:, None]
        o_x = o_t[:, None] * N + o_n[None, :]
        b_x = tl.load(x + o_x, mask=m_t, other=0.0).to(tl.float32)
        # [BT * NA, NB]: H_NB along the contiguous factor.
        b_y = _stage(tl.reshape(b_x, (BT * NA, NB)), b_hb, BT * NA, NB, KB, SPLIT_IN)
        if NA > 1:
            # [BT, NA, NB] -> [BT * NB, NA]: H_NA along the strided factor, then back.
            b_y = tl.reshape(tl.permute(tl.reshape(b_y, (BT, NA, NB)), (0, 2, 1)), (BT * NB, NA))
            b_y = _stage(b_y, b_ha, BT * NB, NA, KA, SPLIT_MID)
            b_y = tl.permute(tl.reshape(b_y, (BT, NB, NA)), (0, 2, 1))
        b_y = tl.reshape(b_y, (BT, N)) * scale
        tl.store(y + o_x, b_y.to(y.dtype.element_ty), mask=m_t)


@triton.jit
def _hadamard_outer_kernel(
    x,
    y,
    S,
    scale,
    A: tl.constexpr,
    K: tl.constexpr,
    BJ: tl.constexpr,
    SPLIT: tl.constexpr,
    DOT: tl.constexpr,
):
    """``y[t, :, j] = scale * H_A x[t, :, j]`` for ``x, y: [T, A, S]``, ``S % BJ == 0``; one ``[A, BJ]`` tile each."""
    i_p = tl.program_id(0).to(tl.int64)
    NJ = S // BJ
    i_t, i_j = i_p // NJ, i_p % NJ
    o_j = i_j * BJ + tl.arange(0, BJ)
    o_a = tl.arange(0, A)
    # [BJ, A]: the transform axis last, as _stage wants it.
    o_x = i_t * A * S + o_a[None, :] * S + o_j[:, None]
    b_x = tl.load(x + o_x).to(tl.float32)
    b_y = _stage(b_x, _hadamard_block(K, A, DOT), BJ, A, K, SPLIT) * scale
    tl.store(y + o_x, b_y.to(y.dtype.element_ty))


# bf16 pieces of the first dot's operand: exact for the input dtype.
_SPLIT_IN = {torch.bfloat16: 1, torch.float16: 2, torch.float32: 3}
# bf16 pieces of the fp32 intermediates, by output dtype: 3 (24 bits, fp32) for fp32 and fp16 outputs. A bf16
# output takes 2 (16 bits: error <= 2^-17 relative, 256x below the output's own rounding): on an H100 the third
# piece costs a quarter of the bandwidth at n = 4096 (95% -> 70% of copy).
_SPLIT_MID = {torch.bfloat16: 2, torch.float16: 3, torch.float32: 3}


def _factors(n: int, split_in: int) -> tuple[int, int]:
    """``(NA, NB)`` with ``n = NA * NB``, each <= 128, the contiguous NB the larger; ``NA = 1`` means one dot.

    One dot of width 128 costs 256 flops an element per bf16 piece, so a 2-piece or 3-piece input splits 128.
    """
    if n <= _MAX_FACTOR // 2 or (n == _MAX_FACTOR and split_in == 1):
        return 1, n
    nb = 1 << ((n.bit_length() - 1 + 1) // 2)
    return n // nb, nb


def _config(n: int) -> tuple[int, int, int]:
    """``(rows per tile, warps, persistent programs per SM)`` of the fused kernel, tuned on an H100.

    4096-element tiles with 4 warps (32 fp32 values a thread) and 8 programs an SM keep HBM busy for n <= 8192;
    a 16384 row needs 8 warps to avoid spills, and shared memory then allows 2 programs an SM.
    """
    if n <= 4096:
        return 4096 // n, 4, 8
    if n <= 8192:
        return 1, 4, 8
    return 1, 8, 2


@functools.cache
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _programs(device: torch.device, tiles: int, per_sm: int) -> int:
    """Persistent grid: ``per_sm`` programs an SM on a GPU; on the interpreter 3, so the tile loop runs."""
    if device.type == "cuda":
        return max(1, min(tiles, per_sm * _num_sms(device.index if device.index is not None else 0)))
    return max(1, min(tiles, 3))


def _dot_dtype(device: torch.device) -> tl.dtype:
    # Triton's interpreter multiplies bf16 bit patterns as integers; fp32 operands holding bf16 values are exact.
    return tl.bfloat16 if device.type == "cuda" else tl.float32


def _launch_fused(x: torch.Tensor, y: torch.Tensor, scale: float) -> None:
    """``y = scale * (x @ H_n)`` for contiguous ``x, y: [T, n]``, ``n <= MAX_FUSED_N``."""
    t, n = x.shape
    na, nb = _factors(n, _SPLIT_IN[x.dtype])
    bt, num_warps, per_sm = _config(n)
    _hadamard_fused_kernel[(_programs(x.device, triton.cdiv(t, bt), per_sm),)](
        x,
        y,
        t,
        scale,
        N=n,
        NA=na,
        NB=nb,
        KA=max(na, _MIN_K),
        KB=max(nb, _MIN_K),
        BT=bt,
        SPLIT_IN=_SPLIT_IN[x.dtype],
        SPLIT_MID=_SPLIT_MID[y.dtype],
        DOT=_dot_dtype(x.device),
        num_warps=num_warps,
    )


def _launch_outer(x: torch.Tensor, y: torch.Tensor, a: int, scale: float) -> None:
    """``y[t, :, j] = scale * H_a x[t, :, j]`` for contiguous ``x, y: [T, a * S]``."""
    t, n = x.shape
    s = n // a
    _hadamard_outer_kernel[(t * (s // _BJ),)](
        x,
        y,
        s,
        scale,
        A=a,
        K=max(a, _MIN_K),
        BJ=_BJ,
        SPLIT=3,
        DOT=_dot_dtype(x.device),
        num_warps=4,
    )


def hadamard_triton_fwd(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Host side, no autograd: ``x [..., n]`` (fp32/fp16/bf16, n a power of two <= 32768) -> ``[..., n]``.

    ``out``, if given, is a contiguous tensor of ``x``'s shape and dtype that receives the result (tests poison
    it to catch unwritten elements).
    """
    n = x.shape[-1]
    x2 = x.reshape(-1, n).contiguous()
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    y = out.view(-1, n)
    if x2.numel() == 0:
        return out
    scale = n**-0.5
    # Triton launches on the current CUDA device: make it x's.
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        if n <= MAX_FUSED_N:
            _launch_fused(x2, y, scale)
        else:
            # n = a * inner: H_inner on each contiguous chunk (unscaled, into fp32), then H_a across chunks.
            a = n // MAX_FUSED_N
            ws = y if y.dtype == torch.float32 else torch.empty(x2.shape, dtype=torch.float32, device=x.device)
            _launch_fused(x2.view(-1, MAX_FUSED_N), ws.view(-1, MAX_FUSED_N), 1.0)
            _launch_outer(ws, y, a, scale)
    return out


@torch.library.custom_op("tilewise::hadamard", mutates_args=())
def hadamard_triton(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal Walsh-Hadamard transform along the last dim with the Triton kernels (a ``torch.library`` op)."""
    return hadamard_triton_fwd(x)


@hadamard_triton.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape)


def _setup_context(ctx, inputs, output) -> None:
    pass


def _backward(ctx, grad: torch.Tensor) -> torch.Tensor:
    # H_n / sqrt(n) is symmetric and orthonormal: the vector-Jacobian product is the same transform.
    return hadamard_triton(grad)


hadamard_triton.register_autograd(_backward, setup_context=_setup_context)
