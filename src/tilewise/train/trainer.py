"""The trainer behind ``tilewise train``: a byte-level MetaFormer LM on the built-in corpus (or ``data``).

One run directory holds everything a run writes:

- ``config.json``: the :class:`TrainConfig` (``--resume DIR`` reads it back);
- ``metrics.jsonl``: one JSON object per optimizer step (``step, loss, lr, grad_norm, tokens_per_s, ...``) and one
  per evaluation (``"val_loss"``, ``"val_bpb"``);
- ``checkpoints/step-NNNNNNN/``: ``model.safetensors``, ``optimizer.pt``, ``trainer.pt`` (see
  :mod:`tilewise.train.checkpoint`); the newest ``keep_last`` are kept;
- ``loss.png`` (with the ``plot`` extra, matplotlib) and ``report.md``.

Resume is exact: the batch sampler's generator, torch's RNG states and the step are saved with the model and the
optimizer, and the learning rate is a pure function of the step, so on the CPU a resumed run repeats the losses of
an uninterrupted one bit for bit. Ctrl-C (or a ``KeyboardInterrupt`` raised by ``callback``) between or during the
forward/backward passes writes a checkpoint of the last completed step before the exception propagates.

Example:
    >>> run_dir = train(TrainConfig(steps=200, out="runs/demo"))
    >>> run_dir = train(dataclasses.replace(load_config("runs/demo"), steps=400, resume="runs/demo"))
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

from tilewise.nn import build_model
from tilewise.train.checkpoint import latest_checkpoint, prune_checkpoints, read_checkpoint, write_checkpoint
from tilewise.train.corpus import Corpus, build_corpus

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
        batch_size: sequences per micro-batch (default 16).
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

    def __post_init__(self) -> None:
        if self.optim not in OPTIMIZERS:
            raise ValueError(f"optim must be one of {', '.join(OPTIMIZERS)}, got {self.optim!r}")
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
    """The :class:`TrainConfig` saved in a run directory's ``config.json``."""
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


