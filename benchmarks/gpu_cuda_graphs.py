"""Short-sequence token mixers, eager against CUDA-graphed: ``python benchmarks/gpu_cuda_graphs.py``.

At short sequences a forward + backward step is bound by the host (Python, Triton's launcher, allocations), so an
eager timing measures the host rather than the kernels. This script times each step two ways, in one process:

- eager: 200 back-to-back calls, then a synchronise (ms a call; the GPU waits on the host where it is faster);
- graphed: the same step captured once in a ``torch.cuda.CUDAGraph`` and replayed 200 times.

Steps (forward + ``torch.autograd.grad`` of every input):

- ``fft_conv`` at u [4, 768, N] (N in 512..4096, fp32 and bf16), ``backend="reference"`` (torch.fft) and
  ``"triton"``;
- ``linear_attention`` (no gate) at [4, 2048, 16, 128] bf16, Triton, and fla's ``chunk_linear_attn`` if installed;
- ``block_sparse_attention`` at [4, 16, 2048, 128] bf16 with ``tilewise bench mixers``' mask (block 128), against
  SDPA causal (dense).

Prints a markdown table. Options: ``--n 1024 2048`` (fft_conv lengths), ``--skip-attention``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence

import torch

from tilewise.bench.mixers import keep_mask
from tilewise.ops import block_sparse_attention, fft_conv, linear_attention

CALLS = 200


def _per_call_ms(f: Callable[[], object], calls: int = CALLS) -> float:
    for _ in range(3):
        f()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        f()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / calls * 1e3


def _graphed(step: Callable[[], Sequence[torch.Tensor]]) -> torch.cuda.CUDAGraph:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph


def _row(name: str, step: Callable[[], Sequence[torch.Tensor]]) -> tuple[str, float, float]:
    eager = _per_call_ms(step)
    graph = _graphed(step)
    return name, eager, _per_call_ms(graph.replay)


def _fft_rows(lengths: Sequence[int]) -> list[tuple[str, float, float]]:
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for n in lengths:
            u = torch.randn(4, 768, n, device="cuda", dtype=dtype, requires_grad=True)
            decay = torch.exp(-torch.arange(n, device="cuda") / (n / 4))
            k = (torch.randn(768, n, device="cuda") * decay).to(dtype).requires_grad_()
            dy = torch.randn_like(u)
            for backend in ("reference", "triton"):

                def step(backend=backend, u=u, k=k, dy=dy):
                    y = fft_conv(u, k, backend=backend)
                    return torch.autograd.grad(y, (u, k), dy)

                label = "torch.fft" if backend == "reference" else "tilewise triton"
                rows.append(_row(f"fft_conv {label}, {str(dtype)[6:]} N={n}", step))
                print(*rows[-1], flush=True)
    return rows


def _attention_rows() -> list[tuple[str, float, float]]:
    rows = []
    b, t, h, d = 4, 2048, 16, 128
    q, k, v = (torch.randn(b, t, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    do = torch.randn_like(q)

    def la():
        o, _ = linear_attention(q, k, v, backend="triton")
        return torch.autograd.grad(o, (q, k, v), do)

    rows.append(_row("linear_attention tilewise triton, bf16 T=2048", la))
    try:
        from fla.ops.linear_attn import chunk_linear_attn
    except ImportError:
        chunk_linear_attn = None
    if chunk_linear_attn is not None:

        def fla():
            o, _ = chunk_linear_attn(q, k, v, normalize=False)
            return torch.autograd.grad(o, (q, k, v), do)

        rows.append(_row("linear_attention fla chunk_linear_attn, bf16 T=2048", fla))
    qh, kh, vh, doh = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v, do))
    mask = keep_mask(t, 128).to("cuda")[None, None]

    def bsa():
        o = block_sparse_attention(qh, kh, vh, mask, block_size=128, backend="triton")
        return torch.autograd.grad(o, (qh, kh, vh), doh)

    def sdpa():
        o = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, is_causal=True)
        return torch.autograd.grad(o, (qh, kh, vh), doh)

    rows.append(_row("block_sparse_attention tilewise triton (bench mask), bf16 T=2048", bsa))
    rows.append(_row("SDPA causal (dense), bf16 T=2048", sdpa))
    for r in rows:
        print(*r, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--skip-attention", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    import triton

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    rows = _fft_rows(args.n)
    if not args.skip_attention:
        rows += _attention_rows()
    print("\n| forward + backward step | eager ms/call | CUDA graph ms/call |")
    print("| --- | --- | --- |")
    for name, eager, graph in rows:
        print(f"| {name} | {eager:.3f} | {graph:.3f} |")


if __name__ == "__main__":
    main()
