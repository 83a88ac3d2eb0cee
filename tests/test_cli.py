"""The ``tilewise`` command: parsing, ``env``, ``demo`` and error handling."""

import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tilewise.cli import build_parser, main
from tilewise.envinfo import PEERS, collect, format_env
from tilewise.quant.demo import format_demo_table, make_input, run_demo


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tilewise", *args], capture_output=True, text=True, check=False)


def test_env_json_in_a_subprocess() -> None:
    proc = _run("env", "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    expected = {"tilewise", "python", "platform", "torch", "torch_cuda", "cudnn", "triton", "gpus", "backends", "peers"}
    assert expected <= set(info)
    assert set(info["backends"]) == {"reference", "triton", "interpret"}
    assert info["backends"]["reference"]["available"] is True
    assert set(info["peers"]) == set(PEERS)
    assert info["python"] == ".".join(map(str, sys.version_info[:3]))


def test_env_table_names_every_section() -> None:
    text = format_env(collect())
    for key in ("torch", "triton", "GPU", "backend reference", "backend triton", "peer bitsandbytes"):
        assert key in text


def test_unknown_subcommand_is_a_usage_error() -> None:
    proc = _run("generate")  # not written yet (issue #4 lists it for later)
    assert proc.returncode == 2
    assert "invalid choice: 'generate'" in proc.stderr


def test_version() -> None:
    proc = _run("--version")
    assert proc.returncode == 0
    assert proc.stdout.strip() == "tilewise 0.1.0"


def test_demo_parses_kebab_case_flags() -> None:
    args = build_parser().parse_args(["demo", "--codebooks", "nf4", "int8", "--block-size", "64", "--numel", "100"])
    assert args.codebooks == ["nf4", "int8"]
    assert args.block_size == 64
    assert args.numel == 100
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--numel", "0"])


def test_make_input_is_deterministic_with_outliers() -> None:
    x = make_input(4096)
    assert x.dtype.is_floating_point
    assert x.shape == (4096,)
    assert bool((make_input(4096) == x).all())
    assert not bool((make_input(4096, seed=1) == x).all())
    # channels 11, 300, 777 (of 1024 per row) carry the outliers
    assert x.float().view(4, 1024).abs().amax(0).argmax().item() in (11, 300, 777)


def test_run_demo_scores_each_codebook() -> None:
    rows = run_demo(["int8", "nf4"], numel=8192, block_size=256, repeats=1)
    assert [(r["codebook"], r["rotate"]) for r in rows] == [
        ("int8", False),
        ("int8", True),
        ("nf4", False),
        ("nf4", True),
    ]
    by = {(r["codebook"], r["rotate"]): r for r in rows}
    assert by["int8", False]["bits_per_element"] == pytest.approx(8 + 32 / 256)
    assert by["nf4", False]["bits_per_element"] == pytest.approx(4 + 32 / 256)
    assert by["nf4", False]["compression_vs_bf16"] == pytest.approx(16 / 4.125)
    # 8 bits beat 4 bits, and the Hadamard rotation helps against the outlier channels
    assert by["int8", False]["snr_db"] > by["nf4", False]["snr_db"] + 10
    assert by["nf4", True]["rel_rms"] < by["nf4", False]["rel_rms"]
    assert "nf4" in format_demo_table(rows)


def test_demo_command_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo.json"
    status = main(
        ["demo", "--codebooks", "int4", "--numel", "1000", "--block-size", "64", "--repeats", "1", "--json", str(out)]
    )
    assert status == 0
    printed = capsys.readouterr().out
    assert "int4" in printed
    assert f"wrote {out}" in printed
    rows = json.loads(out.read_text())
    assert len(rows) == 2
    assert rows[0]["numel"] == 1000


def test_demo_bad_codebook_is_a_clean_usage_error() -> None:
    proc = _run("demo", "--codebooks", "int3", "--numel", "64")
    assert proc.returncode == 2
    assert "tilewise demo: error:" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bench_passes_only_the_given_options(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The handler calls tilewise.bench.run_suite / format_table; a stand-in module records the call."""
    calls: list[tuple[str, dict[str, Any]]] = []
    fake = ModuleType("tilewise.bench")

    def run_suite(name: str, **options: Any) -> list[dict[str, Any]]:
        calls.append((name, options))
        return [{"impl": "tilewise", "median_ms": 1.5}]

    fake.run_suite = run_suite  # type: ignore[attr-defined]
    fake.format_table = lambda rows: f"TABLE {len(rows)} rows"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tilewise.bench", fake)
    out = tmp_path / "runs" / "bench.json"
    assert main(["bench", "quant", "--numel", "4096", "--backend", "reference", "--json", str(out)]) == 0
    assert calls == [("quant", {"numel": 4096, "backend": "reference"})]
    assert "TABLE 1 rows" in capsys.readouterr().out
    assert json.loads(out.read_text()) == [{"impl": "tilewise", "median_ms": 1.5}]
    assert main(["bench", "mixers", "--seqlens", "256", "512"]) == 0
    assert calls[-1] == ("mixers", {"seqlens": [256, 512]})
    with pytest.raises(SystemExit, match="--seqlens is an option of the mixers suite"):
        main(["bench", "quant", "--seqlens", "256"])


def test_plan_prints_the_breakdown(capsys) -> None:
    from tilewise.cli import main

    assert main(["plan", "--model", "tiny", "--optim", "adamw8bit", "--batch-size", "2", "--seq-len", "64"]) == 0
    out = capsys.readouterr().out
    for category in ("weights", "gradients", "optimizer_state", "activations", "total"):
        assert category in out
    assert main(["plan", "--model", "nope"]) == 2


def test_plan_budget_prints_the_train_command(capsys) -> None:
    from tilewise.cli import main

    assert main(["plan", "--budget", "8GiB", "--model", "base"]) == 0
    out = capsys.readouterr().out
    assert "does not fit" in out
    assert "tilewise train --model base --optim adamw8bit --batch-size 8 --seq-len 1024" in out
    assert "tilewise plan --model base --optim adamw8bit" in out
    assert main(["plan", "--budget", "1MiB", "--model", "llama-7b"]) == 1
    assert "Nothing fits" in capsys.readouterr().out
