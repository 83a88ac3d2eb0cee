"""The trainer behind ``tilewise train``: a byte-level MetaFormer LM on the built-in corpus (or ``data``).

One run directory holds everything a run writes:

- ``config.json``: the :class:`TrainConfig` (``--resume DIR`` reads it back);
- ``metrics.jsonl``: one JSON object per optimizer step (``step, loss, lr, grad_norm, tokens_per_s, ...``) and one
  per evaluation (``"val_loss"``, ``"val_bpb"``);
- ``checkpoints/step-NNNNNNN/``: ``model.safetensors``, ``optimizer.pt``, ``trainer.pt`` (see
  :mod:`tilewise.train.checkpoint`); the newest ``keep_last`` are kept;
- ``report.md``, with the memory of one step measured beside :func:`tilewise.memory.estimate`'s prediction (also a
  ``metrics.jsonl`` row ``{"step": N, "memory": {...}}``; see :mod:`tilewise.train.report`), and ``loss.png`` and
  ``memory.png`` with the ``plot`` extra (matplotlib).

Data parallel: ``dist="ddp"`` or ``"fsdp"`` under torchrun (``torchrun --nproc-per-node N -m tilewise train --dist
ddp``); ``batch_size`` stays the global batch, split evenly over the ranks (see :mod:`tilewise.train.distributed`).

Resume is exact: the batch sampler's generator, torch's RNG states and the step are saved with the model and the
optimizer, and the learning rate is a pure function of the step, so on the CPU a resumed run repeats the losses of
an uninterrupted one bit for bit. Ctrl-C (or a ``KeyboardInterrupt`` raised by ``callback``) between or during the
forward/backward passes writes a checkpoint of the last completed step before the exception propagates.

Example:
    >>> import contextlib
    >>> import dataclasses
    >>> import io
    >>> import json
    >>> import tempfile
    >>> from pathlib import Path
    >>> from tilewise.train import TrainConfig, train
    >>> def losses(run_dir):
    ...     rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    ...     return [row["loss"] for row in rows if "loss" in row]
    >>> with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
    ...     text = Path(tmp, "notes.txt")
    ...     _ = text.write_text("A resumed run repeats the losses of an uninterrupted one. " * 100)
    ...     config = TrainConfig(
    ...         steps=2, batch_size=2, seq_len=16, eval_batches=1, device="cpu", data=str(text), cache_dir=tmp
    ...     )
    ...     whole = losses(train(dataclasses.replace(config, out=f"{tmp}/whole")))
    ...     part = train(dataclasses.replace(config, out=f"{tmp}/part", stop_after=1))  # ends after step 1 ...
    ...     resumed = losses(train(dataclasses.replace(config, resume=str(part))))  # ... and goes on to step 2
    >>> len(whole), resumed == whole  # bit for bit
    (2, True)
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from tilewise.memory import measure_peak
from tilewise.nn import build_model
from tilewise.train.checkpoint import latest_checkpoint, prune_checkpoints, read_checkpoint, write_checkpoint
from tilewise.train.corpus import Corpus, build_corpus
from tilewise.train.distributed import (
    DIST_MODES,
    Dist,
    full_state,
    full_value,
    init_distributed,
    load_full_state,
    no_sync,
    shutdown,
    wrap_model,
)
from tilewise.train.report import memory_row, read_metrics, write_report

__all__ = ["OPTIMIZERS", "TrainConfig", "load_config", "train"]

OPTIMIZERS = ("adamw", "tw-adamw", "adamw8bit", "adamw4bit", "lion8bit")
"""Names for ``TrainConfig.optim``: torch's AdamW, then tilewise's AdamW with 32-, 8- and 4-bit state, Lion 8-bit."""

# Fields that change the loss trajectory: a resume that changes one of them warns.
_TRAJECTORY_FIELDS = (
    "model", "mixer", "optim", "steps", "batch_size", "seq_len", "grad_accum", "lr", "min_lr", "warmup_steps",
    "weight_decay", "grad_clip", "seed", "data", "max_bytes",
)  # fmt: skip


@dataclass
class TrainConfig:
    """Everything a training run depends on; saved as the run's ``config.json``.

    Attributes:
        model: a name in ``tilewise.nn.CONFIGS`` (default ``"tiny"``, the CPU size).
        mixer: replaces the model's token mixer (e.g. ``"pooling"``); None keeps the config's (attention).
        optim: one of :data:`OPTIMIZERS` (default ``"adamw"``, torch's).
        steps: optimizer steps in the whole run; the cosine schedule ends there (default 600).
        batch_size: sequences per micro-batch (default 16); with ``dist``, over all ranks together (a multiple of
            their number, each rank taking an equal slice).
        seq_len: bytes per sequence (default 128).
        grad_accum: micro-batches per optimizer step (default 1); tokens per step = batch_size·seq_len·grad_accum.
        lr: peak learning rate; None picks 3e-3 for the AdamW variants and 3e-4 for Lion.
        min_lr: the cosine schedule's floor, as a fraction of ``lr`` (default 0.1).
        warmup_steps: linear warmup from 0 (default 30).
        weight_decay: decoupled weight decay on matrices (not on norms or biases); default 0.1.
        grad_clip: clip the global gradient norm to this; 0 disables (default 1.0).
        activation_checkpointing: recompute each block's activations in the backward pass (less memory, ~30% slower).
        eval_every: steps between validation passes; the last step is always evaluated (default 100).
        eval_batches: validation micro-batches per pass, the same ones each time (default 8).
        log_every: steps between log lines when stdout is not a terminal (default 10).
        save_every: steps between checkpoints; the last step is always saved (default 200).
        keep_last: checkpoints kept (default 2).
        seed: seeds the model's initialization, the batch sampler and dropout (default 0).
        device: ``"auto"`` (CUDA when present, else CPU), or a torch device string.
        data: a text file or folder to train on; None for the built-in corpus (pydoc + stdlib sources).
        max_bytes: a cap on the corpus size; None for ``build_corpus``'s default.
        cache_dir: where the corpus cache lives; None for ``build_corpus``'s default.
        out: the run directory; None for ``runs/<model>-<YYYYmmdd-HHMMSS>``.
        resume: a run directory to continue from its newest checkpoint (the run then writes there).
        stop_after: end this invocation after this many steps (with a checkpoint), to resume later; None runs to
            ``steps``.
        dist: ``"ddp"`` or ``"fsdp"`` to train data-parallel under torchrun (:data:`DIST_MODES`); None for one
            process.

    Example:
        >>> from tilewise.train import TrainConfig
        >>> config = TrainConfig(optim="lion8bit", batch_size=8, grad_accum=4)
        >>> config.model, config.steps, config.peak_lr  # lr=None: Lion's default peak
        ('tiny', 600, 0.0003)
        >>> config.batch_size * config.seq_len * config.grad_accum  # tokens (bytes) per optimizer step
        4096
        >>> TrainConfig(optim="sgd")
        Traceback (most recent call last):
        ...
        ValueError: optim must be one of adamw, tw-adamw, adamw8bit, adamw4bit, lion8bit, got 'sgd'
    """

    model: str = "tiny"
    mixer: str | None = None
    optim: str = "adamw"
    steps: int = 600
    batch_size: int = 16
    seq_len: int = 128
    grad_accum: int = 1
    lr: float | None = None
    min_lr: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    activation_checkpointing: bool = False
    eval_every: int = 100
    eval_batches: int = 8
    log_every: int = 10
    save_every: int = 200
    keep_last: int = 2
    seed: int = 0
    device: str = "auto"
    data: str | None = None
    max_bytes: int | None = None
    cache_dir: str | None = None
    out: str | None = None
    resume: str | None = None
    stop_after: int | None = None
    dist: str | None = None

    def __post_init__(self) -> None:
        if self.optim not in OPTIMIZERS:
            raise ValueError(f"optim must be one of {', '.join(OPTIMIZERS)}, got {self.optim!r}")
        if self.dist is not None and self.dist not in DIST_MODES:
            raise ValueError(f"dist must be one of {', '.join(DIST_MODES)} or None, got {self.dist!r}")
        positive = ("steps", "batch_size", "seq_len", "grad_accum", "eval_every", "eval_batches", "log_every")
        for name in (*positive, "save_every", "keep_last"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup_steps < 0 or self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError("warmup_steps, grad_clip and weight_decay must be >= 0")
        if not 0.0 <= self.min_lr <= 1.0:
            raise ValueError(f"min_lr is a fraction of lr, in [0, 1]; got {self.min_lr}")
        if self.lr is not None and self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.stop_after is not None and self.stop_after < 1:
            raise ValueError(f"stop_after must be >= 1 (or None), got {self.stop_after}")

    @property
    def peak_lr(self) -> float:
        """``lr``, or the optimizer's default peak learning rate when ``lr`` is None."""
        if self.lr is not None:
            return self.lr
        return 3e-4 if self.optim.startswith("lion") else 3e-3


def load_config(run_dir: str | Path) -> TrainConfig:
    """The :class:`TrainConfig` saved in a run directory's ``config.json``.

    Example:
        >>> import dataclasses
        >>> import json
        >>> import tempfile
        >>> from pathlib import Path
        >>> from tilewise.train import TrainConfig, load_config
        >>> config = TrainConfig(steps=50, optim="adamw8bit", seed=3)
        >>> with tempfile.TemporaryDirectory() as run:
        ...     saved = dataclasses.asdict(config) | {"from_a_newer_version": 1}  # unknown keys are ignored
        ...     _ = Path(run, "config.json").write_text(json.dumps(saved))
        ...     print(load_config(run) == config)
        True
        >>> load_config("no/such/run")
        Traceback (most recent call last):
        ...
        ValueError: 'no/such/run/config.json' does not exist; pass a run directory written by `tilewise train`
    """
    path = Path(run_dir) / "config.json"
    if not path.exists():
        raise ValueError(f"{str(path)!r} does not exist; pass a run directory written by `tilewise train`")
    saved = json.loads(path.read_text())
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in saved.items() if k in known})


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup, then cosine down to ``min_lr·lr``."""
    peak = config.peak_lr
    if step < config.warmup_steps:
        return peak * (step + 1) / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    return peak * (config.min_lr + (1 - config.min_lr) * 0.5 * (1 + math.cos(math.pi * progress)))


def _build_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer named by ``config.optim``, with weight decay on matrices only."""
    import tilewise.optim as tw

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    lr = config.peak_lr
    if config.optim == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))
    if config.optim == "lion8bit":
        return tw.Lion8bit(groups, lr=lr, betas=(0.9, 0.99))
    bits = {"tw-adamw": 32, "adamw8bit": 8, "adamw4bit": 4}[config.optim]
    return tw.AdamW(groups, lr=lr, betas=(0.9, 0.95), state_bits=bits)


