"""Training: the trainer and the byte-level corpus behind ``tilewise train``.

Example:
    >>> from tilewise.train import TrainConfig, train
    >>> run_dir = train(TrainConfig())  # tiny model, built-in corpus; writes runs/tiny-<time>/

    >>> from tilewise.train import build_corpus
    >>> corpus = build_corpus(max_bytes=400_000)  # pydoc topics + stdlib sources, cached; nothing is downloaded
    >>> x, y = corpus.batch("train", batch_size=8, seq_len=128)
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
