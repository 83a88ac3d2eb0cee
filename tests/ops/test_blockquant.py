"""tilewise.ops.blockquant: the Triton kernels against the reference, bit for bit (nearest rounding), and the
stochastic rounding of both backends in distribution.

``interpret`` tests run the kernels on the GPU when there is one, else on the CPU in Triton's interpreter.
"""

from __future__ import annotations

import math

import pytest
import torch

from tilewise._testing import assert_exact, poison_
from tilewise.ops.blockquant import dequantize_blockwise, quantize_blockwise
from tilewise.ops.blockquant.reference import (
    dequantize_blockwise_ref,
    midpoints,
    quantize_blockwise_ref,
    unpack_nibbles,
)
from tilewise.quant.codebooks import codebook, codebook_bits, codebook_names

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BLOCKS = [32, 64, 256, 4096]
SIZES = [0, 1, 2, 3, 31, 255, 256, 257, 1000, 4099]
NAMES = codebook_names()


@pytest.fixture
def poisoned(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every ``torch.empty`` in the test comes back poisoned (NaN / 255), so an element a kernel leaves unwritten
    fails the exact comparison instead of passing on stale memory that held the right answer."""
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison_(empty(*a, **k)))


def triton_ops():
    from tilewise.ops.blockquant.triton import dequantize_blockwise_triton, quantize_blockwise_triton

    return quantize_blockwise_triton, dequantize_blockwise_triton


def sample(n: int, dtype: torch.dtype, device: str, block: int = 64) -> torch.Tensor:
    """Normal values whose magnitude changes from block to block (1e-3 .. 1e3), with an all-zero block."""
    x = torch.randn(n, dtype=torch.float64)
    nb = -(-n // block)
    x *= (10.0 ** torch.empty(nb, dtype=torch.float64).uniform_(-3, 3)).repeat_interleave(block)[:n]
    if nb > 2:
        x[block : 2 * block] = 0.0
    return x.to(dtype=dtype, device=device)


def check(x: torch.Tensor, code: torch.Tensor, block: int, bits: int, out_dtype: torch.dtype | None = None) -> None:
    """Triton quantize and dequantize equal the reference exactly on ``x``."""
    quantize, dequantize = triton_ops()
    q, s = quantize(x, code, block, bits=bits)
    qr, sr = quantize_blockwise_ref(x, code, block, bits=bits)
    assert_exact(s, sr, msg="scales")
    assert_exact(q, qr, msg="codes")
    dtype = out_dtype or x.dtype
    y = dequantize(q, s, code, block, x.numel(), bits=bits, dtype=dtype)
    assert_exact(y, dequantize_blockwise_ref(qr, sr, code, block, x.numel(), bits=bits, dtype=dtype), msg="dequant")


# ---- exact agreement with the reference


@pytest.mark.interpret
@pytest.mark.usefixtures("poisoned")
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_matches_reference(name: str, dtype: torch.dtype, block: int, device: str) -> None:
    code, bits = codebook(name), codebook_bits(name)
    for n in SIZES:
        check(sample(n, dtype, device, block), code, block, bits)


@pytest.mark.interpret
@pytest.mark.usefixtures("poisoned")
@pytest.mark.parametrize("shape", [(3, 5, 7), (2, 1000), (64, 33), (1, 1, 1)])
@pytest.mark.parametrize("name", ["int8", "dynamic8", "nf4", "fp4"])
def test_multidim_and_output_dtypes(name: str, shape: tuple[int, ...], device: str) -> None:
    code, bits = codebook(name), codebook_bits(name)
    x = torch.randn(shape, device=device)
    for out_dtype in DTYPES:
        check(x, code, 64, bits, out_dtype)


@pytest.mark.interpret
@pytest.mark.parametrize("name", NAMES)
def test_exact_ties(name: str, device: str) -> None:
    """Elements placed exactly on every scaled threshold fp32(s * mid[j]) (a tie takes the lower code) and one
    ulp either side of it, for a few scales."""
    code, bits = codebook(name), codebook_bits(name)
    mids = midpoints(code)
    for s in (1.0, 1.2345678, 3.3e-5, 7.5e4):
        t = torch.tensor(s, dtype=torch.float32) * mids  # fp32(s * mid[j]), as the rule computes it
        x = torch.cat([torch.tensor([s]), t, t.nextafter(t + 1), t.nextafter(t - 1)])
        check(x.to(device), code, 4096, bits)
        check(x.flip(0).contiguous().to(device), code, 1024, bits)


@pytest.mark.interpret
@pytest.mark.parametrize("name", ["int8", "dynamic8", "udynamic8", "fp8_e5m2", "nf4", "ulinear4"])
def test_extreme_scales(name: str, device: str) -> None:
    """Huge and tiny blocks, subnormal inputs; scales below 2**-90 take the binary search (mixed in one tile)."""
    code, bits = codebook(name), codebook_bits(name)
    base = torch.randn(4 * 256, dtype=torch.float64)
    for mags in ([3e38, 1e30, 1.0, 1e-20], [1e-28, 1e-30, 1e-38, 1e-44], [1.0, 1e-27, 5e-45, 1e-3]):
        x = (base * torch.tensor(mags, dtype=torch.float64).repeat_interleave(256)).clamp(-3.4e38, 3.4e38)
        check(x.to(torch.float32).to(device), code, 256, bits)
        check(x.to(torch.float32).to(device), code, 32, bits)


@pytest.mark.interpret
@pytest.mark.parametrize("name", ["udynamic8", "ulinear4"])
def test_negative_inputs_to_unsigned_codebook(name: str, device: str) -> None:
    code, bits = codebook(name), codebook_bits(name)
    x = -torch.rand(1000, device=device)
    x[::7] *= -1
    check(x, code, 64, bits)
    q, _ = triton_ops()[0](-torch.rand(64, device=device), code, 64, bits=bits)
    idx = unpack_nibbles(q, 64) if bits == 4 else q
    assert int(idx.max()) == 0, "values below the codebook's range take code 0"


@pytest.mark.interpret
@pytest.mark.parametrize(
    ("values", "bits"),
    [
        # a cluster of 56 values 1e-6 apart: no cell grid resolves it, so the plan is the binary search
        (torch.cat([torch.linspace(-1, 1, 200), 0.5 + 1e-6 * torch.arange(1, 57)]).sort().values, 8),
        (torch.tensor([-1.0, -0.3, 0.0, 0.2, 1.0]), 4),  # K = 5: padded tables
        (torch.tensor([-0.75, 0.25]), 4),  # K = 2
        (torch.linspace(-1, 1, 100), 8),
    ],
    ids=["cluster", "k5", "k2", "linear100"],
)
def test_custom_codebooks(values: torch.Tensor, bits: int, device: str) -> None:
    from tilewise.ops.blockquant.triton import _plan

    x = sample(3000, torch.float32, device)
    check(x, values, 64, bits)
    check(x, values.to(device), 256, bits)  # a codebook on the device: cached by storage
    if values.numel() == 256:
        assert _plan(values, bits, x.device).search == 0


@pytest.mark.interpret
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's inf * 0
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_finite_raises(bad: float, dtype: torch.dtype, device: str) -> None:
    quantize, _ = triton_ops()
    x = torch.randn(1000, dtype=dtype, device=device)
    x[700] = bad
    with pytest.raises(ValueError, match="quantize: input contains NaN or inf"):
        quantize(x, codebook("int8"), 256, bits=8)
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize(x, codebook("nf4"), 64, bits=4)
    # NaN with larger finite values in the same block still makes the scale non-finite
    x = torch.full((64,), 5.0, dtype=dtype, device=device)
    x[3] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize(x, codebook("dynamic8"), 64, bits=8)


@pytest.mark.interpret
def test_public_dispatch_uses_the_kernels(device: str) -> None:
    x = sample(2000, torch.bfloat16, device)
    code = codebook("nf4")
    q, s = quantize_blockwise(x, code, 64, bits=4, backend="triton")
    qr, sr = quantize_blockwise(x, code, 64, bits=4, backend="reference")
    assert_exact(q, qr)
    assert_exact(s, sr)
    y = dequantize_blockwise(q, s, code, 64, x.numel(), bits=4, dtype=torch.bfloat16, backend="triton")
    assert_exact(y, dequantize_blockwise(qr, sr, code, 64, x.numel(), bits=4, dtype=torch.bfloat16))


@pytest.mark.interpret
def test_dequantize_codes_past_the_codebook_stay_in_bounds(device: str) -> None:
    # int4 has 15 values: nibble 15 is never written by quantize; it must not read past the table
    _, dequantize = triton_ops()
    codes = torch.full((8,), 0xFF, dtype=torch.uint8, device=device)
    y = dequantize(codes, torch.ones(1, device=device), codebook("int4"), 32, 16, bits=4)
    assert bool(torch.isfinite(y).all())


# ---- stochastic rounding: unbiased, between the two neighbours


def neighbours(x: torch.Tensor, code: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The spec's ``fp32(s * c[lo])`` and ``fp32(s * c[hi])`` of every element of the 1-D fp32 ``x``."""
    s = x.view(-1, block).abs().amax(1, keepdim=True)
    s = torch.where(s > 0, s, torch.ones_like(s))
    levels = (s * code.to(x.device)).contiguous()
    lo = (torch.searchsorted(levels, x.view(-1, block), side="right") - 1).clamp(0, code.numel() - 1)
    hi = (lo + 1).clamp(max=code.numel() - 1)
    return levels.gather(1, lo).view(-1), levels.gather(1, hi).view(-1)


@pytest.mark.interpret
@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("name", ["int4", "nf4", "dynamic8"])
def test_stochastic_is_unbiased(name: str, backend: str, device: str) -> None:
    code, bits = codebook(name), codebook_bits(name)
    block, draws = 64, 512
    x = torch.randn(block, device=device)
    xs = x.repeat(draws)  # every block holds the same values: one call makes `draws` independent roundings
    kw = {"seed": 7} if backend == "triton" else {"generator": torch.Generator(device).manual_seed(7)}
    q, s = quantize_blockwise(xs, code, block, bits=bits, stochastic=True, backend=backend, **kw)
    y = dequantize_blockwise(q, s, code, block, xs.numel(), bits=bits, backend=backend).view(draws, block)
    v_lo, v_hi = neighbours(x, code, block)
    # every draw is one of the two neighbours, up with probability (x - v_lo) / (v_hi - v_lo)
    assert bool(((y == v_lo) | (y == v_hi)).all())
    gap = v_hi - v_lo
    err = (y.double().mean(0) - x.double()).abs()
    # 5 standard deviations of a mean of `draws` Bernoulli(p) steps of size gap (p(1-p) <= 1/4)
    bound = 5 * gap.double() / (2 * math.sqrt(draws)) + 1e-7
    assert bool((err <= bound).all()), f"max |mean - x| / bound = {float((err / bound).max()):.2f}"


@pytest.mark.interpret
def test_stochastic_seed_is_deterministic(device: str) -> None:
    quantize, _ = triton_ops()
    x, code = torch.randn(4096, device=device), codebook("int8")
    a, _ = quantize(x, code, 256, bits=8, stochastic=True, seed=1)
    b, _ = quantize(x, code, 256, bits=8, stochastic=True, seed=1)
    c, _ = quantize(x, code, 256, bits=8, stochastic=True, seed=2)
    assert_exact(a, b)
    assert not torch.equal(a, c)


# ---- large sizes on the GPU


@pytest.mark.gpu
@pytest.mark.parametrize("name", NAMES)
def test_large_matches_reference_gpu(name: str) -> None:
    code, bits = codebook(name), codebook_bits(name)
    x = torch.randn((1 << 26) + 12345, device="cuda", dtype=torch.bfloat16) * 3
    for block in (64, 256, 4096):
        check(x, code, block, bits)


@pytest.mark.gpu
def test_more_than_2_31_elements_gpu() -> None:
    """int64 offsets: 2**31 + 4099 fp16 elements (about 11 GB with codes and output). Blocks are independent, so
    slices of the result are checked against the reference on the same slices, around 2**31 too."""
    free, _ = torch.cuda.mem_get_info()
    if free < 16 * 2**30:
        pytest.skip(f"needs 16 GiB of free GPU memory, {free / 2**30:.1f} GiB free")
    quantize, dequantize = triton_ops()
    n, block, code = (1 << 31) + 4099, 256, codebook("int8")
    x = torch.randn(n, device="cuda", dtype=torch.float16)
    q, s = quantize(x, code, block, bits=8)
    y = dequantize(q, s, code, block, n, bits=8, dtype=torch.float16)
    for start in (0, (1 << 31) - (1 << 20), n - (1 << 20) - 3):
        a = start // block * block
        b = min(a + (2 << 20), n)
        qr, sr = quantize_blockwise_ref(x[a:b], code, block, bits=8)
        assert_exact(q[a:b], qr, msg=f"codes at {a}")
        assert_exact(s[a // block : -(-b // block)], sr, msg=f"scales at {a}")
        assert_exact(y[a:b], dequantize_blockwise_ref(qr, sr, code, block, b - a, dtype=torch.float16))


def test_ops_compile_without_graph_breaks():
    """quantize/dequantize are torch.library ops: torch.compile(fullgraph=True) keeps them as single nodes."""
    from tilewise.ops.blockquant import dequantize_blockwise, quantize_blockwise
    from tilewise.quant import codebook

    code = codebook("nf4")

    def round_trip(x):
        codes, scales = quantize_blockwise(x, code, 64, bits=4, backend="reference")
        return dequantize_blockwise(codes, scales, code, 64, x.numel(), bits=4, backend="reference") * 2

    x = torch.randn(1000)
    compiled = torch.compile(round_trip, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x), round_trip(x))


def test_opcheck_blockquant_ops():
    from tilewise.quant import codebook

    x = torch.randn(300)
    for bits, name in ((8, "dynamic8"), (4, "nf4")):
        code = codebook(name)
        torch.library.opcheck(torch.ops.tilewise.quantize_blockwise, (x, code, 64, bits, True, "reference"))
        codes, scales = torch.ops.tilewise.quantize_blockwise(x, code, 64, bits, True, "reference")
        args = (codes, scales, code, 64, 300, bits, torch.bfloat16, "reference")
        torch.library.opcheck(torch.ops.tilewise.dequantize_blockwise, args)
