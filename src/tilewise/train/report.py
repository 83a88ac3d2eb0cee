"""What a ``tilewise train`` run reports: the memory of one step, predicted beside measured, ``report.md`` and the
plots ``loss.png`` and ``memory.png`` (with the ``plot`` extra, matplotlib; skipped without it).

Memory: the trainer measures one optimizer step with :func:`tilewise.memory.measure_peak` (the second step of an
invocation, once the optimizer state exists; on CUDA the allocator's peak, on the CPU tensor accounting) and
predicts the same recipe with :func:`tilewise.memory.estimate`, per rank; the pair goes into ``metrics.jsonl``
as a row ``{"step": N, "memory": {...}}``, and the table into the printed summary and ``report.md``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tilewise.memory import CATEGORIES, Recipe, estimate, format_comparison
from tilewise.train.distributed import Dist

if TYPE_CHECKING:
    from tilewise.train.trainer import TrainConfig

__all__ = ["memory_row", "plot_loss", "plot_memory", "read_metrics", "write_report"]


def read_metrics(path: Path, up_to_step: int | None = None) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl`` (optionally those of steps up to ``up_to_step``); [] when it is missing."""
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if up_to_step is None or r["step"] <= up_to_step]


def _recipe(config: TrainConfig, ctx: Dist, device: torch.device) -> Recipe:
    return Recipe(
        optim=config.optim,
        autocast_bf16=device.type == "cuda",  # the trainer's autocast
        batch_size=config.batch_size // ctx.world_size,
        seq_len=config.seq_len,
        activation_checkpointing=config.activation_checkpointing,
        grad_accum=config.grad_accum,
        device=device.type,
    )


def _plan_command(config: TrainConfig, recipe: Recipe) -> str:
    flags = f"--model {config.model} --optim {recipe.optim} --batch-size {recipe.batch_size} --seq-len {recipe.seq_len}"
    flags += f" --mixer {config.mixer}" if config.mixer else ""
    flags += " --autocast" if recipe.autocast_bf16 else ""
    flags += " --device cpu" if recipe.device == "cpu" else ""
    return f"tilewise plan {flags}" + (" --checkpointing" if recipe.activation_checkpointing else "")


def memory_row(
    step: int, measured: dict[str, int], config: TrainConfig, ctx: Dist, device: torch.device
) -> dict[str, Any]:
    """The ``metrics.jsonl`` row of a measured step: ``measured`` beside the estimate of the same recipe, per rank.

    Under FSDP the estimate's weights, gradients and optimizer state are divided by the number of ranks (even
    shards). ``predicted`` is None for a mixer the estimator has no activation formula for.
    """
    recipe = _recipe(config, ctx, device)
    try:
        predicted: dict[str, int] | None = estimate(config.model, recipe, mixer=config.mixer).as_dict()
    except ValueError:
        predicted = None
    if predicted is not None and ctx.mode == "fsdp":
        for name in ("weights", "gradients", "optimizer_state"):
            predicted[name] = math.ceil(predicted[name] / ctx.world_size)
        predicted["total"] = sum(predicted[c] for c in CATEGORIES)
    memory = {
        "device": device.type,
        "dist": ctx.mode,
        "ranks": ctx.world_size,
        "measured": measured,
        "predicted": predicted,
        "plan": _plan_command(config, recipe),
    }
    return {"step": step, "memory": memory}


def _memory_notes(memory: dict[str, Any], config: TrainConfig) -> list[str]:
    cpu = memory["device"] == "cpu"
    how = (
        "tensor accounting (no allocator statistics on the CPU)"
        if cpu
        else "peak = torch.cuda.max_memory_allocated over the step, other = the peak less the four categories"
    )
    fsdp = ", weights, gradients and optimizer state divided by the ranks (FSDP)" if memory["dist"] == "fsdp" else ""
    notes = [
        f"Measured: {how}; activations: what one micro-batch saves for backward.",
        f"Predicted: `{memory['plan']}`{fsdp}."
        if memory["predicted"]
        else "Predicted: none; tilewise.memory.estimate has no activation formula for this mixer.",
    ]
    if cpu:
        notes.append("`other`: not measured on the CPU; the estimate's is an allowance for CUDA workspaces.")
    if cpu and config.activation_checkpointing:
        notes.append(
            "With activation checkpointing the block inputs and the recomputed block are invisible to saved-tensor "
            "hooks, so the measured activations are low."
        )
    return notes


