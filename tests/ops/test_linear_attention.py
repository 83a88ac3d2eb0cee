"""tilewise.ops.linear_attention: the chunked reference against the token-by-token recurrence, the Triton kernels
against the reference (forward and every gradient), the decoding step against the full forward, and the errors."""

from __future__ import annotations

import importlib
import warnings

import pytest
import torch

from tilewise._testing import assert_close, assert_rel_rms, poison_
from tilewise.ops import linear_attention, linear_attention_step
from tilewise.ops.linear_attention.reference import linear_attention_chunked, linear_attention_recurrent

GATES = [None, "head", "scalar", "vector"]
# Relative RMS error allowed between two fp32-math implementations that sum in different orders, by input dtype.
# fp32: both are fp32 throughout; 2e-5 covers a [H] gate's gradient, a sum over every token (cancellation).
# bf16 / fp16: outputs and gradients are rounded to the input dtype (u = 2^-8, 2^-11), so a rounding flip moves an
# element by one ulp; the RMS of that is below u.
REL = {torch.float32: 2e-5, torch.float16: 1e-3, torch.bfloat16: 4e-3}


def make_inputs(
    batch: int,
    seq: int,
    heads: int,
    dk: int,
    dv: int,
    gate: str | None,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    n_states: int | None = None,
) -> dict[str, torch.Tensor | None]:
    """Leaf tensors (requires_grad) for one call: q, k, v, g in log space (decays in [0.37, 1)) and a state."""
    q, k, v = (torch.randn(batch, seq, heads, d, device=device).to(dtype) for d in (dk, dk, dv))
    g = {
        None: None,
        "head": -torch.rand(heads, device=device) * 0.5,
        "scalar": -torch.rand(batch, seq, heads, device=device),
        "vector": -torch.rand(batch, seq, heads, dk, device=device),
    }[gate]
    h0 = torch.randn(batch if n_states is None else n_states, heads, dk, dv, device=device)
    out = {"q": q, "k": k, "v": v, "g": g, "initial_state": h0}
    return {name: None if t is None else t.requires_grad_() for name, t in out.items()}


def forward_and_grads(fn, inputs: dict, cu_seqlens=None, with_final: bool = True, seed: int = 0):
    """``fn(q, k, v, g, initial_state, cu_seqlens) -> (o, final)``; returns o, final and the gradients of a fixed
    random projection of both, in the order of ``inputs`` (None inputs skipped)."""
    o, final = fn(inputs["q"], inputs["k"], inputs["v"], inputs["g"], inputs["initial_state"], cu_seqlens)
    gen = torch.Generator(device=o.device).manual_seed(seed)
    loss = (o.float() * torch.randn(o.shape, generator=gen, device=o.device)).sum()
    if with_final:
        loss = loss + (final * torch.randn(final.shape, generator=gen, device=o.device)).sum()
    leaves = [t for t in inputs.values() if t is not None]
    return o, final, torch.autograd.grad(loss, leaves)


def recurrent(q, k, v, g, h0, cu_seqlens):
    return linear_attention_recurrent(q, k, v, g, None, h0, True, cu_seqlens)


def chunked(q, k, v, g, h0, cu_seqlens):
    return linear_attention_chunked(q, k, v, g, None, h0, True, cu_seqlens)


def assert_all_close(got: tuple, want: tuple, dtype: torch.dtype, names: list[str], rel: float | None = None) -> None:
    rel = REL[dtype] if rel is None else rel
    o, final, grads = got
    o2, final2, grads2 = want
    assert o.dtype == o2.dtype
    assert_rel_rms(o, o2, rel, floor=1e-6, msg="o")
    assert_rel_rms(final, final2, rel, floor=1e-6, msg="final_state")
    for name, a, b in zip(names, grads, grads2, strict=True):
        assert a.dtype == b.dtype, name
        assert_rel_rms(a, b, rel, floor=1e-6, msg=f"d{name}")


def grad_names(inputs: dict) -> list[str]:
    return [name for name, t in inputs.items() if t is not None]


# ---- the reference is the spec: check it against the definition


