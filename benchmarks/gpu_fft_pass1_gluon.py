"""Experiment: fft_conv's pass 1 (fp32 I/O, float16 products) written in Gluon, against the Triton pass 1.

Not used by the library. Triton 3.6 waits on every ``tl.dot`` right after issuing it, so the Triton pass 1
(``_conv_pass_kernel``) runs its chain -- load the pair's rows, dot1, twiddle, dot2, kernel product, dot3,
twiddle, store -- one stage after another. Here the wgmma are asynchronous and two pairs are in flight: each
elementwise stage of one pair runs while a dot of the other pair is on the tensor cores::

    A0(q) x -> float16 | T1(q) issue | A2(q-1) after T2(q-1) | T3(q-1) issue | A1(q) after T1(q) | T2(q) issue |
    A3(q-1) after T3(q-1), stored

Two layout changes keep it inside an H100's 227 KB of shared memory and make its stores whole sectors:

- one buffer holds a pair's fp32 rows as they arrive (``cp.async``), then its float16 operands ``xr, xi, -xi``
  (the next pair's rows are fetched once every warp's dot1 is done);
- the accumulator's columns are relabelled (``sigma``, no data moves) so a thread's 16 columns of a row are
  contiguous in memory: 16-byte stores instead of 4-byte ones. For that, register column ``c`` holds time index
  ``sigma(c)``: ``G``'s rows and the twiddles' columns are permuted on the host, and the rows are relabelled by
  the inverse when they become operands. ``D`` in memory is in natural order, so pass 2 is unchanged.

Run on a GPU: ``PYTHONPATH=src python benchmarks/gpu_fft_pass1_gluon.py`` checks ``D`` against the Triton pass 1
and the whole convolution against torch.fft on several shapes, then times both passes at ``B=8 H=768`` for
``N = 8192`` and ``4096``. ``--ncu`` launches each pass-1 kernel twice and exits (for Nsight Compute's
``--launch-skip 1``). Results: BENCHMARKS.md, "fft_conv pass 1 in Gluon".
"""

from __future__ import annotations

import argparse
import importlib

import torch
import triton
import triton.testing
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma, warpgroup_mma_wait


@gluon.jit
def _cmul16(ar, ai, br, bi, OUT: gl.constexpr):
    """(ar + i ai)(br + i bi), fp32 tiles times float16 tiles in fp32, rounded to float16 in layout OUT."""
    brf = br.to(gl.float32)
    bif = bi.to(gl.float32)
    cr = ar * brf - ai * bif
    ci = ar * bif + ai * brf
    return gl.convert_layout(cr.to(gl.float16), OUT), gl.convert_layout(ci.to(gl.float16), OUT)


