"""What a run reports: the measured memory of one step beside the estimate, report.md, loss.png and memory.png."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path

import pytest

from tilewise.memory import Recipe, estimate
from tilewise.nn import build_model
from tilewise.train import TrainConfig, train
from tilewise.train.distributed import Dist
from tilewise.train.report import read_metrics, write_report

pytestmark = pytest.mark.filterwarnings("ignore:AdamW. .* smaller than min_quant_numel")  # norms keep fp32 state


def _memory(run_dir: Path) -> tuple[int, dict]:
    (row,) = [r for r in read_metrics(run_dir / "metrics.jsonl") if "memory" in r]
    return row["step"], row["memory"]


@pytest.fixture(scope="module")
def runs(data_file: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two-step runs (B=2, T=16) with torch's AdamW and with 8-bit AdamW."""
    folder = tmp_path_factory.mktemp("runs")
    config = TrainConfig(
        steps=2, batch_size=2, seq_len=16, warmup_steps=1, eval_batches=1, data=str(data_file), cache_dir=str(folder)
    )
    return {o: train(dataclasses.replace(config, optim=o, out=str(folder / o))) for o in ("adamw", "adamw8bit")}


def test_measured_weights_gradients_optimizer_bytes(runs: dict[str, Path]) -> None:
    """Exact byte counts, each from the model's shapes and the documented state layouts, not from the trainer."""
    params = list(build_model("tiny").parameters())
    weights = sum(p.numel() * p.element_size() for p in params)
    assert weights == 918_656 * 4
    step, adamw = _memory(runs["adamw"])
    assert step == 2  # the second step: the optimizer state exists by then
    assert adamw["measured"]["weights"] == weights
    assert adamw["measured"]["gradients"] == weights
    # torch.optim.AdamW: exp_avg and exp_avg_sq in fp32, and a 4-byte `step` per tensor
    assert adamw["measured"]["optimizer_state"] == 2 * weights + 4 * len(params)
    # tilewise 8-bit: per moment 1-byte codes and an fp32 scale per 256 elements; fp32 moments below 4096 elements;
    # fp32 `step` and `skips`
    q8 = sum(2 * (p.numel() + 4 * math.ceil(p.numel() / 256)) if p.numel() >= 4096 else 8 * p.numel() for p in params)
    _, adamw8bit = _memory(runs["adamw8bit"])
    assert adamw8bit["measured"]["optimizer_state"] == q8 + 8 * len(params)
    assert adamw8bit["measured"]["optimizer_state"] < 0.3 * adamw["measured"]["optimizer_state"]


def test_measured_activations_beside_the_estimate(runs: dict[str, Path]) -> None:
    _, memory = _memory(runs["adamw"])
    activations = memory["measured"]["activations"]
    B, T, V = 2, 16, 256
    assert activations > 4 * B * T * V  # at least the fp32 log-softmax that cross-entropy keeps for backward
    assert (
        memory["predicted"] == estimate("tiny", Recipe(optim="adamw", batch_size=B, seq_len=T, device="cpu")).as_dict()
    )
    # The estimator's per-block formulas are read off these same saved tensors (tests/memory checks a bare forward
    # to 1%); a training step saves nothing more, so 5% leaves room only for small [T]-sized extras, while a
    # missing [B, T, hidden] tensor per block would move it by over 10%.
    assert activations == pytest.approx(memory["predicted"]["activations"], rel=0.05)
    assert memory["measured"]["other"] == 0  # the CPU has no allocator statistics
    parts = ("weights", "gradients", "optimizer_state", "activations")
    assert memory["measured"]["peak"] == sum(memory["measured"][c] for c in parts)


def test_report_and_summary_show_the_memory_table(runs: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    report = (runs["adamw"] / "report.md").read_text().splitlines()
    expected = [
        "## Memory of step 2 on cpu",
        "| category | predicted MiB | measured MiB | measured/predicted |",
        "| weights | 3.50 | 3.50 | 1.00 |",
        "| optimizer_state | 7.01 | 7.01 | 1.00 |",
        "| other | 64.00 | n/a | - |",
        "- Predicted: `tilewise plan --model tiny --optim adamw --batch-size 2 --seq-len 16 --device cpu`.",
    ]
    assert [line for line in report if line in expected] == expected
    summary = "\n".join(write_report(runs["adamw8bit"], TrainConfig(optim="adamw8bit"), 4.0, Dist())).splitlines()
    assert summary[0] == "memory of step 2 on cpu:"
    assert summary[1].split() == ["category", "predicted", "MiB", "measured", "MiB", "measured/predicted"]
    assert summary[2].split()[:3] == ["weights", "3.50", "3.50"]
    assert summary[-1].startswith("val ")


def test_plots_are_pngs(runs: dict[str, Path]) -> None:
    plt = pytest.importorskip("matplotlib.pyplot")
    for name, size in (("loss.png", (840, 480)), ("memory.png", (840, 420))):  # figsize × 120 dpi
        path = runs["adamw"] / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        height, width, _ = plt.imread(path).shape
        assert (width, height) == size
    report = (runs["adamw"] / "report.md").read_text()
    assert "- loss curve: loss.png" in report
    assert "- memory chart: memory.png" in report


def test_without_matplotlib_the_report_says_so(
    runs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = tmp_path / "copy"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_bytes((runs["adamw"] / "metrics.jsonl").read_bytes())
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    write_report(run_dir, TrainConfig(), 4.0, Dist())
    report = (run_dir / "report.md").read_text()
    assert "- loss curve: skipped (install the `plot` extra: matplotlib)" in report
    assert "- memory chart: skipped" in report
    assert not list(run_dir.glob("*.png"))
    assert "| activations |" in report


def test_cuda_memory_row_compares_the_allocator_peak(tmp_path: Path) -> None:
    """A row as a CUDA run writes it (no GPU needed to format one): `other` and the peak are measured there."""
    mib = 2**20
    measured = {"weights": 4 * mib, "gradients": 4 * mib, "optimizer_state": 2 * mib, "activations": 6 * mib}
    measured |= {"other": 2 * mib, "peak": 18 * mib}
    predicted = {"weights": 4 * mib, "gradients": 4 * mib, "optimizer_state": 2 * mib, "activations": 5 * mib}
    predicted |= {"other": 64 * mib, "total": 79 * mib}
    memory = {"device": "cuda", "dist": "fsdp", "ranks": 2, "measured": measured, "predicted": predicted, "plan": "p"}
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 2, "memory": memory}) + "\n")
    write_report(tmp_path, TrainConfig(), 4.0, Dist("fsdp", 0, 2))
    report = (tmp_path / "report.md").read_text().splitlines()
    expected = [
        "- data parallel: fsdp over 2 ranks, 8 of the 16 sequences of a micro-batch each",
        "## Memory of step 2 on cuda, per rank of 2 (fsdp)",
        "| activations | 5.00 | 6.00 | 1.20 |",
        "| other | 64.00 | 2.00 | 0.03 |",
        "| total (peak) | 79.00 | 18.00 | 0.23 |",
        "- Measured: peak = torch.cuda.max_memory_allocated over the step, other = the peak less the four "
        "categories; activations: what one micro-batch saves for backward.",
        "- Predicted: `p`, weights, gradients and optimizer state divided by the ranks (FSDP).",
    ]
    assert [line for line in report if line in expected] == expected
