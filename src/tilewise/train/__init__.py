"""Training: the byte-level corpus behind ``tilewise train`` (the trainer and recipes land here too).

Example:
    >>> from tilewise.train import build_corpus
    >>> corpus = build_corpus(max_bytes=400_000)  # pydoc topics + stdlib sources, cached; nothing is downloaded
    >>> x, y = corpus.batch("train", batch_size=8, seq_len=128)
"""

from tilewise.train.corpus import DEFAULT_MAX_BYTES, TEXT_SUFFIXES, Corpus, build_corpus, default_cache_dir

__all__ = ["DEFAULT_MAX_BYTES", "TEXT_SUFFIXES", "Corpus", "build_corpus", "default_cache_dir"]
