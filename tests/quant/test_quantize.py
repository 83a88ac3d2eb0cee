import io

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tilewise._testing import assert_exact
from tilewise.quant import QuantizedTensor, codebook, codebook_bits, codebook_names, quantize

UNSIGNED = {"udynamic8", "ulinear4"}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _sample(n: int, dtype: torch.dtype, seed: int, unsigned: bool, spread: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # log-uniform magnitudes over `spread` decades so small blocks and large blocks both occur
    mags = torch.exp(torch.empty(n).uniform_(-spread, spread, generator=g) * 2.3)
    x = torch.randn(n, generator=g) * mags
    return (x.abs() if unsigned else x).to(dtype)


def _error_bound(name: str) -> float:
    """Largest distance from a point of [-1, 1] ([0, 1] unsigned) to its nearest codebook value: half the widest
    gap between values, or the whole gap from a range edge to the first value."""
    c = codebook(name).double()
    lowest = 0.0 if name in UNSIGNED else -1.0
    return max(((c[1:] - c[:-1]) / 2).max().item(), (c[0] - lowest).item(), (1 - c[-1]).item())


@given(
    n=st.integers(0, 3000),
    name=st.sampled_from(codebook_names()),
    block_log2=st.integers(5, 12),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**31 - 1),
)
def test_error_within_half_gap_per_block(n, name, block_log2, dtype, seed):
    block = 2**block_log2
    x = _sample(n, dtype, seed, name in UNSIGNED)
    q = quantize(x, name, block, backend="reference")
    y = q.dequantize(torch.float32)
    assert y.shape == x.shape
    assert q.dequantize().dtype == dtype
    nb = -(-n // block)
    assert q.scales.shape == (nb,)
    xf = x.float().reshape(-1)
    scale_per_elem = q.scales.repeat_interleave(block)[:n]
    if n:
        ref_scales = torch.nn.functional.pad(xf.abs(), (0, -n % block)).view(nb, block).amax(1)
        assert_exact(q.scales, ref_scales)
    # 1e-6 relative slack: the fp32 product code * scale is rounded once
    bound = (_error_bound(name) + 1e-6) * scale_per_elem
    err = (y.reshape(-1) - xf).abs()
    assert bool((err <= bound).all()), f"max excess {(err - bound).max().item()}"


@given(name=st.sampled_from(codebook_names()), n=st.integers(1, 2000), seed=st.integers(0, 2**31 - 1))
def test_codes_in_range(name, n, seed):
    x = _sample(n, torch.float32, seed, unsigned=False)  # negatives too, also for unsigned codebooks
    q = quantize(x, name, 64, backend="reference")
    k = codebook(name).numel()
    codes = q.codes
    if codebook_bits(name) == 4:
        assert codes.numel() == (n + 1) // 2
        codes = torch.stack([codes >> 4, codes & 15], 1).view(-1)[:n]
    assert int(codes.max()) < k


@pytest.mark.parametrize("name", codebook_names())
def test_all_zero_blocks_give_zeros(name):
    x = torch.randn(4 * 64)
    x[64:192] = 0  # two whole zero blocks
    q = quantize(x, name, 64, backend="reference")
    assert q.scales[1].item() == 0
    assert q.scales[2].item() == 0
    y = q.dequantize()
    assert not torch.isnan(y).any()
    assert bool((y[64:192] == 0).all())
    assert bool((quantize(torch.zeros(100), name, 32).dequantize() == 0).all())


def test_nearest_code_is_nearest():
    """Brute force: the chosen value is a nearest codebook value (ties excepted)."""
    x = torch.randn(5000)
    for name in ("int8", "dynamic8", "nf4", "fp4", "fp8_e4m3"):
        q = quantize(x, name, 256, backend="reference")
        y = q.dequantize()
        s = q.scales.repeat_interleave(256)[: x.numel()]
        cands = codebook(name)[None, :] * s[:, None]
        best = (cands - x[:, None]).abs().min(1).values
        assert bool(((y - x).abs() <= best * (1 + 1e-6) + 1e-12).all()), name


@pytest.mark.parametrize("shape", [(0,), (1,), (3, 0, 5), (7,), (2, 3, 129), (513,)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_shapes_and_dtypes_round_trip(shape, dtype):
    x = torch.randn(shape).to(dtype)
    for name in ("int8", "nf4"):
        q = quantize(x, name, 32)
        y = q.dequantize()
        assert y.shape == x.shape
        assert y.dtype == dtype
        if x.numel():
            rel = ((y.float() - x.float()).norm() / x.float().norm()).item()
            assert rel < (0.02 if name == "int8" else 0.2)


def test_one_element_is_exact_for_codebooks_with_one():
    for name in codebook_names():
        x = torch.tensor([-2.5 if name not in UNSIGNED else 2.5])
        y = quantize(x, name, 32).dequantize()
        # |x| is the scale and +-1 sits in the codebook (except dynamic maps at -1)
        if codebook(name)[0].item() == -1.0 or name in UNSIGNED:
            assert y.item() == x.item(), name


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_raises_naming_x(bad):
    x = torch.randn(1000)
    x[777] = bad
    with pytest.raises(ValueError, match=r"x contains NaN or inf \(first at flat index 777\)"):
        quantize(x, "int8", 256)


def test_bad_inputs():
    with pytest.raises(TypeError, match="integer dtype"):
        quantize(torch.arange(10), "int8")
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        quantize([1.0, 2.0], "int8")
    with pytest.raises(TypeError, match="float64"):
        quantize(torch.randn(10, dtype=torch.float64), "int8")
    for block in (48, 16, 8192, 0, -64, 256.0):
        with pytest.raises(ValueError, match="power of two"):
            quantize(torch.randn(10), "int8", block)
    with pytest.raises(ValueError, match="unknown codebook"):
        quantize(torch.randn(10), "int5")


def test_rotation_lowers_error_with_outlier_channels():
    g = torch.Generator().manual_seed(42)
    x = torch.randn(256, 1024, generator=g)
    x[:, ::97] *= 50  # a few outlier channels, as in LLM activations / weights
    for name in ("int4", "nf4", "int8"):
        plain = quantize(x, name, 128)
        rot = quantize(x, name, 128, rotate=True)
        e_plain = (plain.dequantize() - x).norm() / x.norm()
        e_rot = (rot.dequantize() - x).norm() / x.norm()
        assert e_rot < 0.7 * e_plain, (name, e_plain.item(), e_rot.item())


def test_rotation_partial_block_and_dtype():
    x = torch.randn(3, 100, dtype=torch.bfloat16)
    q = quantize(x, "int8", 64, rotate=True)
    assert q.codes.numel() == 320  # padded to 5 whole blocks
    y = q.dequantize()
    assert y.shape == x.shape
    assert y.dtype == torch.bfloat16
    assert ((y.float() - x.float()).norm() / x.float().norm()).item() < 0.02


def test_double_quant_saves_bytes_and_keeps_accuracy():
    x = torch.randn(64 * 4096)
    single = quantize(x, "nf4", 64)
    double = quantize(x, "nf4", 64, double_quant=True)
    assert double.scales is None
    assert double.scale_codes.dtype == torch.uint8
    bits_single = 8 * single.nbytes / x.numel()
    bits_double = 8 * double.nbytes / x.numel()
    assert bits_single == pytest.approx(4.5, abs=0.01)
    assert bits_double == pytest.approx(4.127, abs=0.01)
    e1 = (single.dequantize() - x).norm() / x.norm()
    e2 = (double.dequantize() - x).norm() / x.norm()
    assert e2 < e1 * 1.02  # the scales' own error is ~1% of a 4-bit code's
    assert_exact(double.codes, single.codes)  # codes use the exact scales


def test_stochastic_rounding_is_unbiased():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(256, generator=g) * 2 - 1
    x[0] = 1.0  # pin the scale to 1 so every block sees the same grid
    draws = quantize(x.repeat(2000), "int4", 256, stochastic=True, generator=g).dequantize().view(2000, 256)
    nearest = quantize(x, "int4", 256).dequantize()
    # mean of 2000 draws: std <= (1/7)/2/sqrt(2000) = 1.6e-3 per element; 0.01 is over 6 sigma
    assert (draws.mean(0) - x).abs().max().item() < 0.01
    assert (nearest - x).abs().max().item() > 0.05  # nearest rounding alone is visibly biased per element
    assert bool(((draws - x).abs() <= 1 / 7 + 1e-6).all())  # always a neighbour


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("rotate", [False, True])
def test_state_dict_round_trips(tmp_path, double_quant, rotate):
    x = torch.randn(3, 1000, dtype=torch.bfloat16)
    q = quantize(x, "nf4", 64, double_quant=double_quant, rotate=rotate)
    sd = q.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in sd.values())
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    q2 = QuantizedTensor.from_state_dict(torch.load(buf, weights_only=True))
    assert_exact(q2.dequantize(), q.dequantize())
    assert (q2.codebook, q2.block_size, q2.shape, q2.dtype, q2.rotate) == ("nf4", 64, x.shape, x.dtype, rotate)

    safetensors = pytest.importorskip("safetensors.torch")
    path = tmp_path / "q.safetensors"
    safetensors.save_file(sd, str(path))
    q3 = QuantizedTensor.from_state_dict(safetensors.load_file(str(path)))
    assert_exact(q3.dequantize(), q.dequantize())


def test_from_state_dict_rejects_garbage():
    with pytest.raises(ValueError, match="missing"):
        QuantizedTensor.from_state_dict({"codes": torch.zeros(3, dtype=torch.uint8)})
    sd = quantize(torch.randn(10), "int8", 32).state_dict()
    sd["format_version"] = torch.tensor([99])
    with pytest.raises(ValueError, match="version"):
        QuantizedTensor.from_state_dict(sd)


def test_nbytes_repr_and_to():
    x = torch.randn(1024, 64)
    q = quantize(x, "int8", 256)
    assert q.nbytes == x.numel() + 4 * (x.numel() // 256)
    assert q.bits == 8
    assert q.numel() == x.numel()
    assert "int8" in repr(q)
    assert "block_size=256" in repr(q)
    q2 = q.to("cpu")
    assert q2.device.type == "cpu"
    assert q2 is not q


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.interpret)])
def test_check_finite_false_keeps_non_finite_in_its_block(backend, device):
    x = torch.randn(1000, device=device if backend == "triton" else "cpu")
    x[300] = float("inf")
    q = quantize(x, "int8", 256, check_finite=False, backend=backend)
    finite = torch.isfinite(q.scales).cpu()
    assert finite.tolist() == [True, False, True, True]  # only block 1 (elements 256..511) is touched
    y = q.dequantize().cpu()
    assert bool(torch.isfinite(y[:256]).all())
    assert bool(torch.isfinite(y[512:]).all())
