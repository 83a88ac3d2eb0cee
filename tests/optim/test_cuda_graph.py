"""tilewise.optim under CUDA graphs: ``opt.step()`` captured after warm-up steps and replayed gives the parameters
and state of the same eager steps bit for bit (32-, 8- and 4-bit state, fp32 and bf16 parameters, a scheduled
tensor lr); what would break a capture raises before anything is captured, naming the fix."""

from __future__ import annotations

import math

import pytest
import torch

import tilewise.optim as to
from tilewise._testing import assert_exact
from tilewise.optim import _base

WARMUP, REPLAYS = 3, 12
# a weight, an odd-sized one (a partial last block and tile) and a bias under min_quant_numel (fp32 state: a second
# bucket in the group)
SHAPES = [(256, 384), (1000, 77), (384,)]


def _lr(step: int) -> float:
    """A cosine schedule from 1e-2 over all the steps, filled into the lr tensor before each (as a scheduler does)."""
    return 1e-2 * 0.5 * (1 + math.cos(math.pi * step / (WARMUP + REPLAYS)))


def _grads(dtype: torch.dtype, inf_at: int | None) -> list[list[torch.Tensor]]:
    """One gradient list per step, on the GPU; ``inf_at``: the step whose second gradient holds an inf."""
    g = torch.Generator().manual_seed(1)
    grads = [[torch.randn(s, generator=g).to("cuda", dtype) for s in SHAPES] for _ in range(WARMUP + REPLAYS)]
    if inf_at is not None:
        grads[inf_at][1][3, 5] = float("inf")
    return grads


def _setup(dtype: torch.dtype, kwargs: dict) -> tuple[list[torch.nn.Parameter], torch.Tensor, to.AdamW]:
    """Parameters with static gradient buffers (a captured step reads these addresses), lr a CUDA tensor."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s).to("cuda", dtype)) for s in SHAPES]
    for p in params:
        p.grad = torch.zeros_like(p)
    lr = torch.tensor(_lr(0), device="cuda")
    return params, lr, to.AdamW(params, lr=lr, weight_decay=0.1, min_quant_numel=1024, **kwargs)


def _feed(params: list[torch.nn.Parameter], lr: torch.Tensor, grads: list[list[torch.Tensor]], step: int) -> None:
    for p, g in zip(params, grads[step], strict=True):
        p.grad.copy_(g)
    lr.fill_(_lr(step))


def _warm_up_and_capture(params, lr, opt, grads) -> torch.cuda.CUDAGraph:
    """``WARMUP`` eager steps on a side stream (state, kernel compiles, launch tables), then ``opt.step()`` captured."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for k in range(WARMUP):
            _feed(params, lr, grads, k)
            opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    return graph


def _check_replays_match_eager(dtype: torch.dtype, kwargs: dict, inf_at: int | None = None) -> None:
    grads = _grads(dtype, inf_at)
    eager, eager_lr, eager_opt = _setup(dtype, kwargs)
    for k in range(WARMUP + REPLAYS):
        _feed(eager, eager_lr, grads, k)
        eager_opt.step()

    params, lr, opt = _setup(dtype, kwargs)
    graph = _warm_up_and_capture(params, lr, opt, grads)
    captured = params[0].detach().clone()  # capturing runs nothing: the parameters are as after the warm-up
    for k in range(WARMUP, WARMUP + REPLAYS):
        _feed(params, lr, grads, k)
        graph.replay()
    torch.cuda.synchronize()

    assert not torch.equal(params[0].detach(), captured), "the replays did not step"
    for i, (p, q) in enumerate(zip(params, eager, strict=True)):
        assert_exact(p.detach(), q.detach(), msg=f"params[{i}]")
        assert sorted(opt.state[p]) == sorted(eager_opt.state[q])
        for key, value in eager_opt.state[q].items():
            assert_exact(opt.state[p][key], value, msg=f"params[{i}] state {key!r}")
    assert float(opt.state[params[0]]["step"]) == WARMUP + REPLAYS


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("state_bits", [32, 8, 4])
def test_captured_step_replays_like_eager_steps(state_bits: int, dtype: torch.dtype) -> None:
    _check_replays_match_eager(dtype, {"state_bits": state_bits})


@pytest.mark.gpu
def test_captured_step_with_master_amsgrad_and_a_skip_replays_like_eager_steps() -> None:
    """bf16 parameters with fp32 master copies, 4-bit amsgrad state, and an inf gradient in one replay: that
    parameter's update is skipped on the device (``step`` stays, ``skips`` counts it) as in eager mode."""
    kwargs = {"state_bits": 4, "master_weights": True, "amsgrad": True, "skip_nonfinite": True}
    _check_replays_match_eager(torch.bfloat16, kwargs, inf_at=WARMUP + 4)


def _capture_error(opt: to.AdamW, params: list[torch.nn.Parameter], match: str) -> None:
    """Capturing ``opt.step()`` raises ``RuntimeError`` matching ``match`` before it launches anything."""
    before = [p.detach().clone() for p in params]
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match=match), torch.cuda.graph(graph):
        opt.step()
    torch.cuda.synchronize()
    for p, b in zip(params, before, strict=True):
        assert_exact(p.detach(), b)


@pytest.mark.gpu
def test_capture_without_warm_up_raises() -> None:
    params, _, opt = _setup(torch.float32, {"state_bits": 8})
    _capture_error(opt, params, "before this parameter .* has optimizer state: take one or more eager steps")
    assert not opt.state[params[0]]


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": torch.tensor(1e-3)}, "lr a tensor on cpu, which would be copied to cuda:0 with a host sync"),
        ({"backend": "reference"}, "with the reference backend, which reads the step count on the host"),
    ],
    ids=["cpu-lr", "reference"],
)
def test_capture_that_would_sync_raises(kwargs: dict, match: str) -> None:
    params, _, opt = _setup(torch.float32, {"state_bits": 8})
    opt.param_groups[0].update(kwargs)
    for p in params:
        p.grad.normal_()
    opt.step()  # warm-up: the state exists
    _capture_error(opt, params, match)


def test_capture_checks_run_before_state_or_launches(monkeypatch: pytest.MonkeyPatch) -> None:
    """On the CPU, with capture simulated: a parameter without state raises before its state is created, and the
    reference backend (which syncs on ``step``) raises before it steps."""
    p = torch.nn.Parameter(torch.randn(4096))
    p.grad = torch.randn(4096)
    opt = to.AdamW([p], lr=1e-2, state_bits=8, backend="reference")
    monkeypatch.setattr(_base, "_capturing", lambda device: True)
    with pytest.raises(RuntimeError, match="has optimizer state"):
        opt.step()
    assert not opt.state[p]
    monkeypatch.setattr(_base, "_capturing", lambda device: False)
    opt.step()
    before = p.detach().clone()
    monkeypatch.setattr(_base, "_capturing", lambda device: True)
    with pytest.raises(RuntimeError, match="reference backend"):
        opt.step()
    assert_exact(p.detach(), before)
