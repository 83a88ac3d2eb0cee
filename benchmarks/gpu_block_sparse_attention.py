"""GPU check and timing of tilewise's block-sparse attention: ``python benchmarks/gpu_block_sparse_attention.py``.

1. Checks the Triton kernels against the dense masked PyTorch reference on CUDA (forward and dq, dk, dv; bf16 and
   fp16, D in {64, 128}, T=2048+17, random masks), printing the relative RMS error of each tensor. Exits non-zero on
   a failure.
2. Times forward and forward+backward at ``B=1 H=16 D=128`` bf16, ``T=32768`` (``triton.testing.do_bench``,
   median) for torch SDPA causal (dense, flash) and ours with 10% and 20% of the causal blocks kept, by two masks:
   random blocks (plus the diagonal) and :func:`select_blocks` (threshold bisected to hit the density). Prints ms,
   speedup over SDPA, and the cosine similarity of our output to dense causal attention, on two inputs: i.i.d.
   Gaussian q, k, v (flat attention: a sparse mask cannot capture it, the worst case) and "local" q, k (a shared
   smooth latent plus noise, so attention is concentrated, as in trained models). Our time includes building the
   block lists from the mask; ``select_blocks`` is timed on its own.

3. ``--sweep``: the forward kernel's launch choices (``tilewise.ops.block_sparse_attention.triton.TUNING``: query
   rows per program, warps, stages) at ``B=4 H=16 T=8192 D=128`` bf16 with ~10% random blocks, block 128 and 64
   (the ``tilewise bench mixers`` shape), forward and forward+backward, then that suite's rows at T=8192 without
   fla (SDPA and FlexAttention on the same mask, in the same process).

4. ``--sweep-bwd``: the gradient kernels' launch choices (``TUNING`` ``dkdv_*``: keys a program, query rows a step,
   warps, stages; then ``dq_*`` with the best dk/dv choice kept), the backward alone (``do_bench``) at ``B=4 H=16
   D=128`` bf16, block 128, ~10% of the blocks, ``T = --seq``; every variant's gradients are compared with the
   default's.

Options: ``--skip-check``, ``--skip-time``, ``--sweep``, ``--sweep-bwd``, ``--seq 32768``, ``--block-size 64``.
"""

from __future__ import annotations

import argparse
import sys

import torch

from tilewise.ops import block_sparse_attention, select_blocks
from tilewise.ops.block_sparse_attention.reference import block_sparse_attention_ref, causal_block_mask


def _rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0))


def _random_mask(batch, heads, nb, frac, device="cuda"):
    """Random causal blocks, about ``frac`` of them counting the diagonal (always kept)."""
    p = max(0.0, (frac * nb * (nb + 1) / 2 - nb) / (nb * (nb - 1) / 2)) if nb > 1 else 1.0
    m = torch.rand(batch, heads, nb, nb, device=device) < p
    m.diagonal(dim1=-2, dim2=-1).fill_(True)
    return m & causal_block_mask(nb, device)


def _density(m: torch.Tensor) -> float:
    nb = m.shape[-1]
    return float((m & causal_block_mask(nb, m.device)).sum()) / (m.shape[0] * m.shape[1] * nb * (nb + 1) / 2)


def _selector_mask(q, k, block_size, frac) -> tuple[torch.Tensor, float]:
    """``select_blocks`` with the threshold bisected so that about ``frac`` of the causal blocks are kept."""
    lo, hi, best = 0.0, 1.0, None
    for _ in range(14):
        mid = (lo + hi) / 2
        m = select_blocks(q, k, block_size=block_size, threshold=max(mid, 1e-6))
        d = _density(m)
        if best is None or abs(d - frac) < abs(best[1] - frac):
            best = (m, d, mid)
        lo, hi = (mid, hi) if d < frac else (lo, mid)
    return best[0], best[2]


