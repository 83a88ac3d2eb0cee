"""The machinery behind ``tilewise bench``: timing, the copy-bandwidth ceiling, peer look-up and the suite registry.

A suite is a function registered with :func:`register_suite` that returns one dict per (op, config, impl) with the
keys of :data:`ROW_KEYS`. Every implementation of a row group sees the same input tensor in one process, and is
credited with the same byte count, so GB/s compare the implementations' speed on the same nominal work.

Timing (:func:`time_fn`): on CUDA the median of CUDA-event timed calls after warm-up calls, launched back to back
(no host sync between calls, as ``triton.testing.do_bench``), with the L2 cache flushed before each call when the
op touches few enough bytes that its inputs would stay cached; on the CPU the median of ``time.perf_counter``
intervals. The ceiling (:func:`copy_bandwidth`) is a measured device-to-device ``copy_``, counting bytes read and
written, so "% of copy" reads as the fraction of the machine's attainable memory bandwidth.

A peer library (bitsandbytes, torchao, ...) that is not installed yields rows with status
``"missing (pip install NAME)"``; one that fails to import or raises while running yields rows that carry the
error. Neither stops the suite.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
import inspect
import math
import statistics
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch

__all__ = [
    "ROW_KEYS",
    "Peer",
    "Timing",
    "copy_bandwidth",
    "count_label",
    "default_device",
    "error_status",
    "format_table",
    "load_peer",
    "make_row",
    "measure",
    "register_suite",
    "rel_rms",
    "resolve_dtype",
    "run_suite",
    "suite_names",
    "time_fn",
]

# Every row has all of these keys (None where one does not apply), in this order.
ROW_KEYS: tuple[str, ...] = (
    "suite",
    "op",
    "codebook",
    "block",
    "n",
    "rows",
    "impl",
    "status",
    "numel",
    "dtype",
    "device",
    "state_bpp",
    "median_ms",
    "gbps",
    "pct_copy",
    "tflops",
    "check",
    "rel_rms",
    "repeats",
    "bytes",
    "copy_gbps",
    "device_name",
    "note",
    "error_at",
)

_SUITES: dict[str, Callable[..., list[dict[str, Any]]]] = {}
# Modules whose import registers the built-in suites.
_BUILTIN_SUITES = (
    "tilewise.bench.quant",
    "tilewise.bench.hadamard",
    "tilewise.bench.optim",
    "tilewise.bench.mixers",
)
# An op whose bytes are under this many L2 sizes gets the L2 flushed before each timed call.
_FLUSH_L2_BELOW = 8
_DEFAULT_L2_BYTES = 50 << 20
_DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
}


def register_suite(name: str) -> Callable[[Callable[..., list[dict[str, Any]]]], Callable[..., list[dict[str, Any]]]]:
    """Decorator: register ``fn(**options) -> list[dict]`` as the suite ``name`` of :func:`run_suite`.

    Example:
        >>> from tilewise.bench import register_suite, run_suite, suite_names
        >>> from tilewise.bench.runner import _SUITES, make_row
        >>> @register_suite("squares")
        ... def squares(*, n: int = 3) -> list[dict]:
        ...     return [make_row(suite="squares", op="square", n=i, check=str(i * i)) for i in range(n)]
        >>> "squares" in suite_names()
        True
        >>> [row["check"] for row in run_suite("squares", n=4)]
        ['0', '1', '4', '9']
        >>> register_suite("squares")(lambda: [])
        Traceback (most recent call last):
        ...
        ValueError: a benchmark suite named 'squares' is already registered (...)
        >>> del _SUITES["squares"]  # the registry is the process's: leave it as it was
    """

    def decorator(fn: Callable[..., list[dict[str, Any]]]) -> Callable[..., list[dict[str, Any]]]:
        if name in _SUITES and _SUITES[name] is not fn:
            raise ValueError(f"a benchmark suite named {name!r} is already registered ({_SUITES[name].__module__})")
        _SUITES[name] = fn
        return fn

    return decorator


def _load_builtin_suites() -> None:
    for module in _BUILTIN_SUITES:
        importlib.import_module(module)


def suite_names() -> list[str]:
    """Names :func:`run_suite` accepts.

    Example:
        >>> from tilewise.bench import suite_names
        >>> suite_names()  # the built-in suites; register_suite adds more
        ['hadamard', 'mixers', 'optim', 'quant']
    """
    _load_builtin_suites()
    return sorted(_SUITES)


def run_suite(name: str, **options: Any) -> list[dict[str, Any]]:
    """Run the benchmark suite ``name`` and return its rows (dicts with the keys of :data:`ROW_KEYS`).

    Args:
        name: a registered suite, e.g. ``"quant"`` or ``"hadamard"`` (see :func:`suite_names`).
        **options: the suite's keyword options; ``None`` values mean the suite's default. The built-in suites
            take ``numel`` (elements per input tensor), ``repeats`` (most timed calls per measurement),
            ``device``, ``backend`` (ours: ``"auto"``, ``"triton"`` or ``"reference"``), ``dtype``, ``peers``
            (which peers to run; default all) and their own (``codebooks``/``block_sizes``, ``sizes``).

    Raises:
        ValueError: unknown suite, or an option the suite does not take.

    Example:
        >>> from tilewise.bench import ROW_KEYS, run_suite
        >>> rows = run_suite("hadamard", numel=1024, sizes=[128], repeats=1, device="cpu", peers=[], backend=None)
        >>> [(row["impl"].split()[0], row["n"], row["rows"], row["status"]) for row in rows]  # 8 rows of 128
        [('tilewise', 128, 8, 'ok'), ('torch', 128, 8, 'ok')]
        >>> all(list(row) == list(ROW_KEYS) and row["median_ms"] > 0 for row in rows)
        True
        >>> run_suite("hadamard", size=128)
        Traceback (most recent call last):
        ...
        ValueError: suite 'hadamard' takes no option 'size'; its options: numel, repeats, sizes, device, ...
    """
    names = suite_names()
    if name not in _SUITES:
        raise ValueError(f"unknown benchmark suite {name!r}; choose one of {', '.join(names)}")
    fn = _SUITES[name]
    options = {key: value for key, value in options.items() if value is not None}
    params = inspect.signature(fn).parameters
    unknown = sorted(set(options) - set(params))
    if unknown:
        takes = ", ".join(p for p in params if not p.startswith("_"))
        raise ValueError(f"suite {name!r} takes no option {', '.join(map(repr, unknown))}; its options: {takes}")
    return fn(**options)


@dataclass(frozen=True)
class Timing:
    """A timed measurement: median milliseconds over ``repeats`` calls, and how it was taken.

    Example:
        >>> from tilewise.bench import Timing, time_fn
        >>> timing = time_fn(lambda: sum(range(1000)), "cpu", repeats=5)
        >>> isinstance(timing, Timing), timing.method, timing.repeats, timing.median_ms > 0
        (True, 'host', 5, True)
    """

    median_ms: float
    repeats: int
    method: str  # "cuda-events" or "host"


def default_device() -> str:
    """``"cuda"`` when a CUDA GPU is present, else ``"cpu"``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``torch.bfloat16``/``float16``/``float32`` from a dtype or a name (``"bf16"``, ``"float16"``, ...)."""
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")


def _l2_bytes(device: torch.device) -> int:
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "L2_cache_size", 0) or _DEFAULT_L2_BYTES)


def _count(estimate_ms: float, repeats: int, budget_s: float) -> int:
    """Timed calls to make: ``repeats``, cut so they take about ``budget_s``, but never under 3 (unless
    ``repeats`` itself is smaller)."""
    fit = int(budget_s * 1e3 / max(estimate_ms, 1e-3))
    return max(1, min(repeats, max(3, fit)))


def time_fn(
    fn: Callable[[], Any],
    device: str | torch.device,
    *,
    repeats: int = 20,
    warmup: int = 2,
    budget_s: float = 2.0,
    nbytes: int | None = None,
) -> Timing:
    """Median time of ``fn()`` in milliseconds.

    Args:
        fn: the call to time; its result is dropped. The first warm-up call pays compilation and autotuning.
        device: where ``fn`` runs its work; CUDA devices are timed with CUDA events, others on the host clock.
        repeats: most timed calls (fewer when they would take longer than ``budget_s``; at least 3).
        warmup: untimed calls first (at least 1).
        budget_s: rough seconds to spend on the timed calls.
        nbytes: bytes the op moves; on CUDA, below ``8 x L2`` the L2 cache is flushed before every timed call so
            each call reads its inputs from memory (``None``: flush).

    Example:
        >>> import time
        >>> from tilewise.bench import time_fn
        >>> calls = []
        >>> def work():
        ...     calls.append(1)
        ...     time.sleep(0.001)
        >>> timing = time_fn(work, "cpu", repeats=10, warmup=2)
        >>> timing.method, timing.repeats, len(calls), timing.median_ms >= 1.0  # 2 warm-up + 10 timed calls
        ('host', 10, 12, True)
        >>> time_fn(work, "cpu", repeats=10, budget_s=0).repeats  # over budget: fewer calls, but at least 3
        3
    """
    device = torch.device(device)
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    if device.type == "cuda":
        with torch.cuda.device(device):
            return _time_cuda(fn, device, repeats, max(1, warmup), budget_s, nbytes)
    return _time_host(fn, repeats, max(1, warmup), budget_s)


def _time_host(fn: Callable[[], Any], repeats: int, warmup: int, budget_s: float) -> Timing:
    for _ in range(warmup):
        fn()
    start = time.perf_counter()
    fn()
    first = (time.perf_counter() - start) * 1e3
    times = [first]
    for _ in range(_count(first, repeats, budget_s) - 1):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return Timing(statistics.median(times), len(times), "host")


def _time_cuda(
    fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int, budget_s: float, nbytes: int | None
) -> Timing:
    flush = None
    if nbytes is None or nbytes < _FLUSH_L2_BELOW * _l2_bytes(device):
        flush = torch.empty(2 * _l2_bytes(device), dtype=torch.uint8, device=device)
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize(device)
    # one timed call to size the run
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    if flush is not None:
        flush.zero_()
    start.record()
    fn()
    end.record()
    end.synchronize()
    count = _count(start.elapsed_time(end), repeats, budget_s)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(count)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(count)]
    for s, e in zip(starts, ends, strict=True):
        if flush is not None:
            flush.zero_()
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize(device)
    return Timing(statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)), count, "cuda-events")


@functools.cache
def _copy_bandwidth(device: str) -> float:
    dev = torch.device(device)
    nbytes = (512 << 20) if dev.type == "cuda" else (64 << 20)
    src = torch.ones(nbytes, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    timing = time_fn(lambda: dst.copy_(src), dev, repeats=20, warmup=3, budget_s=1.0, nbytes=2 * nbytes)
    return 2 * nbytes / (timing.median_ms * 1e-3) / 1e9


def copy_bandwidth(device: str | torch.device) -> float:
    """Measured ``dst.copy_(src)`` bandwidth of ``device`` in GB/s (1e9 bytes/s, bytes read + written), cached per
    device: 512 MiB buffers on CUDA, 64 MiB on the CPU.

    Example:
        >>> from tilewise.bench import copy_bandwidth
        >>> gbps = copy_bandwidth("cpu")  # measured on the first call (a fraction of a second)
        >>> gbps > 0, copy_bandwidth("cpu") == gbps  # then cached
        (True, True)
    """
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return _copy_bandwidth(str(dev))


def device_name(device: str | torch.device) -> str:
    """The GPU's name, or ``"cpu"``."""
    dev = torch.device(device)
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"


