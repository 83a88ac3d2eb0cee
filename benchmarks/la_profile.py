"""Where the time of one linear-attention forward + backward goes on a GPU: ``python benchmarks/la_profile.py``.

Prints, per ``T``, the wall time per call (host launches included, synchronised), CUDA-event time, and the
torch.profiler table of kernels (CUDA time) and host ops for one call at ``B=4 H=16 D=128`` bf16, no gate:
for telling host overhead (launch cost, custom-op dispatch, syncs) from kernel time at short sequences.
"""

from __future__ import annotations

import argparse
import time

import torch

from tilewise.ops import linear_attention


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqlens", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--gate", action="store_true", help="a scalar gate g [B, T, H]")
    args = parser.parse_args()
    batch, heads, dim = 4, 16, 128
    for seq in args.seqlens:
        q, k, v = (torch.randn(batch, seq, heads, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))  # fmt: skip
        g = None
        if args.gate:
            g = torch.nn.functional.logsigmoid(torch.randn(batch, seq, heads, device="cuda") + 4).requires_grad_()
        do = torch.randn_like(v)
        leaves = [t for t in (q, k, v, g) if t is not None]

        def step(q=q, k=k, v=v, g=g, leaves=leaves, do=do):
            o, _ = linear_attention(q, k, v, g, backend="triton")
            return torch.autograd.grad(o, leaves, do)

        for _ in range(5):
            step()
        torch.cuda.synchronize()
        n = 20
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        host = (time.perf_counter() - t0) / n * 1e3
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / n * 1e3
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            step()
        end.record()
        torch.cuda.synchronize()
        print(f"T={seq}: host {host:.3f} ms/call (launch only), wall {wall:.3f} ms/call, "
              f"events {start.elapsed_time(end) / n:.3f} ms/call")  # fmt: skip
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:  # fmt: skip
            for _ in range(3):
                step()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12, max_name_column_width=60))


if __name__ == "__main__":
    main()
