"""A byte-level training corpus built at run time from what every Python install already has; nothing is downloaded.

Sources:

- Default: the English text of ``pydoc_data.topics.topics`` (one document per topic) plus the standard library's
  ``.py`` files under ``sysconfig.get_paths()["stdlib"]`` (one document per file). Folders named ``site-packages``,
  ``dist-packages``, ``test``, ``tests``, ``idle_test``, ``__pycache__``, ``lib-dynload`` and hidden folders are
  skipped: third-party code varies between machines and the test suites are large, repetitive fixtures. ``idlelib``
  is kept: it is ordinary application code.
- ``data=PATH``: one text file (any extension), or a folder whose files with a text extension (``TEXT_SUFFIXES``)
  are read recursively; hidden files and folders are skipped. A file with NUL bytes or that is not UTF-8 is skipped
  with a warning.

Documents are ordered by a stable hash of their name (a relative path or ``pydoc:<topic>``), so a ``max_bytes`` cap
takes an even mix of English and code; the last document taken is cut to fill the cap exactly. Each document then
goes wholly to train or to validation by a second, independent hash of its name (validation when it falls below
``val_fraction``), so validation never shares a document with training and the split does not move when other
documents are added. If the hash leaves a split empty, the document nearest the threshold moves over; a corpus of a
single document is split by bytes instead (the last ``val_fraction`` of it is validation).

The splits are cached as raw bytes (``train.bin``, ``val.bin``) beside a ``meta.json`` in
``<cache_dir>/<key>``, where ``cache_dir`` defaults to ``$TILEWISE_CACHE/corpus`` or ``~/.cache/tilewise/corpus``
and the key hashes the sources' paths, sizes and modification times with the settings. A cache entry is written to
a temporary folder and renamed into place, so a reader never sees half of one.

Example:
    >>> import tempfile
    >>> import torch
    >>> from tilewise.train import build_corpus
    >>> with tempfile.TemporaryDirectory() as cache:  # the default cache is ~/.cache/tilewise/corpus
    ...     corpus = build_corpus(max_bytes=400_000, cache_dir=cache)
    ...     again = build_corpus(max_bytes=400_000, cache_dir=cache)
    >>> corpus.train.numel() + corpus.val.numel(), corpus.cached, again.cached, torch.equal(again.val, corpus.val)
    (400000, False, True, True)
    >>> x, y = corpus.batch("train", batch_size=8, seq_len=128, generator=torch.Generator().manual_seed(0))
    >>> x.shape, x.dtype, bool((x[:, 1:] == y[:, :-1]).all())
    (torch.Size([8, 128]), torch.int64, True)
    >>> 4.0 < corpus.unigram_bits_per_byte("val") < 5.0  # a byte-frequency model's score: about 4.6 (Python 3.11)
    True
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import sysconfig
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = ["DEFAULT_MAX_BYTES", "TEXT_SUFFIXES", "Corpus", "build_corpus", "default_cache_dir"]

DEFAULT_MAX_BYTES = 8_000_000
"""The built-in corpus's size when ``max_bytes`` is None: light enough for a CPU run."""

TEXT_SUFFIXES = frozenset(
    {".txt", ".md", ".rst", ".py", ".pyi", ".json", ".jsonl", ".csv", ".tsv", ".toml", ".yaml", ".yml", ".ini",
     ".cfg", ".html", ".htm", ".xml", ".tex", ".c", ".h", ".cc", ".cpp", ".hpp", ".rs", ".go", ".js", ".ts",
     ".java", ".sh", ".log"}
)  # fmt: skip
"""File extensions read from a ``data`` folder (a single file given as ``data`` is read whatever its extension)."""

_SKIPPED_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "lib-dynload"}
)
_FORMAT = 1  # bump when the cache layout or the selection/split rules change
_SPLITS = ("train", "val")


@dataclass
class _Source:
    """A document not yet read: its name (which decides its order and split), byte size and a reader."""

    name: str
    size: int
    read: Callable[[], bytes]
    stamp: tuple[str, int, int]  # (path, size, mtime_ns) for the cache key


