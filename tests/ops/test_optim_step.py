"""tilewise.ops.optim_step: the reference steps against torch.optim (fp32 state), hand-written fp32 math and the
block quantization spec (quantized state), state layouts, stochastic rounding, skips and backend dispatch."""

from __future__ import annotations

import math

import pytest
import torch

import tilewise.ops.optim_step as optim_step
from tilewise._testing import assert_close, assert_exact, assert_rel_rms
from tilewise.ops.blockquant import quantize_blockwise
from tilewise.ops.optim_step import (
    QUANT_FORMATS,
    RANK1_FORMATS,
    STATE_FORMATS,
    adam_step,
    buffer_keys,
    init_state,
    lion_step,
    round_bf16_stochastic,
    sgd_step,
)
from tilewise.quant.codebooks import codebook

ADAM = {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8}


def _grads(n: int, steps: int, shape: tuple[int, ...]) -> list[torch.Tensor]:
    """Gradients with a persistent signal, per-element scales and noise, as a training run sees."""
    scale = torch.rand(shape) * 2
    signal = torch.randn(shape) * 0.3
    return [signal + scale * torch.randn(shape) for _ in range(steps)][:n]


@pytest.mark.parametrize(
    ("decoupled", "amsgrad", "maximize", "tensor_lr"),
    [(True, False, False, False), (True, True, False, True), (False, False, True, False), (False, True, True, True)],
)
def test_adam_fp32_matches_torch(decoupled: bool, amsgrad: bool, maximize: bool, tensor_lr: bool) -> None:
    """100 steps bit for bit equal to torch.optim's (CPU, single-tensor path). A tensor lr matters: torch computes
    ``1 - lr * wd`` and ``lr / bc1`` as fp32 tensor ops then, not in float64 (before that was mirrored, the
    parameters drifted ~5e-7 relative in 100 steps)."""
    p0 = torch.randn(37, 5)
    ref = p0.clone().requires_grad_()
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    lr = torch.tensor(1e-2) if tensor_lr else 1e-2
    opt = cls([ref], lr=lr, weight_decay=0.1, amsgrad=amsgrad, maximize=maximize)
    p, st = p0.clone(), init_state(p0, "adam", "fp32", amsgrad=amsgrad)
    for g in _grads(100, 100, p0.shape):
        ref.grad = g.clone()
        opt.step()
        adam_step(
            [p], [g], [st], lr=lr, weight_decay=0.1, decoupled=decoupled, amsgrad=amsgrad, maximize=maximize,
            state_format="fp32", **ADAM,
        )  # fmt: skip
    assert_exact(p, ref.detach())
    assert_exact(st["exp_avg_sq"], opt.state[ref]["exp_avg_sq"])
    assert float(st["step"]) == 100


@pytest.mark.parametrize(
    ("momentum", "dampening", "nesterov", "weight_decay", "maximize"),
    [(0.0, 0.0, False, 0.0, False), (0.9, 0.0, True, 0.1, False), (0.9, 0.3, False, 0.0, True)],
)
def test_sgd_fp32_matches_torch(momentum: float, dampening: float, nesterov: bool, weight_decay: float, maximize: bool):
    p0 = torch.randn(300)
    ref = p0.clone().requires_grad_()
    kw = {"momentum": momentum, "dampening": dampening, "nesterov": nesterov, "weight_decay": weight_decay}
    opt = torch.optim.SGD([ref], lr=1e-2, maximize=maximize, **kw)
    p, st = p0.clone(), init_state(p0, "sgd", "fp32", momentum=momentum != 0)
    for g in _grads(100, 100, p0.shape):
        ref.grad = g.clone()
        opt.step()
        sgd_step([p], [g], [st], lr=1e-2, maximize=maximize, state_format="fp32", **kw)
    assert_close(p, ref.detach())


