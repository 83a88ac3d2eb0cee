"""tilewise.train.corpus: the built-in corpus (determinism, cache, split), ``data`` files and folders, binary files,
errors, batch windows, and the unigram bits-per-byte baseline against a hand computation."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from tilewise.train import Corpus, build_corpus, default_cache_dir

SMALL = 400_000


@pytest.fixture(scope="module")
def default_corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    return build_corpus(cache_dir=tmp_path_factory.mktemp("cache"), max_bytes=SMALL)


def _folder(root: Path, n: int) -> Path:
    """n documents, each a unique marker repeated, so a byte string tells which document it came from."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / f"doc{i:03d}.txt").write_text(f"<DOC{i:03d}>" * 20 + "\n")
    return root


def test_default_corpus_builds(default_corpus: Corpus) -> None:
    c = default_corpus
    assert c.train.dtype == c.val.dtype == torch.uint8
    assert c.train.numel() > 0
    assert c.val.numel() > 0
    assert c.train.numel() + c.val.numel() == SMALL
    assert c.vocab_size == 256
    assert "pydoc topics" in c.description
    names = [name for split in ("train", "val") for name, _ in c.meta["documents"][split]]
    assert all(n.startswith(("pydoc:", "stdlib/")) for n in names)
    assert not any("/site-packages/" in n or "/test/" in n or "/tests/" in n for n in names)
    meta = json.loads((c.path / "meta.json").read_text())
    assert meta["train_bytes"] == c.train.numel()
    assert meta["val_bytes"] == c.val.numel()
    assert (c.path / "train.bin").read_bytes() == bytes(c.train.tolist())


def test_default_corpus_deterministic_and_cached(default_corpus: Corpus, tmp_path: Path) -> None:
    again = build_corpus(cache_dir=default_corpus.path.parent, max_bytes=SMALL)
    assert again.cached
    assert not default_corpus.cached
    assert again.path == default_corpus.path
    assert torch.equal(again.train, default_corpus.train)
    assert torch.equal(again.val, default_corpus.val)
    fresh = build_corpus(cache_dir=tmp_path, max_bytes=SMALL)  # an independent build gives the same bytes
    assert not fresh.cached
    assert torch.equal(fresh.train, default_corpus.train)
    assert torch.equal(fresh.val, default_corpus.val)


def test_cache_reused_then_rebuilt_when_a_source_changes(tmp_path: Path) -> None:
    data = _folder(tmp_path / "data", 30)
    first = build_corpus(data, cache_dir=tmp_path / "cache")
    mtime = (first.path / "meta.json").stat().st_mtime_ns
    second = build_corpus(data, cache_dir=tmp_path / "cache")
    assert second.cached
    assert (second.path / "meta.json").stat().st_mtime_ns == mtime
    (data / "doc000.txt").write_text("changed\n" * 3)
    third = build_corpus(data, cache_dir=tmp_path / "cache")
    assert not third.cached
    assert third.path != first.path
    assert b"changed" in bytes(third.train.tolist()) + bytes(third.val.tolist())


def test_corrupt_cache_is_rebuilt(tmp_path: Path) -> None:
    data = _folder(tmp_path / "data", 10)
    first = build_corpus(data, cache_dir=tmp_path / "cache")
    (first.path / "train.bin").write_bytes(b"garbage")
    again = build_corpus(data, cache_dir=tmp_path / "cache")
    assert not again.cached
    assert torch.equal(again.train, first.train)


def test_cache_dir_env_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TILEWISE_CACHE", str(tmp_path / "tw"))
    assert default_cache_dir() == tmp_path / "tw" / "corpus"
    c = build_corpus(_folder(tmp_path / "data", 5))
    assert c.path.parent == tmp_path / "tw" / "corpus"
    assert (c.path / "val.bin").exists()
    assert not list(c.path.parent.glob(".*"))  # no temporary folder left behind


