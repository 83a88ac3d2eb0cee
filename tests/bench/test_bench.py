"""tilewise.bench: the suites' rows, missing and failing peers, the timing helpers and format_table.

The suites run at tiny sizes; peers are made missing (or fake) with monkeypatch so the rows do not depend on what
this machine has installed.
"""

import re
import subprocess
import sys
import types

import pytest
import torch

from tilewise.bench import ROW_KEYS, format_table, register_suite, run_suite, runner, suite_names
from tilewise.bench import hadamard as hadamard_bench
from tilewise.bench import quant as quant_bench
from tilewise.bench.runner import (
    LoadedPeer,
    Peer,
    copy_bandwidth,
    count_label,
    load_peer,
    make_row,
    rel_rms,
    time_fn,
)

PEER_MODULES = ("bitsandbytes", "torchao", "fast_hadamard_transform")
# Round-trip error of N(0, 1) data: 8-bit codebooks lose well under 2%, 4-bit ones about 10%.
RMS_BOUNDS = {"int8": 0.01, "dynamic8": 0.02, "nf4": 0.12, "fp4": 0.15}
NUMEL = 4096


@pytest.fixture
def no_peers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every peer looks uninstalled: an entry of None in sys.modules makes find_spec and import fail."""
    for name in PEER_MODULES:
        monkeypatch.setitem(sys.modules, name, None)


def _select(rows: list[dict], **match: object) -> list[dict]:
    return [r for r in rows if all(r[k] == v for k, v in match.items())]


def _assert_timed(row: dict) -> None:
    assert row["status"] == "ok", row
    assert row["median_ms"] > 0
    assert row["repeats"] >= 1
    assert row["gbps"] == pytest.approx(row["bytes"] / (row["median_ms"] * 1e-3) / 1e9)
    assert row["pct_copy"] == pytest.approx(100 * row["gbps"] / row["copy_gbps"])


@pytest.mark.usefixtures("no_peers")
def test_quant_suite_rows_on_cpu() -> None:
    rows = run_suite("quant", numel=NUMEL, repeats=1, device="cpu", backend="reference")
    assert all(tuple(r) == ROW_KEYS for r in rows)
    for name, block in quant_bench.DEFAULT_BLOCKS.items():
        bits = 8 if name in ("int8", "dynamic8") else 4
        expected_bytes = NUMEL * 2 + NUMEL * bits // 8 + 4 * (NUMEL // block)
        for op in ("quantize", "dequantize"):
            (ours,) = _select(rows, codebook=name, op=op, impl="tilewise (reference)")
            _assert_timed(ours)
            assert (ours["block"], ours["numel"], ours["dtype"], ours["device"]) == (block, NUMEL, "bfloat16", "cpu")
            assert ours["bytes"] == expected_bytes
            assert 0 < ours["rel_rms"] < RMS_BOUNDS[name]
            assert "not GPU kernel speeds" in ours["note"]
            (bnb,) = _select(rows, codebook=name, op=op, impl="bitsandbytes")
            assert bnb["status"] == "missing (pip install bitsandbytes)"
            assert bnb["median_ms"] is None
            torchao = [r["status"] for r in _select(rows, codebook=name, op=op, impl="torchao")]
            assert torchao == (["missing (pip install torchao)"] if name in ("dynamic8", "nf4") else [])
    # the quantize rows of every codebook come first, then the dequantize rows
    ops = [r["op"] for r in rows]
    assert ops == sorted(ops, key=lambda op: op != "quantize")


@pytest.mark.interpret
def test_quant_suite_triton_matches_reference(device: str) -> None:
    rows = run_suite("quant", numel=3000, repeats=1, device=device, backend="triton", peers=[])
    # on CUDA the suite also times quantize without its finite check (the check syncs the device)
    extra = {"tilewise (triton, check_finite=False)"} if device == "cuda" else set()
    assert {r["impl"] for r in rows} == {"tilewise (triton)"} | extra
    assert len(rows) == 8 * (1 + len(extra))
    for row in rows:
        _assert_timed(row)
        assert row["check"] == "exact (3000 el.)", row


@pytest.mark.usefixtures("no_peers")
def test_quant_suite_options() -> None:
    rows = run_suite(
        "quant", numel=1000, repeats=1, device="cpu", codebooks=["int4"], block_sizes={"int4": 128}, dtype="fp32"
    )
    assert [(r["op"], r["codebook"], r["block"], r["dtype"]) for r in rows] == [
        ("quantize", "int4", 128, "float32"),
        ("dequantize", "int4", 128, "float32"),
    ]
    assert rows[0]["bytes"] == 1000 * 4 + 500 + 4 * 8
    with pytest.raises(ValueError, match="block_size"):
        run_suite("quant", numel=1000, device="cpu", block_sizes=48)
    with pytest.raises(ValueError, match="unknown codebook"):
        run_suite("quant", numel=1000, device="cpu", codebooks=["int3"])
    with pytest.raises(ValueError, match="unknown peers"):
        run_suite("quant", numel=1000, device="cpu", peers=["bnb"])


def _fake_peer(monkeypatch: pytest.MonkeyPatch) -> None:
    """bitsandbytes 'installed' as an empty module, so the suite calls its builder."""
    fake = LoadedPeer(quant_bench.PEERS["bitsandbytes"], types.ModuleType("bitsandbytes"), "9.9", "ok")
    monkeypatch.setattr(quant_bench, "load_peer", lambda peer: fake)


def test_peer_that_raises_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_peer(monkeypatch)

    def broken(case: object, peer: object) -> None:
        raise RuntimeError("no kernel image for this GPU")

    monkeypatch.setitem(quant_bench._PEER_BUILDERS, "bitsandbytes", broken)
    rows = run_suite("quant", numel=NUMEL, repeats=1, device="cpu", codebooks=["nf4"], peers=["bitsandbytes"])
    statuses = {(r["impl"], r["op"]): r["status"] for r in rows}
    assert statuses[("tilewise (reference)", "quantize")] == "ok"
    assert statuses[("tilewise (reference)", "dequantize")] == "ok"
    for op in ("quantize", "dequantize"):
        assert statuses[("bitsandbytes 9.9", op)] == "error: RuntimeError: no kernel image for this GPU"
    assert all("test_bench.py" in r["error_at"] for r in rows if r["impl"] == "bitsandbytes 9.9")


@pytest.mark.parametrize("stage", ["quantize", "dequantize"])
def test_peer_failing_in_one_op(monkeypatch: pytest.MonkeyPatch, stage: str) -> None:
    _fake_peer(monkeypatch)

    def fail(*args: object) -> None:
        raise ValueError(f"{stage} exploded")

    def build(case: quant_bench.Case, peer: LoadedPeer) -> quant_bench.Impl:
        quantize = fail if stage == "quantize" else (lambda x: x.float())
        dequantizer = (lambda state: fail) if stage == "dequantize" else (lambda state: lambda: state)
        return quant_bench.Impl("fake 1.0", quantize, dequantizer)

    monkeypatch.setitem(quant_bench._PEER_BUILDERS, "bitsandbytes", build)
    rows = run_suite("quant", numel=NUMEL, repeats=1, device="cpu", codebooks=["int8"], peers=["bitsandbytes"])
    fake = {r["op"]: r for r in rows if r["impl"] == "fake 1.0"}
    if stage == "quantize":
        assert fake["quantize"]["status"] == "error: ValueError: quantize exploded"
        assert fake["dequantize"]["status"] == "not run (quantize failed)"
    else:
        _assert_timed(fake["quantize"])
        assert fake["dequantize"]["status"] == "error: ValueError: dequantize exploded"


@pytest.mark.usefixtures("no_peers")
def test_hadamard_suite_rows_on_cpu() -> None:
    sizes = (128, 1024, 4096, 32768)
    rows = run_suite("hadamard", numel=NUMEL, repeats=1, device="cpu", sizes=sizes)
    assert all(tuple(r) == ROW_KEYS for r in rows)
    assert [r["n"] for r in rows] == [n for n in sizes for _ in range(3)]
    for n in sizes:
        ours, dense, fht = _select(rows, n=n)
        assert ours["rows"] == max(1, NUMEL // n)
        assert ours["numel"] == ours["rows"] * n
        _assert_timed(ours)
        assert ours["bytes"] == 2 * ours["numel"] * 2
        assert ours["rel_rms"] < 4e-3  # bf16 output: one rounding, u = 2**-9 relative, RMS ~ u / sqrt(3)
        assert dense["impl"] == f"torch {torch.__version__.split('+')[0]} dense x @ H"
        if n <= 4096:
            _assert_timed(dense)
            assert dense["tflops"] == pytest.approx(2 * dense["rows"] * n * n / (dense["median_ms"] * 1e-3) / 1e12)
            assert dense["rel_rms"] < 8e-3  # the bf16 matrix holds 1/sqrt(n) rounded too
        else:
            assert dense["status"] == "not run (n > 4096)"
        assert fht["status"] == "missing (pip install fast-hadamard-transform)"


@pytest.mark.interpret
def test_hadamard_suite_with_triton(device: str) -> None:
    rows = run_suite("hadamard", numel=2048, repeats=1, device=device, backend="triton", sizes=[64, 2048], peers=[])
    ours = [r for r in rows if r["impl"].startswith("tilewise")]
    assert [r["impl"] for r in ours] == ["tilewise (triton)"] * 2
    for row in ours:
        _assert_timed(row)
        # The check compares with the reference rounded to bf16; how close the kernel comes is the kernel tests'
        # business (Triton's interpreter truncates fp32 -> bf16, so there about half the values are 1 ulp off).
        assert re.fullmatch(
            rf"= ref \({count_label(row['numel'])} el\.\)|\d+/{row['numel']} off by <= \d+ ulp \(max err .* x RMS\)",
            row["check"],
        )
        assert row["rel_rms"] < 4e-3


def test_ulp_check() -> None:
    a = torch.tensor([1.0, -2.0, 0.0, 3.0], dtype=torch.bfloat16)
    assert hadamard_bench._ulp_check(a, a.clone()) == "= ref (4 el.)"
    assert hadamard_bench._ulp_check(torch.tensor([0.0]), torch.tensor([-0.0])) == "= ref (1 el.)"
    bits = a.view(torch.int16).clone()
    bits[1] += 1  # -2 -> the next bf16 value away from zero
    bits[3] -= 2
    assert (
        hadamard_bench._ulp_check(a, bits.view(torch.bfloat16)) == "2/4 off by <= 2 ulp (max err 1.7e-02 x RMS)"
    )  # 2 ulp of 3.0 = 2**-5, over RMS 1.87
    tiny = torch.tensor([1e-45, -1e-45])  # the two smallest fp32 subnormals around zero are 2 ulp apart
    assert hadamard_bench._ulp_check(tiny, -tiny).startswith("2/2 off by <= 2 ulp")


def test_hadamard_suite_checks_sizes() -> None:
    with pytest.raises(ValueError, match="powers of two"):
        run_suite("hadamard", numel=1024, device="cpu", sizes=[96])


def test_run_suite_rejects_unknown_names() -> None:
    assert {"quant", "hadamard"} <= set(suite_names())
    with pytest.raises(ValueError, match="unknown benchmark suite 'nope'; choose one of"):
        run_suite("nope")
    with pytest.raises(ValueError, match="takes no option 'colour'"):
        run_suite("quant", colour="red")


def test_register_suite_refuses_a_second_function_under_one_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner, "_SUITES", dict(runner._SUITES))

    @register_suite("tiny")
    def tiny(*, numel: int = 3) -> list[dict]:
        return [make_row(suite="tiny", op="noop", impl="x", numel=numel)]

    assert run_suite("tiny", numel=None)[0]["numel"] == 3  # None means the suite's default
    assert run_suite("tiny", numel=5)[0]["numel"] == 5
    with pytest.raises(ValueError, match="already registered"):
        register_suite("tiny")(lambda: [])


def test_load_peer(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    missing = load_peer(Peer("bitsandbytes", "bitsandbytes"))
    assert missing.module is None
    assert (missing.status, missing.label) == ("missing (pip install bitsandbytes)", "bitsandbytes")
    (tmp_path / "tilewise_broken_peer.py").write_text("raise OSError('libcudart.so.13: cannot open shared object')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    broken = load_peer(Peer("tilewise_broken_peer", "broken-peer"))
    assert broken.module is None
    assert broken.status == "import failed: OSError: libcudart.so.13: cannot open shared object"
    ok = load_peer(Peer("pytest", "pytest"))
    assert ok.module is pytest
    assert (ok.status, ok.label) == ("ok", f"pytest {pytest.__version__}")


def test_time_fn_on_host() -> None:
    calls = []
    timing = time_fn(lambda: calls.append(1), "cpu", repeats=7, warmup=2)
    assert (timing.method, timing.repeats, len(calls)) == ("host", 7, 9)
    assert timing.median_ms >= 0
    with pytest.raises(ValueError, match="repeats"):
        time_fn(lambda: None, "cpu", repeats=0)


def test_repeats_are_cut_to_the_budget_but_never_below_three() -> None:
    assert runner._count(estimate_ms=100.0, repeats=50, budget_s=1.0) == 10
    assert runner._count(estimate_ms=5000.0, repeats=50, budget_s=1.0) == 3
    assert runner._count(estimate_ms=5000.0, repeats=2, budget_s=1.0) == 2
    assert runner._count(estimate_ms=0.0, repeats=20, budget_s=1.0) == 20


def test_copy_bandwidth_and_rel_rms() -> None:
    assert copy_bandwidth("cpu") > 0.1  # GB/s; any machine copies faster than 100 MB/s
    x = torch.tensor([3.0, 4.0])
    assert rel_rms(x, x) == 0.0
    assert rel_rms(torch.tensor([3.0, 0.0]), x) == pytest.approx(0.8)


def _row(**fields: object) -> dict:
    base = {"suite": "quant", "op": "quantize", "codebook": "int8", "block": 256, "numel": 1 << 28}
    return make_row(**{**base, "dtype": "bfloat16", "device": "cuda:0", "device_name": "H100", **fields})


def test_format_table() -> None:
    rows = [
        _row(impl="tilewise (triton)", median_ms=0.5, gbps=1547.0, pct_copy=51.4, check="exact", copy_gbps=3010.0),
        _row(impl="bitsandbytes", status="missing (pip install bitsandbytes)"),
        _row(impl="torchao 0.18.0", status="error: RuntimeError: boom", note="torchao nf4 runs eagerly"),
    ]
    lines = format_table(rows).splitlines()
    header = lines[0].split()
    assert header[:7] == ["suite", "op", "codebook", "block", "impl", "numel", "dtype"]
    assert "n" not in header  # columns no row fills are left out
    assert "TFLOP/s" not in header
    assert set(lines[1]) == {"-", " "}
    assert lines[2].split()[5:] == ["(triton)", "256M", "bfloat16", "0.500", "1547", "51.4%", "exact", "ok"]
    assert lines[3].rstrip().endswith("missing (pip install bitsandbytes)")
    assert " - " in lines[3]  # missing values print as '-'
    assert "error: RuntimeError: boom" in lines[4]
    assert "H100 (cuda:0): copy_ 3010 GB/s (bytes read + written) = 100%" in lines
    assert "note: torchao nf4 runs eagerly" in lines
    # every row line is as wide as the header's columns: right-aligned numbers end in the same place
    assert len({line.index("bfloat16") for line in lines[2:5]}) == 1
    assert format_table([]) == "(no rows)"


def test_make_row_rejects_unknown_keys() -> None:
    assert make_row(suite="s")["status"] == "ok"
    with pytest.raises(ValueError, match="unknown row keys"):
        make_row(colour="red")


def test_import_is_lazy() -> None:
    probe = (
        "import sys, torch, tilewise.bench\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('triton', 'bitsandbytes', 'torchao')))\n"
        "print(torch.cuda.is_initialized())\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[:2] == ["[]", "False"], out


@pytest.mark.gpu
def test_quant_suite_on_gpu_with_installed_peers() -> None:
    rows = run_suite("quant", numel=1 << 20, repeats=3, codebooks=["dynamic8", "nf4"])
    assert rows[0]["device"].startswith("cuda")
    assert rows[0]["copy_gbps"] > 100
    for row in rows:
        assert row["status"] == "ok" or row["status"].startswith("missing ("), row
        if row["impl"].startswith("tilewise"):
            assert row["impl"] in ("tilewise (triton)", "tilewise (triton, check_finite=False)"), row
            assert row["check"] == "exact (1M el.)", row
        if row["status"] == "ok":
            assert 0 < row["rel_rms"] < RMS_BOUNDS[row["codebook"]], row


@pytest.mark.gpu
def test_time_fn_uses_cuda_events() -> None:
    x = torch.ones(1 << 20, device="cuda")
    timing = time_fn(lambda: x.mul_(1.0), "cuda", repeats=5, nbytes=8 << 20)
    assert (timing.method, timing.repeats) == ("cuda-events", 5)
    assert timing.median_ms > 0