def test_small_values() -> None:
    # All-ones q, k, v: S_t = t * ones, o_t = q S_t = 4t (Dk = 4, scale 1); with decay 1/2: S_t = 1/2 S_{t-1} + 1.
    ones = torch.ones(1, 3, 1, 4)
    o, final = linear_attention(ones, ones, ones, scale=1.0, output_final_state=True)
    assert_close(o[0, :, 0], torch.tensor([4.0, 8.0, 12.0])[:, None].expand(3, 4))
    assert_close(final, torch.full((1, 1, 4, 4), 3.0))
    g = torch.full((1, 3, 1), -torch.log(torch.tensor(2.0)).item())
    o, _ = linear_attention(ones, ones, ones, g, scale=1.0)
    assert_close(o[0, :, 0, 0], torch.tensor([4.0, 6.0, 7.0]))


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("seq", [1, 63, 64, 500])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_matches_recurrent(seq: int, gate: str | None, dtype: torch.dtype) -> None:
    # One batch row at T=500: the recurrence's autograd graph is a Python loop, slow on CI's 2 cores.
    inputs = make_inputs(1 if seq > 64 else 2, seq, 2, 16, 24, gate, dtype)
    got = forward_and_grads(chunked, inputs)
    want = forward_and_grads(recurrent, inputs)
    assert_all_close(got, want, dtype, grad_names(inputs))


@pytest.mark.parametrize("gate", GATES)
def test_chunked_matches_recurrent_varlen(gate: str | None) -> None:
    # An empty sequence, a single token, one exact chunk, and lengths across chunk edges.
    cu = torch.tensor([0, 0, 1, 65, 128, 300], dtype=torch.int32)
    inputs = make_inputs(1, 300, 2, 16, 8, gate, n_states=5)
    got = forward_and_grads(chunked, inputs, cu)
    want = forward_and_grads(recurrent, inputs, cu)
    assert_all_close(got, want, torch.float32, grad_names(inputs))
    # Each packed sequence is its own batch row.
    lo, hi = 65, 128
    part = {
        name: None if t is None else (t[3:4] if name == "initial_state" else t[:, lo:hi] if t.dim() > 1 else t)
        for name, t in inputs.items()
    }
    o_alone, final_alone = recurrent(part["q"], part["k"], part["v"], part["g"], part["initial_state"], None)
    assert_close(got[0][:, lo:hi], o_alone, rtol=1e-5, reason="chunked vs recurrent summation order")
    assert_close(got[1][3:4], final_alone, rtol=1e-5, reason="chunked vs recurrent summation order")


@pytest.mark.parametrize("gate", ["scalar", "vector"])
def test_strong_decay_stays_finite(gate: str) -> None:
    # Decay e^-40 a token: cumulative log decay reaches -2560 in a chunk; e^{-G} would overflow, e^{G_i-G_j} does not.
    inputs = make_inputs(1, 130, 2, 16, 16, gate)
    inputs["g"] = (inputs["g"].detach() * 0 - 40.0).requires_grad_()
    got = forward_and_grads(chunked, inputs)
    want = forward_and_grads(recurrent, inputs)
    assert_all_close(got, want, torch.float32, grad_names(inputs))


def test_auto_on_cpu_is_the_chunked_reference() -> None:
    inputs = {
        name: t if t is None else t.detach()
        for name, t in make_inputs(2, 70, 2, 16, 8, "scalar", torch.bfloat16).items()
    }
    o, final = linear_attention(**inputs, output_final_state=True)
    o2, final2 = chunked(*inputs.values(), None)
    assert torch.equal(o, o2)
    assert torch.equal(final, final2)
    assert o.dtype == torch.bfloat16
    assert final.dtype == torch.float32
    assert linear_attention(**inputs)[1] is None


# ---- the decoding step


@pytest.mark.parametrize("gate", GATES)
def test_step_chained_equals_forward(gate: str | None) -> None:
    inputs = {name: t if t is None else t.detach() for name, t in make_inputs(2, 37, 3, 8, 12, gate).items()}
    q, k, v, g, h0 = inputs.values()
    o, final = linear_attention(q, k, v, g, initial_state=h0, output_final_state=True, scale=0.7)
    state, outs = h0, []
    for t in range(q.shape[1]):
        g_t = None if g is None else g if g.dim() == 1 else g[:, t]
        o_t, state = linear_attention_step(q[:, t], k[:, t], v[:, t], state, g_t, scale=0.7)
        outs.append(o_t)
    assert_close(torch.stack(outs, 1), o, rtol=1e-5, reason="token steps vs chunks: different summation order")
    assert_close(state, final, rtol=1e-5, reason="token steps vs chunks: different summation order")