def _check_even_shards(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ctx: Dist) -> None:
    """Under FSDP, refuse 8/4-bit state on a parameter whose first dim does not split evenly over the ranks: its
    per-shard codes stay local tensors that no full checkpoint can gather."""
    if ctx.mode != "fsdp":
        return
    from tilewise.ops.optim_step import QUANT_FORMATS
    from tilewise.optim._base import resolve_state_format

    names = {id(p): name for name, p in model.named_parameters()}
    for group in optimizer.param_groups:
        fmt = resolve_state_format(group["state_bits"], group["state_format"]) if "state_bits" in group else "torch"
        if fmt not in QUANT_FORMATS:
            continue
        for p in group["params"]:
            if p.numel() >= group["min_quant_numel"] and p.shape[0] % ctx.world_size:
                raise ValueError(
                    f"--dist fsdp with {ctx.world_size} ranks splits {names[id(p)]} {tuple(p.shape)} unevenly, and its "
                    "quantized optimizer state could not be checkpointed; use a number of ranks that divides its "
                    "first dim, --dist ddp, or --optim adamw / tw-adamw"
                )


def _enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each block of ``model.layers`` in the backward pass (non-reentrant ``torch.utils.checkpoint``)."""
    for layer in model.layers:
        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)


def _resolve_device(name: str) -> torch.device:
    """``"auto"``: CUDA when present, else the CPU; any other name as torch reads it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _new_run_dir(config: TrainConfig) -> Path:
    if config.out is not None:
        return Path(config.out)
    return Path("runs") / f"{config.model}-{time.strftime('%Y%m%d-%H%M%S')}"