def test_lion_fp32_matches_hand_math() -> None:
    p0 = torch.randn(500)
    p, st = p0.clone(), init_state(p0, "lion", "fp32")
    w, m = p0.clone().double(), torch.zeros(500, dtype=torch.float64)
    lr, b1, b2, wd = 1e-3, 0.9, 0.99, 0.1
    for g in _grads(20, 20, p0.shape):
        lion_step([p], [g], [st], lr=lr, beta1=b1, beta2=b2, weight_decay=wd, state_format="fp32")
        w = w * (1 - lr * wd) - lr * torch.sign(b1 * m + (1 - b1) * g.double())
        m = b2 * m + (1 - b2) * g.double()
    assert_close(p, w.float())
    assert_close(st["exp_avg"], m.float())


@pytest.mark.parametrize("fmt", ["q8", "q4", "fp8"])
def test_quantized_adam_first_step_matches_hand_math(fmt: str) -> None:
    """From zero state, one step: the update uses the fp32 moments, then the moments are quantized (nearest) with
    the blockquant spec, codes and scales bit for bit."""
    n = 1000
    p0, g = torch.randn(n), torch.randn(n)
    p, st = p0.clone(), init_state(p0, "adam", fmt, amsgrad=True)
    adam_step([p], [g], [st], lr=1e-2, weight_decay=0.1, amsgrad=True, state_format=fmt, **ADAM)
    m, v = 0.1 * g, 0.001 * g * g
    expected = p0 * (1 - 1e-3) - 1e-2 / 0.1 * m / (v.sqrt() / math.sqrt(0.001) + 1e-8)
    assert_close(p, expected, rtol=1e-5, reason="bias corrections in float64 vs the fp32 hand math")
    signed, unsigned, block, bits = QUANT_FORMATS[fmt]
    for name, value, cb in [("exp_avg", m, signed), ("exp_avg_sq", v, unsigned), ("max_exp_avg_sq", v, unsigned)]:
        codes, scales = quantize_blockwise(value, codebook(cb), block, bits=bits, backend="reference")
        codes_key, scales_key = buffer_keys(name, fmt)
        assert_exact(st[codes_key], codes, msg=name)
        assert_close(st[scales_key], scales, msg=name)


