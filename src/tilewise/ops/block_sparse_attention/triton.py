"""Triton kernels for block-sparse causal softmax attention (flash-attention style; README.md has the math).

The host turns the block mask into compacted lists of kept causal blocks, so every loop runs over kept blocks only:

- ``kv_idx [B, H, NB, NB]`` / ``kv_cnt [B, H, NB]``: per query block, its kept key blocks, ascending (diagonal last).
- ``q_idx`` / ``q_cnt``: per key block, the query blocks that keep it, ascending (diagonal first).

Kernels, one program per ``(block or part of one, b * H + h)``:

1. ``_fwd_kernel``: online softmax in base 2 in fp32 over the kept key blocks of one query block; stores ``o`` and
   the logsumexp ``lse [B, H, T]`` (natural log, fp32).
2. ``_bwd_dq_kernel``: per query block (or part), ``dq = scale Σ ds k`` over its kept key blocks, with
   ``p = exp(s - lse)`` recomputed and ``ds = p ⊙ (do v^T - delta)``; it also stores ``delta = rowsum(o ⊙ do)``.
3. ``_bwd_dkdv_kernel`` (after it): per key block (a part of one by default, :data:`DKDV_LAUNCH`),
   ``dv = Σ p^T do`` and ``dk = scale Σ ds^T q`` over the query blocks that keep it.

The causal mask is applied in the diagonal block only: kept off-diagonal blocks are fully visible, and only the
diagonal block can hold keys past ``T``. The autograd pair is registered with ``torch.library``
(``tilewise::block_sparse_attention`` and its ``_bwd``).

The selector's block mass (``select_blocks``) has two kernels of its own. ``_mass_tile_kernel``, one program per
``(tile of BM strided query rows, tile of BN key columns, b * H + h)`` on or below the diagonal, computes the tile's
antidiagonal logits (``S`` dots of ``[BM, D]`` query rows by ``[BN, D]`` key rows) once and keeps only each row's
max over the tile and its ``exp2(s - max)`` summed per group of key columns. ``_mass_finish_kernel``, one program
per row tile, combines the tiles' maxima and sums into each row's softmax (as flash attention does) and pools the
rescaled group sums per block pair. The ``[T/S, T/S]`` logits are never stored: the scratch is ``1 / GN`` of them in
fp32 (``GN`` strided columns a block), bounded by running the ``(b, h)`` slices in chunks. Registered as
``tilewise::select_blocks_mass``.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from tilewise.ops._launch import dot_args as _dot_args
from tilewise.ops._launch import first_that_fits
from tilewise.ops.block_sparse_attention.reference import with_diagonal

__all__ = [
    "block_lists",
    "block_lists_torch",
    "block_mass_triton",
    "block_sparse_attention_bwd",
    "block_sparse_attention_fwd",
    "block_sparse_attention_triton",
    "select_blocks_mass_triton",
]

LOG2E = 1.4426950408889634


@triton.jit
def _load_rows(x, base, o_t, T, D: tl.constexpr, DOT: tl.constexpr):
    """``[BT, D]`` rows ``o_t`` of one ``(b, h)`` slice of a ``[B, H, T, D]`` tensor (zeros past ``T``) as ``DOT``."""
    o_d = tl.arange(0, D)
    b_x = tl.load(x + base + o_t[:, None] * D + o_d[None, :], mask=(o_t < T)[:, None], other=0.0)
    return b_x.to(DOT)


@triton.jit
def _store_rows(x, base, o_t, T, b_x, D: tl.constexpr):
    o_d = tl.arange(0, D)
    tl.store(x + base + o_t[:, None] * D + o_d[None, :], b_x.to(x.dtype.element_ty), mask=(o_t < T)[:, None])


@triton.jit
def _fwd_step(b_q, k, v, base, o_s, o_t, T, b_m, b_l, b_acc, qk_scale, D: tl.constexpr, DIAG: tl.constexpr,
              DOT: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    """Keys ``o_s`` (a block or a part of one) of the online softmax: the updated ``(max, sum, accumulator)``
    (base 2). On the diagonal a row sees at least its own key in the block's first part, so its max is finite
    before any part that hides every key from it."""
    b_k = _load_rows(k, base, o_s, T, D, DOT)
    b_v = _load_rows(v, base, o_s, T, D, DOT)
    b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PREC) * qk_scale
    if DIAG:
        b_s = tl.where(o_s[None, :] <= o_t[:, None], b_s, float("-inf"))
    b_m_new = tl.maximum(b_m, tl.max(b_s, 1))
    b_alpha = tl.exp2(b_m - b_m_new)
    b_p = tl.exp2(b_s - b_m_new[:, None])
    b_l = b_l * b_alpha + tl.sum(b_p, 1)
    b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(DOT), b_v, input_precision=PREC)
    return b_m_new, b_l, b_acc


@triton.jit
def _fwd_kernel(q, k, v, o, lse, kv_idx, kv_cnt, T, NB, qk_scale, D: tl.constexpr, BT: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    """``BM`` query rows (a part of query block ``i_t`` when ``BM < BT``) against the block's kept key blocks, ``BN``
    keys a step (``BT / BN`` steps a block: a longer loop for the pipeline to fill)."""
    i_p, i_bh = tl.program_id(0), tl.program_id(1)
    i_t = i_p // (BT // BM)
    # int64: (b * H + h) * T * D can pass 2**31.
    base = i_bh.to(tl.int64) * T * D
    row = i_bh.to(tl.int64) * NB + i_t
    o_t = i_t * BT + (i_p % (BT // BM)) * BM + tl.arange(0, BM)
    b_q = _load_rows(q, base, o_t, T, D, DOT)
    b_m = tl.full([BM], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BM], dtype=tl.float32)
    b_acc = tl.zeros([BM, D], dtype=tl.float32)
    n = tl.load(kv_cnt + row)
    # Off-diagonal kept blocks (fully visible), then the diagonal block, always kept and last in the list.
    SUB: tl.constexpr = BT // BN
    for i_j in range(0, (n - 1) * SUB):
        i_s = tl.load(kv_idx + row * NB + i_j // SUB)
        o_s = i_s * BT + (i_j % SUB) * BN + tl.arange(0, BN)
        b_m, b_l, b_acc = _fwd_step(b_q, k, v, base, o_s, o_t, T, b_m, b_l, b_acc, qk_scale, D, False, DOT, PREC)
    for i_c in range(0, SUB):
        o_s = i_t * BT + i_c * BN + tl.arange(0, BN)
        b_m, b_l, b_acc = _fwd_step(b_q, k, v, base, o_s, o_t, T, b_m, b_l, b_acc, qk_scale, D, True, DOT, PREC)
    _store_rows(o, base, o_t, T, b_acc / b_l[:, None], D)
    tl.store(lse + i_bh.to(tl.int64) * T + o_t, (b_m + tl.log2(b_l)) / 1.4426950408889634, mask=o_t < T)


@triton.jit
def _probs(b_q, b_k, lse, o_t, o_s, T, bh_t, qk_scale, DIAG: tl.constexpr, PREC: tl.constexpr):
    """``p = exp(scale q k^T - lse)`` ``[BT, BT]`` fp32, zero above the diagonal in the diagonal block."""
    b_lse = tl.load(lse + bh_t + o_t, mask=o_t < T, other=0.0) * 1.4426950408889634
    b_p = tl.exp2(tl.dot(b_q, tl.trans(b_k), input_precision=PREC) * qk_scale - b_lse[:, None])
    if DIAG:
        b_p = tl.where(o_s[None, :] <= o_t[:, None], b_p, 0.0)
    return b_p


@triton.jit
def _dkdv_step(q, do, lse, delta, base, bh_t, o_t, o_s, T, b_k, b_v, b_dk, b_dv, qk_scale, D: tl.constexpr,
               DIAG: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    """The query rows ``o_t`` (a block or a part of one) against the keys ``o_s`` of the program."""
    b_q = _load_rows(q, base, o_t, T, D, DOT)
    b_do = _load_rows(do, base, o_t, T, D, DOT)
    b_p = _probs(b_q, b_k, lse, o_t, o_s, T, bh_t, qk_scale, DIAG, PREC)
    b_dv += tl.dot(tl.trans(b_p.to(DOT)), b_do, input_precision=PREC)
    b_delta = tl.load(delta + bh_t + o_t, mask=o_t < T, other=0.0)
    b_ds = b_p * (tl.dot(b_do, tl.trans(b_v), input_precision=PREC) - b_delta[:, None])
    b_dk += tl.dot(tl.trans(b_ds.to(DOT)), b_q, input_precision=PREC)
    return b_dk, b_dv


@triton.jit
def _bwd_dkdv_kernel(q, k, v, do, lse, delta, dk, dv, q_idx, q_cnt, T, NB, scale, qk_scale, D: tl.constexpr,
                     BT: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr, DOT: tl.constexpr,
                     PREC: tl.constexpr):  # fmt: skip
    """``BN`` keys (a part of key block ``i_s`` when ``BN < BT``) against the query blocks that keep the block,
    ``BM`` query rows a step (``BT / BM`` steps a block; on the diagonal only the steps from the first row that can
    see the part)."""
    i_p, i_bh = tl.program_id(0), tl.program_id(1)
    i_s = i_p // (BT // BN)
    r_s = (i_p % (BT // BN)) * BN
    base = i_bh.to(tl.int64) * T * D
    bh_t = i_bh.to(tl.int64) * T
    row = i_bh.to(tl.int64) * NB + i_s
    o_s = i_s * BT + r_s + tl.arange(0, BN)
    b_k = _load_rows(k, base, o_s, T, D, DOT)
    b_v = _load_rows(v, base, o_s, T, D, DOT)
    b_dk = tl.zeros([BN, D], dtype=tl.float32)
    b_dv = tl.zeros([BN, D], dtype=tl.float32)
    SUB: tl.constexpr = BT // BM
    # The diagonal block first in the list (rows below the part's first key see none of it), then the query blocks
    # below it that keep this key block.
    for i_c in range(r_s // BM, SUB):
        o_t = i_s * BT + i_c * BM + tl.arange(0, BM)
        b_dk, b_dv = _dkdv_step(
            q, do, lse, delta, base, bh_t, o_t, o_s, T, b_k, b_v, b_dk, b_dv, qk_scale, D, True, DOT, PREC
        )
    n = tl.load(q_cnt + row)
    for i_j in range(SUB, n * SUB):
        i_t = tl.load(q_idx + row * NB + i_j // SUB)
        o_t = i_t * BT + (i_j % SUB) * BM + tl.arange(0, BM)
        b_dk, b_dv = _dkdv_step(
            q, do, lse, delta, base, bh_t, o_t, o_s, T, b_k, b_v, b_dk, b_dv, qk_scale, D, False, DOT, PREC
        )
    _store_rows(dk, base, o_s, T, b_dk * scale, D)
    _store_rows(dv, base, o_s, T, b_dv, D)


@triton.jit
def _dq_step(b_q, b_do, b_delta, k, v, lse, base, bh_t, o_s, o_t, T, b_dq, qk_scale, D: tl.constexpr,
             DIAG: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    b_k = _load_rows(k, base, o_s, T, D, DOT)
    b_v = _load_rows(v, base, o_s, T, D, DOT)
    b_p = _probs(b_q, b_k, lse, o_t, o_s, T, bh_t, qk_scale, DIAG, PREC)
    b_ds = b_p * (tl.dot(b_do, tl.trans(b_v), input_precision=PREC) - b_delta[:, None])
    return b_dq + tl.dot(b_ds.to(DOT), b_k, input_precision=PREC)


@triton.jit
def _bwd_dq_kernel(q, k, v, o, do, lse, delta, dq, kv_idx, kv_cnt, T, NB, scale, qk_scale, D: tl.constexpr,
                   BT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, DOT: tl.constexpr,
                   PREC: tl.constexpr):  # fmt: skip
    """``BM`` query rows (a part of query block ``i_t`` when ``BM < BT``) against the block's kept key blocks, ``BN``
    keys a step (on the diagonal only the steps up to the part's last row). Runs before the dk/dv kernel: it takes
    ``delta = rowsum(o ⊙ do)`` of its rows in fp32 (16-bit values are exact in fp32) while ``do`` is loaded, and
    stores it for that kernel."""
    i_p, i_bh = tl.program_id(0), tl.program_id(1)
    i_t = i_p // (BT // BM)
    r_t = (i_p % (BT // BM)) * BM
    base = i_bh.to(tl.int64) * T * D
    bh_t = i_bh.to(tl.int64) * T
    row = i_bh.to(tl.int64) * NB + i_t
    o_t = i_t * BT + r_t + tl.arange(0, BM)
    b_q = _load_rows(q, base, o_t, T, D, DOT)
    b_do = _load_rows(do, base, o_t, T, D, DOT)
    b_delta = tl.sum(_load_rows(o, base, o_t, T, D, tl.float32) * b_do.to(tl.float32), axis=1)
    tl.store(delta + bh_t + o_t, b_delta, mask=o_t < T)
    b_dq = tl.zeros([BM, D], dtype=tl.float32)
    n = tl.load(kv_cnt + row)
    SUB: tl.constexpr = BT // BN
    for i_j in range(0, (n - 1) * SUB):
        i_s = tl.load(kv_idx + row * NB + i_j // SUB)
        o_s = i_s * BT + (i_j % SUB) * BN + tl.arange(0, BN)
        b_dq = _dq_step(b_q, b_do, b_delta, k, v, lse, base, bh_t, o_s, o_t, T, b_dq, qk_scale, D, False, DOT, PREC)
    for i_c in range(0, (r_t + BM - 1) // BN + 1):
        o_s = i_t * BT + i_c * BN + tl.arange(0, BN)
        b_dq = _dq_step(b_q, b_do, b_delta, k, v, lse, base, bh_t, o_s, o_t, T, b_dq, qk_scale, D, True, DOT, PREC)
    _store_rows(dq, base, o_t, T, b_dq * scale, D)


@triton.jit
def _strided_rows(x, base, o_r, i, T, s_t, s_d, D: tl.constexpr, S: tl.constexpr, BD: tl.constexpr,
                  DOT: tl.constexpr):  # fmt: skip
    """``[len(o_r), BD]`` tokens ``S * o_r + i`` of one ``(b, h)`` slice of a strided ``[B, H, T, D]`` tensor (zeros
    past ``T`` and ``D``) as ``DOT``."""
    o_t = S * o_r + i
    o_d = tl.arange(0, BD)
    p_x = x + base + o_t.to(tl.int64)[:, None] * s_t + o_d[None, :] * s_d
    return tl.load(p_x, mask=(o_t < T)[:, None] & (o_d < D)[None, :], other=0.0).to(DOT)


@triton.jit
def _antidiagonal_tile(q, k, q_base, k_base, o_i, o_j, T, sq_t, sq_d, sk_t, sk_d, qk_scale, D: tl.constexpr,
                       S: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, DOT: tl.constexpr,
                       PREC: tl.constexpr):  # fmt: skip
    """``[BM, BN]`` fp32 antidiagonal logits (base 2) of strided rows ``o_i`` and columns ``o_j``:
    ``qk_scale Σ_{i<S} q_{S a + S-1-i} · k_{S b + i}``, ``-inf`` where ``b > a``. No mask for all-padding columns
    is needed: a real row ``a`` sees only ``b <= a``, real too, and padding rows weigh 0."""
    b_s = tl.zeros([BM, BN], dtype=tl.float32)
    for i in range(S):
        b_q = _strided_rows(q, q_base, o_i, S - 1 - i, T, sq_t, sq_d, D, S, BD, DOT)
        b_k = _strided_rows(k, k_base, o_j, i, T, sk_t, sk_d, D, S, BD, DOT)
        b_s = tl.dot(b_q, tl.trans(b_k), b_s, input_precision=PREC)
    return tl.where(o_j[None, :] <= o_i[:, None], b_s * qk_scale, float("-inf"))


@triton.jit
def _mass_tile_kernel(q, k, part, stats, T, NRT, NT, BH0, sq_b, sq_h, sq_t, sq_d, sk_b, sk_h, sk_t, sk_d,
                      qk_scale, H, D: tl.constexpr, S: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                      GN: tl.constexpr, BD: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    """Block mass, step 1: one program per ``(row tile, key tile, b * H + h - BH0)``. The ``[BM, BN]`` tile's
    antidiagonal logits ``s`` give each row its max ``m`` over the tile and ``exp2(s - m)`` summed per group of ``GN``
    columns (``part [.., BM, BN / GN]``) and over the tile (``stats [.., 1, BM]``; ``stats [.., 0, BM]`` is ``m``).
    Tiles with no visible column for any real row of the row tile do nothing (:func:`_mass_finish_kernel` reads only
    the others)."""
    i_m, i_n, i_c = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n_real = tl.cdiv(T, S)
    n_tiles = tl.where(i_m * BM < n_real, tl.cdiv(tl.minimum(i_m * BM + BM, n_real), BN), 0)
    if i_n >= n_tiles:
        return
    i_bh = BH0 + i_c
    i_b, i_h = i_bh // H, i_bh % H
    q_base = i_b.to(tl.int64) * sq_b + i_h.to(tl.int64) * sq_h
    k_base = i_b.to(tl.int64) * sk_b + i_h.to(tl.int64) * sk_h
    o_i = i_m * BM + tl.arange(0, BM)
    o_j = i_n * BN + tl.arange(0, BN)
    b_s = _antidiagonal_tile(q, k, q_base, k_base, o_i, o_j, T, sq_t, sq_d, sk_t, sk_d, qk_scale, D, S, BM, BN, BD,
                             DOT, PREC)  # fmt: skip
    b_m = tl.max(b_s, 1)
    # a row whose columns in this tile all lie above the diagonal: max -inf, every exp2 0
    b_p = tl.exp2(b_s - tl.where(b_m == float("-inf"), 0.0, b_m)[:, None])
    b_part = tl.sum(tl.reshape(b_p, [BM, BN // GN, GN]), 2)
    i_t = (i_c.to(tl.int64) * NRT + i_m) * NT + i_n
    o_r = tl.arange(0, BM)
    o_g = tl.arange(0, BN // GN)
    tl.store(part + i_t * (BM * (BN // GN)) + o_r[:, None] * (BN // GN) + o_g[None, :], b_part)
    tl.store(stats + i_t * (2 * BM) + o_r, b_m)
    tl.store(stats + i_t * (2 * BM) + BM + o_r, tl.sum(b_part, 1))


@triton.jit
def _mass_finish_kernel(part, stats, mass, T, NR, NC, NRT, NT, BH0, S: tl.constexpr, PER: tl.constexpr,
                        BM: tl.constexpr, BN: tl.constexpr, GM: tl.constexpr, GN: tl.constexpr):  # fmt: skip
    """Block mass, step 2: one program per ``(row tile, b * H + h - BH0)``. Each row's softmax max and sum come
    from its tiles' ``(m, sum)`` (online, as in flash attention); then each tile's group sums are rescaled by
    ``exp2(m_tile - m) / (sum * real rows of the block)`` and pooled over ``GM`` rows into ``mass``. Key tiles above
    the diagonal store zeros."""
    i_m, i_c = tl.program_id(0), tl.program_id(1)
    n_real = tl.cdiv(T, S)
    n_tiles = tl.where(i_m * BM < n_real, tl.cdiv(tl.minimum(i_m * BM + BM, n_real), BN), 0)
    o_i = i_m * BM + tl.arange(0, BM)
    o_r = tl.arange(0, BM)
    p_t = (i_c.to(tl.int64) * NRT + i_m) * NT
    b_m = tl.full([BM], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BM], dtype=tl.float32)
    for i_n in range(0, n_tiles):
        b_mt = tl.load(stats + (p_t + i_n) * (2 * BM) + o_r)
        b_lt = tl.load(stats + (p_t + i_n) * (2 * BM) + BM + o_r)
        b_new = tl.maximum(b_m, b_mt)
        b_ref = tl.where(b_new == float("-inf"), 0.0, b_new)
        b_l = b_l * tl.exp2(b_m - b_ref) + b_lt * tl.exp2(b_mt - b_ref)
        b_m = b_new
    # A block's mass is the mean over its real rows: weigh each real row by 1 / (count * its sum of exp).
    m_real = o_i < n_real
    b_cnt = tl.minimum(PER, n_real - (o_i // PER) * PER).to(tl.float32)
    b_w = tl.where(m_real, 1.0 / tl.where(m_real, b_cnt * b_l, 1.0), 0.0)
    b_ref = tl.where(b_m == float("-inf"), 0.0, b_m)
    o_q = i_m * (BM // GM) + tl.arange(0, BM // GM)
    p_row = mass + (BH0 + i_c).to(tl.int64) * NR * NC + o_q[:, None].to(tl.int64) * NC
    o_g = tl.arange(0, BN // GN)
    for i_n in range(0, n_tiles):
        b_mt = tl.load(stats + (p_t + i_n) * (2 * BM) + o_r)
        b_part = tl.load(part + (p_t + i_n) * (BM * (BN // GN)) + o_r[:, None] * (BN // GN) + o_g[None, :])
        b_part = b_part * (tl.exp2(b_mt - b_ref) * b_w)[:, None]
        b_mass = tl.sum(tl.reshape(b_part, [BM // GM, GM, BN // GN]), 1)
        o_c = i_n * (BN // GN) + o_g
        tl.store(p_row + o_c[None, :], b_mass, mask=(o_q < NR)[:, None] & (o_c < NC)[None, :])
    for i_n in range(n_tiles, tl.cdiv(NC * GN, BN)):
        o_c = i_n * (BN // GN) + o_g
        b_zero = tl.zeros([BM // GM, BN // GN], dtype=tl.float32)
        tl.store(p_row + o_c[None, :], b_zero, mask=(o_q < NR)[:, None] & (o_c < NC)[None, :])


# Launch choices of the forward kernel (benchmarks/gpu_block_sparse_attention.py --sweep times them): query rows
# per program (``fwd_bm``, a power of two <= block_size, >= 32; None = the block), keys a step (``fwd_bn``, a power
# of two <= block_size, >= 16), warps and pipeline stages (None: FWD_LAUNCH's, falling back to fewer stages where
# shared memory is short: _launch_fitting).
TUNING: dict[str, int | None] = {
    "fwd_bm": None,
    "fwd_bn": None,
    "fwd_warps": None,
    "fwd_stages": None,
    # the dk/dv kernel: keys a program, query rows a step; the dq kernel: query rows a program, keys a step
    "dkdv_bn": None,
    "dkdv_bm": None,
    "dkdv_warps": None,
    "dkdv_stages": None,
    "dq_bm": None,
    "dq_bn": None,
    "dq_warps": None,
    "dq_stages": None,
}


# fp32 inputs run on blocks of at most this many rows (the mask refined to them: the same pairs attend) with tf32x3
# products on a GPU. Compiled for sm_90 (D = 128, 8 warps): IEEE fp32 dots (FMA loops) at block 128 took 161 s to
# compile with a 25 KB spill stack a thread and 256 KB of shared memory (did not finish within 7 minutes on the H100);
# tf32x3 at block 32 compiles in 2-3 s (1-3 KB of spill: fp32 [32, 128] tiles split in two tf32 parts).
FP32_BLOCK = 32


def _launch_args(q: torch.Tensor, block_size: int) -> dict:
    warps = 8 if block_size >= 128 else 4
    dots = _dot_args(q.dtype, q.device)
    if q.is_cuda and q.dtype == torch.float32:
        dots["PREC"] = "tf32x3"  # three tensor-core products (~2^-21 relative), not FMA loops
    return {"D": q.shape[-1], "BT": block_size, "num_warps": warps, **dots}


def _split(block_size: int, rows: int | None, low: int, name: str = "rows") -> int:
    """Rows of a part of a block: ``rows`` clamped to ``[low, block_size]``; None: the block. A part must divide
    the block (the kernels step through it in whole parts), so ``rows`` must be a power of two."""
    if rows is not None and (isinstance(rows, bool) or not isinstance(rows, int) or rows < 1 or rows & (rows - 1)):
        raise ValueError(f"TUNING[{name!r}] must be None or a power of two (e.g. 64), got {rows!r}")
    return min(block_size, max(low, rows or block_size))


# The dk/dv kernel's launch unless TUNING says otherwise: 64 keys a program, 64 query rows a step, 4 warps, pipeline
# depth 2 first. H100, B=4 H=16 D=128 bf16, block 128, 10% of the blocks (benchmarks/gpu_block_sparse_attention.py
# --sweep-bwd): the backward 1.708 -> 1.30 ms at T=8192 and 16.54 -> 13.32 at T=32768 against whole 128-blocks with
# 8 warps (whose three stages ask 296 KB of shared memory and fall back); 128 keys with 32-row steps 1.98, 8 warps
# with 64/64 1.91, 32/32 2.2+. The dq kernel keeps whole blocks: 64-row parts measured within 1% at 8K and 7%
# slower at 32K.
DKDV_LAUNCH = {"bn": 64, "bm": 64, "warps": 4, "stages": (2, 1)}


def _bwd_launch_args(
    q: torch.Tensor, block_size: int
) -> tuple[tuple[int, int, dict, tuple], tuple[int, int, dict, tuple]]:
    """``(keys a program, query rows a step, options, pipeline depths to try)`` of the dk/dv kernel
    (:data:`DKDV_LAUNCH`) and ``(query rows a program, keys a step, options, depths)`` of the dq kernel (whole
    blocks), each overridden by ``TUNING``. Parts of at least 32 rows: each is an M or N dimension of some dot
    (16-wide 16-bit dot tiles were wrong on an H100 with triton 3.6; see linear_attention)."""
    base = _launch_args(q, block_size)
    defaults = {"dkdv": DKDV_LAUNCH, "dq": {"bn": None, "bm": None, "warps": None, "stages": STAGES_TRIED}}
    out = []
    for kernel, first, second in (("dkdv", "bn", "bm"), ("dq", "bm", "bn")):
        dflt = defaults[kernel]
        opts = dict(base)
        warps = TUNING[f"{kernel}_warps"] or dflt["warps"]
        if warps:
            opts["num_warps"] = warps
        stages = (TUNING[f"{kernel}_stages"],) if TUNING[f"{kernel}_stages"] else dflt["stages"]
        rows = _split(block_size, TUNING[f"{kernel}_{first}"] or dflt[first], 32, f"{kernel}_{first}")
        step = _split(block_size, TUNING[f"{kernel}_{second}"] or dflt[second], 32, f"{kernel}_{second}")
        out.append((rows, step, opts, stages))
    return out[0], out[1]


# The forward kernel's launch unless TUNING says otherwise: keys in steps of 64 (of a block of up to 128), 4 warps,
# pipeline depth 2 first. H100, B=4 H=16 D=128 bf16, block 128, the bench mask (do_bench of the kernel): T=2048
# 0.108 -> 0.087 ms, T=8192 0.418 -> 0.403, against whole blocks with 8 warps (the earlier default); 64-key steps
# with 8 warps 0.099 / 0.453, 64-row programs 0.085 / 0.418, whole blocks with 4 warps 0.15 / 0.71.
FWD_LAUNCH = {"bn": 64, "warps": 4, "stages": (2, 1)}


def _fwd_launch_args(q: torch.Tensor, block_size: int) -> tuple[int, dict, tuple[int, ...]]:
    """``(query rows per program, launch options, pipeline depths to try)`` of the forward kernel:
    :data:`FWD_LAUNCH`, overridden by ``TUNING``."""
    bm = _split(block_size, TUNING["fwd_bm"], 32, "fwd_bm")
    bn = _split(block_size, TUNING["fwd_bn"] or FWD_LAUNCH["bn"], 16, "fwd_bn")
    opts = _launch_args(q, block_size) | {"BM": bm, "BN": bn, "num_warps": TUNING["fwd_warps"] or FWD_LAUNCH["warps"]}
    stages = (TUNING["fwd_stages"],) if TUNING["fwd_stages"] else FWD_LAUNCH["stages"]
    return bm, opts, stages


@triton.jit
def _block_lists_kernel(mask, s_b, s_h, s_i, s_j, idx, cnt, H, NB, NBP: tl.constexpr):
    """Row ``i = program_id(0)`` of head ``b * H + h = program_id(1)``, direction ``program_id(2)``: 0, the kept
    causal key blocks ``j <= i`` of query block ``i``; 1, the query blocks ``j >= i`` keeping key block ``i``. The
    diagonal counts as kept. Kept indices go, ascending, to ``idx[dir, b, h, i, :count]`` (positions from a prefix
    sum of the kept flags) and ``count`` to ``cnt[dir, b, h, i]``; the rest of the row is left as it was."""
    i = tl.program_id(0)
    bh = tl.program_id(1)
    t = tl.program_id(2)
    o = tl.arange(0, NBP)
    base = mask + (bh // H).to(tl.int64) * s_b + (bh % H).to(tl.int64) * s_h
    # direction 0 reads row i of the mask, direction 1 its column i (the transpose)
    p = base + tl.where(t == 0, i * s_i + o * s_j, o * s_i + i * s_j)
    valid = tl.where(t == 0, o <= i, (o >= i) & (o < NB))
    keep = ((tl.load(p, mask=valid, other=0) != 0) & valid) | (o == i)
    k32 = keep.to(tl.int32)
    row = ((t * tl.num_programs(1) + bh) * NB + i).to(tl.int64)
    tl.store(idx + row * NB + tl.cumsum(k32, axis=0) - 1, o, mask=keep)
    tl.store(cnt + row, tl.sum(k32, axis=0))


def block_lists(block_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(kv_idx, kv_cnt, q_idx, q_cnt)`` int32 from a bool ``[B, H, NB, NB]`` mask (any strides: broadcast batch
    and head dims stay views; its diagonal counts as kept, set or not), in one launch of :func:`_block_lists_kernel`
    (the PyTorch version, :func:`block_lists_torch`, is ~15 small ops: ~0.25 ms of host time a call on the H100's
    host, more than the attention kernel at T=8192 with 10% of blocks).

    ``kv_idx[b, h, i, :kv_cnt[b, h, i]]``: the kept causal key blocks of query block ``i``, ascending (the diagonal
    last); ``q_idx[b, h, j, :q_cnt[b, h, j]]``: the query blocks keeping key block ``j``, ascending (the diagonal
    first). The rest of each row is padding (not written)."""
    batch, heads, nb, _ = block_mask.shape
    idx = torch.empty((2, batch, heads, nb, nb), dtype=torch.int32, device=block_mask.device)
    cnt = torch.empty((2, batch, heads, nb), dtype=torch.int32, device=block_mask.device)
    if idx.numel():
        m = block_mask.view(torch.uint8)
        with torch.cuda.device(m.device) if m.is_cuda else contextlib.nullcontext():
            _block_lists_kernel[(nb, batch * heads, 2)](
                m, *m.stride(), idx, cnt, heads, nb, NBP=max(16, triton.next_power_of_2(nb))
            )
    return idx[0], cnt[0], idx[1], cnt[1]


def block_lists_torch(block_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`block_lists` in PyTorch (a stable sort of the dropped flags; the padding holds the dropped indices):
    the reference its test compares with."""
    nb = block_mask.shape[-1]
    m = block_mask & torch.ones(nb, nb, dtype=torch.bool, device=block_mask.device).tril()
    m = m | torch.eye(nb, dtype=torch.bool, device=block_mask.device)
    lists = []
    for mm in (m, m.transpose(-1, -2)):
        # A stable sort of "dropped" flags puts the kept indices first, in ascending order.
        idx = torch.sort((~mm).to(torch.int8), dim=-1, stable=True).indices.to(torch.int32).contiguous()
        lists += [idx, mm.sum(-1, dtype=torch.int32).contiguous()]
    return tuple(lists)


def refine_mask(block_mask: torch.Tensor, ratio: int, blocks: int) -> torch.Tensor:
    """``block_mask [B, H, NB, NB]`` over blocks ``ratio`` times smaller: each kept block becomes ``ratio x ratio``
    kept sub-blocks, cut to ``blocks`` a side (the last block may be partial). The same query-key pairs attend
    (the causal cut of the diagonal blocks is :func:`block_lists`' ``tril``)."""
    fine = block_mask.repeat_interleave(ratio, dim=-2).repeat_interleave(ratio, dim=-1)
    return fine[..., :blocks, :blocks]


def block_sparse_attention_fwd(q, k, v, kv_idx, kv_cnt, block_size: int, scale: float):
    """``(o [B, H, T, D] in q's dtype, lse [B, H, T] fp32)``; contiguous inputs, no autograd."""
    batch, heads, seq, _ = q.shape
    o = torch.empty_like(q)
    lse = torch.empty(batch, heads, seq, dtype=torch.float32, device=q.device)
    nb = kv_cnt.shape[-1]
    if o.numel():
        bm, opts, stages = _fwd_launch_args(q, block_size)
        grid = (nb * (block_size // bm), batch * heads)
        args = (q, k, v, o, lse, kv_idx, kv_cnt, seq, nb, scale * LOG2E)
        _launch_fitting(_fwd_kernel, grid, args, opts, stages)
    return o, lse


def block_sparse_attention_bwd(q, k, v, o, lse, do, kv_idx, kv_cnt, q_idx, q_cnt, block_size: int, scale: float):
    """``(dq, dk, dv)`` in the inputs' dtype; contiguous inputs, no autograd."""
    batch, heads, seq, _ = q.shape
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if not q.numel():
        return dq, dk, dv
    # delta = rowsum(o * do), fp32: written by the dq kernel, read by the dk/dv kernel after it
    delta = torch.empty((batch, heads, seq), dtype=torch.float32, device=q.device)
    nb = kv_cnt.shape[-1]
    (bn1, bm1, o1, st1), (bm2, bn2, o2, st2) = _bwd_launch_args(q, block_size)
    dq_args = (q, k, v, o, do, lse, delta, dq, kv_idx, kv_cnt, seq, nb, scale, scale * LOG2E)
    grid2 = (nb * (block_size // bm2), batch * heads)
    _launch_fitting(_bwd_dq_kernel, grid2, dq_args, o2 | {"BM": bm2, "BN": bn2}, st2)
    dkdv_args = (q, k, v, do, lse, delta, dk, dv, q_idx, q_cnt, seq, nb, scale, scale * LOG2E)
    grid1 = (nb * (block_size // bn1), batch * heads)
    _launch_fitting(_bwd_dkdv_kernel, grid1, dkdv_args, o1 | {"BN": bn1, "BM": bm1}, st1)
    return dq, dk, dv


# (kernel name, launch options) -> index of the pipeline depth that fitted (first_that_fits's record).
_STAGES: dict[tuple, int] = {}
# the pipeline depths tried, deepest first (never None: first_that_fits returns the one that fitted, None if none)
STAGES_TRIED = (3, 2, 1)


def _launch_fitting(kernel, grid, args, options: dict, tried: tuple[int, ...] = STAGES_TRIED) -> None:
    """Launch once with the first of the pipeline depths ``tried`` that fits the GPU's shared memory (by default 3,
    Triton's default, then 2 and 1: the gradient kernels on whole 128-blocks with D = 128 asked for 296 KB on an
    H100, which has 227 KB; :func:`tilewise.ops._launch.first_that_fits`); when none fits, the last launch's
    ``OutOfResources`` goes to the caller. Stages the caller chose (``num_stages`` in ``options``) are launched as
    they are.

    (The depths were ``(None, 2, 1)``, None for Triton's default, until ``first_that_fits`` returning that None
    read as "nothing fitted": every kernel then ran a second time with 1 stage, doubling the forward (0.889 ->
    0.445 ms at B=4 H=16 T=8192 D=128 bf16) and the gradient kernels.)"""
    if "num_stages" in options:
        kernel[grid](*args, **options)
        return
    # the record is an index into ``tried``, so the depths are part of the key
    key = (kernel.fn.__name__, tried, *sorted(options.items(), key=lambda kv: kv[0]))

    def launch(stages: int) -> None:
        kernel[grid](*args, **options, num_stages=stages)

    if first_that_fits(_STAGES, key, tried, launch) is None:
        launch(tried[-1])  # raises the OutOfResources of the smallest depth


# The block mass's fp32 scratch (each tile's row maxima, sums and column-group sums) holds at most this many bytes,
# or one (b, h) slice's worth when that is more; the (b, h) slices run in chunks that fit (B=1 H=16 T=32768, block
# 64, stride 8: 8.4 MB a slice, two chunks of 8).
MASS_SCRATCH_BYTES = 64 << 20


def _mass_config(q: torch.Tensor) -> dict:
    """Tiles (``BM`` strided rows x ``BN`` key columns), warps and the pipeline depths to try (the first that fits the
    GPU's shared memory) of the block mass's tile kernel. Swept on an H100 (B=1 H=16 D=128, stride 8 at block 64 and
    16 at block 128; ``do_bench`` of the whole mass, BENCHMARKS.md): 16-bit inputs 128 x 128, 8 warps, 3 stages (192
    KiB; 2 where less fits): T=32768 0.74 / 0.35 ms at block 64 / 128 (64 x 128: 0.99 / 0.44; 128 x 256, 2 stages:
    0.78 / 0.42; 256 x 128: 0.85 / 0.43; 4 warps 0.77 / 0.36). fp32 (FMA dots): 64 x 64, 4 warps, 2 stages (128 KiB),
    T=8192 block 64 1.45 ms (64 x 32: 2.67; 128 x 32: 1.63; 32 x 32: 2.46). 32 x 32 in the interpreter, where small
    tiles are faster and cross more tile edges. Never below 32: 16-wide 16-bit dots were wrong on an H100 (see the
    attention kernels)."""
    if q.device.type != "cuda":
        return {"BM": 32, "BN": 32, "stages": (1,)}
    if q.dtype == torch.float32:
        return {"BM": 64, "BN": 64, "num_warps": 4, "stages": (2, 1)}
    return {"BM": 128, "BN": 128, "num_warps": 8, "stages": (3, 2, 1)}


def block_mass_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    block_size: int,
    stride: int,
    scale: float,
    tiles: tuple[int, int] | None = None,
) -> torch.Tensor:
    """fp32 ``[B, H, NB, NB]`` block mass of :func:`select_blocks` with the two mass kernels, equal (up to rounding)
    to ``reference.block_mass_ref``. ``q, k [B, H, T, D]`` any strides, ``block_size % stride == 0``; ``tiles``
    overrides ``(BM, BN)``, powers of two >= 32 (tests). When a block spans several tiles (``block_size / stride``
    above ``BM`` or ``BN``) the kernels write partial sums per tile and they are added here. The ``(b, h)`` slices
    run in chunks whose scratch fits :data:`MASS_SCRATCH_BYTES`. No autograd."""
    batch, heads, seq, dim = q.shape
    nb = -(-seq // block_size)
    per = block_size // stride
    cfg = _mass_config(q)
    if tiles:
        cfg["BM"], cfg["BN"] = tiles
    gm, gn = min(per, cfg["BM"]), min(per, cfg["BN"])
    n = nb * per
    out = torch.empty(batch, heads, n // gm, n // gn, dtype=torch.float32, device=q.device)
    if out.numel():
        bm, bn, tried = cfg.pop("BM"), cfg.pop("BN"), cfg.pop("stages")
        nrt, nt = triton.cdiv(n, bm), triton.cdiv(n, bn)
        per_head = nrt * nt * (bm * (bn // gn) + 2 * bm)  # fp32 scratch words a (b, h) slice
        chunk = max(1, min(batch * heads, MASS_SCRATCH_BYTES // (4 * per_head)))
        part = torch.empty(chunk * nrt * nt * bm * (bn // gn), dtype=torch.float32, device=q.device)
        stats = torch.empty(chunk * nrt * nt * 2 * bm, dtype=torch.float32, device=q.device)
        consts = {"D": dim, "S": stride, "BM": bm, "BN": bn, "GN": gn, "BD": max(32, triton.next_power_of_2(dim))}
        for bh0 in range(0, batch * heads, chunk):
            slices = min(chunk, batch * heads - bh0)
            args = (q, k, part, stats, seq, nrt, nt, bh0, *q.stride(), *k.stride(), scale / stride * LOG2E, heads)
            options = {**consts, **cfg, **_dot_args(q.dtype, q.device)}
            _launch_fitting(_mass_tile_kernel, (nrt, nt, slices), args, options, tried)
            _mass_finish_kernel[(nrt, slices)](
                part, stats, out, seq, n // gm, n // gn, nrt, nt, bh0, S=stride, PER=per, BM=bm, BN=bn, GM=gm, GN=gn,
                num_warps=4,
            )  # fmt: skip
    if gm == per and gn == per:
        return out
    return out.view(batch, heads, nb, per // gm, nb, per // gn).sum(dim=(3, 5))


@torch.library.custom_op("tilewise::block_sparse_attention", mutates_args=())
def _bsa_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_idx: torch.Tensor,
    kv_cnt: torch.Tensor,
    q_idx: torch.Tensor,
    q_cnt: torch.Tensor,
    block_size: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention with the Triton kernel: ``(o, lse)`` (see :func:`block_sparse_attention_fwd`)."""
    return block_sparse_attention_fwd(q, k, v, kv_idx, kv_cnt, block_size, scale)


@_bsa_op.register_fake
def _(q, k, v, kv_idx, kv_cnt, q_idx, q_cnt, block_size, scale):
    return torch.empty_like(q), q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("tilewise::block_sparse_attention_bwd", mutates_args=())
def _bsa_bwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    do: torch.Tensor,
    kv_idx: torch.Tensor,
    kv_cnt: torch.Tensor,
    q_idx: torch.Tensor,
    q_cnt: torch.Tensor,
    block_size: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`_bsa_op` with respect to ``q, k, v``."""
    return block_sparse_attention_bwd(q, k, v, o, lse, do, kv_idx, kv_cnt, q_idx, q_cnt, block_size, scale)


@_bsa_bwd_op.register_fake
def _(q, k, v, o, lse, do, kv_idx, kv_cnt, q_idx, q_cnt, block_size, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, kv_idx, kv_cnt, q_idx, q_cnt, block_size, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, kv_idx, kv_cnt, q_idx, q_cnt)
    ctx.block_size, ctx.scale = block_size, scale


def _backward(ctx, do: torch.Tensor | None, dlse: torch.Tensor | None):
    q, k, v, o, lse, kv_idx, kv_cnt, q_idx, q_cnt = ctx.saved_tensors
    if do is None:
        return None, None, None, None, None, None, None, None, None
    dq, dk, dv = _bsa_bwd_op(q, k, v, o, lse, do.contiguous(), kv_idx, kv_cnt, q_idx, q_cnt, ctx.block_size, ctx.scale)
    return dq, dk, dv, None, None, None, None, None, None


_bsa_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerBSA(torch.autograd.Function):
    """The same forward and backward as :func:`_bsa_op` without the custom-op layers (dispatcher, fake-tensor
    wrapper, the compiler's disable guard), for eager calls. At short sequences the GPU waits on the host: H100,
    B=4 H=16 T=2048 D=128 bf16, forward + backward through the custom op took 0.77 ms of host time a call against
    0.49 ms of kernels (the host functions alone: 0.14 ms). The custom op stays for ``torch.compile``."""

    @staticmethod
    def forward(ctx, q, k, v, kv_idx, kv_cnt, q_idx, q_cnt, block_size, scale):
        o, lse = block_sparse_attention_fwd(q, k, v, kv_idx, kv_cnt, block_size, scale)
        ctx.save_for_backward(q, k, v, o, lse, kv_idx, kv_cnt, q_idx, q_cnt)
        ctx.block_size, ctx.scale = block_size, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, kv_idx, kv_cnt, q_idx, q_cnt = ctx.saved_tensors
        dq, dk, dv = block_sparse_attention_bwd(
            q, k, v, o, lse, do.contiguous(), kv_idx, kv_cnt, q_idx, q_cnt, ctx.block_size, ctx.scale
        )
        return dq, dk, dv, None, None, None, None, None, None


# Tests set this to run the eager calls through the custom op as well (both paths share the host functions).
EAGER_VIA_CUSTOM_OP = False


def block_sparse_attention_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: torch.Tensor, block_size: int, scale: float
) -> torch.Tensor:
    """Validated arguments in (``block_mask`` bool ``[B, H, NB, NB]``, any strides; its diagonal blocks are
    attended whether kept or not), ``o [B, H, T, D]`` out; differentiable in ``q, k, v`` (the gradient of ``lse`` is
    not: it is internal). fp32 runs on blocks of :data:`FP32_BLOCK` rows (:func:`refine_mask`)."""
    if q.dtype == torch.float32 and block_size > FP32_BLOCK:
        # the coarse diagonal first: the refined mask's own diagonal is only part of it
        block_mask = refine_mask(with_diagonal(block_mask), block_size // FP32_BLOCK, -(-q.shape[-2] // FP32_BLOCK))
        block_size = FP32_BLOCK
    lists = block_lists(block_mask)
    args = (q.contiguous(), k.contiguous(), v.contiguous(), *lists, int(block_size), float(scale))
    # torch.compile traces the registered custom op (one graph node); eager calls take the leaner Function.
    if torch.compiler.is_compiling() or EAGER_VIA_CUSTOM_OP:
        return _bsa_op(*args)[0]
    return _EagerBSA.apply(*args)


@torch.library.custom_op("tilewise::select_blocks_mass", mutates_args=())
def _mass_op(q: torch.Tensor, k: torch.Tensor, block_size: int, stride: int, scale: float) -> torch.Tensor:
    """The block mass of :func:`select_blocks` with the Triton kernel (see :func:`block_mass_triton`)."""
    return block_mass_triton(q, k, block_size, stride, scale)


@_mass_op.register_fake
def _(q, k, block_size, stride, scale):
    nb = -(-q.shape[-2] // block_size)
    return q.new_empty(*q.shape[:2], nb, nb, dtype=torch.float32)


def select_blocks_mass_triton(q: torch.Tensor, k: torch.Tensor, block_size: int, stride: int, scale: float):
    """Validated arguments in, fp32 block mass ``[B, H, NB, NB]`` out (no gradient: a selection's input)."""
    return _mass_op(q, k, int(block_size), int(stride), float(scale))
