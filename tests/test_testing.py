"""The tolerance tiers and poisoning helpers of tilewise._testing: they pass what they should and fail the rest."""

import math

import pytest
import torch

from tilewise._testing import (
    TOLERANCES,
    assert_close,
    assert_exact,
    assert_rel_rms,
    assert_snr,
    poison_,
    poison_like,
)


def test_assert_exact_passes_equal_tensors() -> None:
    assert_exact(torch.arange(6, dtype=torch.uint8).view(2, 3), torch.arange(6, dtype=torch.uint8).view(2, 3))


def test_assert_exact_reports_count_and_first_mismatch() -> None:
    a = torch.arange(12).view(3, 4)
    b = a.clone()
    b[1, 2] = 99
    b[2, 3] = 98
    with pytest.raises(
        AssertionError, match=r"codes: 2 of 12 elements differ; first at index \(1, 2\): 6 != expected 99"
    ):
        assert_exact(a, b, msg="codes")


def test_assert_exact_checks_dtype_and_shape() -> None:
    with pytest.raises(AssertionError, match="dtype"):
        assert_exact(torch.zeros(3, dtype=torch.int32), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(AssertionError, match="shape"):
        assert_exact(torch.zeros(3), torch.zeros(1, 3))


def test_assert_exact_fails_on_nan() -> None:
    with pytest.raises(AssertionError, match="1 of 2"):
        assert_exact(torch.tensor([1.0, math.nan]), torch.tensor([1.0, math.nan]))


@pytest.mark.parametrize("dtype", list(TOLERANCES))
def test_assert_close_within_and_beyond_the_tier(dtype: torch.dtype) -> None:
    atol, rtol = TOLERANCES[dtype]
    expected = torch.full((4,), 1.0, dtype=torch.float64)
    inside = (expected * (1 + rtol / 2)).to(dtype)
    assert_close(inside, expected.to(dtype))
    outside = (expected * (1 + 4 * rtol) + 4 * atol).to(dtype)
    with pytest.raises(AssertionError):
        assert_close(outside, expected.to(dtype))


def test_assert_close_uses_the_named_tier() -> None:
    expected = torch.ones(4)
    actual = expected + 1e-3
    with pytest.raises(AssertionError):
        assert_close(actual, expected)
    assert_close(actual, expected, dtype=torch.bfloat16)


def test_assert_close_fails_on_nan_and_wants_a_reason_to_loosen() -> None:
    with pytest.raises(AssertionError):
        assert_close(torch.tensor([math.nan]), torch.tensor([0.0]))
    with pytest.raises(ValueError, match="reason"):
        assert_close(torch.ones(1), torch.ones(1), atol=1.0)
    assert_close(torch.ones(1) + 0.5, torch.ones(1), atol=1.0, rtol=0.0, reason="demonstration")


def test_assert_rel_rms() -> None:
    expected = torch.randn(1000, dtype=torch.float64)
    noisy = expected + 1e-3 * torch.randn(1000, dtype=torch.float64)
    assert_rel_rms(noisy, expected, rel=3e-3)
    with pytest.raises(AssertionError, match="RMS error"):
        assert_rel_rms(noisy, expected, rel=1e-4)


def test_assert_rel_rms_floor_covers_a_zero_reference() -> None:
    zeros = torch.zeros(100)
    assert_rel_rms(zeros + 1e-7, zeros, rel=1e-3, floor=1e-6)
    with pytest.raises(AssertionError):
        assert_rel_rms(zeros + 1e-7, zeros, rel=1e-3)


def test_assert_rel_rms_and_snr_fail_on_unwritten_output() -> None:
    expected = torch.ones(8)
    actual = expected.clone()
    actual[5] = math.nan
    with pytest.raises(AssertionError, match="non-finite"):
        assert_rel_rms(actual, expected, rel=1.0, floor=1.0)
    with pytest.raises(AssertionError, match="non-finite"):
        assert_snr(actual, expected, min_db=-100)


def test_assert_snr() -> None:
    expected = torch.randn(10_000)
    noisy = expected + 0.01 * torch.randn(10_000)  # ~40 dB
    assert_snr(noisy, expected, min_db=35)
    with pytest.raises(AssertionError, match="SNR"):
        assert_snr(noisy, expected, min_db=45)
    assert_snr(expected.clone(), expected, min_db=1000)  # exact: infinite SNR


@pytest.mark.parametrize(
    ("dtype", "sentinel"),
    [(torch.float32, None), (torch.bfloat16, None), (torch.uint8, 255), (torch.int32, 2**31 - 1), (torch.bool, True)],
)
def test_poison(dtype: torch.dtype, sentinel: int | bool | None) -> None:
    like = torch.zeros(2, 3, dtype=dtype)
    p = poison_like(like)
    assert p.shape == like.shape
    assert p.dtype == dtype
    if sentinel is None:
        assert bool(p.isnan().all())
    else:
        assert bool((p == sentinel).all())
    t = torch.zeros(5, dtype=dtype)
    assert poison_(t) is t
    assert not bool((t == torch.zeros(5, dtype=dtype)).all())


def test_poisoned_output_fails_every_tier() -> None:
    expected = torch.zeros(4)
    out = poison_like(expected)
    out[:3] = 0.0  # a kernel that forgot the last element
    for check in (
        lambda: assert_exact(out, expected),
        lambda: assert_close(out, expected),
        lambda: assert_rel_rms(out, expected, rel=1.0, floor=1.0),
        lambda: assert_snr(out, expected, min_db=-100),
    ):
        with pytest.raises(AssertionError):
            check()
