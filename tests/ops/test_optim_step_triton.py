"""The fused Triton optimizer steps against the reference (``tilewise.ops.optim_step.reference``).

Both sides start from equal copies and take several consecutive steps on the same gradients. Parameters agree
within rounding (the fp32 math differs only in scalar op order and FMA), codes of quantized state on >= 99.9% of
elements (a code differs only where the fp32 moment lands within an ulp of a threshold), scales and fp32/bf16
state within a few ulps.
"""

import copy

import pytest
import torch

from tilewise._testing import assert_close, assert_exact
from tilewise.ops.optim_step.reference import _lr_terms, adam_step_ref, init_state, lion_step_ref, sgd_step_ref

triton_step = pytest.importorskip("tilewise.ops.optim_step.triton")

pytestmark = pytest.mark.interpret

SIZES = (1, 255, 256, 1000, 4099, (33, 65))
QUANTIZED = ("q8", "q4", "fp8")
ADAM = {"lr": 1e-2, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.1}
# fp32 moments: the two sides' fp32 ops round differently by an ulp or two (the order of the scalar products);
# near-cancelling moments then differ by a few ulps of their inputs, hence the small absolute floor.
STATE_FP32 = {"atol": 1e-9, "rtol": 1e-6, "reason": "moments: an ulp or two of op-order rounding, 3 steps"}


def _setup(kind: str, fmt: str, dtype: torch.dtype, device: str, **kw: bool) -> tuple:
    params = [torch.randn(s, device=device).to(dtype) for s in SIZES]
    states = [init_state(p, kind, fmt, **kw) for p in params]
    return params, states, copy.deepcopy(params), copy.deepcopy(states)


def _grads(params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.randn(p.shape, device=p.device).to(p.dtype) for p in params]


