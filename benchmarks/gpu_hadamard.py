"""GPU check and timing of tilewise's Hadamard transform: ``python benchmarks/gpu_hadamard.py [--dtype bf16]``.

1. Checks the Triton kernel against the PyTorch reference for every power of two n in 1..32768, all dtypes.
2. Times it at rows * n = 256M elements (``triton.testing.do_bench``, median) and prints achieved GB/s (bytes
   read + written) and the percentage of the measured copy bandwidth (``torch.empty_like(x).copy_(x)``), beside
   ``fast_hadamard_transform`` (Dao-AILab) when it is installed.
"""

from __future__ import annotations

import argparse

import torch

from tilewise.ops.hadamard.reference import hadamard_ref
from tilewise.ops.hadamard.triton import hadamard_triton_fwd

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# (atol, rtol) as in tilewise._testing.TOLERANCES: one rounding each side of fp32 math.
TOL = {torch.float32: (1e-5, 1.3e-6), torch.float16: (1e-5, 1e-3), torch.bfloat16: (1e-5, 1.6e-2)}


def check(max_log2: int = 15, rows: int = 37) -> bool:
    """Triton vs reference for n = 1..2**max_log2 and every dtype; prints failures, returns whether all passed."""
    ok = True
    for dtype in DTYPES.values():
        for k in range(max_log2 + 1):
            n = 1 << k
            x = torch.randn(rows, n, device="cuda").to(dtype)
            got, want = hadamard_triton_fwd(x), hadamard_ref(x)
            atol, rtol = TOL[dtype]
            err = (got.float() - want.float()).abs()
            bad = err > atol + rtol * want.float().abs()
            if bool(bad.any()) or not bool(torch.isfinite(got).all()):
                ok = False
                print(f"FAIL n={n} {dtype}: {int(bad.sum())} elements off, max error {err.max().item():.3e}")
    print("check:", "all n and dtypes match the reference" if ok else "FAILURES above")
    return ok


def _bench(fn) -> float:
    import triton

    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def _fht():
    try:
        from fast_hadamard_transform import hadamard_transform
    except ImportError:
        return None
    return hadamard_transform


def time_all(dtype: torch.dtype, total: int = 1 << 28, ns: list[int] | None = None) -> None:
    """Print one table: time, GB/s and % of copy bandwidth at rows * n = ``total`` for each n."""
    ns = ns or [1 << k for k in range(0, 16)]
    x = torch.randn(total, device="cuda").to(dtype)
    nbytes = 2 * x.numel() * x.element_size()
    copy_ms = _bench(lambda: torch.empty_like(x).copy_(x))
    copy_gbs = nbytes / copy_ms / 1e6
    fht = _fht()
    print(f"\n{torch.cuda.get_device_name()}, {dtype}, rows * n = {total}; copy {copy_ms:.3f} ms = {copy_gbs:.0f} GB/s")
    print(f"fast_hadamard_transform: {'installed' if fht else 'missing'}")
    head = f"{'n':>6} {'rows':>10} {'ms':>8} {'GB/s':>7} {'%copy':>6}"
    print(head + (f" {'fht ms':>8} {'fht GB/s':>8} {'fht %copy':>9}" if fht else ""))
    out = torch.empty_like(x)
    for n in ns:
        xv, ov = x.view(-1, n), out.view(-1, n)
        ms = _bench(lambda xv=xv, ov=ov: hadamard_triton_fwd(xv, out=ov))
        gbs = nbytes / ms / 1e6
        line = f"{n:>6} {xv.shape[0]:>10} {ms:>8.3f} {gbs:>7.0f} {100 * gbs / copy_gbs:>5.1f}%"
        if fht:
            try:
                fms = _bench(lambda xv=xv, s=n**-0.5: fht(xv, scale=s))
                fgbs = nbytes / fms / 1e6
                line += f" {fms:>8.3f} {fgbs:>8.0f} {100 * fgbs / copy_gbs:>8.1f}%"
            except RuntimeError as e:
                line += f" {'error: ' + str(e).splitlines()[0][:40]:>27}"
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=sorted(DTYPES), nargs="+", default=["bf16"], help="dtypes to time")
    parser.add_argument("--total", type=int, default=1 << 28, help="rows * n, elements (default 256M)")
    parser.add_argument("--no-check", action="store_true", help="skip the correctness sweep")
    args = parser.parse_args()
    if not args.no_check:
        check()
    for name in args.dtype:
        time_all(DTYPES[name], args.total)


if __name__ == "__main__":
    main()
