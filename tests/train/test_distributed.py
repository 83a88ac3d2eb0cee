"""``tilewise train --dist ddp|fsdp`` on 2 CPU processes (gloo) launched by torchrun: the loss trajectory matches one
process with the same global batch, rank 0 alone writes the run, and checkpoints move between DDP, FSDP and one
process."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tilewise._testing import assert_rel_rms
from tilewise.nn import build_model
from tilewise.optim import AdamW8bit
from tilewise.train import TrainConfig, latest_checkpoint, load_config, train
from tilewise.train.checkpoint import read_checkpoint
from tilewise.train.distributed import Dist
from tilewise.train.report import read_metrics
from tilewise.train.trainer import _check_even_shards

pytestmark = [
    pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed (gloo)"),
    pytest.mark.filterwarnings("ignore:AdamW. .* smaller than min_quant_numel"),  # norms keep fp32 state
]

SRC = Path(__file__).resolve().parents[2] / "src"
# The same fp32 math, summed in another order: each rank's loss is the mean of its 2 rows and the gradient
# all-reduce averages the ranks, where one process takes the mean of 4 rows. Gradients then differ in the last bit
# or two, and 8-bit state can turn that into a rare code flip; over 4 steps the losses measured here differ by
# < 1e-6 relative. 1e-5 stays well below what a real fault moves: another batch slicing changes the loss by
# percents, and losing the optimizer state at a resume moves step 4's loss by 4%.
RTOL = 1e-5


def _flags(config: TrainConfig) -> list[str]:
    names = ("optim", "steps", "batch_size", "seq_len", "warmup_steps", "eval_every", "save_every", "data")
    return [arg for name in names for arg in (f"--{name.replace('_', '-')}", str(getattr(config, name)))]


def _torchrun(*args: str, cache: Path) -> str:
    """``python -m torch.distributed.run --nproc-per-node 2 --standalone -m tilewise train ARGS``; its stdout."""
    env = {**os.environ, "PYTHONPATH": str(SRC), "TILEWISE_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone"]
    proc = subprocess.run(
        [*launch, "-m", "tilewise", "train", *args], capture_output=True, text=True, env=env, timeout=240, check=False
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


def _trajectory(run_dir: Path) -> list[tuple[int, str, float]]:
    rows = read_metrics(run_dir / "metrics.jsonl")
    return [(r["step"], key, r[key]) for r in rows for key in ("loss", "grad_norm", "val_loss") if key in r]


def _assert_same_trajectory(got: Path, want: Path) -> None:
    a, b = _trajectory(got), _trajectory(want)
    assert [(s, k) for s, k, _ in a] == [(s, k) for s, k, _ in b]
    assert [v for _, _, v in a] == pytest.approx([v for _, _, v in b], rel=RTOL)


def test_ddp_then_fsdp_match_one_process(base: TrainConfig, tmp_path: Path) -> None:
    """Steps 1-2 under DDP, then a resume under FSDP for steps 3-4, both on 2 ranks with 8-bit AdamW: the losses,
    gradient norms and validation losses follow one process on the same global batch. The resume shards the DDP
    checkpoint (the same files one process writes), including the quantized optimizer state (DTensors under
    FSDP2); the last checkpoint, gathered from the shards, holds what the single process holds."""
    # batch 4 is global (2 rows per rank); eval_batches: the CLI's default, which _flags does not pass
    config = dataclasses.replace(base, optim="adamw8bit", steps=4, batch_size=4, eval_every=2, eval_batches=8)
    config = dataclasses.replace(config, save_every=100, out=str(tmp_path / "single"))
    single = train(config)
    out, cache = tmp_path / "dist", tmp_path / "cache"
    stdout = _torchrun(*_flags(config), "--dist", "ddp", "--stop-after", "2", "--out", str(out), cache=cache)
    # rank 0 alone prints and writes: one header, one line per evaluation, the run directory last
    lines = stdout.strip().splitlines()
    assert lines[-1] == str(out)
    assert sum("× 2 ranks (ddp, gloo)" in line for line in lines) == 1
    assert sum("val loss" in line for line in lines) == 1
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r] == [1, 2]

    _torchrun("--resume", str(out), "--dist", "fsdp", cache=cache)
    _assert_same_trajectory(out, single)
    assert load_config(out).dist == "fsdp"
    memory = {r["step"]: r["memory"] for r in read_metrics(out / "metrics.jsonl") if "memory" in r}
    assert [(m["dist"], m["ranks"]) for m in memory.values()] == [("ddp", 2), ("fsdp", 2)]
    # FSDP: each rank holds half of the weights (DDP: all of them)
    assert memory[3]["measured"]["weights"] * 2 == memory[2]["measured"]["weights"] == 918_656 * 4

    got, want = (read_checkpoint(latest_checkpoint(run)) for run in (out, single))
    assert got[0].keys() == want[0].keys()
    for name, tensor in want[0].items():
        # A rare 8-bit code flip (about 0.05% of the codes here) moves one element by at most a learning-rate step
        # (relative RMS error ~1e-4 at most); a shard put back in the wrong place moves the weights by their own
        # size (~1), and a lost moment moves every element by about a step (~5e-2).
        assert_rel_rms(got[0][name], tensor, rel=1e-3, msg=name)
    shapes = [
        {n: {k: (v.dtype, v.shape) for k, v in s.items()} for n, s in opt["state"].items()} for opt in (got[1], want[1])
    ]
    assert shapes[0] == shapes[1]


def test_fsdp_refuses_uneven_shards_of_quantized_state() -> None:
    """The check reads shapes only: 3 ranks cannot split the 256-row embedding evenly, 2 can."""
    model = build_model("tiny")
    _check_even_shards(model, AdamW8bit(model.parameters()), Dist("fsdp", 0, 2))
    _check_even_shards(model, torch.optim.AdamW(model.parameters()), Dist("fsdp", 0, 3))  # its state is a DTensor
    with pytest.raises(ValueError, match=r"3 ranks splits tok_embeddings.weight \(256, 128\) unevenly"):
        _check_even_shards(model, AdamW8bit(model.parameters()), Dist("fsdp", 0, 3))


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_dist_without_torchrun_runs_as_one_rank(base: TrainConfig, tmp_path: Path, mode: str) -> None:
    """No torchrun environment: a process group of one (created and destroyed by train), one process's losses."""
    plain = train(dataclasses.replace(base, steps=2, out=str(tmp_path / "plain")))
    run = train(dataclasses.replace(base, steps=2, dist=mode, out=str(tmp_path / mode)))
    _assert_same_trajectory(run, plain)
    assert not torch.distributed.is_initialized()