def _allow_code_flips(a: torch.Tensor, e: torch.Tensor, within: torch.Tensor, steps: int = 3, lr: float = 1e-2) -> None:
    """Quantized state: a moment whose fp32 value differs by an ulp between the two sides can land on the
    neighbouring code (the spec allows 0.1% of codes to differ), and that element's update then differs by up to
    one step's size. So all but 0.1% of elements (at least one) must pass ``within``, and every element must stay
    within ``2 * lr`` per step (an Adam/Lion/SGD step moves a weight by about ``lr`` at most)."""
    outside = int((~within).sum())
    assert outside <= max(1, a.numel() // 1000), f"{outside} of {a.numel()} elements outside the tolerance"
    assert bool(((a.float() - e.float()).abs() <= 2 * lr * steps).all())


def _check_params(ours: list[torch.Tensor], ref: list[torch.Tensor], quantized: bool = False) -> None:
    for a, e in zip(ours, ref, strict=True):
        if a.dtype == torch.float32:
            if quantized:
                _allow_code_flips(a, e, torch.isclose(a, e, rtol=1.3e-6, atol=1e-5))
            else:
                assert_close(a, e)
        else:  # one rounding of nearly equal fp32 values: at most one ulp of the parameter dtype apart
            ulp = torch.finfo(a.dtype).eps * e.float().abs().clamp_min(torch.finfo(a.dtype).tiny)
            within = (a.float() - e.float()).abs() <= ulp * 1.01
            if quantized:
                _allow_code_flips(a, e, within)
            else:
                assert bool(within.all())


def _check_states(ours: list[dict], ref: list[dict]) -> None:
    for s_a, s_e in zip(ours, ref, strict=True):
        assert s_a.keys() == s_e.keys()
        for key, e in s_e.items():
            a = s_a[key]
            if key == "master":
                if any(t.dtype == torch.uint8 for t in s_e.values()):  # see _allow_code_flips
                    _allow_code_flips(a, e, torch.isclose(a, e, rtol=1.3e-6, atol=1e-5))
                else:
                    assert_close(a, e, msg=key)
            elif key in ("step", "skips"):
                assert_exact(a, e, msg=key)
            elif e.dtype == torch.uint8:
                assert a.shape == e.shape
                agree = (a == e).float().mean().item() if e.numel() else 1.0
                assert agree >= 0.999 if e.numel() > 1000 else agree >= 0.99, f"{key}: {agree:.5f} of codes agree"
            elif key.endswith("_scales") or e.dtype == torch.float32:
                assert_close(a, e, **STATE_FP32, msg=key)
            else:  # bf16 moments: one bf16 rounding of nearly equal fp32 values
                assert_close(a.float(), e.float(), atol=1e-12, rtol=2**-7, reason="one bf16 ulp", msg=key)


@pytest.mark.parametrize("fmt", ["fp32", "bf16", "q8", "q4", "fp8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adamw_matches_reference(fmt: str, dtype: torch.dtype, device: str) -> None:
    params, states, p_ref, s_ref = _setup("adam", fmt, dtype, device, amsgrad=True)
    for _ in range(3):
        grads = _grads(params)
        triton_step.adam_step_triton(params, grads, states, **ADAM, amsgrad=True, state_format=fmt)
        adam_step_ref(p_ref, grads, s_ref, **ADAM, amsgrad=True, state_format=fmt)
    _check_params(params, p_ref, quantized=fmt in QUANTIZED)
    _check_states(states, s_ref)
    assert all(s["step"].item() == 3 for s in states)


@pytest.mark.parametrize("fmt", ["q8", "q4"])
def test_adam_coupled_maximize_tensor_lr(fmt: str, device: str) -> None:
    params, states, p_ref, s_ref = _setup("adam", fmt, torch.float16, device)
    kw = {**ADAM, "decoupled": False, "maximize": True, "state_format": fmt}
    for lr in (torch.tensor(3e-3, device=device), torch.tensor(1e-3, device=device)):
        grads = _grads(params)
        triton_step.adam_step_triton(params, grads, states, **{**kw, "lr": lr})
        adam_step_ref(p_ref, grads, s_ref, **{**kw, "lr": lr})
    _check_params(params, p_ref, quantized=fmt in QUANTIZED)
    _check_states(states, s_ref)


def test_master_weights_and_skip_nonfinite(device: str) -> None:
    params = [torch.randn(s, device=device).bfloat16() for s in SIZES]
    states = [init_state(p, "adam", "q8", master=True) for p in params]
    p_ref, s_ref = copy.deepcopy(params), copy.deepcopy(states)
    for it in range(3):
        grads = _grads(params)
        if it == 1:
            grads[2][7] = float("nan")
            grads[4][-1] = float("inf")
        kw = {**ADAM, "state_format": "q8", "skip_nonfinite": True}
        triton_step.adam_step_triton(params, grads, states, **kw)
        adam_step_ref(p_ref, grads, s_ref, **kw)
    _check_params(params, p_ref, quantized=True)
    _check_states(states, s_ref)
    assert [s["skips"].item() for s in states] == [0, 0, 1, 0, 1, 0]
    assert [s["step"].item() for s in states] == [3, 3, 2, 3, 2, 3]
    for p, s in zip(params, states, strict=True):  # the parameter is the master copy rounded to nearest
        assert_exact(p, s["master"].to(torch.bfloat16))


def test_stochastic_round_brackets_and_is_unbiased(device: str) -> None:
    p = torch.full((4096,), 1.0, device=device, dtype=torch.bfloat16)
    st = init_state(p, "sgd", "fp32", momentum=False)
    g = torch.full_like(p, -1.0)
    # w = 1 + 2**-10: an eighth of a bf16 ulp (2**-7 at 1) above 1, so an eighth of the elements round up
    triton_step.sgd_step_triton([p], [g], [st], lr=2**-10, momentum=0.0, dampening=0.0, nesterov=False,
                                weight_decay=0.0, state_format="fp32", stochastic_round=True, seed=3)  # fmt: skip
    up = (p.float() == 1 + 2**-7).float().mean().item()
    assert ((p.float() == 1) | (p.float() == 1 + 2**-7)).all()
    assert 0.09 < up < 0.16


@pytest.mark.parametrize("fmt", ["fp32", "q8", "q4"])
def test_lion_matches_reference(fmt: str, device: str) -> None:
    params, states, p_ref, s_ref = _setup("lion", fmt, torch.float32, device)
    kw = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.99, "weight_decay": 0.1, "state_format": fmt}
    for _ in range(3):
        grads = _grads(params)
        triton_step.lion_step_triton(params, grads, states, **kw)
        lion_step_ref(p_ref, grads, s_ref, **kw)
    _check_params(params, p_ref, quantized=fmt in QUANTIZED)
    _check_states(states, s_ref)


@pytest.mark.parametrize(("fmt", "nesterov", "momentum"), [("fp32", True, 0.9), ("q8", False, 0.9), ("bf16", False, 0)])
def test_sgd_matches_reference(fmt: str, nesterov: bool, momentum: float, device: str) -> None:
    params, states, p_ref, s_ref = _setup("sgd", fmt, torch.float32, device, momentum=momentum != 0)
    kw = {"lr": 1e-2, "momentum": momentum, "dampening": 0.0 if nesterov else 0.1, "nesterov": nesterov,
          "weight_decay": 1e-2, "maximize": True, "state_format": fmt}  # fmt: skip
    for _ in range(3):
        grads = _grads(params)
        triton_step.sgd_step_triton(params, grads, states, **kw)
        sgd_step_ref(p_ref, grads, s_ref, **kw)
    _check_params(params, p_ref, quantized=fmt in QUANTIZED)
    _check_states(states, s_ref)


def test_tables_are_cached(device: str) -> None:
    params, states, _, _ = _setup("adam", "q8", torch.float32, device)
    grads = _grads(params)
    triton_step.adam_step_triton(params, grads, states, **ADAM, state_format="q8")
    before = len(triton_step._LAUNCHES)
    triton_step.adam_step_triton(params, grads, states, **ADAM, state_format="q8")
    assert len(triton_step._LAUNCHES) == before


def test_public_api_dispatches_and_handles_empty(device: str) -> None:
    from tilewise.ops.optim_step import adam_step

    params = [torch.randn(s, device=device) for s in (0, 300)]
    states = [init_state(p, "adam", "q4") for p in params]
    p_ref, s_ref = copy.deepcopy(params), copy.deepcopy(states)
    grads = _grads(params)
    adam_step(params, grads, states, **ADAM, state_format="q4", backend="triton")
    adam_step_ref(p_ref, grads, s_ref, **ADAM, state_format="q4")
    _check_params(params, p_ref, quantized=True)
    _check_states(states, s_ref)
    assert [s["step"].item() for s in states] == [1, 1]


@pytest.mark.parametrize("lr_kind", ["float", "tensor"])
def test_per_tensor_scalars_equal_the_reference(lr_kind: str, device: str) -> None:
    """The step kernel's per-tensor scalars (``_scalar_kernel``: decay, step size, sqrt of the second bias
    correction) equal the reference's bit for bit at every step, for a float and a tensor ``lr``: the step then
    differs from the reference only in the elementwise update."""
    p = torch.randn(300, device=device)
    st = init_state(p, "adam", "fp32")
    lr = 3e-3 if lr_kind == "float" else torch.tensor(3e-3, device=device)
    wd, beta1, beta2 = 0.1, 0.9, 0.999
    for step in range(1, 6):
        lr = lr * 0.9  # a new value each step, as a scheduler gives
        triton_step.adam_step_triton(
            [p], [torch.randn_like(p)], [st], lr=lr, beta1=beta1, beta2=beta2, eps=1e-8, weight_decay=wd,
            state_format="fp32",
        )  # fmt: skip
        sc = next(reversed(triton_step._LAUNCHES.values())).sc[0].cpu()
        bc1 = 1 - beta1**step
        decay, step_size = _lr_terms(lr, wd, bc1)
        expected = [decay, -step_size, (1 - beta2**step) ** 0.5]
        actual = [
            sc[triton_step._SC_DECAY.value],
            sc[triton_step._SC_STEP_SIZE.value],
            sc[triton_step._SC_BC2_SQRT.value],
        ]
        assert_exact(torch.stack(actual), torch.tensor(expected, dtype=torch.float32), msg=f"step {step}")
