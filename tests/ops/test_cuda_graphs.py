"""The token mixers' Triton paths inside a CUDA graph (GPU only).

At short sequences an eager forward + backward waits on the host (Triton launches and allocations cost more than
the kernels; BENCHMARKS.md). Capturing the step in a CUDA graph removes that cost, which only works if the ops
never synchronise with the host, never allocate outside the graph's pool, and launch the same kernels on every
replay. These tests capture forward + backward once, write new values into the captured inputs, replay, and
compare with an eager call on the same values.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
import torch

from tilewise._testing import assert_exact
from tilewise.ops import block_sparse_attention, fft_conv, linear_attention

pytestmark = pytest.mark.gpu


def _graphed_matches_eager(step: Callable[[], Sequence[torch.Tensor]], inputs: Sequence[torch.Tensor]) -> None:
    """Capture ``step`` (reads ``inputs``, returns outputs and gradients), refill ``inputs`` with new values, replay,
    and check the replay against an eager ``step`` on those values."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # compile and pick launch configurations outside the capture
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    with torch.no_grad():
        for t in inputs:
            t.copy_(torch.randn_like(t))
    graph.replay()
    torch.cuda.synchronize()
    want = step()
    assert len(captured) == len(want)
    for i, (got, w) in enumerate(zip(captured, want, strict=True)):
        # Exact: the replay runs the eager call's kernels with the same launch configurations on the same values,
        # and none of these kernels sums with atomics, so the order of every reduction is the same.
        assert_exact(got, w, msg=f"output {i}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fft_conv_forward_backward_in_a_cuda_graph(dtype: torch.dtype) -> None:
    # N = 1024: below backend="auto"'s Triton range, where only a graph makes the Triton path pay (BENCHMARKS.md)
    u = torch.randn(4, 64, 1024, device="cuda", dtype=dtype, requires_grad=True)
    k = (torch.randn(64, 1024, device="cuda") / 32).to(dtype).requires_grad_()
    skip = torch.randn(64, device="cuda", dtype=dtype, requires_grad=True)
    dy = torch.randn_like(u)

    def step():
        y = fft_conv(u, k, skip=skip, backend="triton")
        return (y, *torch.autograd.grad(y, (u, k, skip), dy))

    _graphed_matches_eager(step, (u, k, skip, dy))


@pytest.mark.parametrize("gated", [False, True])
def test_linear_attention_forward_backward_in_a_cuda_graph(gated: bool) -> None:
    b, t, h, d = 2, 512, 4, 64
    q, k, v = (torch.randn(b, t, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    g = (-torch.rand(b, t, h, device="cuda") * 0.1).requires_grad_() if gated else None
    do = torch.randn_like(q)
    leaves = (q, k, v) + ((g,) if gated else ())

    def step():
        o, _ = linear_attention(q, k, v, g, backend="triton")
        return (o, *torch.autograd.grad(o, leaves, do))

    # the gate keeps its captured values (a log-space decay must stay <= 0; randn would break that)
    _graphed_matches_eager(step, (q, k, v, do))


def test_block_sparse_attention_forward_backward_in_a_cuda_graph() -> None:
    b, h, t, d, bs = 2, 4, 1024, 64, 64
    q, k, v = (torch.randn(b, h, t, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    nb = t // bs
    torch.manual_seed(0)
    mask = (torch.rand(nb, nb, device="cuda") < 0.3) | torch.eye(nb, dtype=torch.bool, device="cuda")
    mask = mask.tril()[None, None].expand(b, h, nb, nb).contiguous()
    do = torch.randn_like(q)

    def step():
        o = block_sparse_attention(q, k, v, mask, block_size=bs, backend="triton")
        return (o, *torch.autograd.grad(o, (q, k, v), do))

    _graphed_matches_eager(step, (q, k, v, do))
