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
import multiprocessing as mp
import sys
import time

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _configs(args) -> list[dict]:
    out = []
    for prec, pair, bk, stages, warps, n2 in itertools.product(
        args.precs, (True, False), args.bk, args.stages, args.warps, args.n2
    ):
        out.append({"precision": prec, "pair": pair, "block_k": bk, "num_stages": stages, "num_warps": warps, "n2": n2})
    return out


def _name(c: dict) -> str:
    rows = "pair" if c["pair"] else "row "
    return f"{c['precision']:>6} {rows} N2={c['n2']:>3} BK={c['block_k']:>2} st={c['num_stages']} w={c['num_warps']}"


def _warm(job: tuple[dict, str, int]) -> str:
    """Compile one configuration (a small launch with the timed shape's integer specialisations)."""
    cfg, dtype_name, n = job
    from tilewise.ops.fft_conv.reference import fft_conv_ref
    from tilewise.ops.fft_conv.triton import fft_conv_triton_fwd

    t0 = time.time()
    try:
        dtype = DTYPES[dtype_name]
        u = torch.randn(2, 16, n, device="cuda").to(dtype)
        k = torch.randn(16, n, device="cuda").to(dtype)
        skip = torch.randn(16, device="cuda").to(dtype)
        got = fft_conv_triton_fwd(u, k, skip, **cfg)
        torch.cuda.synchronize()
        want = fft_conv_ref(u.double(), k.double(), skip.double())
        err = float((got.double() - want).norm() / want.norm())
        return f"ok {time.time() - t0:.0f}s, small-case err {err:.1e}"
    except Exception as e:  # does not compile, fit or run: the timing pass skips it (a crash would end it)
        return f"{type(e).__name__}: {str(e)[:80]}"


def _stats() -> dict:
    """Compiled kernels of the convolution kernel so far: cache key -> (regs, spills, shared bytes)."""
    from tilewise.ops.fft_conv.triton import _fft_conv_kernel

    found = {}
    for cache in getattr(_fft_conv_kernel, "device_caches", {}).values():
        for key, kern in cache[0].items():
            # a kernel not yet loaded on the device has no register counts
            with contextlib.suppress(Exception):
                found[key] = (kern.n_regs, kern.n_spills, kern.metadata.shared)
    return found


def _sweep_dtype(args, dtype_name: str, configs: list[dict]) -> None:
    import triton

    from tilewise.ops.fft_conv.reference import fft_conv_ref
    from tilewise.ops.fft_conv.triton import fft_conv_triton_fwd

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
    rows = []
    for cfg, w in zip(configs, warm, strict=True):
        if not w.startswith("ok"):
            rows.append((float("inf"), f"{_name(cfg)}: not timed, its compile/launch said {w}"))
            print(rows[-1][1], flush=True)
            continue
        before = set(_stats())
        try:
            got = fft_conv_triton_fwd(u, k, skip, **cfg)
            err = float((got.double() - want).norm() / want.norm())
            ms = triton.testing.do_bench(
                lambda cfg=cfg: fft_conv_triton_fwd(u, k, skip, **cfg), warmup=5, rep=100, return_mode="median"
            )
            new = [v for key, v in _stats().items() if key not in before]
            res = f"regs {new[0][0]} spill {new[0][1]} smem {new[0][2] // 1024}K" if new else ""
            rows.append((ms, f"{_name(cfg)}: {ms:7.3f} ms  x{base / ms:5.2f}  err {err:.2e}  {res}  ({w})"))
        except Exception as e:  # not compiled / does not fit: report and go on
            rows.append((float("inf"), f"{_name(cfg)}: {type(e).__name__}: {str(e)[:90]}"))
        print(rows[-1][1], flush=True)
    print(f"\n{dtype_name} sorted:")
    for _, line in sorted(rows, key=lambda r: r[0]):
        print("  " + line)
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=sorted(DTYPES), nargs="+", default=["fp32"])
    parser.add_argument("--n", type=int, default=8192)
    parser.add_argument("--b", type=int, default=8)
    parser.add_argument("--h", type=int, default=768)
    parser.add_argument("--precs", nargs="+", default=["fp16"])
    parser.add_argument("--bk", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--n2", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--pair-only", action="store_true")
    parser.add_argument("--jobs", type=int, default=12, help="processes compiling at once")
    args = parser.parse_args()
    import triton

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    configs = [c for c in _configs(args) if c["pair"] or not args.pair_only]
    for dtype_name in args.dtype:
        _sweep_dtype(args, dtype_name, configs)


if __name__ == "__main__":
    main()