def test_split_disjoint_by_document(tmp_path: Path) -> None:
    c = build_corpus(_folder(tmp_path / "data", 60), cache_dir=tmp_path / "cache", val_fraction=0.2)
    train, val = bytes(c.train.tolist()).decode(), bytes(c.val.tolist()).decode()
    in_train = {i for i in range(60) if f"<DOC{i:03d}>" in train}
    in_val = {i for i in range(60) if f"<DOC{i:03d}>" in val}
    assert in_train
    assert in_val
    assert not in_train & in_val
    assert in_train | in_val == set(range(60))
    for i in in_val:  # whole documents: every copy of the marker is in val
        assert val.count(f"<DOC{i:03d}>") == 20
    meta_train = {name for name, _ in c.meta["documents"]["train"]}
    meta_val = {name for name, _ in c.meta["documents"]["val"]}
    assert meta_val == {f"doc{i:03d}.txt" for i in in_val}
    assert not meta_train & meta_val
    # Adding documents does not move the old ones between splits (the split hashes names only).
    (tmp_path / "data" / "extra.md").write_text("# extra\n")
    c2 = build_corpus(tmp_path / "data", cache_dir=tmp_path / "cache", val_fraction=0.2)
    assert meta_val <= {name for name, _ in c2.meta["documents"]["val"]}


def test_few_documents_still_fill_both_splits(tmp_path: Path) -> None:
    c = build_corpus(_folder(tmp_path / "data", 2), cache_dir=tmp_path / "cache")
    assert len(c.meta["documents"]["train"]) == 1
    assert len(c.meta["documents"]["val"]) == 1


def test_data_single_file_splits_tail(tmp_path: Path) -> None:
    path = tmp_path / "book.anything"  # a file given directly is read whatever its extension
    text = "".join(f"line {i}\n" for i in range(1000)).encode()
    path.write_bytes(text)
    c = build_corpus(path, cache_dir=tmp_path / "cache", val_fraction=0.1)
    n_val = round(len(text) * 0.1)
    assert bytes(c.val.tolist()) == text[-n_val:]
    assert bytes(c.train.tolist()) == text[:-n_val]
    assert "book.anything" in c.description


def test_data_folder_reads_text_suffixes_recursively(tmp_path: Path) -> None:
    data = _folder(tmp_path / "data", 3)
    (data / "sub").mkdir()
    (data / "sub" / "notes.md").write_text("NESTED-MARKDOWN\n")
    (data / "image.png").write_bytes(b"NOT-TEXT-SUFFIX")
    (data / ".hidden.txt").write_text("HIDDEN\n")
    c = build_corpus(data, cache_dir=tmp_path / "cache")
    everything = bytes(c.train.tolist()) + bytes(c.val.tolist())
    assert b"NESTED-MARKDOWN" in everything
    assert b"NOT-TEXT-SUFFIX" not in everything
    assert b"HIDDEN" not in everything
    assert len(everything) == sum(len(f"<DOC{i:03d}>" * 20 + "\n") for i in range(3)) + len("NESTED-MARKDOWN\n")


def test_max_bytes_caps_data(tmp_path: Path) -> None:
    c = build_corpus(_folder(tmp_path / "data", 50), cache_dir=tmp_path / "cache", max_bytes=1000)
    assert c.train.numel() + c.val.numel() == 1000


def test_binary_files_skipped_with_warning(tmp_path: Path) -> None:
    data = _folder(tmp_path / "data", 4)
    (data / "blob.txt").write_bytes(b"BINARY\x00\x01\x02")
    (data / "latin1.txt").write_bytes("caf\xe9 LATIN1".encode("latin-1"))
    with pytest.warns(UserWarning, match="binary or not UTF-8") as record:
        c = build_corpus(data, cache_dir=tmp_path / "cache")
    messages = " ".join(str(w.message) for w in record)
    assert "'blob.txt'" in messages
    assert "'latin1.txt'" in messages
    assert "'doc000.txt'" not in messages
    everything = bytes(c.train.tolist()) + bytes(c.val.tolist())
    assert b"BINARY" not in everything
    assert b"LATIN1" not in everything
    assert b"<DOC000>" in everything


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        build_corpus(tmp_path / "missing", cache_dir=tmp_path / "cache")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no readable UTF-8 text"):
        build_corpus(tmp_path / "empty", cache_dir=tmp_path / "cache")
    (tmp_path / "only.bin").write_bytes(b"\x00\xff\x00")
    with pytest.warns(UserWarning, match="only.bin"), pytest.raises(ValueError, match="no readable UTF-8 text"):
        build_corpus(tmp_path / "only.bin", cache_dir=tmp_path / "cache")
    (tmp_path / "one.txt").write_text("x")
    with pytest.raises(ValueError, match="at least 2"):
        build_corpus(tmp_path / "one.txt", cache_dir=tmp_path / "cache")
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="val_fraction"):
            build_corpus(tmp_path / "one.txt", cache_dir=tmp_path / "cache", val_fraction=bad)
    with pytest.raises(ValueError, match="max_bytes"):
        build_corpus(cache_dir=tmp_path / "cache", max_bytes=0)


