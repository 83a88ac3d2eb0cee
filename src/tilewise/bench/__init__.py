"""Side-by-side benchmarks behind ``tilewise bench``: tilewise's ops beside the installed peers, in one process.

Example:
    >>> from tilewise.bench import format_table, run_suite
    >>> rows = run_suite("quant", numel=4096, repeats=1, codebooks=["nf4"], device="cpu", peers=[])
    >>> [(row["op"], row["impl"], row["status"], row["check"]) for row in rows]
    [('quantize', 'tilewise (reference)', 'ok', 'is the reference'),
     ('dequantize', 'tilewise (reference)', 'ok', 'is the reference')]
    >>> print(format_table(rows).splitlines()[0])  # the timings below it vary from run to run
    suite  op  codebook  block  impl  numel  dtype  ms  GB/s  % copy  check  rel RMS err  status

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