@dataclass
class Corpus:
    """A byte-level corpus: ``train`` and ``val`` as 1-D ``torch.uint8`` tensors of raw bytes, tokens 0..255.

    Attributes:
        train, val: ``[N]`` uint8 tensors (each document's bytes, concatenated).
        description: where the bytes came from, for logs.
        meta: the cache's ``meta.json`` (sizes, documents of each split, content hash, Python version).
        path: the cache folder, or None for a corpus made by hand.
        cached: True when this corpus was loaded from an existing cache entry.
        vocab_size: 256, one token per byte value.

    Example:
        >>> import torch
        >>> from tilewise.train import Corpus
        >>> c = Corpus(torch.tensor(list(b"aaab"), dtype=torch.uint8), torch.tensor(list(b"ab"), dtype=torch.uint8))
        >>> c.vocab_size, c.train.numel(), c.val.numel(), c.cached
        (256, 4, 2, False)
        >>> round(c.unigram_bits_per_byte(), 4)  # (log2(260/4) + log2(260/2)) / 2
        6.5224
    """

    train: torch.Tensor
    val: torch.Tensor
    description: str = "hand-made"
    meta: dict = field(default_factory=dict)
    path: Path | None = None
    cached: bool = False
    vocab_size: int = 256

    def __post_init__(self) -> None:
        for name in _SPLITS:
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.dim() != 1 or t.numel() == 0:
                raise ValueError(f"Corpus.{name} must be a non-empty 1-D torch.uint8 tensor, got {t!r:.80}")

    def _split(self, split: str) -> torch.Tensor:
        if split not in _SPLITS:
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        return self.train if split == "train" else self.val

    def batch(
        self, split: str, batch_size: int, seq_len: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample ``batch_size`` windows of ``seq_len + 1`` bytes at uniform random offsets of a split.

        Returns ``(x, y)``, both int64 ``[B, T]`` (T = ``seq_len``) on the CPU, with ``y[:, t] == x[:, t + 1]``: ``y``
        is the next byte after each position of ``x``.

        Example:
            >>> import torch
            >>> from tilewise.train import Corpus
            >>> letters = torch.tensor(list(b"abcdefghijklmnopqrstuvwxyz"), dtype=torch.uint8)
            >>> corpus = Corpus(train=letters, val=letters)
            >>> x, y = corpus.batch("val", 4, 8, torch.Generator().manual_seed(0))
            >>> x.shape, y.dtype, bool((y == x + 1).all())  # consecutive letters: each target is the next byte
            (torch.Size([4, 8]), torch.int64, True)
            >>> corpus.batch("val", 1, 26)
            Traceback (most recent call last):
            ...
            ValueError: seq_len + 1 = 27 is longer than the val split (26 bytes); use a shorter seq_len or ...
        """
        data = self._split(split)
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be >= 1, got batch_size={batch_size}, seq_len={seq_len}")
        if seq_len + 1 > data.numel():
            raise ValueError(
                f"seq_len + 1 = {seq_len + 1} is longer than the {split} split ({data.numel()} bytes); "
                "use a shorter seq_len or a larger corpus"
            )
        starts = torch.randint(0, data.numel() - seq_len, (batch_size,), generator=generator)
        windows = data[starts[:, None] + torch.arange(seq_len + 1)].long()
        return windows[:, :-1], windows[:, 1:]

    def unigram_bits_per_byte(self, split: str = "val") -> float:
        """The cross-entropy, in bits per byte, of a byte-frequency model fitted on train and measured on ``split``.

        The model is ``p(b) = (count_train(b) + 1) / (len(train) + 256)`` (add-one smoothing, so no byte has zero
        probability); the result is ``-mean(log2 p(b))`` over the bytes of ``split``. It is the baseline a language
        model must beat: a model that ignores context scores this.

        Example:
            >>> import torch
            >>> from tilewise.train import Corpus
            >>> c = Corpus(torch.tensor(list(b"abab"), dtype=torch.uint8), torch.tensor(list(b"zz"), dtype=torch.uint8))
            >>> round(c.unigram_bits_per_byte("train"), 4)  # p(a) = p(b) = (2 + 1) / (4 + 256): log2(260 / 3)
            6.4374
            >>> round(c.unigram_bits_per_byte("val"), 4)  # 'z' is not in train: p = 1 / 260, log2(260)
            8.0224
        """
        target = self._split(split)
        counts = torch.bincount(self.train.long(), minlength=256).double() + 1.0
        log2p = torch.log2(counts / counts.sum())
        target_counts = torch.bincount(target.long(), minlength=256).double()
        return float(-(target_counts * log2p).sum() / target_counts.sum())


def default_cache_dir() -> Path:
    """``$TILEWISE_CACHE/corpus`` if ``TILEWISE_CACHE`` is set, else ``~/.cache/tilewise/corpus``.

    Example:
        >>> import os
        >>> from pathlib import Path
        >>> from unittest import mock
        >>> from tilewise.train import default_cache_dir
        >>> with mock.patch.dict(os.environ, {"TILEWISE_CACHE": "/data/tw-cache"}):
        ...     print(default_cache_dir().as_posix())
        /data/tw-cache/corpus
        >>> with mock.patch.dict(os.environ):  # restores the environment afterwards
        ...     _ = os.environ.pop("TILEWISE_CACHE", None)
        ...     print(default_cache_dir() == Path.home() / ".cache" / "tilewise" / "corpus")
        True
    """
    root = os.environ.get("TILEWISE_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "tilewise") / "corpus"


def _hash01(salt: str, name: str) -> float:
    """A stable number in [0, 1) from a name (unlike ``hash()``, identical across runs and machines)."""
    return int.from_bytes(hashlib.sha256(f"{salt}:{name}".encode()).digest()[:8], "big") / 2**64


def _file_source(path: Path, name: str) -> _Source:
    st = path.stat()
    return _Source(name, st.st_size, path.read_bytes, (str(path), st.st_size, st.st_mtime_ns))


def _default_sources() -> tuple[list[_Source], str]:
    """pydoc topics (one document each) and the stdlib's ``.py`` files, in sorted order."""
    import pydoc_data.topics as topics_module

    topics: dict[str, str] = topics_module.topics
    topics_path = Path(topics_module.__file__)
    st = topics_path.stat()
    stamp = (str(topics_path), st.st_size, st.st_mtime_ns)
    sources = []
    for key in sorted(topics):
        text = topics[key].encode("utf-8")
        sources.append(_Source(f"pydoc:{key}", len(text), lambda text=text: text, stamp))

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for dirpath, dirnames, filenames in os.walk(stdlib):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIPPED_DIRS and not d.startswith("."))
        for fname in sorted(filenames):
            if fname.endswith(".py"):
                path = Path(dirpath, fname)
                sources.append(_file_source(path, "stdlib/" + path.relative_to(stdlib).as_posix()))
    version = ".".join(map(str, sys.version_info[:3]))
    return sources, f"pydoc topics + stdlib .py sources of Python {version} ({stdlib})"


