"""GPU check and timing of tilewise's block-wise quantization kernels: ``python benchmarks/gpu_blockquant.py``.

1. Checks the Triton kernels against the PyTorch reference, bit for bit (codes, scales, dequantized values), for
   every codebook at ``--check-size`` bf16 elements and block sizes 64 and 256.
2. Times quantize and dequantize at ``--size`` bf16 elements (default 256M; ``triton.testing.do_bench``, median)
   for int8, dynamic8 (8-bit) and nf4, fp4 (4-bit) and prints one table: ms, GB/s (bytes = bf16 input + codes +
   fp32 scales) and % of the measured copy bandwidth (``torch.empty_like(x).copy_(x)``, read + write).
   "kernel" is the quantize kernel alone; "op" is ``quantize_blockwise_triton`` as users call it, with its
   NaN/inf check of the scales (a device sync) and its host work.
"""

from __future__ import annotations

import argparse
import sys

import torch
import triton

from tilewise.ops.blockquant import triton as kernels
from tilewise.ops.blockquant.reference import dequantize_blockwise_ref, quantize_blockwise_ref
from tilewise.ops.blockquant.triton import dequantize_blockwise_triton, quantize_blockwise_triton
from tilewise.quant.codebooks import codebook, codebook_bits, codebook_names

TIMED = [("int8", 256), ("dynamic8", 256), ("nf4", 64), ("nf4", 256), ("fp4", 64), ("fp4", 256)]


def check(n: int) -> bool:
    """Triton vs reference, exact, for every codebook; prints failures, returns whether all matched."""
    ok = True
    x = torch.randn(n, device="cuda", dtype=torch.bfloat16) * 3
    x[:4096] = 0  # all-zero blocks
    for name in codebook_names():
        code, bits = codebook(name), codebook_bits(name)
        for block in (64, 256):
            q, s = quantize_blockwise_triton(x, code, block, bits=bits)
            qr, sr = quantize_blockwise_ref(x, code, block, bits=bits)
            y = dequantize_blockwise_triton(q, s, code, block, n, bits=bits, dtype=torch.bfloat16)
            yr = dequantize_blockwise_ref(qr, sr, code, block, n, bits=bits, dtype=torch.bfloat16)
            for what, a, b in (("codes", q, qr), ("scales", s, sr), ("dequant", y, yr)):
                if not torch.equal(a, b):
                    ok = False
                    print(f"FAIL {name} block {block} {what}: {int((a != b).sum())} of {a.numel()} differ")
    print(f"check: {n} bf16 elements, {len(codebook_names())} codebooks, blocks 64/256:", "exact" if ok else "FAILED")
    return ok


def _bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def _kernel_call(x: torch.Tensor, name: str, block: int):
    """The quantize kernel's launch alone (no NaN check, no host work), on preallocated outputs."""
    code, bits = codebook(name), codebook_bits(name)
    n = x.numel()
    plan = kernels._plan(code, bits, x.device)
    rows, warps = kernels._tile(block, 32, 2048) if bits == 8 else kernels._tile(block, 16, 1024)
    codes = torch.empty(n if bits == 8 else (n + 1) // 2, dtype=torch.uint8, device=x.device)
    scales = torch.empty(-(-n // block), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(scales.numel(), rows),)

    def run():
        kernels._quantize_kernel[grid](
            x, codes, scales, scales, plan.lut, plan.thr, plan.mid, plan.val, n, code.numel(), 0, BS=block,
            ROWS=rows, BITS=bits, SEARCH=plan.search, G=plan.g, M=plan.m, E0=plan.e0, NT=plan.nt, R=plan.r,
            STOCHASTIC=False, CHECK=False, INTERPRET=False, num_warps=warps,
        )  # fmt: skip

    return run


def time_all(n: int) -> None:
    x = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    copy_ms = _bench(lambda: torch.empty_like(x).copy_(x))
    copy_gbs = 2 * x.numel() * x.element_size() / copy_ms / 1e6
    print(
        f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; "
        f"{n} bf16 elements; copy {copy_ms:.3f} ms = {copy_gbs:.0f} GB/s"
    )
    head = f"{'codebook':<9} {'bits':>4} {'block':>5} {'plan':>12} |"
    for op in ("quant kernel", "quant op", "dequant"):
        head += f" {op + ' ms':>15} {'GB/s':>6} {'%copy':>6} |"
    print(head)
    for name, block in TIMED:
        code, bits = codebook(name), codebook_bits(name)
        plan = kernels._plan(code, bits, x.device)
        kind = {0: "bsearch", 1: f"uniform{plan.g}", 2: f"log{plan.m}"}[plan.search] + f" R{plan.r}"
        q, s = quantize_blockwise_triton(x, code, block, bits=bits)
        nbytes = x.numel() * x.element_size() + q.numel() + s.numel() * 4
        times = [
            _bench(_kernel_call(x, name, block)),
            _bench(lambda code=code, block=block, bits=bits: quantize_blockwise_triton(x, code, block, bits=bits)),
            _bench(
                lambda q=q, s=s, code=code, block=block, bits=bits: dequantize_blockwise_triton(
                    q, s, code, block, n, bits=bits, dtype=torch.bfloat16
                )
            ),
        ]
        line = f"{name:<9} {bits:>4} {block:>5} {kind:>12} |"
        for ms in times:
            gbs = nbytes / ms / 1e6
            line += f" {ms:>15.4f} {gbs:>6.0f} {100 * gbs / copy_gbs:>5.1f}% |"
        print(line)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1 << 28, help="elements timed (default 256M)")
    parser.add_argument("--check-size", type=int, default=(1 << 24) + 12345, help="elements checked")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 1
    ok = check(args.check_size)
    time_all(args.size)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
