"""Launch-configuration sweep of the fused FFT-convolution kernel on a GPU, beside torch.fft in the same run:
``python benchmarks/gpu_fft_conv_sweep.py [--dtype fp32 bf16] [--n 8192] [--precs fp16 tf32] [--jobs 14]``.

Every combination of dot precision, rows per program (pair / one row), block ``BK``, pipelining stages, warps and
the contiguous factor ``N2`` is compiled first, in ``--jobs`` processes at once (Triton compiles on the CPU, and a
big kernel takes tens of seconds), then timed one after another at ``B=8 H=768 N`` (``do_bench`` median) with its
relative RMS error against torch.fft in float64 and its compiled registers, spills and shared memory. The table is
sorted by time; the torch.fft rfft/irfft forward at the same shape heads it, and each row says its speedup.
A configuration that does not compile or fit prints its error and the sweep goes on.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import math
import multiprocessing as mp
import sys
import time

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _two_pass_configs(args) -> list[dict]:
    """Pass 1 alone over its knobs, pass 2 alone over its knobs (``only_pass``), per ``N2``."""
    out = []
    # TwoPassConfig fields: block_k, pairs, warps1, stages1 (pass 1); block_m, block_k2, warps2, stages2 (pass 2)
    for n2, bk, gp, w1, st, reg in itertools.product(
        args.n2, args.bk, args.pairs, args.warps, args.stages, args.maxnreg
    ):
        out.append(
            {"kind": "two-pass", "only_pass": 1, "n2": n2, "config": (bk, gp, w1, st, 64, 32, 4, 3, reg or None)}
        )
    for n2, bm, bk2, w2, st in itertools.product(args.n2, args.bm, args.bk2, args.warps, args.stages):
        out.append({"kind": "two-pass", "only_pass": 2, "n2": n2, "config": (128, 4, 8, 3, bm, bk2, w2, st)})
    return out


def _call(u, k, skip, cfg: dict):
    from tilewise.ops.fft_conv.triton import TwoPassConfig, fft_conv_triton_fwd, fft_conv_two_pass

    kw = {key: v for key, v in cfg.items() if key != "kind"}
    if cfg.get("kind") == "two-pass":
        kw["config"] = TwoPassConfig(*kw["config"])
        return fft_conv_two_pass(u, k, skip, **kw)
    return fft_conv_triton_fwd(u, k, skip, **kw)


def _configs(args) -> list[dict]:
    out = []
    for prec, pair, bk, stages, warps, n2 in itertools.product(
        args.precs, (True, False), args.bk, args.stages, args.warps, args.n2
    ):
        out.append({"precision": prec, "pair": pair, "block_k": bk, "num_stages": stages, "num_warps": warps, "n2": n2})
    return out


def _name(c: dict) -> str:
    if c.get("kind") == "two-pass":
        which = {1: "pass 1", 2: "pass 2", None: "both  "}[c.get("only_pass")]
        bk, gp, w1, st1, bm, bk2, w2, st2, *reg = c["config"] + (None,)
        one, two = f"BK={bk:>3} GP={gp} w={w1} st={st1} reg={reg[0]}", f"BM={bm:>3} BK2={bk2:>3} w={w2} st={st2}"
        knobs = {1: one, 2: two}.get(c.get("only_pass"), f"{one} | {two}")
        return f"two-pass {which} N2={c['n2']:>3} {knobs}"
    rows = "pair" if c["pair"] else "row "
    return f"{c['precision']:>6} {rows} N2={c['n2']:>3} BK={c['block_k']:>2} st={c['num_stages']} w={c['num_warps']}"


def _warm(job: tuple[dict, str, int]) -> str:
    """Compile one configuration (a small launch with the timed shape's integer specialisations)."""
    cfg, dtype_name, n = job
    from tilewise.ops.fft_conv.reference import fft_conv_ref

    t0 = time.time()
    try:
        dtype = DTYPES[dtype_name]
        u = torch.randn(2, 16, n, device="cuda").to(dtype)
        k = torch.randn(16, n, device="cuda").to(dtype)
        skip = torch.randn(16, device="cuda").to(dtype)
        got = _call(u, k, skip, cfg)
        torch.cuda.synchronize()
        if cfg.get("only_pass"):
            return f"ok {time.time() - t0:.0f}s"
        want = fft_conv_ref(u.double(), k.double(), skip.double())
        err = float((got.double() - want).norm() / want.norm())
        return f"ok {time.time() - t0:.0f}s, small-case err {err:.1e}"
    except Exception as e:  # does not compile, fit or run: the timing pass skips it (a crash would end it)
        return f"{type(e).__name__}: {str(e)[:80]}"


def _stats() -> dict:
    """Compiled convolution kernels so far: cache key -> (regs, spills, shared bytes)."""
    from tilewise.ops.fft_conv import triton as tt

    found = {}
    kernels = (tt._fft_conv_kernel, tt._forward_pass_kernel, tt._conv_pass_kernel, tt._inverse_pass_kernel)
    caches = [c for kern in kernels for c in getattr(kern, "device_caches", {}).values()]
    for cache in caches:
        for key, kern in cache[0].items():
            # a kernel not yet loaded on the device has no register counts
            with contextlib.suppress(Exception):
                found[key] = (kern.n_regs, kern.n_spills, kern.metadata.shared)
    return found


def _sweep_dtype(args, dtype_name: str, configs: list[dict]) -> None:
    import triton

    from tilewise.ops.fft_conv.reference import fft_conv_ref

    t0 = time.time()
    ctx = mp.get_context("spawn")
    # one process per configuration: a kernel that faults leaves its CUDA context unusable
    with ctx.Pool(args.jobs, maxtasksperchild=1) as pool:
        warm = pool.map(_warm, [(c, dtype_name, args.n) for c in configs], chunksize=1)
    print(f"\n{dtype_name}: compiled {len(configs)} configurations in {time.time() - t0:.0f}s", flush=True)
    dtype = DTYPES[dtype_name]
    u = torch.randn(args.b, args.h, args.n, device="cuda").to(dtype)
    decay = torch.exp(-torch.arange(args.n, device="cuda") / (args.n / 4))
    k = (torch.randn(args.h, args.n, device="cuda") * decay).to(dtype)
    skip = torch.randn(args.h, device="cuda").to(dtype)
    want = fft_conv_ref(u.double(), k.double(), skip.double())
    base = triton.testing.do_bench(lambda: fft_conv_ref(u, k, skip), warmup=10, rep=200, return_mode="median")
    print(f"B={args.b} H={args.h} N={args.n} {dtype_name}: torch.fft forward {base:.3f} ms", flush=True)
    length = 1 << (2 * args.n - 1).bit_length()

    def prep():  # what the two-pass host does before its kernels: the kernel's spectrum and its bound
        return torch.fft.rfft(k.float(), n=length), k.float().abs().sum(-1)

    ms = triton.testing.do_bench(prep, warmup=10, rep=100, return_mode="median")
    print(f"two-pass host preparation (fft of k, bound): {ms:.3f} ms", flush=True)
    rows = []
    for cfg, w in zip(configs, warm, strict=True):
        if not w.startswith("ok"):
            rows.append((float("inf"), f"{_name(cfg)}: not timed, its compile/launch said {w}", cfg))
            print(rows[-1][1], flush=True)
            continue
        before = set(_stats())
        try:
            got = _call(u, k, skip, cfg)
            err = math.nan if cfg.get("only_pass") else float((got.double() - want).norm() / want.norm())
            ms = triton.testing.do_bench(
                lambda cfg=cfg: _call(u, k, skip, cfg), warmup=5, rep=100, return_mode="median"
            )
            new = [v for key, v in _stats().items() if key not in before]
            res = f"regs {new[0][0]} spill {new[0][1]} smem {new[0][2] // 1024}K" if new else ""
            rows.append((ms, f"{_name(cfg)}: {ms:7.3f} ms  x{base / ms:5.2f}  err {err:.2e}  {res}  ({w})", cfg))
        except Exception as e:  # not compiled / does not fit: report and go on
            rows.append((float("inf"), f"{_name(cfg)}: {type(e).__name__}: {str(e)[:90]}", cfg))
        print(rows[-1][1], flush=True)
    print(f"\n{dtype_name} sorted:")
    for _, line, _ in sorted(rows, key=lambda r: r[0]):
        print("  " + line)
    if args.two_pass:
        # the best pass 1 and the best pass 2 of each N2, run together, with the error of the whole
        print(f"\n{dtype_name} two-pass, best pass 1 + best pass 2 per N2:")
        for n2 in args.n2:
            best = {}
            for ms, _, cfg in sorted(rows, key=lambda r: r[0]):
                if cfg["n2"] == n2 and ms < math.inf:
                    best.setdefault(cfg["only_pass"], cfg["config"])
            if len(best) < 2:
                continue
            both = {"kind": "two-pass", "n2": n2, "config": best[1][:4] + best[2][4:8] + best[1][8:]}
            try:
                got = _call(u, k, skip, both)
                err = float((got.double() - want).norm() / want.norm())
                ms = triton.testing.do_bench(
                    lambda both=both: _call(u, k, skip, both), warmup=5, rep=200, return_mode="median"
                )
                print(f"  {_name(both)}: {ms:7.3f} ms  x{base / ms:5.2f}  err {err:.2e}")
            except Exception as e:  # reported, not fatal
                print(f"  {_name(both)}: {type(e).__name__}: {str(e)[:90]}")
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=sorted(DTYPES), nargs="+", default=["fp32"])
    parser.add_argument("--n", type=int, default=8192)
    parser.add_argument("--b", type=int, default=8)
    parser.add_argument("--h", type=int, default=768)
    parser.add_argument("--precs", nargs="+", default=["tf32", "bf16"], help="fused kernel: dot precisions")
    parser.add_argument("--bk", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--n2", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--pair-only", action="store_true")
    parser.add_argument("--two-pass", action="store_true", help="sweep the two-pass kernels instead of the fused one")
    parser.add_argument("--pairs", type=int, nargs="+", default=[1, 4], help="two-pass: pairs of rows per program")
    parser.add_argument("--bk2", type=int, nargs="+", default=[32, 64], help="two-pass: second pass k1 step")
    parser.add_argument("--bm", type=int, nargs="+", default=[64, 128], help="two-pass: second pass output rows")
    parser.add_argument("--maxnreg", type=int, nargs="+", default=[0], help="two-pass: pass 1 register caps (0: none)")
    parser.add_argument("--jobs", type=int, default=12, help="processes compiling at once")
    args = parser.parse_args()
    import triton

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    if args.two_pass:
        configs = _two_pass_configs(args)
    else:
        configs = [c for c in _configs(args) if c["pair"] or not args.pair_only]
    for dtype_name in args.dtype:
        _sweep_dtype(args, dtype_name, configs)


if __name__ == "__main__":
    main()