def _data_sources(data: Path) -> tuple[list[_Source], str]:
    """One file, or the text files of a folder (recursively, sorted, hidden entries skipped)."""
    if not data.exists():
        raise ValueError(f"data path {str(data)!r} does not exist; pass an existing text file or folder")
    data = data.resolve()
    if data.is_file():
        return [_file_source(data, data.name)], f"file {data}"
    sources = []
    for dirpath, dirnames, filenames in os.walk(data):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__")
        for fname in sorted(filenames):
            path = Path(dirpath, fname)
            if not fname.startswith(".") and path.suffix.lower() in TEXT_SUFFIXES and path.is_file():
                sources.append(_file_source(path, path.relative_to(data).as_posix()))
    return sources, f"text files under {data}"


def _read_text(source: _Source) -> bytes | None:
    """The document's bytes, or None (with a warning) when it cannot be read or is not UTF-8 text."""
    try:
        raw = source.read()
    except OSError as e:
        warnings.warn(f"skipping {source.name!r}: cannot read it ({e})", stacklevel=4)
        return None
    try:
        if b"\x00" in raw:
            raise UnicodeDecodeError("utf-8", raw, raw.index(b"\x00"), raw.index(b"\x00") + 1, "NUL byte")
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        warnings.warn(f"skipping {source.name!r}: binary or not UTF-8 ({e.reason} at byte {e.start})", stacklevel=4)
        return None
    return raw


def _select(sources: list[_Source], max_bytes: int | None) -> list[tuple[str, bytes]]:
    """Read documents in stable-hash order until ``max_bytes``; the last one is cut to fill the cap."""
    docs: list[tuple[str, bytes]] = []
    remaining = max_bytes if max_bytes is not None else float("inf")
    for source in sorted(sources, key=lambda s: (_hash01("order", s.name), s.name)):
        if remaining <= 0:
            break
        raw = _read_text(source)
        if raw:
            raw = raw[: int(min(remaining, len(raw)))]
            docs.append((source.name, raw))
            remaining -= len(raw)
    return docs


def _split_documents(docs: list[tuple[str, bytes]], val_fraction: float) -> dict[str, list[tuple[str, bytes]]]:
    """Whole documents to train or val by a stable hash of the name; one document is split by bytes."""
    if len(docs) == 1:
        name, raw = docs[0]
        if len(raw) < 2:
            raise ValueError(f"the data has {len(raw)} byte(s); a train/validation split needs at least 2")
        n_val = min(len(raw) - 1, max(1, round(len(raw) * val_fraction)))
        return {"train": [(name, raw[:-n_val])], "val": [(name + "#tail", raw[-n_val:])]}
    ranked = sorted(docs, key=lambda d: (_hash01("split", d[0]), d[0]))
    n_val = sum(_hash01("split", name) < val_fraction for name, _ in docs)
    n_val = min(len(docs) - 1, max(1, n_val))  # both splits non-empty: move the document nearest the threshold
    return {"train": sorted(ranked[n_val:]), "val": sorted(ranked[:n_val])}