def test_batch_shapes_dtypes_shift(default_corpus: Corpus) -> None:
    gen = torch.Generator().manual_seed(42)
    for split in ("train", "val"):
        x, y = default_corpus.batch(split, 8, 128, gen)
        assert x.shape == y.shape == (8, 128)
        assert x.dtype == y.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])
        data = bytes((default_corpus.train if split == "train" else default_corpus.val).tolist())
        for row_x, row_y in zip(x, y, strict=True):  # each row is a real window of the split
            assert bytes(torch.cat([row_x, row_y[-1:]]).tolist()) in data
    a = default_corpus.batch("val", 4, 16, torch.Generator().manual_seed(1))
    b = default_corpus.batch("val", 4, 16, torch.Generator().manual_seed(1))
    assert torch.equal(a[0], b[0])


def test_batch_window_covers_whole_split() -> None:
    c = Corpus(torch.arange(10, dtype=torch.uint8), torch.arange(5, dtype=torch.uint8))
    x, y = c.batch("val", 3, 4)  # seq_len + 1 == len(val): the only window is the whole split
    assert x.tolist() == [[0, 1, 2, 3]] * 3
    assert y.tolist() == [[1, 2, 3, 4]] * 3
    with pytest.raises(ValueError, match="longer than the val split"):
        c.batch("val", 1, 5)
    with pytest.raises(ValueError, match="split must be"):
        c.batch("test", 1, 2)
    with pytest.raises(ValueError, match="batch_size"):
        c.batch("train", 0, 2)
    with pytest.raises(ValueError, match="uint8"):
        Corpus(torch.zeros(4, dtype=torch.int64), torch.zeros(4, dtype=torch.uint8))


def test_unigram_bits_per_byte_hand_computed() -> None:
    c = Corpus(torch.tensor(list(b"aaab"), dtype=torch.uint8), torch.tensor(list(b"ab"), dtype=torch.uint8))
    # add-one counts: a 3+1=4, b 1+1=2, the other 254 bytes 1 each: 260 in all.
    assert c.unigram_bits_per_byte("val") == pytest.approx((math.log2(260 / 4) + math.log2(260 / 2)) / 2, abs=1e-12)
    assert c.unigram_bits_per_byte("train") == pytest.approx(
        (3 * math.log2(260 / 4) + math.log2(260 / 2)) / 4, abs=1e-12
    )


def test_unigram_bits_per_byte_default_corpus(default_corpus: Corpus) -> None:
    bpb = default_corpus.unigram_bits_per_byte("val")
    assert 3.0 < bpb < 6.0
    assert default_corpus.unigram_bits_per_byte("train") < 8.0


def test_byte_values_round_trip_through_cache(tmp_path: Path) -> None:
    text = "ünïcödé ✓ text\n" * 50
    (tmp_path / "u.txt").write_text(text, encoding="utf-8")
    first = build_corpus(tmp_path / "u.txt", cache_dir=tmp_path / "cache")
    second = build_corpus(tmp_path / "u.txt", cache_dir=tmp_path / "cache")
    assert second.cached
    assert bytes(second.train.tolist()) + bytes(second.val.tolist()) == text.encode("utf-8")
    assert torch.equal(first.val, second.val)
    assert os.path.samefile(first.path, second.path)
