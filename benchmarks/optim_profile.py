"""Where the time of a fused tilewise AdamW step goes on CUDA: per-step wall times and a kernel table.

Run on the GPU machine: python3 benchmarks/optim_profile.py
"""

import time

import torch

from tilewise.optim import AdamW


def main() -> None:
    torch.manual_seed(0)
    params = [torch.randn(1024, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(64)]
    for p in params:
        p.grad = torch.randn_like(p)
    for bits in (8, 32):
        opt = AdamW(params, lr=1e-3, state_bits=bits, backend="triton")
        for i in range(6):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            opt.step()
            torch.cuda.synchronize()
            print(f"state_bits={bits} step {i}: {(time.perf_counter() - t0) * 1e3:.2f} ms")
        with torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CUDA, torch.profiler.ProfilerActivity.CPU]
        ) as prof:
            for _ in range(3):
                opt.step()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=8, max_name_column_width=50))
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8, max_name_column_width=50))


if __name__ == "__main__":
    main()
