"""Side-by-side benchmarks behind ``tilewise bench``: tilewise's ops beside the installed peers, in one process.

Example:
    >>> from tilewise.bench import format_table, run_suite
    >>> rows = run_suite("quant", numel=1 << 20, repeats=5)
    >>> print(format_table(rows))

Suites: ``quant`` (block-wise quantize/dequantize vs bitsandbytes and torchao), ``hadamard`` (the Walsh-Hadamard
transform vs a dense matmul and fast_hadamard_transform), ``optim`` (an AdamW step on quantized state vs torch,
bitsandbytes and torchao) and ``mixers`` (linear attention, block-sparse attention and fft_conv, forward and
forward + backward, vs causal SDPA, FlexAttention, the torch.fft conv and fla). Importing this package imports
neither Triton nor any peer and does not initialise CUDA; a suite does that when it runs.
"""

from __future__ import annotations

from tilewise.bench.runner import (
    ROW_KEYS,
    Peer,
    Timing,
    copy_bandwidth,
    format_table,
    load_peer,
    register_suite,
    run_suite,
    suite_names,
    time_fn,
)

__all__ = [
    "ROW_KEYS",
    "Peer",
    "Timing",
    "copy_bandwidth",
    "format_table",
    "load_peer",
    "register_suite",
    "run_suite",
    "suite_names",
    "time_fn",
]
