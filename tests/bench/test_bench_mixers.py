"""The ``mixers`` bench suite at tiny sizes on the CPU: rows, ops, floor bytes, the block mask and missing peers."""

import sys

import pytest
import torch

from tilewise.bench import ROW_KEYS, mixers, run_suite, suite_names
from tilewise.bench.mixers import keep_mask


@pytest.fixture
def no_fla(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "fla", None)


@pytest.mark.usefixtures("no_fla")
def test_mixers_suite_rows_on_cpu() -> None:
    rows = run_suite("mixers", seqlens=(64, 128), repeats=1, device="cpu")
    assert "mixers" in suite_names()
    assert all(tuple(r) == ROW_KEYS for r in rows)
    assert {r["op"] for r in rows} == {"fwd", "fwd+bwd"}
    assert {r["n"] for r in rows} == {64, 128}
    b, h, d, c = 1, 2, 32, 16
    for t in (64, 128):
        for op in ("fwd", "fwd+bwd"):
            group = {r["impl"]: r for r in rows if r["n"] == t and r["op"] == op}
            attn = [
                "tilewise linear_attention g=None (reference)",
                "tilewise linear_attention g=[B,T,H] (reference)",
                "tilewise linear_attention g=[B,T,H,D] (reference)",
                "tilewise block_sparse_attention (reference)",
                "torch SDPA causal",
            ]
            units = 4 if op == "fwd" else 8
            for impl in attn:
                r = group[impl]
                assert r["status"] == "ok", r
                assert r["median_ms"] > 0
                assert r["gbps"] > 0
                assert r["numel"] == b * h * t * d
                assert r["bytes"] == units * b * h * t * d * 2
            assert "not GPU kernel speeds" in group["tilewise block_sparse_attention (reference)"]["note"]
            assert group["tilewise block_sparse_attention (reference)"]["check"].startswith("kept ")
            flex = group["torch flex_attention (eager)"]
            assert flex["status"] in ("ok", "skipped on CPU"), flex
            for impl in ("tilewise fft_conv (reference)", "torch.fft reference conv"):
                r = group[impl]
                assert r["status"] == "ok", r
                fwd_bytes = (2 * b * c * t + c * t) * 2
                assert r["bytes"] == (fwd_bytes if op == "fwd" else 2 * fwd_bytes)
            assert group["fla chunk_linear_attn"]["status"] == "missing (pip install flash-linear-attention)"
            for name in ("fla chunk_simple_gla", "fla chunk_gla"):
                assert group[name]["status"] == "missing (pip install flash-linear-attention)"


def test_mixers_suite_peers_option() -> None:
    rows = run_suite("mixers", seqlens=(64,), repeats=1, device="cpu", peers=())
    assert not any(r["impl"].startswith("fla") for r in rows)
    with pytest.raises(ValueError, match="unknown peers"):
        run_suite("mixers", seqlens=(64,), device="cpu", peers=("nope",))


def test_mixers_suite_error_row(monkeypatch: pytest.MonkeyPatch) -> None:
    def oom(*args: object, **kwargs: object) -> list:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 8 GiB")

    monkeypatch.setattr(mixers, "_attention_rows", oom)
    rows = run_suite("mixers", seqlens=(64,), repeats=1, device="cpu", peers=())
    (err,) = [r for r in rows if r["op"] == "inputs"]
    assert err["impl"] == "attention"
    assert err["n"] == 64
    assert err["status"].startswith("error: OutOfMemoryError")
    assert tuple(err) == ROW_KEYS
    assert {r["impl"] for r in rows if r["op"] != "inputs"} == {
        "tilewise fft_conv (reference)",
        "torch.fft reference conv",
    }


@pytest.mark.parametrize(("t", "block"), [(32768, 128), (8192, 128), (2048, 64), (100, 32)])
def test_keep_mask(t: int, block: int) -> None:
    mask = keep_mask(t, block)
    nb = -(-t // block)
    assert mask.shape == (nb, nb)
    assert mask.dtype == torch.bool
    assert mask.diagonal().all()
    assert mask[:, 0].all()
    assert not mask.triu(1).any()
    assert torch.equal(mask, keep_mask(t, block))  # fixed by the seed
    kept = float(mask.sum()) / (nb * (nb + 1) / 2)
    if nb >= 64:
        assert kept == pytest.approx(0.1, abs=0.02)
