"""The ``tilewise`` command: argument parsing only. Each subcommand calls one typed library function.

tilewise env [--json]                  what this machine offers (tilewise.envinfo)
tilewise demo [--codebooks ...]        every codebook on one tensor, side by side (tilewise.quant.demo)
tilewise bench SUITE [--json PATH]     our ops beside the installed peers (tilewise.bench)
tilewise train [--steps N ...]         train a byte-level LM into one run directory (tilewise.train)
tilewise plan [--budget SIZE ...]      predict a training recipe's memory; fit a budget (tilewise.memory)

Data parallel: ``torchrun --nproc-per-node N -m tilewise train --dist ddp|fsdp ...`` (also ``python -m tilewise``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tilewise import __version__

__all__ = ["build_parser", "main"]


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _cmd_env(args: argparse.Namespace) -> int:
    from tilewise.envinfo import collect, format_env

    info = collect()
    print(json.dumps(info, indent=2) if args.json else format_env(info))
    return 0


def _stderr_progress(done: int, total: int, label: str) -> None:
    """A one-line progress indicator on a terminal; nothing when stderr is a file or pipe."""
    if not sys.stderr.isatty():
        return
    end = "\n" if done == total else ""
    sys.stderr.write(f"\r\033[K[{done}/{total}] {label}{end}")
    sys.stderr.flush()


def _cmd_demo(args: argparse.Namespace) -> int:
    from tilewise.quant.demo import format_demo_table, run_demo

    rotations = {"both": (False, True), "off": (False,), "on": (True,)}[args.rotate]
    rows = run_demo(
        args.codebooks,
        args.numel,
        args.block_size,
        device=args.device,
        rotations=rotations,
        double_quant=args.double_quant,
        repeats=args.repeats,
        backend=args.backend,
        progress=_stderr_progress,
    )
    print(f"{args.numel} bf16 elements (heavy tails, 3 outlier channels), block {args.block_size}, on {args.device}")
    print(format_demo_table(rows))
    _write_json(args.json, rows)
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from tilewise.bench import format_table, run_suite

    options = {"numel": args.numel, "repeats": args.repeats, "device": args.device, "backend": args.backend}
    if args.seqlens is not None:
        if args.suite != "mixers":
            raise SystemExit(f"tilewise bench: error: --seqlens is an option of the mixers suite, not {args.suite}")
        options["seqlens"] = args.seqlens
    rows = run_suite(args.suite, **{key: value for key, value in options.items() if value is not None})
    print(format_table(rows))
    _write_json(args.json, rows)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    import dataclasses

    from tilewise.train import TrainConfig, load_config, train

    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    given = {name: value for name, value in given.items() if value is not None}
    base = load_config(args.resume) if args.resume is not None else TrainConfig()
    config = dataclasses.replace(base, **given)
    try:
        train(config)
    except KeyboardInterrupt:
        return 130  # the trainer wrote a checkpoint and printed the run directory
    return 0


def _write_json(path: Path | None, rows: list[dict[str, Any]]) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"wrote {path}")


def _add_env(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("env", help="show Python, torch, CUDA, Triton, GPUs, usable backends and installed peers")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(handler=_cmd_env)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="quantize one test tensor with each codebook and compare size, error and time")
    p.add_argument(
        "--codebooks",
        nargs="+",
        default=["int8", "dynamic8", "nf4", "fp4", "int4"],
        metavar="NAME",
        help="codebooks to compare (default: %(default)s)",
    )
    p.add_argument("--numel", type=_positive_int, default=1 << 20, help="elements in the test tensor (default: 2**20)")
    p.add_argument("--block-size", type=_positive_int, default=256, help="elements per scale (default: %(default)s)")
    p.add_argument("--rotate", choices=["both", "off", "on"], default="both", help="Hadamard rotation (default: both)")
    p.add_argument("--double-quant", action="store_true", help="also quantize the scales (QLoRA)")
    p.add_argument("--repeats", type=_positive_int, default=3, help="timed runs per cell; median (default: 3)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    p.add_argument(
        "--backend",
        choices=["auto", "triton", "reference"],
        default="auto",
        help="auto: Triton for CUDA tensors when it imports, else the PyTorch reference (default: auto)",
    )
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the rows to this JSON file")
    p.set_defaults(handler=_cmd_demo)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="time a suite of tilewise ops beside the installed peers, on the same inputs")
    p.add_argument("suite", help="suite name: quant, hadamard, optim or mixers")
    p.add_argument("--numel", type=_positive_int, help="elements per input tensor (default: the suite's)")
    p.add_argument("--repeats", type=_positive_int, help="timed repeats per measurement (default: the suite's)")
    p.add_argument("--device", help="torch device, e.g. cuda or cpu (default: the suite's, cuda when present)")
    p.add_argument(
        "--backend", choices=["auto", "triton", "reference"], help="tilewise's implementation (default: the suite's)"
    )
    p.add_argument(
        "--seqlens",
        type=_positive_int,
        nargs="+",
        metavar="T",
        help="mixers only: sequence lengths (default: 2K 8K 32K)",
    )
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the rows to this JSON file")
    p.set_defaults(handler=_cmd_bench)


def _add_train(sub: argparse._SubParsersAction) -> None:
    from tilewise.train.distributed import DIST_MODES
    from tilewise.train.trainer import OPTIMIZERS

    # Every default is None here: unset flags take TrainConfig's default, or the resumed run's config.
    p = sub.add_parser("train", help="train a byte-level language model; writes one run directory (last line)")
    p.add_argument("--model", help="model size from tilewise.nn.CONFIGS (default: tiny)")
    p.add_argument("--mixer", help="token mixer, e.g. attention or pooling (default: the model's)")
    p.add_argument("--optim", choices=OPTIMIZERS, help="optimizer (default: adamw, torch's)")
    p.add_argument("--steps", type=_positive_int, help="optimizer steps in the run (default: 600)")
    p.add_argument(
        "--batch-size", type=_positive_int, help="sequences per micro-batch, over all ranks with --dist (default: 16)"
    )
    p.add_argument("--seq-len", type=_positive_int, help="bytes per sequence (default: 128)")
    p.add_argument("--grad-accum", type=_positive_int, help="micro-batches per optimizer step (default: 1)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: 3e-3 for AdamW, 3e-4 for Lion)")
    p.add_argument("--warmup-steps", type=int, help="linear warmup, in steps (default: 30)")
    p.add_argument("--weight-decay", type=float, help="decoupled weight decay on matrices (default: 0.1)")
    p.add_argument("--grad-clip", type=float, help="max global gradient norm; 0 disables (default: 1.0)")
    p.add_argument(
        "--activation-checkpointing",
        action="store_true",
        default=None,
        help="recompute block activations in the backward pass: less memory, more time",
    )
    p.add_argument("--eval-every", type=_positive_int, help="steps between validation passes (default: 100)")
    p.add_argument("--save-every", type=_positive_int, help="steps between checkpoints (default: 200)")
    p.add_argument("--keep-last", type=_positive_int, help="checkpoints kept (default: 2)")
    p.add_argument("--seed", type=int, help="seed for initialization and batches (default: 0)")
    p.add_argument("--device", help="auto (CUDA when present), cpu, cuda, cuda:1, ... (default: auto)")
    p.add_argument("--data", help="a text file or folder to train on (default: pydoc topics + stdlib sources)")
    p.add_argument("--max-bytes", type=_positive_int, help="cap on the corpus size, in bytes (default: 8,000,000)")
    p.add_argument("--out", help="run directory (default: runs/<model>-<date>-<time>)")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its newest checkpoint")
    p.add_argument("--stop-after", type=_positive_int, help="stop this invocation after this many steps (resumable)")
    p.add_argument(
        "--dist",
        choices=DIST_MODES,
        help="data parallel under torchrun: ddp (replicated) or fsdp (sharded, FSDP2); gloo on CPU, NCCL on CUDA",
    )
    p.set_defaults(handler=_cmd_train)


def _plan(argv: Sequence[str]) -> int:
    from tilewise.memory import plan_main

    return plan_main(list(argv))


def _add_plan(sub: argparse._SubParsersAction) -> None:
    # listed here for `tilewise --help`; main() hands `plan ...` to the planner, which parses its own flags
    sub.add_parser(
        "plan", help="predict the training memory of a model and recipe without allocating (`tilewise plan --help`)"
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``tilewise`` argument parser with its subcommands."""
    parser = argparse.ArgumentParser(
        prog="tilewise",
        description="Block-wise quantization, low-bit optimizers and efficient token mixers for PyTorch.",
    )
    parser.add_argument("--version", action="version", version=f"tilewise {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    adders: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
        _add_env,
        _add_demo,
        _add_bench,
        _add_train,
        _add_plan,
    )
    for add in adders:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``tilewise`` command with ``argv`` (default ``sys.argv[1:]``); returns the exit status.

    A ``ValueError`` from the library (a bad codebook name, an unknown suite, ...) is reported as a usage error
    (exit status 2) without a traceback.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["plan"]:
        return _plan(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except ValueError as err:
        parser.exit(2, f"tilewise {args.command}: error: {err}\n")