def test_step_accepts_one_token_rank4() -> None:
    q, k, v = (torch.randn(2, 1, 3, 8) for _ in range(3))
    g, state = -torch.rand(2, 1, 3), torch.randn(2, 3, 8, 8)
    o, new = linear_attention_step(q, k, v, state, g)
    o3, new3 = linear_attention_step(q[:, 0], k[:, 0], v[:, 0], state, g[:, 0])
    assert o.shape == (2, 1, 3, 8)
    assert torch.equal(o[:, 0], o3)
    assert torch.equal(new, new3)


# ---- errors name the argument


def _qkv(b=1, t=5, h=2, dk=8, dv=8, dtype=torch.float32):
    return torch.randn(b, t, h, dk, dtype=dtype), torch.randn(b, t, h, dk, dtype=dtype), torch.randn(b, t, h, dv)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"q": torch.randn(5, 2, 8)}, "q must be"),
        ({"k": torch.randn(1, 5, 2, 4)}, "k must have q's shape"),
        ({"v": torch.randn(1, 6, 2, 8)}, "v must match q"),
        ({"q": torch.randn(1, 5, 2, 300), "k": torch.randn(1, 5, 2, 300)}, "head dim of q and k"),
        ({"v": torch.randn(1, 5, 2, 8, dtype=torch.float64)}, "v must be float32"),
        ({"v": torch.randn(1, 5, 2, 8).half()}, "share one dtype"),
        ({"g": torch.randn(1, 5, 3)}, "g must have shape"),
        ({"g": torch.ones(2, dtype=torch.int64)}, "g must be a floating"),
        ({"initial_state": torch.randn(2, 2, 8, 8)}, "initial_state must have shape"),
        ({"cu_seqlens": torch.tensor([0, 2, 4], dtype=torch.int32)}, "end at T=5"),
        ({"cu_seqlens": torch.tensor([0, 3, 2, 5], dtype=torch.int32)}, "never decrease"),
        ({"cu_seqlens": torch.tensor([[0, 5]], dtype=torch.int32)}, "cu_seqlens must be a 1-D"),
        ({"cu_seqlens": torch.tensor([0.0, 5.0])}, "cu_seqlens must be a 1-D"),
        ({"backend": "cuda"}, "backend='cuda' is not a backend"),
    ],
)
def test_errors(kwargs: dict, match: str) -> None:
    q, k, v = _qkv()
    args = {"q": q, "k": k, "v": v, **kwargs}
    with pytest.raises(ValueError, match=match):
        linear_attention(**args)


def test_cu_seqlens_needs_batch_one() -> None:
    q, k, v = _qkv(b=2)
    with pytest.raises(ValueError, match="pack the sequences into batch 1"):
        linear_attention(q, k, v, cu_seqlens=torch.tensor([0, 5], dtype=torch.int32))


def test_step_errors() -> None:
    q, k, v = (torch.randn(2, 3, 8) for _ in range(3))
    with pytest.raises(ValueError, match="state must have shape"):
        linear_attention_step(q, k, v, torch.randn(2, 3, 8, 4))
    with pytest.raises(ValueError, match="g must have shape"):
        linear_attention_step(q, k, v, torch.randn(2, 3, 8, 8), g=torch.randn(3, 2))
    with pytest.raises(ValueError, match="one token"):
        linear_attention_step(*(torch.randn(2, 2, 3, 8) for _ in range(3)), torch.randn(2, 3, 8, 8))
    with pytest.raises(TypeError, match=r"q must be a torch\.Tensor"):
        linear_attention_step([1.0], k, v, torch.randn(2, 3, 8, 8))


# ---- Triton against the reference (the interpreter on CPU; small sizes, the interpreter is slow)


def triton_call(q, k, v, g, h0, cu_seqlens):
    return linear_attention(
        q, k, v, g, initial_state=h0, output_final_state=True, cu_seqlens=cu_seqlens, backend="triton"
    )