def _memory_section(memory_rows: list[dict[str, Any]], config: TrainConfig, *, markdown: bool) -> list[str]:
    if not memory_rows:
        return []
    row = memory_rows[-1]
    memory = row["memory"]
    per_rank = f", per rank of {memory['ranks']} ({memory['dist']})" if memory["dist"] else ""
    title = f"memory of step {row['step']} on {memory['device']}{per_rank}"
    measured_other = memory["device"] != "cpu"
    table = format_comparison(memory["predicted"], memory["measured"], markdown=markdown, measured_other=measured_other)
    notes = _memory_notes(memory, config)
    if markdown:
        return ["", f"## {title[0].upper()}{title[1:]}", "", table, "", *(f"- {note}" for note in notes)]
    return [f"{title}:", table, *notes]


def write_report(run_dir: Path, config: TrainConfig, baseline: float, ctx: Dist) -> list[str]:
    """Write ``report.md``, ``loss.png`` and ``memory.png`` (with matplotlib) into ``run_dir``; returns the summary
    lines to print (the memory table, the final validation)."""
    rows = read_metrics(run_dir / "metrics.jsonl")
    train_rows = [r for r in rows if "loss" in r]
    val_rows = [r for r in rows if "val_bpb" in r]
    memory_rows = [r for r in rows if "memory" in r]
    title = f"{config.model}, {config.optim}"
    plotted = plot_loss(run_dir / "loss.png", train_rows, val_rows, baseline, title=title)
    plotted_memory = bool(memory_rows) and plot_memory(run_dir / "memory.png", memory_rows[-1], title=title)
    last = train_rows[-1] if train_rows else {}
    val = val_rows[-1] if val_rows else None
    plot_note = "skipped (install the `plot` extra: matplotlib)"
    lines = [
        f"# tilewise train: {config.model}",
        "",
        f"- steps: {last.get('step', 0)} of {config.steps}, {last.get('tokens', 0):,} tokens (bytes), "
        f"{last.get('elapsed_s', 0.0):.1f} s of training",
        f"- model: {config.model}, mixer: {config.mixer or 'default'}, optimizer: {config.optim}, peak lr "
        f"{config.peak_lr:g}, batch {config.batch_size} × {config.seq_len} × {config.grad_accum}",
    ]
    if ctx.mode is not None:
        lines.append(
            f"- data parallel: {ctx.mode} over {ctx.world_size} ranks, {config.batch_size // ctx.world_size} of the "
            f"{config.batch_size} sequences of a micro-batch each"
        )
    lines += [
        f"- final train loss: {last.get('loss', float('nan')):.4f} nats/byte",
        f"- validation: {val['val_bpb']:.3f} bits/byte at step {val['step']}" if val else "- validation: not run",
        f"- unigram baseline (byte frequencies): {baseline:.3f} bits/byte",
        f"- loss curve: {'loss.png' if plotted else plot_note}",
    ]
    if memory_rows:
        lines.append(f"- memory chart: {'memory.png' if plotted_memory else plot_note}")
    lines += _memory_section(memory_rows, config, markdown=True)
    lines += ["", "Files: config.json, metrics.jsonl, checkpoints/, report.md."]
    (run_dir / "report.md").write_text("\n".join(lines) + "\n")
    summary = _memory_section(memory_rows, config, markdown=False)
    if val:
        summary.append(f"val {val['val_bpb']:.3f} bits/byte (unigram baseline {baseline:.3f})")
    return summary


def _pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend, or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_loss(path: Path, train_rows: list[dict], val_rows: list[dict], baseline: float, title: str = "") -> bool:
    """Train and validation loss in bits per byte against step; False when matplotlib is missing."""
    plt = _pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in train_rows], [r["loss"] / math.log(2) for r in train_rows], label="train")
    ax.plot([r["step"] for r in val_rows], [r["val_bpb"] for r in val_rows], "o-", label="validation")
    ax.axhline(baseline, color="gray", linestyle="--", label="unigram baseline")
    ax.set(xlabel="step", ylabel="bits per byte", title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_memory(path: Path, row: dict[str, Any], title: str = "") -> bool:
    """Predicted and measured MiB per category side by side (a ``memory_row``); False when matplotlib is missing."""
    plt = _pyplot()
    if plt is None:
        return False
    memory = row["memory"]
    # the CPU measures no `other`: leave the category out rather than draw a prediction with nothing beside it
    names = [c for c in CATEGORIES if c != "other" or memory["device"] != "cpu"]
    predicted = memory["predicted"] or {}
    y = range(len(names))
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.barh([i - 0.2 for i in y], [predicted.get(c, float("nan")) / 2**20 for c in names], 0.4, label="predicted")
    ax.barh([i + 0.2 for i in y], [memory["measured"][c] / 2**20 for c in names], 0.4, label="measured")
    ax.set_yticks(list(y), names)
    ax.invert_yaxis()
    where = f"step {row['step']}, {memory['device']}" + (f", per rank of {memory['ranks']}" if memory["dist"] else "")
    ax.set(xlabel="MiB", title=f"{title}: memory ({where})" if title else f"memory ({where})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