def _memory_mib(device: torch.device) -> float:
    """Peak CUDA memory allocated on ``device``, or this process's peak resident memory on the CPU, in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource
    except ImportError:  # Windows
        return float("nan")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class _Progress:
    """A one-line carriage-return display on a terminal; a log line every ``log_every`` steps otherwise.

    Silent when not ``enabled`` (every rank but 0).
    """

    def __init__(self, total: int, log_every: int, enabled: bool = True) -> None:
        self.total = total
        self.log_every = log_every
        self.enabled = enabled
        self.tty = sys.stdout.isatty()

    def update(self, row: dict[str, Any], mem_mib: float) -> None:
        step = row["step"]
        text = (
            f"step {step}/{self.total}  loss {row['loss']:.4f}  lr {row['lr']:.2e}  "
            f"{row['tokens_per_s']:,.0f} tok/s  mem {mem_mib:,.0f} MiB"
        )
        if not self.enabled:
            return
        if self.tty:
            sys.stdout.write(f"\r\033[K{text}")
            sys.stdout.flush()
        elif step % self.log_every == 0 or step == self.total:
            print(text, flush=True)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.tty:
            sys.stdout.write("\r\033[K")
        print(text, flush=True)


@dataclass
class _State:
    """What a run carries between steps, and what a checkpoint restores."""

    step: int
    generator: torch.Generator
    tokens: int = 0
    elapsed_s: float = 0.0


def _trainer_state(
    state: _State, generator_state: torch.Tensor, cpu_rng: torch.Tensor, device: torch.device
) -> dict[str, Any]:
    saved: dict[str, Any] = {
        "step": torch.tensor(state.step),
        "tokens": torch.tensor(state.tokens),
        "elapsed_s": torch.tensor(state.elapsed_s, dtype=torch.float64),
        "generator": generator_state,
        "torch_rng": cpu_rng,
    }
    if device.type == "cuda":  # the training device's only: reading every GPU's would create a context on each
        saved["cuda_rng"] = torch.cuda.get_rng_state(device)
    return saved


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, corpus: Corpus, config: TrainConfig, device: torch.device, ctx: Dist | None = None
) -> float:
    """Mean validation loss (nats per byte) over ``eval_batches`` fixed batches; the training RNGs are untouched.

    With ``ctx`` (data parallel) every rank evaluates its slice of each batch and the result is the mean over all.
    """
    ctx = ctx or Dist()
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(config.seed + 1)
    rows = ctx.rows(config.batch_size)
    total = 0.0
    for _ in range(config.eval_batches):
        x, y = corpus.batch("val", config.batch_size, config.seq_len, generator)
        with _autocast(device):
            total += float(model(x[rows].to(device), y[rows].to(device)))
    model.train(was_training)
    return ctx.mean(total / config.eval_batches, device)


def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _setup(config: TrainConfig) -> tuple[Path, TrainConfig]:
    """The run directory and the config to run; on resume, checks the config against the saved one."""
    if config.resume is None:
        run_dir = _new_run_dir(config)
        if latest_checkpoint(run_dir) is not None:
            raise ValueError(f"{run_dir} already holds a run; pass resume={str(run_dir)!r} or another out directory")
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "metrics.jsonl").write_text("")
    else:
        run_dir = Path(config.resume)
        saved = load_config(run_dir)
        changed = [f for f in _TRAJECTORY_FIELDS if getattr(saved, f) != getattr(config, f)]
        if changed:
            warnings.warn(
                f"resuming {run_dir} with changed {', '.join(changed)}: the losses will differ from an uninterrupted "
                "run's",
                stacklevel=5,  # the caller of train()
            )
    config = dataclasses.replace(config, out=str(run_dir))
    (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=1) + "\n")
    return run_dir, config


def _setup_on_rank0(config: TrainConfig, ctx: Dist) -> tuple[Path, TrainConfig]:
    """:func:`_setup` on rank 0, its outcome (the run directory, or the error) on every rank."""
    outcome: tuple[Path, TrainConfig] | ValueError | None = None
    if ctx.main:
        try:
            outcome = _setup(config)
        except ValueError as err:
            outcome = err
    outcome = ctx.broadcast(outcome)
    if isinstance(outcome, ValueError):
        raise outcome
    return outcome


def _corpus(config: TrainConfig, ctx: Dist) -> Corpus:
    """The corpus, built (and cached) by rank 0 before the other ranks read the cache."""
    corpus = build_corpus(config.data, cache_dir=config.cache_dir, max_bytes=config.max_bytes) if ctx.main else None
    ctx.barrier()
    if corpus is None:
        corpus = build_corpus(config.data, cache_dir=config.cache_dir, max_bytes=config.max_bytes)
    return corpus


def train(config: TrainConfig, callback: Callable[[dict[str, Any]], None] | None = None) -> Path:
    """Train a language model as ``config`` says; returns the run directory (also printed as the last line).

    Args:
        config: the run's settings; with ``config.resume`` set, the run continues from that directory's newest
            checkpoint and writes there. With ``config.dist``, run one process per rank under torchrun.
        callback: called with each step's metrics row after the step; raising ``KeyboardInterrupt`` from it acts
            like Ctrl-C (a checkpoint of that step is written, then the exception propagates).

    Raises:
        ValueError: bad settings, a resume directory without a checkpoint, ``out`` already holding a run, or a
            ``batch_size`` that the ranks cannot split evenly.
        KeyboardInterrupt: after writing a checkpoint, on Ctrl-C.

    Example:
        >>> import contextlib
        >>> import io
        >>> import tempfile
        >>> from pathlib import Path
        >>> from tilewise.train import TrainConfig, latest_checkpoint, train
        >>> rows = []
        >>> def callback(row):
        ...     rows.append(row)
        ...     if row["step"] == 2:
        ...         raise KeyboardInterrupt  # as Ctrl-C would: step 2's checkpoint is written, then it propagates
        >>> with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()) as log:
        ...     text = Path(tmp, "notes.txt")
        ...     _ = text.write_text("Stop a run from its callback. " * 100)
        ...     config = TrainConfig(
        ...         steps=4, batch_size=2, seq_len=16, device="cpu", data=str(text), cache_dir=tmp, out=f"{tmp}/run"
        ...     )
        ...     try:
        ...         train(config, callback)
        ...     except KeyboardInterrupt:
        ...         saved = latest_checkpoint(config.out).name
        >>> [row["step"] for row in rows], rows[-1]["tokens"], saved  # 2 steps of 2 x 16 bytes
        ([1, 2], 64, 'step-0000002')
        >>> sorted(rows[0])
        ['elapsed_s', 'grad_norm', 'loss', 'lr', 'step', 'tokens', 'tokens_per_s']
        >>> log.getvalue().splitlines()[-2]
        'interrupted: checkpoint of step 2 written; resume with --resume'
    """
    ctx, device = init_distributed(config.dist, _resolve_device(config.device))
    try:
        if config.batch_size % ctx.world_size:
            raise ValueError(
                f"batch_size {config.batch_size} is the global batch: make it a multiple of the {ctx.world_size} ranks"
            )
        return _train(config, callback, ctx, device)
    finally:
        shutdown(ctx)


def _train(
    config: TrainConfig, callback: Callable[[dict[str, Any]], None] | None, ctx: Dist, device: torch.device
) -> Path:
    run_dir, config = _setup_on_rank0(config, ctx)
    torch.manual_seed(config.seed)
    corpus = _corpus(config, ctx)
    model = build_model(config.model, mixer=config.mixer, device=device)
    if config.seq_len > model.config.max_seq_len:
        raise ValueError(f"seq_len {config.seq_len} exceeds the {config.model} model's max_seq_len")
    if config.activation_checkpointing:
        _enable_activation_checkpointing(model)
    header = f"{config.model} ({model.num_params():,} parameters) on {device}"
    model = wrap_model(model, ctx, device)
    optimizer = _build_optimizer(model, config)
    _check_even_shards(model, optimizer, ctx)
    state = _State(0, torch.Generator().manual_seed(config.seed))
    if config.resume is not None:
        _restore(run_dir, model, optimizer, state, ctx, device)
    if ctx.main:
        metrics_path = run_dir / "metrics.jsonl"
        rows = read_metrics(metrics_path, up_to_step=state.step)  # drop rows logged after the checkpoint
        metrics_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    progress = _Progress(config.steps, config.log_every, enabled=ctx.main)
    if ctx.mode is not None:
        ranks = f"{ctx.world_size} rank{'s' if ctx.world_size > 1 else ''}"
        header += f" × {ranks} ({ctx.mode}, {torch.distributed.get_backend()})"
    progress.message(f"{header}, {config.optim}, corpus: {corpus.description}")
    _Loop(config, model, optimizer, corpus, state, device, run_dir, progress, ctx).run(callback)
    if ctx.main:
        for line in write_report(run_dir, config, corpus.unigram_bits_per_byte("val"), ctx):
            progress.message(line)
        progress.message(str(run_dir))
    ctx.barrier()
    return run_dir


def _restore(
    run_dir: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: _State,
    ctx: Dist,
    device: torch.device,
) -> None:
    folder = latest_checkpoint(run_dir)
    if folder is None:
        raise ValueError(f"{run_dir} has no checkpoint to resume from; start a new run instead")
    model_state, optimizer_state, saved = read_checkpoint(folder)
    load_full_state(model, optimizer, model_state, optimizer_state, ctx)
    state.step = int(saved["step"])
    state.tokens = int(saved["tokens"])
    state.elapsed_s = float(saved["elapsed_s"])
    state.generator.set_state(saved["generator"])
    torch.set_rng_state(saved["torch_rng"])  # after the load: torch may take a zero-lr step to lay out the state
    if "cuda_rng" in saved and device.type == "cuda":
        torch.cuda.set_rng_state(saved["cuda_rng"], device)


class _Loop:
    """The optimizer steps of one invocation: micro-batches, update, log, evaluation, checkpoints, Ctrl-C, and the
    memory measurement of one step."""

    def __init__(
        self,
        config: TrainConfig,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        corpus: Corpus,
        state: _State,
        device: torch.device,
        run_dir: Path,
        progress: _Progress,
        ctx: Dist,
    ) -> None:
        self.config, self.model, self.optimizer, self.corpus = config, model, optimizer, corpus
        self.state, self.device, self.run_dir, self.progress, self.ctx = state, device, run_dir, progress, ctx
        self.in_update = False  # between the first parameter update of a step and its end
        self.snapshot = (state.generator.get_state(), torch.get_rng_state())  # RNG states at the last step boundary

    def _micro_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's slices of the step's ``grad_accum`` micro-batches (every rank draws the whole batch)."""
        rows = self.ctx.rows(self.config.batch_size)
        for _ in range(self.config.grad_accum):
            x, y = self.corpus.batch("train", self.config.batch_size, self.config.seq_len, self.state.generator)
            yield x[rows].to(self.device), y[rows].to(self.device)

    def _step(self, lr: float) -> tuple[float, float]:
        """Forward and backward over the micro-batches, clip, update; returns (this rank's loss, grad norm).

        The gradients are left in place (the memory measurement reads them); the caller zeroes them.
        """
        loss = 0.0
        for i, (x, y) in enumerate(self._micro_batches()):
            with no_sync(self.model, self.ctx, last=i == self.config.grad_accum - 1):
                with _autocast(self.device):
                    micro = self.model(x, y) / self.config.grad_accum
                micro.backward()  # outside autocast, as torch recommends
            loss += float(micro.detach())
        self.in_update = True  # an interrupt from here on leaves a half-updated model: no checkpoint of it
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip or float("inf"))
        self.optimizer.step()
        return loss, full_value(norm)

    def _measured_step(self, lr: float) -> tuple[float, float, dict[str, Any]]:
        """:meth:`_step` under :func:`tilewise.memory.measure_peak`; the third value is the metrics row."""
        out: list[tuple[float, float]] = []
        measured = measure_peak(lambda: out.append(self._step(lr)), model=self.model, optimizer=self.optimizer)
        row = memory_row(self.state.step + 1, measured, self.config, self.ctx, self.device)
        return *out[0], row

    def _save(self) -> None:
        """A checkpoint of the last completed step: state gathered on every rank under FSDP, written by rank 0."""
        model_state, optimizer_state = full_state(self.model, self.optimizer, self.ctx)
        if self.ctx.main:
            trainer_state = _trainer_state(self.state, *self.snapshot, self.device)
            write_checkpoint(self.run_dir, self.state.step, model_state, optimizer_state, trainer_state)
            prune_checkpoints(self.run_dir, self.config.keep_last)

    def run(self, callback: Callable[[dict[str, Any]], None] | None) -> None:
        """Run optimizer steps from ``state.step``; checkpoint periodically, at the end and on KeyboardInterrupt."""
        config, state = self.config, self.state
        self.saved_step = state.step  # a fresh run's step 0, or the checkpoint resumed from
        self.end = config.steps if config.stop_after is None else min(config.steps, state.step + config.stop_after)
        # measure once the optimizer state exists (the second step of a fresh run), or the only step
        measure_at = state.step if self.optimizer.state or self.end - state.step < 2 else state.step + 1
        self.model.train()
        log = open(self.run_dir / "metrics.jsonl", "a") if self.ctx.main else None  # noqa: SIM115 -- rank 0 only
        try:
            while state.step < self.end:
                row = self._one_step(log, measure=state.step == measure_at)
                if callback is not None:
                    callback(row)
        except KeyboardInterrupt:
            self._interrupted()
            raise
        finally:
            if log is not None:
                log.close()

    def _one_step(self, log: Any, measure: bool) -> dict[str, Any]:
        """One optimizer step, its log rows, an evaluation and a checkpoint when due; returns the step's row."""
        config, state = self.config, self.state
        tick = time.perf_counter()
        lr = lr_at(state.step, config)
        if measure:
            loss, norm, memory = self._measured_step(lr)
        else:
            (loss, norm), memory = self._step(lr), None
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.ctx.mean(loss, self.device)
        seconds = time.perf_counter() - tick
        tokens_per_step = config.batch_size * config.seq_len * config.grad_accum
        state.step += 1
        state.tokens += tokens_per_step
        state.elapsed_s += seconds
        self.snapshot = (state.generator.get_state(), torch.get_rng_state())
        self.in_update = False
        row = {"step": state.step, "loss": loss, "lr": lr, "grad_norm": norm}
        row |= {"tokens": state.tokens, "tokens_per_s": tokens_per_step / seconds, "elapsed_s": state.elapsed_s}
        rows = [row] if memory is None else [row, memory]
        self.progress.update(row, _memory_mib(self.device))
        if state.step % config.eval_every == 0 or state.step == config.steps:
            val = evaluate(self.model, self.corpus, config, self.device, self.ctx)
            rows.append({"step": state.step, "val_loss": val, "val_bpb": val / math.log(2)})
            self.progress.message(f"step {state.step}: val loss {val:.4f}, {rows[-1]['val_bpb']:.3f} bits/byte")
        if log is not None:
            log.write("".join(json.dumps(r) + "\n" for r in rows))
            log.flush()
        if state.step % config.save_every == 0 or state.step == self.end:
            self._save()
            self.saved_step = state.step
        return row

    def _interrupted(self) -> None:
        """On KeyboardInterrupt: a checkpoint of the last completed step where one can be written."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.in_update:
            self.progress.message("interrupted during an optimizer step; the newest earlier checkpoint is kept")
        elif self.state.step == self.saved_step:
            self.progress.message(f"interrupted at step {self.state.step}: nothing newer to save")
        elif self.ctx.mode == "fsdp":  # gathering the shards needs every rank, which may be anywhere now
            self.progress.message("interrupted: under fsdp the newest periodic checkpoint is kept")
        else:
            if self.ctx.main:  # DDP: rank 0 holds the whole state
                self._save()
            self.progress.message(f"interrupted: checkpoint of step {self.state.step} written; resume with --resume")
        self.progress.message(str(self.run_dir))