def _cache_key(description: str, sources: list[_Source], val_fraction: float, max_bytes: int | None) -> str:
    stamps = sorted({s.stamp for s in sources})
    blob = json.dumps([_FORMAT, sys.version, description, stamps, val_fraction, max_bytes])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _load(folder: Path) -> Corpus | None:
    """The cached corpus in ``folder``, or None if it is missing or does not match its ``meta.json``."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
        parts = {s: (folder / f"{s}.bin").read_bytes() for s in _SPLITS}
    except (OSError, ValueError):
        return None
    if meta.get("format") != _FORMAT or hashlib.sha256(parts["train"] + parts["val"]).hexdigest() != meta.get("sha256"):
        return None
    tensors = {s: torch.frombuffer(bytearray(parts[s]), dtype=torch.uint8) for s in _SPLITS}
    return Corpus(tensors["train"], tensors["val"], meta["description"], meta, folder, cached=True)


def _write(folder: Path, parts: dict[str, bytes], meta: dict) -> None:
    """Write the cache entry into a temporary folder beside ``folder`` and rename it into place."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        for split in _SPLITS:
            (tmp / f"{split}.bin").write_bytes(parts[split])
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        if folder.exists():  # a stale or corrupt entry (a valid one was loaded before we got here)
            shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    except OSError:
        if not (folder / "meta.json").exists():  # another process did not win the race either: a real failure
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def build_corpus(
    data: str | Path | None = None,
    *,
    cache_dir: str | Path | None = None,
    val_fraction: float = 0.05,
    max_bytes: int | None = None,
) -> Corpus:
    """Build (or load from the cache) a byte-level corpus; see the module docstring for sources, split and cache.

    Args:
        data: a text file or a folder of text files; None (default) for the built-in corpus of pydoc topics and
            stdlib sources.
        cache_dir: the folder holding cache entries (one subfolder per key). Default: ``default_cache_dir()``.
        val_fraction: the expected share of documents (of bytes, for a single document) held out for validation,
            in (0, 1). Default 0.05.
        max_bytes: a cap on the corpus size in bytes. None (default): ``DEFAULT_MAX_BYTES`` (8 MB) for the
            built-in corpus, no cap for ``data``.

    Returns:
        A ``Corpus`` with non-empty ``train`` and ``val`` uint8 tensors.

    Raises:
        ValueError: ``data`` does not exist, holds no readable text, or the settings are out of range.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from tilewise.train import build_corpus
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     notes = Path(tmp, "notes")
        ...     notes.mkdir()
        ...     for i in range(20):
        ...         _ = Path(notes, f"note{i:02d}.md").write_text(f"Note {i}: remember the milk. " * 4)
        ...     _ = Path(notes, "photo.png").write_bytes(b"PNG")  # not a text extension: not read
        ...     corpus = build_corpus(notes, cache_dir=Path(tmp, "cache"), val_fraction=0.2)
        >>> print(corpus.description)
        text files under ...notes: 2,200 bytes in 20 documents
        >>> len(corpus.meta["documents"]["train"]), len(corpus.meta["documents"]["val"])  # whole documents
        (15, 5)
        >>> build_corpus("no/such/folder")
        Traceback (most recent call last):
        ...
        ValueError: data path 'no/such/folder' does not exist; pass an existing text file or folder
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if max_bytes is not None and max_bytes < 2:
        raise ValueError(f"max_bytes must be >= 2 (or None for the default), got {max_bytes}")
    if data is None:
        sources, description = _default_sources()
        max_bytes = DEFAULT_MAX_BYTES if max_bytes is None else max_bytes
    else:
        sources, description = _data_sources(Path(data).expanduser())
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    folder = folder / _cache_key(description, sources, val_fraction, max_bytes)
    cached = _load(folder)
    if cached is not None:
        return cached

    docs = _select(sources, max_bytes)
    if not docs:
        raise ValueError(f"no readable UTF-8 text found in {description}; pass a text file or a folder of them")
    splits = _split_documents(docs, val_fraction)
    parts = {s: b"".join(raw for _, raw in splits[s]) for s in _SPLITS}
    meta = {
        "format": _FORMAT,
        "description": f"{description}: {sum(map(len, parts.values())):,} bytes in {len(docs)} documents",
        "python": sys.version,
        "val_fraction": val_fraction,
        "max_bytes": max_bytes,
        "train_bytes": len(parts["train"]),
        "val_bytes": len(parts["val"]),
        "sha256": hashlib.sha256(parts["train"] + parts["val"]).hexdigest(),
        "documents": {s: [[name, len(raw)] for name, raw in splits[s]] for s in _SPLITS},
    }
    _write(folder, parts, meta)
    tensors = {s: torch.frombuffer(bytearray(parts[s]), dtype=torch.uint8) for s in _SPLITS}
    return Corpus(tensors["train"], tensors["val"], meta["description"], meta, folder, cached=False)
