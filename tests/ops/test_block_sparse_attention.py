"""tilewise.ops.block_sparse_attention: the dense masked reference against SDPA and a token-by-token loop, the
Triton kernels against the reference (forward and gradients, under the interpreter on CPU), the block selector
(its Triton block-mass kernel against the reference), and the errors."""

from __future__ import annotations

import importlib
import itertools
import math
import types

import pytest
import torch

from tilewise._testing import assert_close, assert_exact, assert_rel_rms, poison_
from tilewise.ops import block_sparse_attention, select_blocks
from tilewise.ops.block_sparse_attention.reference import block_mass_ref, causal_block_mask


def qkv(batch: int, heads: int, seq: int, dim: int, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    return [torch.randn(batch, heads, seq, dim, device=device).to(dtype).requires_grad_() for _ in range(3)]


def random_mask(batch: int, heads: int, seq: int, block_size: int, p: float = 0.5, device: str = "cpu"):
    """Random causal-irrelevant bits with the diagonal kept (blocks above it are set too: they must be ignored)."""
    nb = -(-seq // block_size)
    m = torch.rand(batch, heads, nb, nb, device=device) < p
    m.diagonal(dim1=-2, dim2=-1).fill_(True)
    return m


def naive(q, k, v, block_mask, block_size, scale):
    """Per query, a float64 softmax over exactly the keys it may see: the definition, one token at a time."""
    batch, heads, seq, _ = q.shape
    o = torch.empty(q.shape, dtype=torch.float64)
    q, k, v = (t.detach().double() for t in (q, k, v))
    for b in range(batch):
        for h in range(heads):
            for i in range(seq):
                keys = [j for j in range(i + 1) if block_mask[b, h, i // block_size, j // block_size]]
                p = torch.softmax(torch.stack([q[b, h, i] @ k[b, h, j] * scale for j in keys]), 0)
                o[b, h, i] = sum(pj * v[b, h, j] for pj, j in zip(p, keys, strict=True))
    return o


@pytest.mark.parametrize("seq", [1, 63, 64, 100, 200])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_full_mask_is_causal_sdpa(seq, dtype):
    q, k, v = qkv(2, 3, seq, 32, dtype)
    full = torch.ones(1, 1, -(-seq // 64), -(-seq // 64), dtype=torch.bool)
    o = block_sparse_attention(q, k, v, full, backend="reference")
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    # bf16: both compute in fp32 from the same bf16 inputs; ours rounds to bf16 once at the end.
    assert_close(o.float(), ref, torch.float32 if dtype == torch.float32 else torch.bfloat16)


@pytest.mark.parametrize(("seq", "block_size"), [(63, 32), (100, 32), (130, 64)])
def test_reference_matches_naive_loop(seq, block_size):
    q, k, v = qkv(1, 2, seq, 32)
    mask = random_mask(1, 2, seq, block_size, p=0.4)
    o = block_sparse_attention(q, k, v, mask, block_size=block_size, scale=0.3, backend="reference")
    assert_close(o.double(), naive(q, k, v, mask, block_size, 0.3), torch.float32)


def test_reference_ignores_blocks_above_the_diagonal():
    q, k, v = qkv(1, 1, 96, 32)
    lower = torch.eye(3, dtype=torch.bool)[None, None] | causal_block_mask(3)[None, None] & (torch.rand(3, 3) < 0.5)
    upper = lower | ~causal_block_mask(3)
    a = block_sparse_attention(q, k, v, lower, block_size=32, backend="reference")
    b = block_sparse_attention(q, k, v, upper, block_size=32, backend="reference")
    assert torch.equal(a, b)


def test_reference_gradients_flow_only_through_kept_blocks():
    q, k, v = qkv(1, 1, 64, 32)
    mask = torch.eye(2, dtype=torch.bool)[None, None]  # diagonal only: the second query block never sees block 0
    o = block_sparse_attention(q, k, v, mask, block_size=32, backend="reference")
    (dk,) = torch.autograd.grad(o[..., 32:, :].sum(), k)
    assert torch.count_nonzero(dk[..., :32, :]) == 0
    assert torch.count_nonzero(dk[..., 32:, :]) > 0


# --- Triton (interpreter on CPU) ------------------------------------------------------------------------------

# Relative RMS error between the kernel and the fp32 reference, by input dtype. fp32: both in fp32, summed in a
# different order (online softmax). bf16: outputs and gradients rounded to bf16 (u = 2^-8); on a GPU the kernel also
# rounds p and ds to bf16 before the dots, as flash attention does.
REL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def forward_and_grads(q, k, v, mask, block_size, backend):
    o = block_sparse_attention(q, k, v, mask, block_size=block_size, scale=0.2, backend=backend)
    gen = torch.Generator(device=o.device).manual_seed(0)
    do = torch.randn(o.shape, generator=gen, device=o.device).to(o.dtype)
    return [o, *torch.autograd.grad(o, (q, k, v), do)]


@pytest.fixture
def poisoned(monkeypatch):
    """Fresh tensors from ``torch.empty`` / ``torch.empty_like`` come filled with NaN, so an unwritten output fails."""
    empty, empty_like = torch.empty, torch.empty_like
    monkeypatch.setattr(torch, "empty", lambda *a, **kw: poison_(empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: poison_(empty_like(*a, **kw)))


@pytest.mark.interpret
@pytest.mark.usefixtures("poisoned")
@pytest.mark.parametrize(("seq", "block_size", "dim"), [(64, 32, 32), (100, 32, 64), (192, 64, 32), (1, 32, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_matches_reference(seq, block_size, dim, dtype, device):
    q, k, v = qkv(1, 2, seq, dim, dtype, device)
    mask = random_mask(1, 2, seq, block_size, p=0.5, device=device)
    got = forward_and_grads(q, k, v, mask, block_size, "triton")
    want = forward_and_grads(q, k, v, mask, block_size, "reference")
    for name, a, b in zip(("o", "dq", "dk", "dv"), got, want, strict=True):
        assert a.dtype == dtype
        assert_rel_rms(a, b, REL[dtype], floor=1e-6, msg=name)


@pytest.mark.interpret
@pytest.mark.parametrize("nb", [1, 5, 16, 37])
@pytest.mark.parametrize("broadcast", [False, True])
def test_block_lists_kernel_matches_torch(nb, broadcast, device):
    """The one-launch lists equal the sorted PyTorch ones on every kept entry and count: random bits above the
    diagonal (ignored), a dropped diagonal (attended anyway), a mask broadcast over batch and heads (stride 0)."""
    from tilewise.ops.block_sparse_attention.triton import block_lists, block_lists_torch

    gen = torch.Generator().manual_seed(nb)
    mask = torch.rand(1 if broadcast else 2, 1 if broadcast else 3, nb, nb, generator=gen) < 0.4
    mask[..., 0, 0] = False
    mask = mask.to(device).expand(2, 3, nb, nb)
    got, want = block_lists(mask), block_lists_torch(mask)
    for idx, cnt, widx, wcnt in ((got[0], got[1], want[0], want[1]), (got[2], got[3], want[2], want[3])):
        assert torch.equal(cnt, wcnt)
        valid = torch.arange(nb, device=device) < cnt[..., None]
        assert torch.equal(torch.where(valid, idx, -1), torch.where(valid, widx, -1))


@pytest.mark.interpret
def test_triton_full_mask_is_causal_sdpa(device):
    q, k, v = (t.detach() for t in qkv(2, 1, 100, 32, device=device))
    o = block_sparse_attention(q, k, v, torch.ones(1, 1, 4, 4, dtype=torch.bool, device=device), block_size=32,
                               backend="triton")  # fmt: skip
    assert_rel_rms(o, torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True), 1e-5)


@pytest.mark.interpret
def test_triton_with_selected_blocks(device):
    q, k, v = qkv(1, 2, 128, 64, device=device)
    mask = select_blocks(q, k, block_size=32, stride=8, threshold=0.5)
    got = forward_and_grads(q, k, v, mask, 32, "triton")
    want = forward_and_grads(q, k, v, mask, 32, "reference")
    for name, a, b in zip(("o", "dq", "dk", "dv"), got, want, strict=True):
        assert_rel_rms(a, b, REL[torch.float32], floor=1e-6, msg=name)


@pytest.mark.gpu
@pytest.mark.parametrize("dim", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_gpu_sizes(dim, dtype):
    q, k, v = qkv(2, 3, 1000, dim, dtype, "cuda")
    mask = random_mask(2, 3, 1000, 64, p=0.3, device="cuda")
    got = forward_and_grads(q, k, v, mask, 64, "triton")
    want = forward_and_grads(q, k, v, mask, 64, "reference")
    for name, a, b in zip(("o", "dq", "dk", "dv"), got, want, strict=True):
        assert_rel_rms(a, b, 1e-2, floor=1e-6, msg=name)


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.interpret)])
@pytest.mark.parametrize("block_size", [32, 64])
def test_diagonal_is_always_attended(backend, block_size, device):
    """A mask without its diagonal blocks attends them anyway: the same output as with them kept (the Triton path's
    block lists add the diagonal; fp32 at block 64 runs on refined 32-row blocks, whose mask takes the coarse
    diagonal before it is refined)."""
    dev = device if backend == "triton" else "cpu"
    q, k, v = (t.detach() for t in qkv(1, 2, 100, 32, device=dev))
    mask = random_mask(1, 2, 100, block_size, p=0.5, device=dev)
    without = mask.clone()
    without.diagonal(dim1=-2, dim2=-1).fill_(False)
    want = block_sparse_attention(q, k, v, mask, block_size=block_size, backend=backend)
    assert torch.equal(block_sparse_attention(q, k, v, without, block_size=block_size, backend=backend), want)


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_eager_function_equals_custom_op(dtype, device, monkeypatch):
    """Eager calls take a plain autograd.Function, torch.compile the custom op: the same host functions, so the same
    bits, forward and gradients."""
    mod = importlib.import_module("tilewise.ops.block_sparse_attention.triton")
    q, k, v = qkv(1, 2, 100, 32, dtype, device=device)
    mask = random_mask(1, 2, 100, 32, p=0.5, device=device)
    results = []
    for via_op in (False, True):
        monkeypatch.setattr(mod, "EAGER_VIA_CUSTOM_OP", via_op)
        results.append(forward_and_grads(q, k, v, mask, 32, "triton"))
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


@pytest.mark.interpret
@pytest.mark.parametrize(("bm", "bn"), [(32, None), (64, None), (None, 32), (None, 128), (64, 16), (64, 128)])
def test_triton_forward_query_and_key_split(bm, bn, device, monkeypatch):
    """The forward with fewer query rows per program than the block (TUNING fwd_bm) and fewer keys a step (fwd_bn:
    parts of the diagonal block hide every key from some rows) gives the same o and grads. bf16: fp32 inputs run on
    32-row blocks, where there is nothing to split."""
    mod = importlib.import_module("tilewise.ops.block_sparse_attention.triton")
    q, k, v = qkv(1, 2, 200, 32, torch.bfloat16, device=device)
    mask = random_mask(1, 2, 200, 128, p=0.5, device=device)
    want = forward_and_grads(q, k, v, mask, 128, "reference")
    monkeypatch.setitem(mod.TUNING, "fwd_bm", bm)
    monkeypatch.setitem(mod.TUNING, "fwd_bn", bn)
    got = forward_and_grads(q, k, v, mask, 128, "triton")
    for name, a, b in zip(("o", "dq", "dk", "dv"), got, want, strict=True):
        assert_rel_rms(a, b, REL[torch.bfloat16], floor=1e-6, msg=name)


@pytest.mark.interpret
@pytest.mark.parametrize(
    ("dkdv_bn", "dkdv_bm", "dq_bm", "dq_bn"),
    [(32, 32, 32, 32), (64, 32, 128, 32), (128, 64, 64, 128), (32, 128, 32, 64)],
)
def test_triton_backward_parts_of_blocks(dkdv_bn, dkdv_bm, dq_bm, dq_bn, device, monkeypatch):
    """The gradient kernels on parts of the 128-blocks (TUNING dkdv_bn keys a program, dkdv_bm query rows a step;
    dq_bm query rows a program, dq_bn keys a step: on the diagonal, steps that see none of the part are skipped)
    give the reference's gradients; T = 200 leaves a partial last block."""
    mod = importlib.import_module("tilewise.ops.block_sparse_attention.triton")
    q, k, v = qkv(1, 2, 200, 32, torch.bfloat16, device=device)
    mask = random_mask(1, 2, 200, 128, p=0.5, device=device)
    want = forward_and_grads(q, k, v, mask, 128, "reference")
    for key, rows in (("dkdv_bn", dkdv_bn), ("dkdv_bm", dkdv_bm), ("dq_bm", dq_bm), ("dq_bn", dq_bn)):
        monkeypatch.setitem(mod.TUNING, key, rows)
    got = forward_and_grads(q, k, v, mask, 128, "triton")
    for name, a, b in zip(("o", "dq", "dk", "dv"), got, want, strict=True):
        assert_rel_rms(a, b, REL[torch.bfloat16], floor=1e-6, msg=name)


@pytest.mark.interpret
def test_triton_attention_opcheck(device):
    """The custom op that torch.compile traces (eager calls take the plain Function): schema, fake tensors and the
    registered autograd hold."""
    from tilewise.ops.block_sparse_attention.triton import _bsa_op, block_lists

    q, k, v = qkv(1, 2, 70, 32, device=device)
    lists = block_lists(random_mask(1, 2, 70, 32, p=0.5, device=device))
    torch.library.opcheck(_bsa_op, (q, k, v, *lists, 32, 0.2))


@pytest.mark.interpret
@pytest.mark.parametrize("key", ["fwd_bm", "fwd_bn", "dkdv_bn", "dkdv_bm", "dq_bm", "dq_bn"])
def test_tuning_parts_must_be_powers_of_two(key, device, monkeypatch):
    """A part that does not divide the block would leave rows out silently: refused, naming the key."""
    mod = importlib.import_module("tilewise.ops.block_sparse_attention.triton")
    q, k, v = qkv(1, 1, 64, 32, torch.bfloat16, device=device)
    mask = random_mask(1, 1, 64, 64, p=1.0, device=device)
    monkeypatch.setitem(mod.TUNING, key, 48)
    with pytest.raises(ValueError, match=key):
        forward_and_grads(q, k, v, mask, 64, "triton")


@pytest.mark.interpret
def test_launch_falls_back_to_fewer_stages(monkeypatch):
    """A launch that does not fit shared memory is retried with 2, then 1 pipeline stage, and the depth that fitted
    is reused; when nothing fits the error goes to the caller."""
    from triton.runtime import OutOfResources

    mod = importlib.import_module("tilewise.ops.block_sparse_attention.triton")
    monkeypatch.setattr(mod, "_STAGES", {})
    calls = []

    class FakeKernel:
        def __init__(self, name, fits):
            self.fn = types.SimpleNamespace(__name__=name)  # a class's __name__ would be "Fn" whatever its dict says
            self.fits = fits

        def __getitem__(self, grid):
            def launch(*args, **kw):
                calls.append(kw.get("num_stages"))
                if kw.get("num_stages") not in self.fits:
                    raise OutOfResources(300000, 232448, "shared memory")

            return launch

    mod._launch_fitting(FakeKernel("k1", {1}), (1,), (), {"BT": 128})
    assert calls == [3, 2, 1]
    mod._launch_fitting(FakeKernel("k1", {1}), (1,), (), {"BT": 128})
    assert calls == [3, 2, 1, 1]
    # one that fits at once launches once, every time (the first depth tried used to be None, which read as
    # "nothing fitted" and launched the kernel a second time)
    calls.clear()
    for _ in range(2):
        mod._launch_fitting(FakeKernel("k3", {1, 2, 3}), (1,), (), {"BT": 64})
    assert calls == [3, 3]
    # the caller's own depths (the forward and dk/dv kernels try 2, then 1); the record of what fitted is kept per
    # sequence of depths (it is an index into it), so another sequence for the same kernel starts afresh
    calls.clear()
    mod._launch_fitting(FakeKernel("k1", {1}), (1,), (), {"BT": 128}, (2, 1))
    assert calls == [2, 1]
    mod._launch_fitting(FakeKernel("k1", {1, 2}), (1,), (), {"BT": 128}, (2,))
    assert calls == [2, 1, 2]
    with pytest.raises(OutOfResources):
        mod._launch_fitting(FakeKernel("k2", set()), (1,), (), {"BT": 128})
    # the shared helper refuses None as a configuration: it could not be told from "none fitted"
    from tilewise.ops._launch import first_that_fits

    with pytest.raises(ValueError, match="None is not a configuration"):
        first_that_fits({}, "k", (None, 2, 1), lambda c: None)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_triton_gpu_block_128(dtype):
    """Blocks of 128 with D = 128: the gradient kernels do not fit shared memory with the default pipelining on an
    H100 (296 KB asked) and fall back to fewer stages; fp32 runs on 32-row blocks with tf32x3 products (with IEEE
    fp32 dots at block 128 it did not finish within 7 minutes)."""
    q, k, v = qkv(1, 2, 1000, 128, dtype, "cuda")
    mask = random_mask(1, 2, 1000, 128, p=0.5, device="cuda")
    got = forward_and_grads(q, k, v, mask, 128, "triton")
    want = forward_and_grads(q, k, v, mask, 128, "reference")
    for name, a, b in zip(("o", "dq", "dk", "dv"), got, want, strict=True):
        assert_rel_rms(a, b, REL.get(dtype, 1e-2), floor=1e-6, msg=name)


@pytest.mark.interpret
@pytest.mark.parametrize(("seq", "block_size"), [(200, 64), (300, 128)])
def test_triton_fp32_runs_on_refined_blocks(seq, block_size, device, monkeypatch):
    """fp32 attention over blocks larger than FP32_BLOCK runs the kernels on the refined mask: the same pairs attend
    (partial last block, dropped blocks, the causal cut inside the diagonal blocks)."""
    import importlib

    mod = importlib.import_module("tilewise.ops.block_sparse_attention.triton")
    seen = []
    real = mod.block_lists
    monkeypatch.setattr(mod, "block_lists", lambda m: seen.append(m.shape[-1]) or real(m))
    q, k, v = qkv(1, 2, seq, 32, torch.float32, device)
    mask = random_mask(1, 2, seq, block_size, p=0.5, device=device)
    got = forward_and_grads(q, k, v, mask, block_size, "triton")
    want = forward_and_grads(q, k, v, mask, block_size, "reference")
    for name, a, b in zip(("o", "dq", "dk", "dv"), got, want, strict=True):
        assert_rel_rms(a, b, REL[torch.float32], floor=1e-6, msg=name)
    assert seen == [-(-seq // mod.FP32_BLOCK)]


# --- selector ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("seq", "block_size", "stride"), [(64, 16, 4), (100, 32, 8), (257, 64, 8), (5, 16, 16)])
def test_selector_shape_diagonal_sink_causal(seq, block_size, stride):
    q, k, _ = qkv(2, 3, seq, 64)
    m = select_blocks(q, k, block_size=block_size, stride=stride, threshold=0.3)
    nb = -(-seq // block_size)
    assert m.shape == (2, 3, nb, nb)
    assert m.dtype == torch.bool
    assert bool(m.diagonal(dim1=-2, dim2=-1).all())
    assert bool(m[..., 0].all())
    assert not bool((m & ~causal_block_mask(nb)).any())


def test_selector_and_reference_take_non_contiguous_inputs():
    """[B, T, H, D] tensors transposed to [B, H, T, D] (views, as a model produces them) give the same results as
    contiguous copies (the selector's strided reshapes once required contiguous inputs)."""
    q, k, v = (t.transpose(1, 2) for t in qkv(2, 64, 3, 32))  # [2, 3, 64, 32] views
    assert not q.is_contiguous()
    m = select_blocks(q, k, block_size=32, stride=8, threshold=0.5)
    assert torch.equal(m, select_blocks(q.contiguous(), k.contiguous(), block_size=32, stride=8, threshold=0.5))
    o = block_sparse_attention(q, k, v, m, block_size=32, backend="reference")
    expected = block_sparse_attention(q.contiguous(), k.contiguous(), v.contiguous(), m, block_size=32)
    assert torch.equal(o, expected)


def test_selector_threshold_one_keeps_every_causal_block():
    q, k, _ = qkv(1, 2, 200, 32)
    m = select_blocks(q, k, block_size=16, stride=4, threshold=1.0)
    assert torch.equal(m, causal_block_mask(13).expand(1, 2, 13, 13))


def test_selector_is_monotone_in_threshold():
    q, k, _ = qkv(2, 2, 256, 32)
    k = k + 3 * q  # peaked attention, so low thresholds drop blocks
    masks = [select_blocks(q, k, block_size=16, stride=4, threshold=t) for t in (0.1, 0.3, 0.5, 0.7, 0.9, 0.99, 1.0)]
    counts = [int(m.sum()) for m in masks]
    for lo, hi in itertools.pairwise(masks):
        assert not bool((lo & ~hi).any())
    assert counts[0] < counts[-1]


def test_selector_finds_the_block_that_holds_the_attention():
    """Keys of block 2 copy the queries of block 5 (scaled up): that block must be picked for query block 5."""
    q, k, _ = (t.detach() for t in qkv(1, 1, 128, 32))
    k[..., 32:48, :] = 4 * q[..., 80:96, :].flip(-2)
    m = select_blocks(q, k, block_size=16, stride=4, threshold=0.5)
    assert bool(m[0, 0, 5, 2])
    assert int(m[0, 0, 5].sum()) <= 4


def test_selector_antidiagonal_logits_match_the_loop():
    from tilewise.ops.block_sparse_attention.reference import _antidiagonal_logits

    q, k, _ = (t.detach() for t in qkv(1, 1, 16, 8 * 4))
    got = _antidiagonal_logits(q, k, 4, 1.0)
    want = torch.empty(4, 4)
    for a in range(4):
        for b in range(4):
            want[a, b] = sum(q[0, 0, 4 * a + 3 - i] @ k[0, 0, 4 * b + i] for i in range(4)) / 4
    assert_close(got[0, 0], want, torch.float32)


# --- selector: the Triton block-mass kernel ---------------------------------------------------------------------

# Relative RMS error of the kernel's block mass against block_mass_ref, for fp32 and bf16 inputs alike. Both sides
# compute in fp32 from the same values: bf16 -> fp32 is exact, and so is a product of two bf16 numbers in fp32
# (8 + 8 significant bits <= 24), so the kernel's bf16 dots with fp32 accumulation (and the interpreter's fp32
# dots) differ from the reference's fp32 matmul only in the order of the fp32 sums (S dots of D terms vs one of
# S * D; online vs two-pass softmax; the block pooling). Each probability then moves by about its logit's absolute
# rounding error, ~1e-7 at these O(1) logits (measured: max |error| <= 2e-7 on masses ~0.1): 1e-5 leaves room.
MASS_REL = 1e-5


def mass_inputs(batch, heads, seq, dim, dtype, device, contiguous=True):
    """q, k ``[B, H, T, D]``; non-contiguous ones are ``[B, T, H, D]`` views, as a model produces them, with k
    sliced out of a wider tensor so that q and k have different strides."""
    if contiguous:
        return [torch.randn(batch, heads, seq, dim, device=device).to(dtype) for _ in range(2)]
    q = torch.randn(batch, seq, heads, dim, device=device).to(dtype).transpose(1, 2)
    k = torch.randn(batch, seq, heads, 2 * dim, device=device).to(dtype)[..., 1::2].transpose(1, 2)
    return [q, k]


def block_mass_triton(*args, **kwargs):
    from tilewise.ops.block_sparse_attention.triton import block_mass_triton

    return block_mass_triton(*args, **kwargs)


@pytest.mark.interpret
@pytest.mark.usefixtures("poisoned")
@pytest.mark.parametrize(
    ("seq", "dim", "block_size", "stride", "tiles", "contiguous"),
    [
        (1, 32, 32, 4, None, True),
        (63, 64, 32, 8, None, False),
        (64, 32, 64, 8, None, True),
        (200, 100, 32, 4, None, False),  # D = 100 padded to 128 (the kernel's masks; select_blocks takes 32/64/128)
        (257, 64, 64, 8, (64, 32), True),  # BM != BN (the GPU's fp32 tiles): key tiles half as wide
        (257, 32, 64, 4, (32, 64), False),
        (100, 32, 64, 1, None, True),  # 64 strided rows a block: a block spans two 32-row tiles (partial sums)
        (70, 32, 16, 16, None, True),  # one strided row a block
        (130, 64, 64, 8, (128, 64), True),  # the GPU's tiles for 16-bit inputs (fp32: 64 x 32, above)
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_block_mass_matches_reference(seq, dim, block_size, stride, tiles, contiguous, dtype, device):
    q, k = mass_inputs(2, 2, seq, dim, dtype, device, contiguous)
    assert q.is_contiguous() == contiguous
    got = block_mass_triton(q, k, block_size, stride, 0.3, tiles)
    want = block_mass_ref(q, k, block_size, stride, 0.3)
    assert got.dtype == torch.float32
    assert_rel_rms(got, want, MASS_REL, floor=1e-7)
    nb = -(-seq // block_size)
    # Every query block has a real row, so each row of mass sums to 1 over its causal blocks; above them, exact 0.
    assert_close(got.sum(-1), torch.ones(2, 2, nb, device=device), torch.float32)
    above = ~causal_block_mask(nb, device)
    assert_exact(got.masked_select(above), torch.zeros(int(above.sum()) * 4, device=device))


@pytest.mark.interpret
@pytest.mark.usefixtures("poisoned")
def test_triton_block_mass_in_chunks_of_slices(device, monkeypatch):
    # a scratch budget under one (b, h) slice's: the 6 slices run one a launch, each writing its own rows of mass
    tt = importlib.import_module("tilewise.ops.block_sparse_attention.triton")
    monkeypatch.setattr(tt, "MASS_SCRATCH_BYTES", 1)
    q, k = mass_inputs(2, 3, 100, 32, torch.float32, device, contiguous=False)
    got = block_mass_triton(q, k, 32, 4, 0.3)
    assert_rel_rms(got, block_mass_ref(q, k, 32, 4, 0.3), MASS_REL, floor=1e-7)


def banded_qk(batch, heads, seq, dim, block_size, device):
    """Query block ``i`` attends to key blocks ``i, i-1, i-2`` with logits 8, 7.5 and 6.5 (0 elsewhere) under the
    default scale, plus a little noise. Blocks ``i, i-1, i-2`` then hold ~37%, ~45% and ~17% of a row's mass (the
    diagonal less than its logit says: causality hides most of it from a block's first rows), the rest ~1%, so every
    threshold's cut lies between well-separated masses. k is the one-hot of the block: ``NB <= dim - 2``."""
    blk = torch.arange(seq) // block_size
    eye = torch.eye(dim)
    q = sum(w * eye[blk - i] * (blk >= i)[:, None] for i, w in enumerate((8.0, 7.5, 6.5))) * dim**0.5
    q, k = (x + 0.01 * torch.randn(batch, heads, seq, dim) for x in (q, eye[blk]))
    return q.to(device), k.to(device)


def cut_margin(mass, threshold):
    """How far ``mass`` is from a selection that rounding could flip: the smallest distance, over rows, between
    ``threshold`` and a causal block's mass-before (in sorted order), or between the masses either side of a row's
    cut (near-ties there could swap which of them is kept)."""
    nb = mass.shape[-1]
    causal = causal_block_mask(nb, mass.device)
    v = torch.sort(mass.masked_fill(~causal, -1.0), dim=-1, descending=True).values
    n_causal = torch.arange(1, nb + 1, device=mass.device)[:, None]  # row i has i + 1 causal blocks
    in_row = torch.arange(nb, device=mass.device)[None, :] < n_causal
    before = torch.cumsum(v.clamp_min(0), -1) - v.clamp_min(0)
    margin = (before - threshold).abs().masked_fill(~in_row, math.inf).amin()
    gap = (v[..., :-1] - v[..., 1:]).masked_fill(~in_row[:, 1:], math.inf)
    cut = (before < threshold) & in_row  # kept before the forced blocks
    at_cut = cut[..., :-1] & ~cut[..., 1:]
    return min(float(margin), float(gap.masked_fill(~at_cut, math.inf).amin()))


def assert_same_selection(q, k, block_size, stride, threshold):
    """select_blocks with Triton equals the reference, on inputs whose selection is far from a flip."""
    mass = block_mass_ref(q, k, block_size, stride, q.shape[-1] ** -0.5)
    # A precondition, not the claim: the reference's selection is 1e-2 from flipping; the kernel is ~1e-7 off.
    assert cut_margin(mass, threshold) > 1e-2
    args = {"block_size": block_size, "stride": stride, "threshold": threshold}
    want = select_blocks(q, k, **args, backend="reference")
    assert_exact(select_blocks(q, k, **args, backend="triton"), want)
    # Neither only the forced blocks (diagonal and sink) nor every causal block.
    nb, rows = want.shape[-1], want.shape[0] * want.shape[1]
    assert rows * (2 * nb - 1) < int(want.sum()) < rows * nb * (nb + 1) // 2


@pytest.mark.interpret
@pytest.mark.parametrize(("seq", "block_size", "stride", "threshold"), [(256, 32, 8, 0.7), (256, 32, 8, 0.95),
                                                                        (200, 16, 4, 0.95)])  # fmt: skip
def test_triton_select_blocks_matches_reference(seq, block_size, stride, threshold, device):
    assert_same_selection(*banded_qk(1, 2, seq, 32, block_size, device), block_size, stride, threshold)


@pytest.mark.interpret
def test_triton_block_mass_opcheck(device):
    from tilewise.ops.block_sparse_attention.triton import _mass_op

    q, k = mass_inputs(1, 2, 70, 32, torch.float32, device, contiguous=False)
    torch.library.opcheck(_mass_op, (q, k, 32, 8, 0.25))


@pytest.mark.interpret
def test_select_blocks_backend_dispatch(monkeypatch, device):
    """Which mass select_blocks computes: the Triton entry point is replaced by one that raises, so a call shows
    whether it was reached. ``auto`` takes the reference for CPU tensors (even with the interpreter on) and Triton
    for CUDA tensors."""
    # import_module: the attribute tilewise.ops.block_sparse_attention is the function, not the package.
    bsa_triton = importlib.import_module("tilewise.ops.block_sparse_attention.triton")

    def reached(*args):
        raise LookupError("the Triton block mass ran")

    monkeypatch.setattr(bsa_triton, "select_blocks_mass_triton", reached)
    monkeypatch.delenv("TILEWISE_BACKEND", raising=False)
    q, k = (t.detach().to(device) for t in qkv(1, 2, 64, 32)[:2])
    want = select_blocks(q, k, block_size=16, stride=4, threshold=0.5, backend="reference")
    if device == "cpu":
        assert torch.equal(select_blocks(q, k, block_size=16, stride=4, threshold=0.5), want)
    else:
        with pytest.raises(LookupError):
            select_blocks(q, k)
    with pytest.raises(LookupError):
        select_blocks(q, k, backend="triton")
    monkeypatch.setenv("TILEWISE_BACKEND", "triton")
    with pytest.raises(LookupError):
        select_blocks(q, k)
    assert torch.equal(select_blocks(q, k, block_size=16, stride=4, threshold=0.5, backend="reference"), want)
    monkeypatch.setenv("TILEWISE_BACKEND", "gpu")
    with pytest.raises(ValueError, match="TILEWISE_BACKEND"):
        select_blocks(q, k)
    monkeypatch.setenv("TILEWISE_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="CPU tensor"):
        select_blocks(q.cpu(), k.cpu())


@pytest.mark.gpu
@pytest.mark.parametrize(("block_size", "stride"), [(64, 8), (128, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_block_mass_gpu(block_size, stride, dtype):
    q, k = mass_inputs(1, 4, 4096, 128, dtype, "cuda", contiguous=False)
    got = block_mass_triton(q, k, block_size, stride, 128**-0.5)
    want = block_mass_ref(q, k, block_size, stride, 128**-0.5)
    # As MASS_REL: fp16 products are exact in fp32 too (11 + 11 bits); tensor cores sum in fp32, in their own order.
    assert_rel_rms(got, want, MASS_REL, floor=1e-7)
    assert_close(got.sum(-1), torch.ones(1, 4, 4096 // block_size, device="cuda"), torch.float32)
    for threshold in (0.7, 0.95):
        q, k = (t.to(dtype) for t in banded_qk(1, 4, 4096, 128, block_size, "cuda"))
        assert_same_selection(q, k, block_size, stride, threshold)


# --- errors -------------------------------------------------------------------------------------------------------


def test_errors():
    q, k, v = (t.detach() for t in qkv(1, 2, 64, 32))
    mask = torch.ones(1, 2, 1, 1, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"block_mask must be \[B, H, NB, NB\]"):
        block_sparse_attention(q, k, v, torch.ones(1, 2, 2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        block_sparse_attention(q, k, v, mask.int())
    with pytest.raises(ValueError, match="head dim"):
        block_sparse_attention(q[..., :16], k[..., :16], v[..., :16], mask)
    with pytest.raises(ValueError, match="block_size"):
        block_sparse_attention(q, k, v, mask, block_size=48)
    with pytest.raises(ValueError, match="block_size"):
        block_sparse_attention(q, k, v, torch.ones(1, 2, 4, 4, dtype=torch.bool), block_size=16)
    with pytest.raises(ValueError, match="shape"):
        block_sparse_attention(q, k[:, :1], v, mask)
    with pytest.raises(ValueError, match="dtype"):
        block_sparse_attention(q, k.half(), v, mask)
    with pytest.raises(ValueError, match="not a backend"):
        block_sparse_attention(q, k, v, mask, backend="cuda")
    with pytest.raises(TypeError, match="block_mask"):
        block_sparse_attention(q, k, v, [[True]])
    with pytest.raises(ValueError, match="threshold"):
        select_blocks(q, k, threshold=0.0)
    with pytest.raises(ValueError, match="stride"):
        select_blocks(q, k, block_size=16, stride=32)
    with pytest.raises(ValueError, match="stride"):
        select_blocks(q, k, stride=3)
    with pytest.raises(ValueError, match="not a backend"):
        select_blocks(q, k, backend="gpu")


def test_block_mask_broadcasts_over_batch_and_heads():
    q, k, v = (t.detach() for t in qkv(2, 3, 64, 32))
    mask = random_mask(1, 1, 64, 32)
    a = block_sparse_attention(q, k, v, mask, block_size=32, backend="reference")
    b = block_sparse_attention(q, k, v, mask.expand(2, 3, 2, 2), block_size=32, backend="reference")
    assert torch.equal(a, b)
    assert math.isfinite(float(a.sum()))
