import pytest
import torch

from tilewise.quant import codebook, codebook_bits, codebook_names

# Published NF4 values (QLoRA, appendix E), to 7 decimals.
NF4_PAPER = [
    -1.0, -0.6961928, -0.5250731, -0.3949175, -0.2844414, -0.1847734, -0.0910500, 0.0,
    0.0795803, 0.1609302, 0.2461123, 0.3379152, 0.4407098, 0.5626170, 0.7229568, 1.0,
]  # fmt: skip

SIZES = {
    "int8": 255,
    "int4": 15,
    "dynamic8": 256,
    "udynamic8": 256,
    "dynamic4": 16,
    "ulinear4": 16,
    "nf4": 16,
    "fp4": 15,
    "fp8_e4m3": 253,
    "fp8_e5m2": 247,
}


@pytest.mark.parametrize("name", sorted(SIZES))
def test_codebook_shape_sorted_and_bounded(name):
    c = codebook(name)
    assert c.dtype == torch.float32
    assert c.ndim == 1
    assert c.numel() == SIZES[name]
    assert c.numel() <= 2 ** codebook_bits(name)
    assert bool((c[1:] > c[:-1]).all()), "values must be strictly increasing"
    assert c.abs().max().item() == 1.0


def test_names_cover_table():
    assert set(codebook_names()) == set(SIZES)


def test_nf4_matches_paper():
    # 3e-7: our quantiles are computed in float64; the paper's table was computed in fp32 and differs from the
    # float64 values by up to 1.8e-7 (e.g. -0.52507305 vs -0.52507296), about 2 fp32 ulps near 0.5.
    torch.testing.assert_close(codebook("nf4"), torch.tensor(NF4_PAPER), atol=3e-7, rtol=0)


def test_linear_and_fp_values():
    assert torch.equal(codebook("int4") * 7, torch.arange(-7, 8, dtype=torch.float32))
    assert torch.equal(codebook("ulinear4") * 16, torch.arange(1, 17, dtype=torch.float32))
    fp4 = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6]) / 6
    assert torch.equal(codebook("fp4"), torch.unique(torch.cat([-fp4, fp4])))
    # fp8: every finite value, so casting a value of the table to fp8 and back is exact
    e4m3 = codebook("fp8_e4m3") * 448
    assert torch.equal(e4m3.to(torch.float8_e4m3fn).float(), e4m3)


def test_dynamic_maps_have_zero_one_and_small_values():
    for name in ("dynamic8", "udynamic8", "dynamic4"):
        c = codebook(name)
        assert 0.0 in c.tolist()
        assert 1.0 in c.tolist()
    assert codebook("udynamic8").min().item() == 0.0
    # the smallest non-zero magnitude of the 8-bit maps is in the 1e-7..1e-6 decade
    small = codebook("dynamic8").abs()
    assert 1e-7 < small[small > 0].min().item() < 1e-6


def test_codebook_returns_a_copy():
    c = codebook("int8")
    c.zero_()
    assert codebook("int8").abs().max().item() == 1.0


@pytest.mark.parametrize("bad", ["int3", "NF4", "", None])
def test_unknown_codebook(bad):
    with pytest.raises(ValueError, match="unknown codebook"):
        codebook(bad)
