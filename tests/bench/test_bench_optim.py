"""The ``optim`` bench suite at a tiny size on the CPU: rows, floor bytes and missing peers."""

import sys

import pytest

from tilewise.bench import ROW_KEYS, run_suite
from tilewise.bench.optim import state_bytes_per_param


@pytest.fixture
def no_peers(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("bitsandbytes", "torchao", "flashoptim"):
        monkeypatch.setitem(sys.modules, name, None)


@pytest.mark.usefixtures("no_peers")
def test_optim_suite_rows_on_cpu() -> None:
    rows = run_suite("optim", count=2, shape=(16, 40), repeats=1, device="cpu", dtypes=("float32",))
    assert all(tuple(r) == ROW_KEYS for r in rows)
    ours = [r for r in rows if r["impl"] == "tilewise (reference)"]
    assert [r["codebook"] for r in ours] == ["fp32", "bf16", "q8", "q4"]
    for r in ours:
        assert r["status"] == "ok", r
        assert r["median_ms"] > 0
        bpp = state_bytes_per_param(r["codebook"])
        assert r["bytes"] == int(2 * 640 * (12 + 2 * bpp))
        assert r["state_bpp"] == bpp
        assert "not GPU kernel speeds" in r["note"]
    torch_rows = [r for r in rows if r["impl"].startswith("torch AdamW")]
    assert [r["status"] for r in torch_rows] == ["ok", "ok"]
    missing = {r["impl"]: r["status"] for r in rows if r["status"].startswith("missing")}
    assert missing == {
        "bitsandbytes AdamW8bit": "missing (pip install bitsandbytes)",
        "torchao AdamW8bit": "missing (pip install torchao)",
        "torchao AdamW4bit": "missing (pip install torchao)",
        "flashoptim FlashAdamW": "missing (pip install flashoptim)",
        "flashoptim FlashAdamW (24-bit master)": "missing (pip install flashoptim)",
    }


def test_state_bytes_per_param() -> None:
    assert state_bytes_per_param("fp32") == 8
    assert state_bytes_per_param("q8") == pytest.approx(2 + 8 / 256)
    assert state_bytes_per_param("q4") == pytest.approx(1 + 8 / 128)


@pytest.mark.interpret
@pytest.mark.usefixtures("no_peers")
def test_optim_suite_runs_the_kernel(device: str) -> None:
    rows = run_suite("optim", count=2, shape=(8, 300), repeats=1, device=device, backend="triton",
                     formats=("q8",), dtypes=("bfloat16",), peers=False)  # fmt: skip
    (ours,) = [r for r in rows if r["impl"] == "tilewise (triton)"]
    assert ours["status"] == "ok", ours
    assert ours["bytes"] == int(2 * 2400 * (6 + 2 * (2 + 8 / 256)))


@pytest.mark.usefixtures("no_peers")
def test_optim_suite_takes_the_cli_options() -> None:
    rows = run_suite(
        "optim", numel=1000, repeats=1, device="cpu", backend="reference", formats=("q8",), dtypes=("bf16",)
    )
    assert {r["numel"] for r in rows if r["status"] == "ok"} == {4000}