@triton.constexpr_function
def _sigma_layout(BK, N2, W):
    """Ownership of an accumulator tile after _to_sigma (thread columns 16a + 2j + e for N2 = 64), registers
    ordered along the columns first, so each thread's 16 columns of a row are one contiguous run."""
    nj = (N2 // 8).bit_length() - 1
    reg = [[0, 1]] + [[0, 2 << i] for i in range(nj)] + [[8, 0]]
    rows = 16 * W
    while rows < BK:
        reg.append([rows, 0])
        rows *= 2
    lane = [[0, N2 // 4], [0, N2 // 2], [1, 0], [2, 0], [4, 0]]
    warp = [[16 << i, 0] for i in range(W.bit_length() - 1)]
    return gl.DistributedLinearLayout(reg, lane, warp, [], [BK, N2])


@gluon.jit
def _to_sigma(t, N2: gl.constexpr, W: gl.constexpr):
    """Accumulator column c = 8j + 2a + e (j register group, a = lane % 4, e pair) relabelled as column
    sigma(c) = (N2 / 4) a + 2j + e: no data moves."""
    BK: gl.constexpr = t.shape[0]
    t = gl.reshape(t, [BK, N2 // 8, 4, 2])
    t = gl.permute(t, (0, 2, 1, 3))
    t = gl.reshape(t, [BK, N2])
    return gl.convert_layout(t, _sigma_layout(BK, N2, W))


@gluon.jit
def _from_sigma(t, N2: gl.constexpr):
    """x[n1, p] in natural order -> column c holds x[n1, sigma(c)] (the inverse relabelling)."""
    R: gl.constexpr = t.shape[0]
    t = gl.reshape(t, [R, 4, N2 // 8, 2])
    t = gl.permute(t, (0, 2, 1, 3))
    return gl.reshape(t, [R, N2])


@gluon.jit
def _pass1_gl_kernel(
    x, d, cscale, kc, kscale, kbound, skip, f1, f2, tw, B, H, N,
    N1: gl.constexpr, N2: gl.constexpr, BK: gl.constexpr, GP: gl.constexpr, CONJ: gl.constexpr,
    HAS_SKIP: gl.constexpr, EVEN: gl.constexpr, num_warps: gl.constexpr,
):  # fmt: skip
    """``_conv_pass_kernel``'s pass 1 (same grid, same ``d`` and ``cscale``) for fp32 ``x``, except that ``f2`` is
    ``G`` ``[3, N2, N2]`` with its rows in ``sigma`` order and ``tw`` the twiddles ``[2, N1, N2]`` with their
    columns in ``sigma`` order (``setup`` builds both). ``EVEN``: every row is ``N = N1 N2 / 2`` long and every
    slot holds a live pair, so no masks."""
    N1H: gl.constexpr = N1 // 2
    DSCALE: gl.constexpr = N2 * 4
    mma: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, N2, 16]
    )
    opa: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    TC: gl.constexpr = N2 // 4
    xl: gl.constexpr = gl.BlockedLayout([1, 4], [32 // TC, TC], [num_warps, 1], [1, 0])
    hl: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
    f1_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BK, N1H], gl.float16)
    g_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([N2, N2], gl.float16)
    st_sl: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
    x3_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([N1H, N2], gl.float16)
    m_sl: gl.constexpr = gl.SwizzledSharedLayout(8, 1, 8, [1, 0])

    i_k = gl.program_id(0)
    i_h = gl.program_id(1).to(gl.int64)
    i_g = gl.program_id(2)
    NS = (B + 1) // 2

    # constants into shared memory: F_N1's block (Re, Im) and G (Re, Im, -Im)
    r_f1 = i_k * BK + gl.arange(0, BK, layout=gl.SliceLayout(1, hl))
    c_f1 = gl.arange(0, N1H, layout=gl.SliceLayout(0, hl))
    p_f1 = f1 + r_f1[:, None] * N1 + c_f1[None, :]
    f1r_s = gl.allocate_shared_memory(gl.float16, [BK, N1H], f1_sl, gl.load(p_f1))
    f1i_s = gl.allocate_shared_memory(gl.float16, [BK, N1H], f1_sl, gl.load(p_f1 + N1 * N1))
    r_g = gl.arange(0, N2, layout=gl.SliceLayout(1, hl))
    c_g = gl.arange(0, N2, layout=gl.SliceLayout(0, hl))
    p_g = f2 + r_g[:, None] * N2 + c_g[None, :]
    gr_s = gl.allocate_shared_memory(gl.float16, [N2, N2], g_sl, gl.load(p_g))
    gi_s = gl.allocate_shared_memory(gl.float16, [N2, N2], g_sl, gl.load(p_g + N2 * N2))
    gn_s = gl.allocate_shared_memory(gl.float16, [N2, N2], g_sl, gl.load(p_g + 2 * N2 * N2))
    grt = gr_s.permute((1, 0))
    git = gi_s.permute((1, 0))
    gnt = gn_s.permute((1, 0))
    # twiddles and the kernel's spectrum (float16) for this block of rows k1
    o_h = r_f1[:, None] * N2 + c_g[None, :]
    tr_s = gl.allocate_shared_memory(gl.float16, [BK, N2], m_sl, gl.load(tw + o_h).to(gl.float16))
    ti_s = gl.allocate_shared_memory(gl.float16, [BK, N2], m_sl, gl.load(tw + N1 * N2 + o_h).to(gl.float16))
    bnd = gl.load(kbound + i_h)
    bnd = gl.where(bnd > 0, bnd, 1.0)
    ks = gl.load(kscale + i_h) / bnd
    p_kc = kc + i_h * (2 * N1 * N2) + o_h
    kr = gl.load(p_kc).to(gl.float32) * ks
    if HAS_SKIP:
        kr += gl.load(skip + i_h).to(gl.float32) / bnd
    if CONJ:
        ki = gl.load(p_kc + N1 * N2).to(gl.float32) * -ks
    else:
        ki = gl.load(p_kc + N1 * N2).to(gl.float32) * ks
    kr_s = gl.allocate_shared_memory(gl.float16, [BK, N2], m_sl, kr.to(gl.float16))
    ki_s = gl.allocate_shared_memory(gl.float16, [BK, N2], m_sl, ki.to(gl.float16))
    # one buffer: a pair's fp32 rows as they arrive (cp.async), then its float16 operands (xr, xi, -xi)
    stage = gl.allocate_shared_memory(gl.float32, [2, N1H, N2], st_sl)
    x16 = stage._reinterpret(gl.float16, [4, N1H, N2], x3_sl)
    xr_s = x16.index(0)
    xi_s = x16.index(1)
    xn_s = x16.index(2)
    zero = gl.zeros([BK, N2], gl.float32, layout=mma)

    SL: gl.constexpr = _sigma_layout(BK, N2, num_warps)
    # x rows: [N1H, N2] fp32 tiles of the row (rows n1 >= N1/2 are the zero padding, never loaded)
    r_x = gl.arange(0, N1H, layout=gl.SliceLayout(1, xl))
    c_x = gl.arange(0, N2, layout=gl.SliceLayout(0, xl))
    o_t = r_x[:, None] * N2 + c_x[None, :]

    # prefetch pair 0
    _prefetch(stage, x, i_g * GP, o_t, B, H, N, NS, i_h, EVEN)
    for q in gl.static_range(GP + 1):
        if q < GP:
            # A0(q): the pair's rows, each divided by its own largest magnitude, to float16 operands
            i_sb = i_g * GP + q
            cp.wait_group(0)
            a_r = stage.index(0).load(xl)
            a_i = stage.index(1).load(xl)
            gl.thread_barrier()
            m1 = gl.max(gl.max(gl.abs(a_r), axis=1), axis=0)
            m2 = gl.max(gl.max(gl.abs(a_i), axis=1), axis=0)
            xr_s.store(_from_sigma((a_r * gl.where(m1 > 0, 1.0 / gl.where(m1 > 0, m1, 1.0), 0.0)).to(gl.float16), N2))
            a_i = _from_sigma((a_i * gl.where(m2 > 0, 1.0 / gl.where(m2 > 0, m2, 1.0), 0.0)).to(gl.float16), N2)
            xi_s.store(a_i)
            xn_s.store(-a_i)
            i_s = i_h * NS + i_sb
            m_s = (i_k == 0) & (i_sb < NS)
            gl.store(cscale + 2 * i_s, m1, mask=m_s)
            gl.store(cscale + 2 * i_s + 1, m2, mask=m_s)
            fence_async_shared()
            gl.thread_barrier()
            # T1(q): B = F1 A: re = F1r xr - F1i xi, im = F1i xr + F1r xi
            t_br = warpgroup_mma(f1r_s, xr_s, zero, use_acc=False, is_async=True)
            t_br = warpgroup_mma(f1i_s, xn_s, t_br, is_async=True)
            t_bi = warpgroup_mma(f1i_s, xr_s, zero, use_acc=False, is_async=True)
            t_bi = warpgroup_mma(f1r_s, xi_s, t_bi, is_async=True)
        if q >= 1:
            # A2(q - 1): E = C ∘ K, then T3(q - 1): D = E conj(G)^T
            if q < GP:
                cr, ci, _er, _ei = warpgroup_mma_wait(4, deps=(t_cr, t_ci, b2r, b2i))  # noqa: F821 (bound by the previous unrolled step)
            else:
                cr, ci, _er, _ei = warpgroup_mma_wait(0, deps=(t_cr, t_ci, b2r, b2i))  # noqa: F821 (bound by the previous unrolled step)
            er, ei = _cmul16(cr, ci, kr_s.load(mma), ki_s.load(mma), opa)
            t_dr = warpgroup_mma(er, grt, zero, use_acc=False, is_async=True)
            t_dr = warpgroup_mma(ei, git, t_dr, is_async=True)
            t_di = warpgroup_mma(ei, grt, zero, use_acc=False, is_async=True)
            t_di = warpgroup_mma(er, gnt, t_di, is_async=True)
            s_p = s_q  # noqa: F821 (bound by the previous unrolled step)
            lv_p = lv_q  # noqa: F821 (bound by the previous unrolled step)
        if q < GP:
            # A1(q): B ∘ T, then T2(q): C = (B ∘ T) G
            if q >= 1:
                br, bi = warpgroup_mma_wait(4, deps=(t_br, t_bi))
            else:
                br, bi = warpgroup_mma_wait(0, deps=(t_br, t_bi))
            if q + 1 < GP:
                # every warp's dot1 is done with the operands: the buffer takes the next pair's rows
                gl.thread_barrier()
                _prefetch(stage, x, i_g * GP + q + 1, o_t, B, H, N, NS, i_h, EVEN)
            b2r, b2i = _cmul16(br, bi, tr_s.load(mma), ti_s.load(mma), opa)
            t_cr = warpgroup_mma(b2r, gr_s, zero, use_acc=False, is_async=True)
            t_cr = warpgroup_mma(b2i, gn_s, t_cr, is_async=True)
            t_ci = warpgroup_mma(b2r, gi_s, zero, use_acc=False, is_async=True)
            t_ci = warpgroup_mma(b2i, gr_s, t_ci, is_async=True)
            s_q = i_h * NS + i_g * GP + q  # noqa: F841 (read by the next unrolled step)
            lv_q = i_g * GP + q < NS  # noqa: F841 (read by the next unrolled step)
        if q >= 1:
            # A3(q - 1): D ∘ conj(T) / DSCALE, stored
            if q < GP:
                dr, di, _er, _ei = warpgroup_mma_wait(4, deps=(t_dr, t_di, er, ei))
            else:
                dr, di, _er, _ei = warpgroup_mma_wait(0, deps=(t_dr, t_di, er, ei))
            dr = dr * (1.0 / DSCALE)
            di = di * (1.0 / DSCALE)
            trf = tr_s.load(mma).to(gl.float32)
            tif = ti_s.load(mma).to(gl.float32)
            o_s = (i_k * BK + gl.arange(0, BK, layout=gl.SliceLayout(1, SL)))[:, None] * N2 + gl.arange(
                0, N2, layout=gl.SliceLayout(0, SL)
            )[None, :]
            p_d = d + s_p * (2 * N1 * N2) + o_s
            v_r = _to_sigma((dr * trf + di * tif).to(gl.float16), N2, num_warps)
            v_i = _to_sigma((di * trf - dr * tif).to(gl.float16), N2, num_warps)
            if EVEN:
                gl.store(p_d, v_r)
                gl.store(p_d + N1 * N2, v_i)
            else:
                m_c = o_s < gl.where(lv_p, N1 * N2, 0)
                gl.store(p_d, v_r, mask=m_c)
                gl.store(p_d + N1 * N2, v_i, mask=m_c)


@gluon.jit
def _prefetch(stage, x, i_sb, o_t, B, H, N, NS, i_h, EVEN: gl.constexpr):
    """cp.async of pair i_sb's two rows ([N1/2, N2] fp32 each) into stage; masked rows come as zeros."""
    p_x = x + (i_sb * 2 * H + i_h) * N + o_t
    if EVEN:
        cp.async_copy_global_to_shared(stage.index(0), p_x)
        cp.async_copy_global_to_shared(stage.index(1), p_x + H * N)
    else:
        n_live = gl.where(i_sb < NS, N, 0)
        cp.async_copy_global_to_shared(stage.index(0), p_x, mask=o_t < n_live)
        cp.async_copy_global_to_shared(stage.index(1), p_x + H * N, mask=o_t < gl.where(i_sb * 2 + 1 < B, n_live, 0))
    cp.commit_group()


T = importlib.import_module("tilewise.ops.fft_conv.triton")
fft_conv_ref = importlib.import_module("tilewise.ops.fft_conv.reference").fft_conv_ref


def sigma(n2: int, device: torch.device) -> torch.Tensor:
    """``sigma(c)`` for ``c = 8j + 2a + e``: ``(N2 / 4) a + 2j + e``."""
    c = torch.arange(n2)
    return ((n2 // 4) * ((c % 8) // 2) + 2 * (c // 8) + c % 2).to(device)


def setup(u: torch.Tensor, k: torch.Tensor, skip: torch.Tensor | None, correlate: bool = False) -> dict:
    """The kernel's spectrum (Triton ``_forward_pass_kernel``) and the constants both pass-1 kernels take."""
    b, h, n = u.shape
    length, _ = T._launch_options(u)
    n1, n2 = T._factors(length)
    f1, _, tw = T._constants(length, u.device, torch.float16)
    f1n, f2n = T._negated_constants(length, u.device)
    nb2, bk = (b + 1) // 2, 128
    kc = torch.empty((h, 2, n1, n2), dtype=torch.float16, device=u.device)
    kscale = torch.empty((h,), dtype=torch.float32, device=u.device)
    kbound = torch.empty((h,), dtype=torch.float32, device=u.device)
    skip_arg = skip if skip is not None else kbound
    p1 = {"N1": n1, "N2": n2, "BK": bk, "HAS_SKIP": skip is not None}
    T._forward_pass_kernel[(n1 // bk, 1, triton.cdiv(h, min(4, h)))](
        k, kc, kscale, kbound, skip_arg, f1, f2n, tw, h, 1, n, GP=min(4, h), PAIR=False, PREC="fp16", num_warps=8,
        num_stages=2, **p1,
    )  # fmt: skip
    s = sigma(n2, u.device)
    return {
        "shape": (b, h, n), "n1": n1, "n2": n2, "nb2": nb2, "gp": min(4, nb2), "p1": p1, "corr": correlate,
        "args": (kc, kscale, kbound, skip_arg), "f1": f1, "f1n": f1n, "f2n": f2n, "tw": tw,
        "f2s": f2n[:, s, :].contiguous(), "tws": tw[:, :, s].contiguous(),
    }  # fmt: skip


def buffers(c: dict) -> tuple[torch.Tensor, torch.Tensor]:
    _, h, _ = c["shape"]
    d = torch.zeros((h * c["nb2"], 2, c["n1"], c["n2"]), dtype=torch.float16, device="cuda")
    return d, torch.zeros((h * c["nb2"], 2), device="cuda")


def pass1_triton(u: torch.Tensor, c: dict, d: torch.Tensor, cs: torch.Tensor) -> None:
    b, h, n = c["shape"]
    T._conv_pass_kernel[(c["n1"] // 128, h, triton.cdiv(c["nb2"], c["gp"]))](
        u, d, cs, *c["args"], c["f1n"], c["f2n"], c["tw"], b, h, n, GP=c["gp"], CONJ=c["corr"], HALF=False,
        PREC="fp16", num_warps=8, num_stages=2, **c["p1"],
    )  # fmt: skip


def pass1_gluon(u: torch.Tensor, c: dict, d: torch.Tensor, cs: torch.Tensor) -> None:
    b, h, n = c["shape"]
    even = n == c["n1"] // 2 * c["n2"] and b % 2 == 0 and c["nb2"] % c["gp"] == 0
    _pass1_gl_kernel[(c["n1"] // 128, h, triton.cdiv(c["nb2"], c["gp"]))](
        u, d, cs, *c["args"], c["f1n"], c["f2s"], c["tws"], b, h, n, GP=c["gp"], CONJ=c["corr"], EVEN=even,
        num_warps=8, **c["p1"],
    )  # fmt: skip


def pass2(c: dict, d: torch.Tensor, cs: torch.Tensor, out: torch.Tensor) -> None:
    b, h, n = c["shape"]
    cfg = T.TwoPassConfig()
    T._inverse_pass_kernel[(c["n1"] // 2 // cfg.block_m, h * c["nb2"])](
        d, cs, c["args"][2], out, c["f1"], b, h, n, N1=c["n1"], N2=c["n2"], BM=cfg.block_m, BK=cfg.block_k2,
        PREC="fp16", num_warps=cfg.warps2, num_stages=cfg.stages2,
    )  # fmt: skip


def inputs(b: int, h: int, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    u = torch.randn(b, h, n, device="cuda")
    k = torch.randn(h, n, device="cuda") * torch.exp(-torch.arange(n, device="cuda") / (n / 8))
    return u, k, torch.randn(h, device="cuda")


def timings(u, k, skip, c, triton_bufs, gluon_bufs, y) -> None:
    for name, fn in [
        ("pass 1, Triton", lambda: pass1_triton(u, c, *triton_bufs)),
        ("pass 1, Gluon", lambda: pass1_gluon(u, c, *gluon_bufs)),
        ("pass 2", lambda: pass2(c, *gluon_bufs, y)),
        ("whole two-pass forward (Triton)", lambda: T.fft_conv_two_pass(u, k, skip)),
    ]:
        print(f"    {name:32s} {triton.testing.do_bench(fn, warmup=50, rep=300):.4f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ncu", action="store_true", help="launch each pass-1 kernel twice at B=8 H=768 N=8192")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.ncu:
        u, k, skip = inputs(8, 768, 8192)
        c = setup(u, k, skip)
        d, cs = buffers(c)
        for _ in range(2):
            pass1_triton(u, c, d, cs)
            pass1_gluon(u, c, d, cs)
        torch.cuda.synchronize()
        return
    print(torch.__version__, triton.__version__, torch.cuda.get_device_name())
    shapes = [
        (8, 768, 8192, False),
        (8, 768, 4096, False),
        (5, 6, 5000, False),
        (3, 4, 8192, True),
        (8, 16, 3000, True),
    ]
    for b, h, n, corr in shapes:
        u, k, skip = inputs(b, h, n)
        c = setup(u, k, skip, corr)
        (d_t, cs_t), (d_g, cs_g) = buffers(c), buffers(c)
        pass1_triton(u, c, d_t, cs_t)
        pass1_gluon(u, c, d_g, cs_g)
        diff = (d_g.float() - d_t.float()).abs().max().item()
        y_t, y_g = torch.empty_like(u), torch.empty_like(u)
        pass2(c, d_t, cs_t, y_t)
        pass2(c, d_g, cs_g, y_g)
        y_r = T._corr_torch(u, k) + skip[:, None] * u if corr else fft_conv_ref(u, k, skip)
        err_t = ((y_t - y_r).norm() / y_r.norm()).item()
        err_g = ((y_g - y_r).norm() / y_r.norm()).item()
        print(
            f"B={b} H={h} N={n} correlate={corr}: max |D_gluon - D_triton| {diff:.2e} (max |D| "
            f"{d_t.float().abs().max().item():.2e}), scales equal {torch.equal(cs_g, cs_t)}; relative error to "
            f"torch.fft: triton {err_t:.3e}, gluon {err_g:.3e}"
        )
        if h == 768:
            timings(u, k, skip, c, (d_t, cs_t), (d_g, cs_g), y_g)


if __name__ == "__main__":
    main()
