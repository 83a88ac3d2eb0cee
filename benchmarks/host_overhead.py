"""Host-side cost of one quantize call on CUDA (tiny input, so the GPU work is negligible): where the time goes.

Run on the GPU machine: python3 benchmarks/host_overhead.py
"""

import time

import torch

from tilewise.ops.blockquant import quantize_blockwise
from tilewise.ops.blockquant.triton import quantize_blockwise_triton
from tilewise.quant import codebook, quantize


def per_call_us(fn, n: int = 2000) -> float:
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e6


def main() -> None:
    x = torch.randn(4096, device="cuda", dtype=torch.bfloat16)
    code_cpu, code_gpu = codebook("int8"), codebook("int8").cuda()
    s = torch.rand(16, device="cuda")
    cases = {
        "torch.empty x2": lambda: (torch.empty(4096, dtype=torch.uint8, device="cuda"), torch.empty(16, device="cuda")),
        "scales.max().item() (sync)": lambda: s.max().item(),
        "triton host fn, no check, cpu code": lambda: quantize_blockwise_triton(x, code_cpu, 256, check_finite=False),
        "triton host fn, no check, gpu code": lambda: quantize_blockwise_triton(x, code_gpu, 256, check_finite=False),
        "triton host fn, check": lambda: quantize_blockwise_triton(x, code_cpu, 256),
        "ops.quantize_blockwise, no check": lambda: quantize_blockwise(x, code_cpu, 256, check_finite=False),
        "ops.quantize_blockwise, check": lambda: quantize_blockwise(x, code_cpu, 256),
        "torch.ops.tilewise op, no check": lambda: torch.ops.tilewise.quantize_blockwise(
            x, code_cpu, 256, 8, False, "triton"
        ),
        "quant.quantize, check": lambda: quantize(x, "int8", 256),
    }
    for name, fn in cases.items():
        print(f"{name:40s} {per_call_us(fn):8.1f} us/call")


if __name__ == "__main__":
    main()