def _enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each block of ``model.layers`` in the backward pass (non-reentrant ``torch.utils.checkpoint``)."""
    for layer in model.layers:
        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)


def _resolve_device(name: str) -> torch.device:
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
    """A one-line carriage-return display on a terminal; a log line every ``log_every`` steps otherwise."""

    def __init__(self, total: int, log_every: int) -> None:
        self.total = total
        self.log_every = log_every
        self.tty = sys.stdout.isatty()

    def update(self, row: dict[str, Any], mem_mib: float) -> None:
        step = row["step"]
        text = (
            f"step {step}/{self.total}  loss {row['loss']:.4f}  lr {row['lr']:.2e}  "
            f"{row['tokens_per_s']:,.0f} tok/s  mem {mem_mib:,.0f} MiB"
        )
        if self.tty:
            sys.stdout.write(f"\r\033[K{text}")
            sys.stdout.flush()
        elif step % self.log_every == 0 or step == self.total:
            print(text, flush=True)

    def message(self, text: str) -> None:
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


def _trainer_state(state: _State, generator_state: torch.Tensor, cpu_rng: torch.Tensor) -> dict[str, Any]:
    saved: dict[str, Any] = {
        "step": torch.tensor(state.step),
        "tokens": torch.tensor(state.tokens),
        "elapsed_s": torch.tensor(state.elapsed_s, dtype=torch.float64),
        "generator": generator_state,
        "torch_rng": cpu_rng,
    }
    if torch.cuda.is_available():
        saved["cuda_rng"] = torch.cuda.get_rng_state_all()
    return saved


@torch.no_grad()
def evaluate(model: torch.nn.Module, corpus: Corpus, config: TrainConfig, device: torch.device) -> float:
    """Mean validation loss (nats per byte) over ``eval_batches`` fixed batches; the training RNGs are untouched."""
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(config.seed + 1)
    total = 0.0
    for _ in range(config.eval_batches):
        x, y = corpus.batch("val", config.batch_size, config.seq_len, generator)
        with _autocast(device):
            total += float(model(x.to(device), y.to(device)))
    model.train(was_training)
    return total / config.eval_batches


def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _read_metrics(path: Path, up_to_step: int | None = None) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if up_to_step is None or r["step"] <= up_to_step]


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
                stacklevel=3,
            )
    config = dataclasses.replace(config, out=str(run_dir))
    (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=1) + "\n")
    return run_dir, config


def _micro_batches(corpus: Corpus, config: TrainConfig, state: _State) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for _ in range(config.grad_accum):
        yield corpus.batch("train", config.batch_size, config.seq_len, state.generator)


def train(config: TrainConfig, callback: Callable[[dict[str, Any]], None] | None = None) -> Path:
    """Train a language model as ``config`` says; returns the run directory (also printed as the last line).

    Args:
        config: the run's settings; with ``config.resume`` set, the run continues from that directory's newest
            checkpoint and writes there.
        callback: called with each step's metrics row after the step; raising ``KeyboardInterrupt`` from it acts
            like Ctrl-C (a checkpoint of that step is written, then the exception propagates).

    Raises:
        ValueError: bad settings, a resume directory without a checkpoint, or ``out`` already holding a run.
        KeyboardInterrupt: after writing a checkpoint, on Ctrl-C.
    """
    run_dir, config = _setup(config)
    device = _resolve_device(config.device)
    torch.manual_seed(config.seed)
    corpus = build_corpus(config.data, cache_dir=config.cache_dir, max_bytes=config.max_bytes)
    model = build_model(config.model, mixer=config.mixer, device=device)
    if config.seq_len > model.config.max_seq_len:
        raise ValueError(f"seq_len {config.seq_len} exceeds the {config.model} model's max_seq_len")
    if config.activation_checkpointing:
        _enable_activation_checkpointing(model)
    optimizer = _build_optimizer(model, config)
    state = _State(0, torch.Generator().manual_seed(config.seed))
    if config.resume is not None:
        _restore(run_dir, model, optimizer, state)
    metrics_path = run_dir / "metrics.jsonl"
    rows = _read_metrics(metrics_path, up_to_step=state.step)  # drop rows logged after the checkpoint
    metrics_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    baseline = corpus.unigram_bits_per_byte("val")
    progress = _Progress(config.steps, config.log_every)
    progress.message(
        f"{config.model} ({model.num_params():,} parameters) on {device}, {config.optim}, corpus: {corpus.description}"
    )
    _loop(config, model, optimizer, corpus, state, device, run_dir, progress, callback)
    _finish(run_dir, config, baseline, progress)
    return run_dir


def _restore(run_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: _State) -> None:
    folder = latest_checkpoint(run_dir)
    if folder is None:
        raise ValueError(f"{run_dir} has no checkpoint to resume from; start a new run instead")
    model_state, optimizer_state, saved = read_checkpoint(folder)
    model.load_state_dict(model_state)
    optimizer.load_state_dict(optimizer_state)
    state.step = int(saved["step"])
    state.tokens = int(saved["tokens"])
    state.elapsed_s = float(saved["elapsed_s"])
    state.generator.set_state(saved["generator"])
    torch.set_rng_state(saved["torch_rng"])
    if "cuda_rng" in saved and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["cuda_rng"])


def _loop(
    config: TrainConfig,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    corpus: Corpus,
    state: _State,
    device: torch.device,
    run_dir: Path,
    progress: _Progress,
    callback: Callable[[dict[str, Any]], None] | None,
) -> None:
    """Run optimizer steps from ``state.step``; checkpoint periodically, at the end and on KeyboardInterrupt."""
    end = config.steps if config.stop_after is None else min(config.steps, state.step + config.stop_after)
    tokens_per_step = config.batch_size * config.seq_len * config.grad_accum
    model.train()

    def save() -> None:
        write_checkpoint(run_dir, state.step, model, optimizer, _trainer_state(state, *snapshot))
        prune_checkpoints(run_dir, config.keep_last)

    with open(run_dir / "metrics.jsonl", "a") as log:
        snapshot = (state.generator.get_state(), torch.get_rng_state())  # RNG states at the last step boundary
        in_update = False
        try:
            while state.step < end:
                start = time.perf_counter()
                loss = 0.0
                for x, y in _micro_batches(corpus, config, state):
                    with _autocast(device):
                        micro = model(x.to(device), y.to(device)) / config.grad_accum
                    micro.backward()
                    loss += float(micro.detach())
                lr = lr_at(state.step, config)
                in_update = True  # an interrupt from here on leaves a half-updated model: no checkpoint of it
                for group in optimizer.param_groups:
                    group["lr"] = lr
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip or float("inf"))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                seconds = time.perf_counter() - start
                state.step += 1
                state.tokens += tokens_per_step
                state.elapsed_s += seconds
                snapshot = (state.generator.get_state(), torch.get_rng_state())
                in_update = False
                row = {"step": state.step, "loss": loss, "lr": lr, "grad_norm": float(norm)}
                row |= {"tokens": state.tokens, "tokens_per_s": tokens_per_step / seconds, "elapsed_s": state.elapsed_s}
                log.write(json.dumps(row) + "\n")
                progress.update(row, _memory_mib(device))
                if state.step % config.eval_every == 0 or state.step == config.steps:
                    val = evaluate(model, corpus, config, device)
                    eval_row = {"step": state.step, "val_loss": val, "val_bpb": val / math.log(2)}
                    log.write(json.dumps(eval_row) + "\n")
                    progress.message(f"step {state.step}: val loss {val:.4f}, {eval_row['val_bpb']:.3f} bits/byte")
                log.flush()
                if state.step % config.save_every == 0 or state.step == end:
                    save()
                if callback is not None:
                    callback(row)
        except KeyboardInterrupt:
            optimizer.zero_grad(set_to_none=True)
            log.flush()
            if in_update:
                progress.message("interrupted during an optimizer step; the newest earlier checkpoint is kept")
            else:
                save()
                progress.message(f"interrupted: checkpoint of step {state.step} written; resume with --resume")
            progress.message(str(run_dir))
            raise


def _finish(run_dir: Path, config: TrainConfig, baseline: float, progress: _Progress) -> None:
    """Write the loss curve (with matplotlib) and report.md; print the summary and, last, the run directory."""
    rows = _read_metrics(run_dir / "metrics.jsonl")
    train_rows = [r for r in rows if "loss" in r]
    val_rows = [r for r in rows if "val_bpb" in r]
    plotted = _plot(run_dir / "loss.png", train_rows, val_rows, baseline)
    last = train_rows[-1] if train_rows else {}
    val = val_rows[-1] if val_rows else None
    lines = [
        f"# tilewise train: {config.model}",
        "",
        f"- steps: {last.get('step', 0)} of {config.steps}, {last.get('tokens', 0):,} tokens (bytes), "
        f"{last.get('elapsed_s', 0.0):.1f} s of training",
        f"- model: {config.model}, mixer: {config.mixer or 'default'}, optimizer: {config.optim}, peak lr "
        f"{config.peak_lr:g}, batch {config.batch_size} × {config.seq_len} × {config.grad_accum}",
        f"- final train loss: {last.get('loss', float('nan')):.4f} nats/byte",
        f"- validation: {val['val_bpb']:.3f} bits/byte at step {val['step']}" if val else "- validation: not run",
        f"- unigram baseline (byte frequencies): {baseline:.3f} bits/byte",
        "- loss curve: loss.png" if plotted else "- loss curve: skipped (install the `plot` extra: matplotlib)",
        "",
        "Files: config.json, metrics.jsonl, checkpoints/, report.md.",
    ]
    (run_dir / "report.md").write_text("\n".join(lines) + "\n")
    if val:
        progress.message(f"val {val['val_bpb']:.3f} bits/byte (unigram baseline {baseline:.3f})")
    progress.message(str(run_dir))


def _plot(path: Path, train_rows: list[dict], val_rows: list[dict], baseline: float) -> bool:
    """Train and validation loss in bits per byte against step; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in train_rows], [r["loss"] / math.log(2) for r in train_rows], label="train")
    ax.plot([r["step"] for r in val_rows], [r["val_bpb"] for r in val_rows], "o-", label="validation")
    ax.axhline(baseline, color="gray", linestyle="--", label="unigram baseline")
    ax.set(xlabel="step", ylabel="bits per byte")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
