"""Training: the trainer and the byte-level corpus behind ``tilewise train``.

Example:
    >>> import contextlib
    >>> import io
    >>> import tempfile
    >>> from pathlib import Path
    >>> from tilewise.train import TrainConfig, latest_checkpoint, train
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     text = Path(tmp, "notes.txt")  # data=None: the built-in corpus (pydoc topics + stdlib sources)
    ...     _ = text.write_text("Train a byte-level model on a text file. " * 120)
    ...     config = TrainConfig(  # out=None: runs/tiny-<time>; cache_dir=None: ~/.cache/tilewise/corpus
    ...         steps=2, batch_size=2, seq_len=16, eval_batches=1, device="cpu", data=str(text), cache_dir=tmp,
    ...         out=f"{tmp}/run",
    ...     )
    ...     with contextlib.redirect_stdout(io.StringIO()) as log:  # progress, memory table, validation
    ...         run_dir = train(config)
    ...     lines = log.getvalue().splitlines()
    ...     print(lines[0])
    ...     print(lines[-1] == str(run_dir), latest_checkpoint(run_dir).name)
    ...     print(sorted(p.name for p in run_dir.iterdir() if p.suffix != ".png"))  # + plots with matplotlib
    tiny (918,656 parameters) on cpu, adamw, corpus: file ...notes.txt: 4,920 bytes in 1 documents
    True step-0000002
    ['checkpoints', 'config.json', 'metrics.jsonl', 'report.md']
"""

from tilewise.train.checkpoint import latest_checkpoint, load_safetensors, save_safetensors
from tilewise.train.corpus import DEFAULT_MAX_BYTES, TEXT_SUFFIXES, Corpus, build_corpus, default_cache_dir
from tilewise.train.trainer import OPTIMIZERS, TrainConfig, load_config, train

__all__ = [
    "DEFAULT_MAX_BYTES",
    "OPTIMIZERS",
    "TEXT_SUFFIXES",
    "Corpus",
    "TrainConfig",
    "build_corpus",
    "default_cache_dir",
    "latest_checkpoint",
    "load_config",
    "load_safetensors",
    "save_safetensors",
    "train",
]