@dataclass(frozen=True)
class Peer:
    """A library we race: ``module`` is imported, ``dist`` is its name on PyPI (and in ``pip install``).

    Example:
        >>> from tilewise.bench import Peer
        >>> peer = Peer(module="fast_hadamard_transform", dist="fast-hadamard-transform")
        >>> peer.missing_status()  # the status of its rows when it is not installed
        'missing (pip install fast-hadamard-transform)'
    """

    module: str
    dist: str

    def missing_status(self) -> str:
        return f"missing (pip install {self.dist})"


@dataclass(frozen=True)
class LoadedPeer:
    """The outcome of :func:`load_peer`: the module (None unless it imported), its version and row status."""

    peer: Peer
    module: ModuleType | None
    version: str | None
    status: str

    @property
    def label(self) -> str:
        return f"{self.peer.dist} {self.version}" if self.version else self.peer.dist


def load_peer(peer: Peer) -> LoadedPeer:
    """Import ``peer`` if it is installed. Never raises: a missing peer gets status ``"missing (pip install X)"``,
    one whose import fails ``"import failed: ..."``, else ``"ok"``.

    Example:
        >>> from tilewise.bench import Peer, load_peer
        >>> torch_peer = load_peer(Peer("torch", "torch"))
        >>> torch_peer.status, torch_peer.module.__name__, torch_peer.label.startswith("torch ")  # label: + version
        ('ok', 'torch', True)
        >>> missing = load_peer(Peer("no_such_module", "no-such-dist"))
        >>> missing.status, missing.module, missing.label
        ('missing (pip install no-such-dist)', None, 'no-such-dist')
    """
    try:
        found = importlib.util.find_spec(peer.module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        return LoadedPeer(peer, None, None, peer.missing_status())
    try:
        module = importlib.import_module(peer.module)
    except ImportError as err:
        if getattr(err, "name", None) == peer.module:
            return LoadedPeer(peer, None, None, peer.missing_status())
        return LoadedPeer(peer, None, None, f"import failed: {_one_line(err)}")
    except Exception as err:
        return LoadedPeer(peer, None, None, f"import failed: {_one_line(err)}")
    try:
        version = importlib.metadata.version(peer.dist)
    except importlib.metadata.PackageNotFoundError:
        version = getattr(module, "__version__", None)
    return LoadedPeer(peer, module, version, "ok")


def _one_line(err: BaseException, limit: int = 200) -> str:
    text = str(err).strip().splitlines()
    message = f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")
    return message if len(message) <= limit else message[: limit - 3] + "..."


def error_status(err: BaseException) -> tuple[str, str]:
    """``("error: Type: first line", "file:line in function")`` of the innermost frame, for a row."""
    frames = traceback.extract_tb(err.__traceback__)
    where = f"{frames[-1].filename}:{frames[-1].lineno} in {frames[-1].name}" if frames else ""
    return f"error: {_one_line(err)}", where


def make_row(**fields: Any) -> dict[str, Any]:
    """A row with every key of :data:`ROW_KEYS` (None for those not given); ``status`` defaults to ``"ok"``."""
    unknown = set(fields) - set(ROW_KEYS)
    if unknown:
        raise ValueError(f"unknown row keys {sorted(unknown)}; add them to ROW_KEYS")
    row = dict.fromkeys(ROW_KEYS)
    row["status"] = "ok"
    row.update(fields)
    return row


def measure(
    fn: Callable[[], Any],
    device: str | torch.device,
    nbytes: int,
    *,
    repeats: int,
    flops: float | None = None,
) -> dict[str, Any]:
    """Time ``fn`` and return the row fields ``median_ms``, ``gbps`` (``nbytes`` per second / 1e9), ``pct_copy``,
    ``tflops`` (when ``flops`` is given), ``repeats``, ``bytes`` and ``copy_gbps``."""
    warmup = 2 if torch.device(device).type == "cuda" else 1
    timing = time_fn(fn, device, repeats=repeats, warmup=warmup, nbytes=nbytes)
    seconds = timing.median_ms * 1e-3
    gbps = nbytes / seconds / 1e9 if seconds > 0 else math.inf
    ceiling = copy_bandwidth(device)
    return {
        "median_ms": timing.median_ms,
        "gbps": gbps,
        "pct_copy": 100 * gbps / ceiling,
        "tflops": flops / seconds / 1e12 if flops is not None and seconds > 0 else None,
        "repeats": timing.repeats,
        "bytes": nbytes,
        "copy_gbps": ceiling,
    }


def rel_rms(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``||actual - expected|| / ||expected||`` over the flattened tensors, accumulated in float64."""
    a = actual.reshape(-1).to(torch.float64)
    e = expected.reshape(-1).to(torch.float64)
    if a.numel() != e.numel():
        raise ValueError(f"rel_rms: {a.numel()} elements vs {e.numel()}")
    signal = float(e.square().sum())
    noise = float((a - e).square().sum())
    return math.sqrt(noise / signal) if signal else (0.0 if noise == 0 else math.inf)


def free_memory(device: str | torch.device) -> None:
    """Return cached blocks to the driver between measurements so one impl's leftovers don't crowd the next."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def count_label(value: int) -> str:
    """``1048576`` -> ``"1M"``, ``3072`` -> ``"3K"``; other counts as digits."""
    for shift, suffix in ((30, "G"), (20, "M"), (10, "K")):
        if value >= 1 << shift and value % (1 << shift) == 0:
            return f"{value >> shift}{suffix}"
    return str(value)


# (row key, header, formatter); a column shows only when some row has a value for it.
_COLUMNS: tuple[tuple[str, str, Callable[[Any], str]], ...] = (
    ("suite", "suite", str),
    ("op", "op", str),
    ("codebook", "codebook", str),
    ("block", "block", str),
    ("n", "n", str),
    ("rows", "rows", str),
    ("impl", "impl", str),
    ("numel", "numel", count_label),
    ("dtype", "dtype", str),
    ("state_bpp", "state B/param", lambda v: f"{v:.3g}"),
    ("median_ms", "ms", lambda v: f"{v:.3f}" if v < 100 else f"{v:.1f}"),
    ("gbps", "GB/s", lambda v: f"{v:.0f}" if v >= 10 else f"{v:.2f}"),
    ("pct_copy", "% copy", lambda v: f"{v:.1f}%"),
    ("tflops", "TFLOP/s", lambda v: f"{v:.1f}"),
    ("check", "check", str),
    ("rel_rms", "rel RMS err", lambda v: f"{v:.2e}"),
    ("status", "status", str),
)
_LEFT = {"suite", "op", "codebook", "impl", "dtype", "check", "status"}


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Rows from :func:`run_suite` as a fixed-width text table, with the machine and its copy ceiling below.

    Columns with no value in any row are left out; a cell whose value is missing shows ``-``.

    Example:
        >>> from tilewise.bench import format_table
        >>> from tilewise.bench.runner import make_row
        >>> rows = [
        ...     make_row(suite="demo", op="copy", impl="ours", numel=1 << 20, device="cpu", median_ms=0.5, gbps=8.4,
        ...              pct_copy=42.0, copy_gbps=20.0),
        ...     make_row(suite="demo", op="copy", impl="peer", numel=1 << 20, device="cpu",
        ...              status="missing (pip install peer)"),
        ... ]
        >>> print(format_table(rows))
        suite  op    impl  numel     ms  GB/s  % copy  status
        -----  ----  ----  -----  -----  ----  ------  --------------------------
        demo   copy  ours     1M  0.500  8.40   42.0%  ok
        demo   copy  peer     1M      -     -       -  missing (pip install peer)
        cpu (cpu): copy_ 20 GB/s (bytes read + written) = 100%
    """
    if not rows:
        return "(no rows)"
    columns = [(key, head, fmt) for key, head, fmt in _COLUMNS if any(r.get(key) is not None for r in rows)]
    body = [[("-" if r.get(key) is None else fmt(r[key])) for key, _, fmt in columns] for r in rows]
    header = [head for _, head, _ in columns]
    widths = [max(len(line[j]) for line in (header, *body)) for j in range(len(columns))]

    def line(cells: Iterable[str]) -> str:
        parts = zip(cells, widths, columns, strict=True)
        return "  ".join(c.ljust(w) if key in _LEFT else c.rjust(w) for c, w, (key, _, _) in parts).rstrip()

    lines = [line(header), "  ".join("-" * w for w in widths), *(line(cells) for cells in body)]
    lines.extend(_footer(rows))
    return "\n".join(lines)


def _footer(rows: Sequence[dict[str, Any]]) -> list[str]:
    """One line per (device, copy ceiling) seen in the rows, and the meaning of the byte counts."""
    seen: dict[tuple[str, str], float | None] = {}
    for r in rows:
        key = (str(r.get("device_name") or r.get("device") or "?"), str(r.get("device") or "?"))
        if r.get("copy_gbps") is not None or key not in seen:
            seen[key] = r.get("copy_gbps") if r.get("copy_gbps") is not None else seen.get(key)
    out = []
    for (name, dev), ceiling in seen.items():
        copy = f"copy_ {ceiling:.0f} GB/s (bytes read + written) = 100%" if ceiling else "copy bandwidth not measured"
        out.append(f"{name} ({dev}): {copy}")
    notes = sorted({r["note"] for r in rows if r.get("note")})
    out.extend(f"note: {n}" for n in notes)
    return out
