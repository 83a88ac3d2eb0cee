"""tilewise.ops.hadamard: the reference against the dense matrix, the Triton kernels against the reference."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tilewise._testing import assert_close, assert_rel_rms, poison_like
from tilewise.ops import hadamard
from tilewise.ops.hadamard.reference import hadamard_ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def dense_hadamard(n: int) -> torch.Tensor:
    """``[n, n]`` float64 Sylvester matrix by Kronecker products: ``H_2n = [[H_n, H_n], [H_n, -H_n]]``."""
    h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.kron(h2, h)
    return h


def triton_fwd(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    from tilewise.ops.hadamard.triton import hadamard_triton_fwd

    return hadamard_triton_fwd(x, out=out)


# ---- the reference is the spec: check it against the definition


@pytest.mark.parametrize("n", [1 << k for k in range(13)])
def test_reference_matches_dense_matrix(n: int) -> None:
    x = torch.randn(5, n, dtype=torch.float64)
    want = x @ dense_hadamard(n) / n**0.5
    assert_close(hadamard_ref(x), want)
    # fp32 input: math in fp32, one butterfly rounding per stage.
    assert_close(hadamard_ref(x.float()), want.float())


def test_reference_matches_kronecker_32768() -> None:
    # The dense 32768^2 matrix is 8 GiB; x @ (H_a ⊗ H_b) = vec(H_a X H_b) with X = x viewed as [a, b].
    a, b = 128, 256
    x = torch.randn(2, a * b, dtype=torch.float64)
    want = (dense_hadamard(a) @ x.view(2, a, b) @ dense_hadamard(b)).reshape(2, -1) / (a * b) ** 0.5
    assert_close(hadamard_ref(x), want)


def test_reference_small_values() -> None:
    assert_close(hadamard_ref(torch.tensor([3.0, 1.0])), torch.tensor([4.0, 2.0]) / 2**0.5)
    assert_close(hadamard_ref(torch.tensor([[1.0, 0.0, 0.0, 0.0]])), torch.full((1, 4), 0.5))
    assert_close(hadamard_ref(torch.tensor([0.0, 1.0, 0.0, 0.0])), torch.tensor([0.5, -0.5, 0.5, -0.5]))


@pytest.mark.parametrize("n", [1, 2, 64, 1024])
def test_self_inverse_and_norm(n: int) -> None:
    x = torch.randn(3, 4, n)
    y = hadamard(x)
    assert_close(hadamard(y), x)
    assert_close(torch.linalg.vector_norm(y, dim=-1), torch.linalg.vector_norm(x, dim=-1))


def test_auto_on_cpu_uses_reference_and_keeps_dtype_and_shape() -> None:
    for dtype in [*DTYPES, torch.float64]:
        x = torch.randn(2, 3, 16).to(dtype)
        y = hadamard(x)
        assert y.dtype == dtype
        assert y.shape == x.shape
        assert torch.equal(y, hadamard_ref(x))


def test_empty_leading_dims() -> None:
    x = torch.randn(0, 3, 8)
    assert hadamard(x).shape == (0, 3, 8)


def test_non_contiguous_input() -> None:
    x = torch.randn(16, 6)[:, :4]  # rows of stride 6
    assert_close(hadamard(x), hadamard(x.contiguous()))


# ---- gradients


def test_gradcheck_reference() -> None:
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: hadamard(t, backend="reference"), (x,))


# ---- bad inputs


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8, torch.bool])
def test_integer_tensor_raises_type_error(dtype: torch.dtype) -> None:
    with pytest.raises(TypeError, match="floating"):
        hadamard(torch.ones(2, 4, dtype=dtype))


@pytest.mark.parametrize("n", [3, 6, 100, 65536])
def test_bad_last_dim_raises_value_error(n: int) -> None:
    with pytest.raises(ValueError, match=f"got {n}"):
        hadamard(torch.zeros(2, n))


def test_zero_last_dim_and_zero_dim_raise() -> None:
    with pytest.raises(ValueError, match="got 0"):
        hadamard(torch.zeros(2, 0))
    with pytest.raises(ValueError, match="0-dim"):
        hadamard(torch.tensor(1.0))


def test_unknown_backend_raises() -> None:
    with pytest.raises(ValueError, match="backend"):
        hadamard(torch.zeros(4), backend="cuda")


@pytest.mark.interpret
def test_triton_rejects_float64(device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.zeros(4, dtype=torch.float64, device=device)
    with pytest.raises(TypeError, match="float64"):
        hadamard(x, backend="triton")
    monkeypatch.setenv("TILEWISE_BACKEND", "triton")
    with pytest.raises(TypeError, match="float64"):
        hadamard(x)


def test_import_and_reference_path_do_not_import_triton() -> None:
    code = (
        "import sys, torch; from tilewise.ops import hadamard; hadamard(torch.ones(2, 8)); "
        "assert 'triton' not in sys.modules and 'tilewise.ops.hadamard.triton' not in sys.modules"
    )
    env = {k: v for k, v in os.environ.items() if k != "TILEWISE_BACKEND"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


# ---- Triton kernels against the reference (interpreter on CPU: small sizes)

INTERPRET_N = [1, 2, 4, 32, 64, 256, 1024]


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", INTERPRET_N)
@pytest.mark.parametrize("shape", [(1,), (7,), (2, 3)])
def test_triton_matches_reference(shape: tuple[int, ...], n: int, dtype: torch.dtype, device: str) -> None:
    x = torch.randn(*shape, n, device=device).to(dtype)
    out = poison_like(x)
    y = triton_fwd(x, out=out)
    assert y is out
    # Same fp32 math in another summation order, one rounding to dtype: the dtype's elementwise tier.
    assert_close(y, hadamard_ref(x))


@pytest.mark.interpret
def test_triton_public_op_and_empty(device: str) -> None:
    x = torch.randn(3, 5, 64, device=device)
    assert_close(hadamard(x, backend="triton"), hadamard_ref(x))
    e = torch.empty(0, 64, device=device)
    assert hadamard(e, backend="triton").shape == (0, 64)


@pytest.mark.interpret
def test_triton_many_tiles(device: str) -> None:
    # More row tiles than persistent programs, and a ragged last tile: every row must be written once.
    x = torch.randn(3 * 4096 // 32 + 5, 32, device=device)
    assert_close(triton_fwd(x, out=poison_like(x)), hadamard_ref(x))


@pytest.mark.interpret
def test_triton_two_pass_large_n(device: str) -> None:
    # n > MAX_FUSED_N runs two kernels (inner transform into an fp32 workspace, then across chunks).
    from tilewise.ops.hadamard.triton import MAX_FUSED_N

    x = torch.randn(1, 2 * MAX_FUSED_N, device=device).to(torch.bfloat16)
    assert_close(triton_fwd(x, out=poison_like(x)), hadamard_ref(x))


@pytest.mark.interpret
def test_triton_backward_matches_reference(device: str) -> None:
    x = torch.randn(7, 64, device=device, requires_grad=True)
    g = torch.randn(7, 64, device=device)
    (gx,) = torch.autograd.grad(hadamard(x, backend="triton"), x, g)
    (gx_ref,) = torch.autograd.grad(hadamard(x, backend="reference"), x, g)
    assert_close(gx, gx_ref)


@pytest.mark.interpret
def test_triton_op_traces_under_compile(device: str) -> None:
    from tilewise.ops.hadamard.triton import hadamard_triton

    torch.library.opcheck(hadamard_triton, (torch.randn(3, 32, device=device),))
    f = torch.compile(lambda t: hadamard(t, backend="triton") * 2, backend="aot_eager", fullgraph=True)
    x = torch.randn(5, 32, device=device)
    assert_close(f(x), 2 * hadamard_ref(x))


# ---- full sizes on the GPU

# Relative RMS error of two transforms, each rounding to dtype (RMS ~0.8 u): 2 u for fp16/bf16. fp32: 4e-6, as
# Hopper tensor cores truncate their fp32 accumulator (measured 1.5-2.1e-6 for n >= 8192 on an H100, < 1e-6 below).
SELF_INVERSE_REL = {torch.float32: 4e-6, torch.float16: 2**-10, torch.bfloat16: 2**-7}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1 << k for k in range(16)])
def test_gpu_triton_matches_reference_all_n(n: int, dtype: torch.dtype) -> None:
    x = torch.randn(37, n, device="cuda").to(dtype)
    y = triton_fwd(x, out=poison_like(x))
    assert_close(y, hadamard_ref(x))
    assert_rel_rms(triton_fwd(y), x, rel=SELF_INVERSE_REL[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("n", [4096, 32768])
def test_gpu_large_rows_int64_offsets(n: int) -> None:
    # rows * n > 2**31 elements (4 GiB of bf16 per tensor): offsets must be 64-bit.
    rows = (1 << 31) // n + 3
    x = torch.randn(rows, n, device="cuda", dtype=torch.bfloat16)
    y = triton_fwd(x, out=poison_like(x))
    tail = slice(rows - 5, rows)
    assert_close(y[tail], hadamard_ref(x[tail]))
    assert bool(torch.isfinite(y).all())
    del x, y
    torch.cuda.empty_cache()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_backward_matches_reference(dtype: torch.dtype) -> None:
    x = torch.randn(33, 4096, device="cuda").to(dtype).requires_grad_()
    g = torch.randn(33, 4096, device="cuda").to(dtype)
    (gx,) = torch.autograd.grad(hadamard(x), x, g)
    assert_close(gx, hadamard_ref(g))
