"""The trainer: run directory, metrics, checkpoints, exact resume, Ctrl-C, and the CLI; tiny runs on a small file."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tilewise.train import TrainConfig, latest_checkpoint, load_config, load_safetensors, save_safetensors, train
from tilewise.train.checkpoint import list_checkpoints
from tilewise.train.corpus import Corpus
from tilewise.train.trainer import lr_at

SRC = Path(__file__).resolve().parents[2] / "src"


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in _rows(run_dir) if "loss" in r]


def _val(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["val_loss"]) for r in _rows(run_dir) if "val_loss" in r]


def test_run_directory(base: TrainConfig, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = train(base)
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(run_dir)
    assert {p.name for p in run_dir.iterdir()} >= {"config.json", "metrics.jsonl", "checkpoints", "report.md"}
    assert load_config(run_dir) == base
    rows = _rows(run_dir)
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 9))
    assert all(math.isfinite(r["loss"]) and r["tokens_per_s"] > 0 for r in rows if "loss" in r)
    evals = [r for r in rows if "val_bpb" in r]
    assert [r["step"] for r in evals] == [4, 8]
    assert all(r["val_bpb"] == pytest.approx(r["val_loss"] / math.log(2)) for r in evals)
    report = (run_dir / "report.md").read_text()
    assert f"{evals[-1]['val_bpb']:.3f} bits/byte" in report
    assert "unigram baseline" in report
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-0000004", "step-0000008"]


def test_checkpoint_contents(base: TrainConfig) -> None:
    run_dir = train(dataclasses.replace(base, steps=2))
    folder = latest_checkpoint(run_dir)
    weights = load_safetensors(folder / "model.safetensors")
    assert "tok_embeddings.weight" in weights
    assert weights["tok_embeddings.weight"].shape == (256, 128)
    opt = torch.load(folder / "optimizer.pt", weights_only=True)
    assert set(opt["state"]) == set(weights)  # keyed by parameter name, whatever wrapped the model
    trainer = torch.load(folder / "trainer.pt", weights_only=True)
    assert int(trainer["step"]) == 2


def test_keep_last(base: TrainConfig) -> None:
    run_dir = train(dataclasses.replace(base, steps=5, save_every=1, keep_last=2))
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-0000004", "step-0000005"]
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]  # no temporary left


@pytest.mark.filterwarnings("ignore:AdamW. .* smaller than min_quant_numel")  # norms keep fp32 state: expected
@pytest.mark.parametrize("optim", ["adamw", "adamw8bit"])
def test_resume_matches_uninterrupted_run(base: TrainConfig, tmp_path: Path, optim: str) -> None:
    full = train(dataclasses.replace(base, optim=optim, out=str(tmp_path / "full")))
    half = train(dataclasses.replace(base, optim=optim, out=str(tmp_path / "half"), stop_after=4))
    assert [s for s, _ in _losses(half)] == [1, 2, 3, 4]
    resumed = train(dataclasses.replace(load_config(half), resume=str(half), stop_after=None))
    assert resumed == half
    assert _losses(resumed) == _losses(full)  # bit-exact on the CPU
    assert _val(resumed) == _val(full)


def test_ctrl_c_leaves_a_resumable_checkpoint(base: TrainConfig, tmp_path: Path) -> None:
    full = train(dataclasses.replace(base, out=str(tmp_path / "full")))

    def interrupt(row: dict) -> None:
        if row["step"] == 3:
            raise KeyboardInterrupt

    config = dataclasses.replace(base, save_every=100, out=str(tmp_path / "cut"))
    with pytest.raises(KeyboardInterrupt):
        train(config, callback=interrupt)
    assert latest_checkpoint(config.out).name == "step-0000003"
    resumed = train(dataclasses.replace(config, resume=config.out))
    assert _losses(resumed) == _losses(full)


def test_interrupt_inside_a_step_resumes_exactly(
    base: TrainConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C while the 5th step samples its batch: the checkpoint is step 4's, with step 4's sampler state."""
    full = train(dataclasses.replace(base, out=str(tmp_path / "full")))
    original = Corpus.batch
    calls = {"train": 0}

    def batch(self: Corpus, split: str, *args, **kwargs):
        out = original(self, split, *args, **kwargs)  # draws from the generator first, as a real interrupt would
        if split == "train":
            calls["train"] += 1
            if calls["train"] == 5:
                raise KeyboardInterrupt
        return out

    monkeypatch.setattr(Corpus, "batch", batch)
    config = dataclasses.replace(base, save_every=100, out=str(tmp_path / "cut"))
    with pytest.raises(KeyboardInterrupt):
        train(config)
    monkeypatch.setattr(Corpus, "batch", original)
    assert latest_checkpoint(config.out).name == "step-0000004"
    assert _losses(train(dataclasses.replace(config, resume=config.out))) == _losses(full)


def test_activation_checkpointing_same_losses(base: TrainConfig, tmp_path: Path) -> None:
    plain = train(dataclasses.replace(base, steps=3, out=str(tmp_path / "a")))
    ckpt = train(dataclasses.replace(base, steps=3, out=str(tmp_path / "b"), activation_checkpointing=True))
    assert [loss for _, loss in _losses(ckpt)] == pytest.approx([loss for _, loss in _losses(plain)], rel=1e-5)


def test_lr_schedule() -> None:
    config = TrainConfig(steps=100, warmup_steps=10, lr=1.0, min_lr=0.1)
    assert lr_at(0, config) == pytest.approx(0.1)
    assert lr_at(9, config) == pytest.approx(1.0)
    assert lr_at(55, config) == pytest.approx(0.55)  # halfway through the cosine
    assert lr_at(99, config) == pytest.approx(0.1, abs=1e-3)
    assert TrainConfig(optim="lion8bit").peak_lr < TrainConfig().peak_lr


def test_bad_settings(base: TrainConfig, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="optim must be one of"):
        TrainConfig(optim="sgd")
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps(dataclasses.asdict(base)))
    with pytest.raises(ValueError, match="no checkpoint"):
        train(dataclasses.replace(base, resume=str(empty)))


def test_safetensors_roundtrip(tmp_path: Path) -> None:
    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7).bfloat16(), "c": torch.arange(4), "e": torch.empty(0, 2)}
    save_safetensors(tensors, tmp_path / "t.safetensors")
    back = load_safetensors(tmp_path / "t.safetensors")
    assert back.keys() == tensors.keys()
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype
        assert torch.equal(back[name], t)
    st = pytest.importorskip("safetensors.torch")
    theirs = st.load_file(str(tmp_path / "t.safetensors"))
    assert all(torch.equal(theirs[name], t) for name, t in tensors.items())


def test_cli_smoke(data_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli-run"
    env = {**os.environ, "PYTHONPATH": str(SRC), "TILEWISE_CACHE": str(tmp_path / "cache")}
    args = ["--steps", "3", "--batch-size", "2", "--seq-len", "16", "--eval-every", "3", "--data", str(data_file)]
    proc = subprocess.run(
        [sys.executable, "-m", "tilewise", "train", *args, "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == str(out)
    assert "bits/byte" in proc.stdout
    assert len(_losses(out)) == 3
    assert len(_val(out)) == 1
    proc = subprocess.run(
        [sys.executable, "-m", "tilewise", "train", "--resume", str(out), "--steps", "4"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert [s for s, _ in _losses(out)] == [1, 2, 3, 4]
    assert load_config(out).steps == 4