@pytest.fixture
def poisoned_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every ``torch.empty`` / ``empty_like`` the kernels' host code allocates starts as NaN: an element no kernel
    writes fails the comparison."""
    mod = importlib.import_module("tilewise.ops.linear_attention.triton")

    class PoisonedTorch:
        def __getattr__(self, name):
            return getattr(torch, name)

        @staticmethod
        def empty(*args, **kwargs):
            return poison_(torch.empty(*args, **kwargs))

        @staticmethod
        def empty_like(*args, **kwargs):
            return poison_(torch.empty_like(*args, **kwargs))

    monkeypatch.setattr(mod, "torch", PoisonedTorch())


# (batch, seq, heads, dk, dv, dtype, gate): awkward T, dims that are not powers of two, two K blocks, 16-bit inputs.
# Every gate on the fp32 shapes; the scalar gate (which runs every gated code path) on the rest, to keep CI fast.
TRITON_CASES = [
    *((2, 63, 2, 16, 32, torch.float32, gate) for gate in (None, "head", "scalar")),
    *((1, 130, 1, 100, 48, torch.float32, gate) for gate in (None, "head", "scalar")),
    (1, 1, 2, 8, 16, torch.float32, "scalar"),
    (2, 70, 2, 32, 32, torch.bfloat16, None),
    (2, 70, 2, 32, 32, torch.bfloat16, "scalar"),
    (1, 65, 2, 32, 16, torch.float16, "scalar"),
    # Neighbours of the fp16 case above, which gave garbage o on an H100 (triton 3.6) though its fp16 operands stay
    # below 18 (test_triton_fp16_dot_operands): on a GPU they tell a dtype problem (fp16 Dv=32 fails too) from a
    # 16-wide tile problem (bf16 Dv=16 fails too) and from the gate (no gate fails too).
    (1, 65, 2, 32, 16, torch.bfloat16, "scalar"),
    (1, 65, 2, 32, 32, torch.float16, "scalar"),
    (1, 65, 2, 32, 16, torch.float16, None),
]


def _triton_rel(dtype: torch.dtype, device: str) -> float:
    if device == "cpu":
        # Triton's interpreter converts fp32 to bf16 by truncation (measured: twice round-to-nearest's mean error).
        return 8e-3 if dtype == torch.bfloat16 else REL[dtype]
    # The GPU kernels multiply in the input dtype (q·k, gated k, the fp32 state rounded for q h_n), as fla does;
    # fp32 uses IEEE dots whose reductions run in another order than cuBLAS's.
    return {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 2e-2}[dtype]


@pytest.mark.interpret
@pytest.mark.usefixtures("poisoned_empty")
@pytest.mark.parametrize("case", TRITON_CASES, ids=lambda c: "-".join(map(str, c)).replace("torch.", ""))
def test_triton_matches_reference(case: tuple, device: str) -> None:
    *shape, dtype, gate = case
    inputs = make_inputs(*shape, gate, dtype, device)
    got = forward_and_grads(triton_call, inputs)
    want = forward_and_grads(chunked, inputs)
    assert_all_close(got, want, dtype, grad_names(inputs), _triton_rel(dtype, device))


@pytest.mark.interpret
@pytest.mark.usefixtures("poisoned_empty")
@pytest.mark.parametrize("gate", [None, "scalar"])
def test_triton_varlen(gate: str | None, device: str) -> None:
    cu = torch.tensor([0, 0, 1, 64, 130, 200], dtype=torch.int32, device=device)
    inputs = make_inputs(1, 200, 2, 16, 16, gate, device=device, n_states=5)
    got = forward_and_grads(triton_call, inputs, cu)
    want = forward_and_grads(chunked, inputs, cu)
    assert_all_close(got, want, torch.float32, grad_names(inputs))


@pytest.fixture
def fp16_dots(monkeypatch: pytest.MonkeyPatch, device: str) -> None:
    """On CPU, give the interpreted kernels fp16 ``tl.dot`` operands for fp16 inputs, as the GPU does (the
    interpreter's fp16 dot multiplies the rounded operands and sums in fp32, like the tensor cores); without this the
    interpreter uses fp32 operands and never sees fp16 rounding or range. On CUDA the kernels are left as they are."""
    if device == "cuda":
        return
    mod = importlib.import_module("tilewise.ops.linear_attention.triton")
    tl = importlib.import_module("triton.language")
    dot_args = mod._dot_args
    monkeypatch.setattr(
        mod,
        "_dot_args",
        lambda dtype, dev: {"DOT": tl.float16, "PREC": "ieee"} if dtype == torch.float16 else dot_args(dtype, dev),
    )


# (batch, seq, heads, dk, dv, gate, log decay a token or None for make_inputs' own). Measured relative RMS errors of
# dg with fp16 operands (CPU interpreter, before -> after dg was cut at chunk ends, see the dq/dk kernel): head gate
# 3.1e-2 -> 1.7e-4; g = -5 a token 3.9e-2 -> 2.6e-4; the H100-failing shape 2.4e-3 -> 1.9e-4. Every other tensor
# 3e-4 to 4e-4 (fp16's unit roundoff is 4.9e-4).
FP16_DOT_CASES = [
    (1, 65, 2, 32, 16, "scalar", None),
    (2, 200, 2, 32, 32, "head", None),
    (1, 130, 2, 32, 16, "scalar", -5.0),
    # e^-40 a token: decays reach e^-2560 in a chunk; the gated operands underflow to fp16 subnormals and zeros.
    (1, 130, 2, 32, 16, "scalar", -40.0),
]


@pytest.mark.interpret
@pytest.mark.usefixtures("poisoned_empty", "fp16_dots")
@pytest.mark.parametrize("case", FP16_DOT_CASES, ids=lambda c: "-".join(map(str, c)))
def test_triton_fp16_dot_operands(case: tuple, device: str) -> None:
    *shape, gate, log_decay = case
    inputs = make_inputs(*shape, gate, torch.float16, device)
    if log_decay is not None:
        inputs["g"] = torch.full_like(inputs["g"], log_decay).requires_grad_()
    got = forward_and_grads(triton_call, inputs)
    want = forward_and_grads(chunked, inputs)
    # The GPU's fp16 bound: the kernels' only fp16 roundings are dot operands and outputs.
    assert_all_close(got, want, torch.float16, grad_names(inputs), _triton_rel(torch.float16, "cuda"))


@pytest.mark.interpret
def test_triton_without_state_or_final(device: str) -> None:
    inputs = make_inputs(1, 70, 2, 16, 16, "scalar", device=device)
    inputs["initial_state"] = None
    q, k, v, g, _ = inputs.values()
    o, final = linear_attention(q, k, v, g, backend="triton")
    assert final is None
    o.float().sum().backward()
    o2, _ = linear_attention_chunked(q, k, v, g, None, None, False, None)
    assert_rel_rms(o, o2, REL[torch.float32])


@pytest.mark.interpret
def test_triton_empty_sequence(device: str) -> None:
    q, k, v = (torch.randn(2, 0, 2, 16, device=device) for _ in range(3))
    h0 = torch.randn(2, 2, 16, 16, device=device)
    o, final = linear_attention(q, k, v, initial_state=h0, output_final_state=True, backend="triton")
    assert o.shape == (2, 0, 2, 16)
    assert_close(final, h0)


@pytest.fixture
def tuning(monkeypatch: pytest.MonkeyPatch) -> dict:
    """The Triton module's launch choices (``TUNING``), restored after the test."""
    mod = importlib.import_module("tilewise.ops.linear_attention.triton")
    monkeypatch.setattr(mod, "TUNING", dict(mod.TUNING))
    return mod.TUNING


# The other launch paths, each forced at small sizes: the fused one-pass forward (which the size rule only picks with
# >= 64 programs), and one wide tile per feature dim for the gradient kernels (Dk = 100: one 128 tile, masked).
FUSED_CASES = [
    (2, 63, 2, 16, 32, torch.float32, None),
    (1, 130, 1, 100, 48, torch.float32, "head"),
    (1, 130, 2, 32, 32, torch.float32, "scalar"),
    (2, 70, 2, 32, 32, torch.bfloat16, None),
    (1, 65, 2, 32, 16, torch.bfloat16, "scalar"),
]


@pytest.mark.interpret
@pytest.mark.usefixtures("poisoned_empty")
@pytest.mark.parametrize("case", FUSED_CASES, ids=lambda c: "-".join(map(str, c)).replace("torch.", ""))
def test_triton_fused_forward_and_wide_tiles(case: tuple, device: str, tuning: dict) -> None:
    tuning.update(fused_min_programs=1, bwd_bk=128, bwd_bv=128)
    test_triton_matches_reference(case, device)


# The fused backward (no gate; opt-in until timed on a GPU), forced at small sizes: awkward T, two K blocks
# (Dk = 100), Dv not a power of two, fp32 and bf16, with an initial state and a used final state (make_inputs).
FUSED_BWD_CASES = [
    (2, 63, 2, 16, 32, torch.float32),
    (1, 130, 1, 100, 48, torch.float32),
    (1, 1, 2, 32, 32, torch.float32),
    (2, 70, 2, 32, 32, torch.bfloat16),
]


@pytest.mark.interpret
@pytest.mark.usefixtures("poisoned_empty")
@pytest.mark.parametrize("case", FUSED_BWD_CASES, ids=lambda c: "-".join(map(str, c)).replace("torch.", ""))
def test_triton_fused_backward(case: tuple, device: str, tuning: dict) -> None:
    tuning.update(fused_bwd=True, fused_min_programs=1)
    *shape, dtype = case
    test_triton_matches_reference((*shape, dtype, None), device)


@pytest.mark.interpret
@pytest.mark.usefixtures("poisoned_empty")
def test_triton_fused_backward_varlen_and_unused_state(device: str, tuning: dict) -> None:
    """Packed sequences; then no initial state and an unused final state (no dht, no dh0)."""
    tuning.update(fused_bwd=True, fused_min_programs=1)
    mod = importlib.import_module("tilewise.ops.linear_attention.triton")
    cu = torch.tensor([0, 0, 1, 64, 130, 200], dtype=torch.int32, device=device)
    inputs = make_inputs(1, 200, 2, 16, 16, None, device=device, n_states=5)
    assert_all_close(
        forward_and_grads(triton_call, inputs, cu),
        forward_and_grads(chunked, inputs, cu),
        torch.float32,
        grad_names(inputs),
    )
    calls = []
    real = mod._states
    mod._states = lambda *a, **kw: calls.append(1) or real(*a, **kw)
    try:
        inputs = make_inputs(2, 90, 2, 32, 32, None, device=device)
        inputs["initial_state"] = None
        got = forward_and_grads(triton_call, inputs, with_final=False)
    finally:
        mod._states = real
    assert not calls  # neither pass stored chunk states
    want = forward_and_grads(chunked, inputs, with_final=False)
    assert_all_close(got, want, torch.float32, grad_names(inputs))


@pytest.mark.interpret
@pytest.mark.usefixtures("poisoned_empty")
def test_triton_fused_forward_varlen(device: str, tuning: dict) -> None:
    tuning.update(fused_min_programs=1)
    cu = torch.tensor([0, 0, 1, 64, 130, 200], dtype=torch.int32, device=device)
    inputs = make_inputs(1, 200, 2, 16, 16, "scalar", device=device, n_states=5)
    got = forward_and_grads(triton_call, inputs, cu)
    want = forward_and_grads(chunked, inputs, cu)
    assert_all_close(got, want, torch.float32, grad_names(inputs))


@pytest.mark.interpret
def test_triton_fused_forward_is_taken_and_matches_split(device: str, tuning: dict) -> None:
    """The fused pass is what runs when forced (no chunk-state kernel launched) and gives the split path's o and
    final state; without an initial state and on an empty sequence too."""
    mod = importlib.import_module("tilewise.ops.linear_attention.triton")
    q, k, v = (torch.randn(2, 100, 2, 32, device=device) for _ in range(3))
    g = -torch.rand(2, 100, 2, device=device)
    tuning.update(fused_fwd=False)
    o_split, h_split = mod.linear_attention_fwd(q, k, v, g, None, None, 0.5)
    tuning.update(fused_fwd=True, fused_min_programs=1)
    calls = []
    real = mod._states
    mod._states = lambda *a, **kw: calls.append(1) or real(*a, **kw)
    try:
        o_fused, h_fused = mod.linear_attention_fwd(q, k, v, g, None, None, 0.5)
        empty = torch.empty(2, 0, 2, 32, device=device)
        h0 = torch.randn(2, 2, 32, 32, device=device)
        o_empty, h_empty = mod.linear_attention_fwd(empty, empty, empty, None, h0, None, 1.0)
    finally:
        mod._states = real
    assert not calls
    assert_rel_rms(o_fused, o_split, REL[torch.float32])
    assert_rel_rms(h_fused, h_split, REL[torch.float32])
    assert o_empty.shape == (2, 0, 2, 32)
    assert_close(h_empty, h0)


@pytest.mark.interpret
@pytest.mark.parametrize("gate", [None, "scalar", "vector"])
def test_triton_eager_function_equals_custom_op(gate: str | None, device: str, monkeypatch) -> None:
    """Eager calls take a plain autograd.Function, torch.compile the custom op: the same host functions, so the
    same bits, with and without a used final state."""
    mod = importlib.import_module("tilewise.ops.linear_attention.triton")
    inputs = make_inputs(1, 70, 2, 16, 16, gate, device=device)
    results = []
    for via_op in (False, True):
        monkeypatch.setattr(mod, "EAGER_VIA_CUSTOM_OP", via_op)
        o, final, grads = forward_and_grads(triton_call, inputs)
        q, k, v, g, h0 = inputs.values()
        o2, _ = linear_attention(q, k, v, g, initial_state=h0, backend="triton")  # final state unused
        grads2 = torch.autograd.grad(o2.float().sum(), [t for t in (q, k, v, g, h0) if t is not None])
        results.append([o, final, *grads, o2, *grads2])
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


# Vector gate g [B, T, H, Dk] (GLA), against the token-by-token recurrence: T in {1, 63, 64, 130}, Dk and Dv in
# {16, 32} (tiles padded to 32), two K blocks (Dk = 100), fp32 and bf16; every case with an initial and a final state.
VECTOR_CASES = [
    (1, 1, 2, 16, 16, torch.float32),
    (2, 63, 1, 16, 32, torch.float32),
    (1, 64, 2, 32, 16, torch.bfloat16),
    (1, 130, 1, 32, 32, torch.float32),
    (1, 130, 1, 16, 32, torch.bfloat16),
    (1, 65, 1, 100, 48, torch.float32),
]


@pytest.mark.interpret
@pytest.mark.usefixtures("poisoned_empty")
@pytest.mark.parametrize("case", VECTOR_CASES, ids=lambda c: "-".join(map(str, c)).replace("torch.", ""))
def test_triton_vector_gate_matches_recurrent(case: tuple, device: str) -> None:
    *shape, dtype = case
    inputs = make_inputs(*shape, "vector", dtype, device)
    got = forward_and_grads(triton_call, inputs)
    want = forward_and_grads(recurrent, inputs)
    assert_all_close(got, want, dtype, grad_names(inputs), _triton_rel(dtype, device))


@pytest.mark.interpret
@pytest.mark.usefixtures("poisoned_empty")
@pytest.mark.parametrize("log_decay", [-1.9, -5.0, -40.0])
def test_triton_vector_gate_strong_decay(log_decay: float, device: str) -> None:
    # e^-5 a token: a chunk decays by e^-320, far past fp32's range if e^{-G} were ever formed. One key dim decays
    # slowly (-0.01) so the state keeps something to check. -1.9 a token: a half chunk spans 31 * 1.9 = 58.9, just
    # inside GATE_SPAN, so its within-half sums take the dot around the half's first row with factors up to e^59;
    # -5 and -40 take the row-by-row sums.
    inputs = make_inputs(1, 130, 2, 32, 16, "vector", device=device)
    g = torch.full_like(inputs["g"], log_decay)
    g[..., 0] = -0.01
    inputs["g"] = g.requires_grad_()
    got = forward_and_grads(triton_call, inputs)
    want = forward_and_grads(recurrent, inputs)
    for t in (got[0], got[1], *got[2]):
        assert torch.isfinite(t).all()
    assert_all_close(got, want, torch.float32, grad_names(inputs), _triton_rel(torch.float32, device))


@pytest.mark.interpret
@pytest.mark.usefixtures("poisoned_empty")
def test_triton_vector_gate_varlen(device: str) -> None:
    cu = torch.tensor([0, 0, 1, 70, 100], dtype=torch.int32, device=device)
    inputs = make_inputs(1, 100, 1, 16, 16, "vector", device=device, n_states=4)
    got = forward_and_grads(triton_call, inputs, cu)
    want = forward_and_grads(recurrent, inputs, cu)
    assert_all_close(got, want, torch.float32, grad_names(inputs), _triton_rel(torch.float32, device))


@pytest.mark.interpret
def test_triton_vector_gate_without_state_or_final(device: str) -> None:
    inputs = make_inputs(1, 70, 2, 16, 16, "vector", device=device)
    q, k, v, g, _ = inputs.values()
    o, final = linear_attention(q, k, v, g, backend="triton")
    assert final is None
    grads = torch.autograd.grad(o.sum(), (q, k, v, g))
    o2, _ = linear_attention_recurrent(q, k, v, g, None, None, False, None)
    grads2 = torch.autograd.grad(o2.sum(), (q, k, v, g))
    assert_rel_rms(o, o2, REL[torch.float32])
    for name, a, b in zip("qkvg", grads, grads2, strict=True):
        assert_rel_rms(a, b, REL[torch.float32], msg=f"d{name}")


@pytest.mark.interpret
def test_triton_vector_gate_dispatch(device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The vector gate dispatches like the other gates (its kernel passed the GPU tests): auto takes Triton for CUDA
    tensors and the reference for CPU tensors, without a warning."""
    q, k, v = (t.to(device) for t in _qkv())
    g = -torch.rand(1, 5, 2, 8, device=device)
    ref = linear_attention_chunked(q, k, v, g)[0]
    assert_rel_rms(linear_attention(q, k, v, g, backend="triton")[0], ref, REL[torch.float32])
    mod = importlib.import_module("tilewise.ops.linear_attention.triton")
    ran = []
    real = mod.linear_attention_triton
    monkeypatch.setattr(mod, "linear_attention_triton", lambda *a, **kw: ran.append(1) or real(*a, **kw))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        o, _ = linear_attention(q, k, v, g)
    assert ran == ([1] if device == "cuda" else [])
    assert_rel_rms(o, ref, REL[torch.float32])


@pytest.mark.interpret
@pytest.mark.parametrize("gate", ["scalar", "vector"])
def test_triton_opcheck(gate: str, device: str) -> None:
    mod = importlib.import_module("tilewise.ops.linear_attention.triton")

    inputs = make_inputs(1, 20, 1, 16, 16, gate, device=device)
    args = (inputs["q"], inputs["k"], inputs["v"], inputs["g"], inputs["initial_state"], None, 0.25)
    torch.library.opcheck(
        mod._chunk_op, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration")
    )


# ---- GPU only: real sizes


@pytest.mark.gpu
@pytest.mark.parametrize("gate", [None, "head", "scalar", "vector"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_matches_reference_gpu(gate: str | None, dtype: torch.dtype) -> None:
    inputs = make_inputs(2, 2048 + 17, 4, 128, 128, gate, dtype, "cuda")
    got = forward_and_grads(triton_call, inputs)
    want = forward_and_grads(chunked, inputs)
    # bf16: products in bf16 (state rounded to bf16 before q h_n), as fla does.
    assert_all_close(got, want, dtype, grad_names(inputs), 2e-2 if dtype == torch.bfloat16 else 1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("gate", [None, "scalar"])
@pytest.mark.parametrize("path", ["fused", "split", "gated-16-bit-states", "fused-backward"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_launch_paths_gpu(gate: str | None, path: str, dtype: torch.dtype, tuning: dict) -> None:
    """Both forward paths and both gradient tile widths at a real size (the size rule picks one of each), and the
    gated kernels reading 16-bit chunk states."""
    if path == "fused":
        tuning.update(fused_fwd=True, fused_min_programs=1, bwd_bk=128, bwd_bv=128, fused_bwd=False)
    elif path == "split":
        tuning.update(
            fused_fwd=False,
            bwd_bk=64,
            bwd_bv=64,
            low_precision_states=False,
            gated_low_precision_states=False,
            fused_bwd=False,
        )
    elif path == "fused-backward":
        tuning.update(fused_bwd=True, fused_min_programs=1)
    else:
        tuning.update(gated_low_precision_states=True)
    inputs = make_inputs(2, 2048 + 17, 4, 128, 128, gate, dtype, "cuda")
    got = forward_and_grads(triton_call, inputs)
    want = forward_and_grads(chunked, inputs)
    # As test_triton_matches_reference_gpu: bf16 products in bf16; fp32 IEEE dots summed in another order.
    assert_all_close(got, want, dtype, grad_names(inputs), 2e-2 if dtype == torch.bfloat16 else 1e-4)


@pytest.mark.gpu
def test_triton_varlen_gpu() -> None:
    cu = torch.tensor([0, 1, 700, 2048, 2048, 5000], dtype=torch.int32, device="cuda")
    inputs = make_inputs(1, 5000, 4, 64, 128, "scalar", torch.bfloat16, "cuda", n_states=5)
    got = forward_and_grads(triton_call, inputs, cu)
    want = forward_and_grads(chunked, inputs, cu)
    assert_all_close(got, want, torch.bfloat16, grad_names(inputs), 2e-2)


@pytest.mark.gpu
def test_triton_compiles_gpu() -> None:
    inputs = {
        name: t if t is None else t.detach()
        for name, t in make_inputs(2, 300, 2, 64, 64, "scalar", device="cuda").items()
    }
    fn = torch.compile(lambda q, k, v, g, h0: triton_call(q, k, v, g, h0, None), fullgraph=True)
    o, final = fn(*inputs.values())
    o2, final2 = chunked(*inputs.values(), None)
    assert_rel_rms(o, o2, 1e-4)
    assert_rel_rms(final, final2, 1e-4)