def check() -> bool:
    ok = True
    for dtype in (torch.bfloat16, torch.float16):
        for dim in (64, 128):
            seq, bs = 2048 + 17, 64
            q, k, v = (torch.randn(2, 4, seq, dim, device="cuda", dtype=dtype).requires_grad_() for _ in range(3))
            nb = -(-seq // bs)
            mask = _random_mask(2, 4, nb, 0.3)
            do = torch.randn_like(q)
            o = block_sparse_attention(q, k, v, mask, block_size=bs, backend="triton")
            got = [o, *torch.autograd.grad(o, (q, k, v), do)]
            r = block_sparse_attention_ref(q, k, v, mask, bs, dim**-0.5)
            want = [r, *torch.autograd.grad(r, (q, k, v), do)]
            errs = {n: _rel_rms(a, b) for n, a, b in zip(("o", "dq", "dk", "dv"), got, want, strict=True)}
            passed = all(bool(torch.isfinite(t).all()) for t in got) and all(e <= 2e-2 for e in errs.values())
            ok &= passed
            print("ok  " if passed else "FAIL", f"T={seq} D={dim} {str(dtype)[6:]}", errs)
    print("check:", "all cases match the reference" if ok else "FAILURES above")
    return ok


def _bench(fn, grad_to_none=None) -> float:
    import triton

    return triton.testing.do_bench(fn, warmup=10, rep=100, grad_to_none=grad_to_none, return_mode="median")


def _inputs(kind: str, seq: int, heads: int, dim: int, dtype):
    if kind == "gaussian":
        return [torch.randn(1, heads, seq, dim, device="cuda").to(dtype).requires_grad_() for _ in range(3)]
    # Local: a latent smoothed over ~100 tokens shared by q and k, plus noise; attention peaks near the diagonal.
    noise = torch.randn(heads * dim, 1, seq + 511, device="cuda")
    kernel = torch.exp(-torch.arange(512, device="cuda", dtype=torch.float32) / 100.0).flip(0)
    z = torch.nn.functional.conv1d(noise, kernel.view(1, 1, -1)).view(1, heads, dim, seq).transpose(-1, -2)
    z = z / z.std()
    q, k = (z + 0.5 * torch.randn_like(z) for _ in range(2))
    v = torch.randn_like(z)
    return [t.to(dtype).contiguous().requires_grad_() for t in (q, k, v)]


def _row(kind: str, label: str, kept: str, fwd: float, both: float, f_sdpa: float, b_sdpa: float, cos: str) -> None:
    print(f"{kind:9} {label:34} {kept:>6} {fwd:8.3f} {f_sdpa / fwd:7.2f} {both:11.3f} {b_sdpa / both:7.2f} {cos:>7}")


def _time_data(kind: str, seq: int, block_size: int, heads: int, dim: int) -> None:
    """Every row of the table for one kind of input."""
    q, k, v = _inputs(kind, seq, heads, dim, torch.bfloat16)
    do = torch.randn_like(q)
    nb = -(-seq // block_size)

    def sdpa():
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    with torch.no_grad():
        dense = sdpa()
        f_sdpa = _bench(sdpa)
    b_sdpa = _bench(lambda: sdpa().backward(do), grad_to_none=[q, k, v])
    _row(kind, "torch SDPA causal (dense)", "100%", f_sdpa, b_sdpa, f_sdpa, b_sdpa, "1")
    with torch.no_grad():
        t_sel = _bench(lambda: select_blocks(q, k, block_size=block_size, threshold=0.9))
    print(f"{kind:9} {'select_blocks alone (thr 0.9)':34} {'':>6} {t_sel:8.3f}")
    for frac in (0.1, 0.2):
        masks = {"random": (_random_mask(1, heads, nb, frac), "")}
        with torch.no_grad():
            mask, thr = _selector_mask(q, k, block_size, frac)
        masks["selector"] = (mask, f" (thr {thr:.3g})")
        for name, (mask, note) in masks.items():

            def ours(mask=mask):
                return block_sparse_attention(q, k, v, mask, block_size=block_size, backend="triton")

            with torch.no_grad():
                cos = _cosine(ours(), dense)
                f = _bench(ours)
            b = _bench(lambda ours=ours: ours().backward(do), grad_to_none=[q, k, v])
            _row(kind, f"ours, {name} mask{note}", f"{_density(mask):.1%}", f, b, f_sdpa, b_sdpa, f"{cos:.4f}")


def time_all(seq: int, block_size: int, heads: int = 16, dim: int = 128) -> None:
    nb = -(-seq // block_size)
    print(f"\nB=1 H={heads} T={seq} D={dim} bf16, block {block_size} ({nb} blocks per side); x SDPA = speedup")
    print(f"{'data':9} {'impl':34} {'kept':>6} {'fwd ms':>8} {'x SDPA':>7} {'fwd+bwd ms':>11} {'x SDPA':>7} {'cos':>7}")
    for kind in ("gaussian", "local"):
        _time_data(kind, seq, block_size, heads, dim)
        torch.cuda.empty_cache()


SWEEP = {
    "defaults": {},
    "whole blocks w8 s3": {"fwd_bn": 128, "fwd_warps": 8, "fwd_stages": 3},
    "whole blocks w4": {"fwd_bn": 128},
    "bm64": {"fwd_bm": 64},
    "w8": {"fwd_warps": 8},
    "s3": {"fwd_stages": 3},
    "s4": {"fwd_stages": 4},
    "bm32": {"fwd_bm": 32},
    "bn32": {"fwd_bn": 32},
    "bm64 w8": {"fwd_bm": 64, "fwd_warps": 8},
}


def sweep(batch: int = 4, heads: int = 16, seq: int = 8192, dim: int = 128) -> None:
    from tilewise.bench.mixers import keep_mask
    from tilewise.ops.block_sparse_attention import triton as bsa_triton

    defaults = dict(bsa_triton.TUNING)
    q, k, v = (torch.randn(batch, heads, seq, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))  # fmt: skip
    do = torch.randn_like(q)
    for block in (128, 64):
        mask = keep_mask(seq, block).to("cuda")
        print(
            f"\nsweep: B={batch} H={heads} T={seq} D={dim} bf16, block {block}, kept {_density(mask[None, None]):.1%}"
        )
        for name, change in SWEEP.items():
            bsa_triton.TUNING.clear()
            bsa_triton.TUNING.update(defaults | change)

            def ours(mask=mask, block=block):
                return block_sparse_attention(q, k, v, mask[None, None], block_size=block)

            try:
                with torch.no_grad():
                    f = _bench(ours)
                b = _bench(lambda ours=ours: ours().backward(do), grad_to_none=[q, k, v])
                print(f"  {name:14} fwd {f:7.3f} ms  fwd+bwd {b:7.3f} ms", flush=True)
            except Exception as e:  # a variant that does not fit: report, go on
                print(f"  {name:14} failed ({type(e).__name__}: {str(e)[:90]})", flush=True)
    bsa_triton.TUNING.clear()
    bsa_triton.TUNING.update(defaults)
    from tilewise.bench import format_table
    from tilewise.bench.mixers import mixers_suite

    print(format_table(mixers_suite(seqlens=[seq], peers=())))


BWD_SWEEP = {
    "dkdv": [(128, 128, 8), (128, 32, 8), (128, 64, 8), (64, 32, 4), (64, 64, 4), (64, 64, 8), (32, 32, 4)],
    "dq": [(128, 128, 8), (128, 32, 8), (128, 64, 8), (64, 32, 4), (64, 64, 4), (64, 64, 8), (32, 32, 4)],
}


def sweep_bwd(seq: int, batch: int = 4, heads: int = 16, dim: int = 128, block: int = 128) -> None:
    from tilewise.bench.mixers import keep_mask
    from tilewise.ops.block_sparse_attention import triton as bsa_triton

    defaults = dict(bsa_triton.TUNING)
    q, k, v, do = (torch.randn(batch, heads, seq, dim, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    mask = keep_mask(seq, block).to("cuda")[None, None].expand(batch, heads, -1, -1)
    lists = bsa_triton.block_lists(mask)
    o, lse = bsa_triton.block_sparse_attention_fwd(q, k, v, lists[0], lists[1], block, dim**-0.5)

    def bwd():
        return bsa_triton.block_sparse_attention_bwd(q, k, v, o, lse, do, *lists, block, dim**-0.5)

    want = [g.float() for g in bwd()]
    print(f"\nbackward sweep: B={batch} H={heads} T={seq} D={dim} bf16, block {block}, kept {_density(mask):.1%}")
    print(f"  default {_bench(bwd):7.3f} ms")
    for kernel, (first, second) in (("dkdv", ("bn", "bm")), ("dq", ("bm", "bn"))):
        best = None
        for rows, step, warps in BWD_SWEEP[kernel]:
            for stages in (2, 3):
                change = {f"{kernel}_{first}": rows, f"{kernel}_{second}": step, f"{kernel}_warps": warps,
                          f"{kernel}_stages": stages}  # fmt: skip
                bsa_triton.TUNING.update(change)
                name = f"{kernel} {first}{rows} {second}{step} w{warps} st{stages}"
                try:
                    diff = max(_rel_rms(g, w) for g, w in zip(bwd(), want, strict=True))
                    t = _bench(bwd)
                    print(f"  {name:28} {t:7.3f} ms (gradients vs the default's: {diff:.1e})", flush=True)
                    best = min(best or (t, change), (t, change), key=lambda x: x[0])
                except Exception as e:  # a variant that does not fit: report, go on
                    print(f"  {name:28} failed ({type(e).__name__}: {str(e)[:90]})", flush=True)
        bsa_triton.TUNING.update(best[1] if best else {})
        print(f"  best {kernel}: {best}")
    bsa_triton.TUNING.clear()
    bsa_triton.TUNING.update(defaults)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-check", action="store_true")
    parser.add_argument("--skip-time", action="store_true")
    parser.add_argument("--seq", type=int, default=32768)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--sweep", action="store_true", help="time the forward kernel's launch choices")
    parser.add_argument("--sweep-bwd", action="store_true", help="time the gradient kernels' launch choices")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 2
    import triton

    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}")
    torch.manual_seed(42)
    ok = check() if not args.skip_check else True
    if args.sweep:
        sweep()
    if args.sweep_bwd:
        sweep_bwd(args.seq)
    if not args.skip_time:
        time_all(args.seq, args.block_size)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