@pytest.mark.parametrize("fmt", STATE_FORMATS)
@pytest.mark.parametrize("n", [1, 127, 128, 129, 1000])
def test_init_state_layout(fmt: str, n: int) -> None:
    p = torch.randn(n, dtype=torch.bfloat16)
    st = init_state(p, "adam", fmt, amsgrad=True, master=True)
    assert st["step"].shape == ()
    assert st["step"].dtype == torch.float32
    assert float(st["step"]) == 0
    assert st["skips"].shape == ()
    assert st["skips"].dtype == torch.float32
    assert_exact(st["master"], p.float())
    for name in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        if fmt in QUANT_FORMATS:
            _, _, block, bits = QUANT_FORMATS[fmt]
            codes_key, scales_key = buffer_keys(name, fmt)
            assert st[codes_key].dtype == torch.uint8
            assert st[codes_key].shape == ((n + 1) // 2 if bits == 4 else n,)
            assert st[scales_key].dtype == torch.float32
            assert st[scales_key].shape == (math.ceil(n / block),)
        else:
            assert st[name].shape == p.shape
            assert st[name].dtype == (torch.float32 if fmt == "fp32" else torch.bfloat16)
    if fmt in RANK1_FORMATS:
        with pytest.raises(ValueError, match="Adam's second moment only"):
            init_state(p, "sgd", fmt)
        return
    sgd = init_state(p, "sgd", fmt, momentum=False)
    assert set(sgd) == {"step", "skips"}
    assert set(init_state(p, "sgd", fmt)) - {"step", "skips"} == set(buffer_keys("momentum_buffer", fmt))


# relative RMS error of the parameter change after 50 steps, against fp32 state (measured ~0.5x these bounds;
# q4's second moment on ulinear4 cannot go below absmax/16 in a block, so small moments are overestimated)
BOUNDS = {
    "adam": {"bf16": 0.01, "q8": 0.08, "fp8": 0.08, "q4": 0.8},
    "lion": {"bf16": 0.02, "q8": 0.06, "fp8": 0.08, "q4": 0.4},
    "sgd": {"bf16": 0.01, "q8": 0.04, "fp8": 0.07, "q4": 0.5},
}


def _run(kind: str, fmt: str, p0: torch.Tensor, grads: list[torch.Tensor]) -> torch.Tensor:
    p, st = p0.clone(), init_state(p0, kind, fmt)
    for g in grads:
        if kind == "adam":
            adam_step([p], [g], [st], lr=1e-2, weight_decay=0.0, state_format=fmt, **ADAM)
        elif kind == "lion":
            lion_step([p], [g], [st], lr=1e-2, beta1=0.9, beta2=0.99, weight_decay=0.0, state_format=fmt)
        else:
            sgd_step([p], [g], [st], lr=1e-2, momentum=0.9, dampening=0.0, nesterov=False, weight_decay=0.0,
                     state_format=fmt)  # fmt: skip
    return p - p0


@pytest.mark.parametrize("kind", ["adam", "lion", "sgd"])
def test_low_bit_state_error_bounds(kind: str) -> None:
    p0 = torch.randn(4099)
    grads = _grads(50, 50, p0.shape)
    exact = _run(kind, "fp32", p0, grads)
    for fmt, bound in BOUNDS[kind].items():
        assert_rel_rms(_run(kind, fmt, p0, grads), exact, bound, msg=f"{kind} {fmt}")


def test_round_bf16_stochastic_is_unbiased() -> None:
    x = torch.full((200_000,), 1 + 2**-9)  # a quarter of the way from 1 to the next bf16 value, 1 + 2**-7
    y = round_bf16_stochastic(x, torch.Generator().manual_seed(0))
    assert y.dtype == torch.bfloat16
    assert set(y.float().unique().tolist()) == {1.0, 1 + 2**-7}
    assert abs(float((y.float() == 1 + 2**-7).float().mean()) - 0.25) < 0.01
    special = torch.tensor([0.0, -0.0, math.inf, -math.inf, 1.5, -2.0])
    assert_exact(round_bf16_stochastic(special).float(), special)
    assert math.isnan(float(round_bf16_stochastic(torch.tensor([math.nan]))))


def test_bf16_params_master_and_stochastic_rounding() -> None:
    """An update below half a bf16 ulp: nearest rounding loses it, the master copy and stochastic rounding keep
    it (the latter on average)."""
    n, steps = 4096, 100
    g = torch.ones(n)
    kw = {"lr": 1e-3, "momentum": 0.0, "dampening": 0.0, "nesterov": False, "weight_decay": 0.0, "state_format": "fp32"}
    nearest, master, sr = (torch.ones(n, dtype=torch.bfloat16) for _ in range(3))
    st_n, st_m, st_s = init_state(nearest, "sgd", "fp32"), init_state(master, "sgd", "fp32", master=True), None
    st_s = init_state(sr, "sgd", "fp32")
    for step in range(steps):
        sgd_step([nearest], [g], [st_n], **kw)
        sgd_step([master], [g], [st_m], **kw)
        sgd_step([sr], [g], [st_s], stochastic_round=True, seed=step, **kw)
    assert bool((nearest == 1).all())
    assert_close(st_m["master"], torch.full((n,), 0.9), rtol=1e-5, reason="100 fp32 subtractions of 1e-3")
    assert_exact(master, st_m["master"].bfloat16())
    assert abs(float(sr.float().mean()) - 0.9) < 2e-3


def test_skip_nonfinite_leaves_param_and_state_untouched() -> None:
    p0 = [torch.randn(300), torch.randn(300)]
    ps = [p.clone() for p in p0]
    states = [init_state(p, "adam", "q8") for p in ps]
    for p, st in zip(ps, states, strict=True):
        adam_step([p], [torch.randn(300)], [st], lr=1e-2, weight_decay=0.0, state_format="q8", **ADAM)
    before = [{k: v.clone() for k, v in st.items()} for st in states]
    p_before = [p.clone() for p in ps]
    bad = torch.randn(300)
    bad[7] = math.nan
    adam_step(ps, [bad, torch.randn(300)], states, lr=1e-2, weight_decay=0.0, state_format="q8", skip_nonfinite=True,
              **ADAM)  # fmt: skip
    assert_exact(ps[0], p_before[0])
    for key, value in before[0].items():
        if key != "skips":
            assert_exact(states[0][key], value, msg=key)
    assert float(states[0]["skips"]) == 1
    assert float(states[1]["skips"]) == 0
    assert float(states[1]["step"]) == 2
    assert not torch.equal(ps[1], p_before[1])


def test_auto_falls_back_to_reference_without_triton_function(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(optim_step, "resolve_backend", lambda backend, *t: "triton")
    monkeypatch.setattr(optim_step, "_triton_function", lambda name: None)
    p, g = torch.randn(10), torch.randn(10)
    st = init_state(p, "lion", "fp32")
    lion_step([p], [g], [st], lr=0.1, beta1=0.9, beta2=0.99, weight_decay=0.0, state_format="fp32")
    assert float(st["step"]) == 1
    with pytest.raises(RuntimeError, match="Triton kernel is not available"):
        lion_step([p], [g], [st], lr=0.1, beta1=0.9, beta2=0.99, weight_decay=0.0, state_format="fp32",
                  backend="triton")  # fmt: skip


def test_bad_inputs_raise() -> None:
    p, st = torch.randn(10), init_state(torch.randn(10), "adam", "fp32")
    with pytest.raises(ValueError, match="state_format='q2' is unknown"):
        adam_step([p], [p], [st], lr=1e-3, weight_decay=0.0, state_format="q2", **ADAM)
    with pytest.raises(ValueError, match="same length"):
        adam_step([p], [], [st], lr=1e-3, weight_decay=0.0, state_format="fp32", **ADAM)
    with pytest.raises(ValueError, match="shape"):
        adam_step([p], [torch.randn(11)], [st], lr=1e-3, weight_decay=0.0, state_format="fp32", **ADAM)
    with pytest.raises(ValueError, match="kind='rmsprop' is unknown"):
        init_state(p, "rmsprop", "fp32")  # type: ignore[arg-type]


def test_rank1_quantize_roundtrip_bound_and_exact_maxima() -> None:
    """q4r1's v: row/column maxima exact; codes follow the blockquant threshold rule with ``s_ij = min(r_i, c_j)``
    per element; the dequantized error is at most half the widest ulinear4 gap times ``s_ij`` for values at or
    above the first level ``c[0] s_ij``, and at most ``c[0] s_ij`` below it (ulinear4 has no zero)."""
    from tilewise.ops.blockquant.reference import midpoints, unpack_nibbles
    from tilewise.ops.optim_step.reference import dequantize_rank1, quantize_rank1

    g = torch.Generator().manual_seed(0)
    v = torch.exp(3 * torch.randn(37, 3, 11, generator=g))  # ~1e-6..1e6: far more range than one block absmax
    v[5] = 0.0  # a zero row: its s is 0 and it dequantizes to exact zeros
    cb = codebook("ulinear4")
    codes, rows, cols = quantize_rank1(v, cb)
    a = v.reshape(37, 33)
    assert codes.shape == ((37 * 33 + 1) // 2,)
    assert_exact(rows, a.amax(dim=1))
    assert_exact(cols, a.amax(dim=0))
    s = torch.minimum(rows[:, None], cols[None, :])
    safe = torch.where(s > 0, s, torch.ones_like(s))
    expected = (a[..., None] > safe[..., None] * midpoints(cb)).sum(-1).to(torch.uint8)
    assert_exact(unpack_nibbles(codes, a.numel()).view(37, 33), expected)
    deq = dequantize_rank1(codes, rows, cols, cb)
    assert_exact(deq[5], torch.zeros(33))
    err = (deq - a).abs()
    half_gap = float((cb[1:] - cb[:-1]).max()) / 2
    above = a >= cb[0] * s
    slack = 1e-6 * s  # fp32 rounding of s * mid and of c * s
    assert bool((err <= half_gap * s + slack)[above].all())
    assert bool((err <= float(cb[0]) * s + slack)[~above].all())
    assert above.float().mean() > 0.2  # both cases are exercised
    assert (~above).float().mean() > 0.2


def test_q4r1_adam_state_layout_and_first_step() -> None:
    """2-D parameter: m block-wise on dynamic4 (as q4), v and v_max rank-1 on ulinear4 (keys ``*_codes``,
    ``*_row``, ``*_col``); a 1-D parameter takes q4's layout and steps bit for bit as q4."""
    from tilewise.ops.optim_step.reference import quantize_rank1

    p0, g = torch.randn(40, 3, 5), torch.randn(40, 3, 5)
    p, st = p0.clone(), init_state(p0, "adam", "q4r1", amsgrad=True)
    assert buffer_keys("exp_avg_sq", "q4r1", p0.shape) == ("exp_avg_sq_codes", "exp_avg_sq_row", "exp_avg_sq_col")
    assert set(st) == {
        "step", "skips", "exp_avg_codes", "exp_avg_scales", "exp_avg_sq_codes", "exp_avg_sq_row", "exp_avg_sq_col",
        "max_exp_avg_sq_codes", "max_exp_avg_sq_row", "max_exp_avg_sq_col",
    }  # fmt: skip
    assert st["exp_avg_sq_codes"].shape == (300,)
    assert st["exp_avg_sq_row"].shape == (40,)
    assert st["exp_avg_sq_col"].shape == (15,)
    adam_step([p], [g], [st], lr=1e-2, weight_decay=0.1, amsgrad=True, state_format="q4r1", **ADAM)
    m, v = 0.1 * g, 0.001 * g * g
    expected = p0 * (1 - 1e-3) - 1e-2 / 0.1 * m / (v.sqrt() / math.sqrt(0.001) + 1e-8)
    assert_close(p, expected, rtol=1e-5, reason="bias corrections in float64 vs the fp32 hand math")
    codes, scales = quantize_blockwise(m, codebook("dynamic4"), 128, bits=4, backend="reference")
    assert_exact(st["exp_avg_codes"], codes)
    assert_close(st["exp_avg_scales"], scales)
    for name in ("exp_avg_sq", "max_exp_avg_sq"):
        for key, want in zip(buffer_keys(name, "q4r1", p0.shape), quantize_rank1(v, codebook("ulinear4")), strict=True):
            check = assert_exact if key.endswith("_codes") else assert_close
            check(st[key], want, msg=key)
    # 1-D (and [1, n]: a side of 1 is 1-D in effect): q4 exactly
    for shape in [(300,), (1, 300)]:
        q0 = torch.randn(shape)
        q, r = q0.clone(), q0.clone()
        sq, sr = init_state(q0, "adam", "q4"), init_state(q0, "adam", "q4r1")
        assert set(sq) == set(sr)
        for grad in _grads(5, 5, shape):
            adam_step([q], [grad], [sq], lr=1e-2, weight_decay=0.0, state_format="q4", **ADAM)
            adam_step([r], [grad], [sr], lr=1e-2, weight_decay=0.0, state_format="q4r1", **ADAM)
        assert_exact(r, q)


def test_q4r1_takes_reference_backend_with_one_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(optim_step, "resolve_backend", lambda backend, *t: "triton")

    def no_triton(name: str):
        raise AssertionError("q4r1 must not reach triton.py")

    monkeypatch.setattr(optim_step, "_triton_function", no_triton)
    monkeypatch.setattr(optim_step, "_warned_unfused", set())
    p = torch.randn(16, 16)
    st = init_state(p, "adam", "q4r1")
    with pytest.warns(UserWarning, match="no fused Triton kernel yet"):
        adam_step([p], [torch.randn(16, 16)], [st], lr=1e-3, weight_decay=0.0, state_format="q4r1", **ADAM)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process
        adam_step([p], [torch.randn(16, 16)], [st], lr=1e-3, weight_decay=0.0, state_format="q4r1", backend="triton",
                  **ADAM)  # fmt: skip
    assert float(st["step"]) == 2
    with pytest.raises(ValueError, match="Adam's second moment only"):
        init_state(p, "lion", "q4r1")


def test_q4r1_state_bytes_on_meta() -> None:
    """init_state on meta tensors (what the memory estimator sums): m 0.5 + 4/128 bytes/element, v 0.5 bytes per
    element plus 4 (R + C)."""
    p = torch.empty(1024, 64, 64, device="meta")
    st = init_state(p, "adam", "q4r1")
    n = p.numel()
    got = sum(t.numel() * t.element_size() for t in st.values())
    assert got == 8 + (n // 2 + 4 * n // 128) + (n // 2 + 4 * (1024 + 4096))
