"""Shared by the trainer's tests: a small text file to train on and a config that runs in a second or two."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tilewise.train import TrainConfig


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 40 kB of varied English-like text: fast to build and train on."""
    words = [
        "the",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "a",
        "lazy",
        "dog",
        "while",
        "seven",
        "wizards",
        "quietly",
        "hex",
        "jolly",
        "bakers",
    ]
    gen = torch.Generator().manual_seed(0)
    picks = torch.randint(0, len(words), (8000,), generator=gen).tolist()
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text(" ".join(words[i] for i in picks) + "\n")
    return path


@pytest.fixture
def base(data_file: Path, tmp_path: Path) -> TrainConfig:
    return TrainConfig(
        steps=8,
        batch_size=2,
        seq_len=16,
        warmup_steps=2,
        eval_every=4,
        eval_batches=2,
        save_every=4,
        data=str(data_file),
        cache_dir=str(tmp_path / "cache"),
        out=str(tmp_path / "run"),
    )
