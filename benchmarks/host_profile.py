"""cProfile of the Triton quantize host function on CUDA (tiny input): which Python calls cost the launch time.

Run on the GPU machine: python3 benchmarks/host_profile.py
"""

import cProfile
import pstats

import torch

from tilewise.ops.blockquant.triton import dequantize_blockwise_triton, quantize_blockwise_triton
from tilewise.quant import codebook


def main() -> None:
    x = torch.randn(4096, device="cuda", dtype=torch.bfloat16)
    code = codebook("int8")
    codes, scales = quantize_blockwise_triton(x, code, 256, check_finite=False)
    for _ in range(100):
        quantize_blockwise_triton(x, code, 256, check_finite=False)
        dequantize_blockwise_triton(codes, scales, code, 256, 4096)
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(2000):
        quantize_blockwise_triton(x, code, 256, check_finite=False)
        dequantize_blockwise_triton(codes, scales, code, 256, 4096)
    torch.cuda.synchronize()
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
