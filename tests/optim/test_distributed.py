"""tilewise.optim under torch.distributed on 2 CPU (gloo) processes: DDP trains as one process with the global batch
does, and FSDP2 (``fully_shard``) with 8-bit AdamW resumes bit-exactly from a ``torch.distributed.checkpoint``."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest
import torch

import tilewise.optim as to

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed (gloo)")

# Shared by both scripts: a 2-rank gloo group, the model, and the batch of step `i` ([16, 64], the global batch).
_PRELUDE = """
import sys, tempfile
import torch, torch.distributed as dist, torch.multiprocessing as mp
import tilewise.optim as to

def mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.Tanh(), torch.nn.Linear(96, 8))

def batch(i):
    return torch.randn(16, 64, generator=torch.Generator().manual_seed(1000 + i))

def train(model, opt, steps, start=0, rows=slice(None)):
    for i in range(start, start + steps):
        opt.zero_grad()
        model(batch(i)[rows]).square().mean().backward()
        opt.step()

def main(worker, *args):
    mp.spawn(worker, args=(tempfile.mktemp(), *args), nprocs=2, join=True)
"""

_DDP_SCRIPT = """
def worker(rank, path):
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=2)
    model = torch.nn.parallel.DistributedDataParallel(mlp())
    opt = to.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, state_bits=8, min_quant_numel=0)
    train(model, opt, 6, rows=slice(8 * rank, 8 * rank + 8))  # each rank: its half of the global batch
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(2)]
    dist.all_gather(gathered, flat)
    if rank == 0:
        assert torch.equal(gathered[0], gathered[1]), "DDP ranks diverged"
        single = mlp()
        train(single, to.AdamW(single.parameters(), lr=1e-2, weight_decay=0.1, state_bits=8, min_quant_numel=0), 6)
        ref = torch.cat([p.detach().flatten() for p in single.parameters()])
        err = (flat - ref).abs().max().item()
        # the same math but another fp32 summation order (two means of 8 rows, averaged by the allreduce,
        # vs one mean of 16): 1-ulp gradient differences, which a rare q8 code flip can carry into an update
        assert err < 1e-4, f"DDP vs single process: max abs diff {err}"
        print(f"DDP OK {err:.3g}")
    dist.destroy_process_group()

if __name__ == "__main__":
    main(worker)
"""

_FSDP_SCRIPT = """
import warnings

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

K = 3

def sharded(mesh, seed=0):
    model = mlp(seed)
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = to.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, state_bits=8, min_quant_numel=0)
    return model, opt

def worker(rank, path, ckpt):
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=2)
    mesh = init_device_mesh("cpu", (2,))
    rows = slice(8 * rank, 8 * rank + 8)
    straight, straight_opt = sharded(mesh)
    train(straight, straight_opt, 2 * K, rows=rows)

    model, opt = sharded(mesh)
    train(model, opt, K, rows=rows)
    model_sd, optim_sd = get_state_dict(model, opt)
    codes = optim_sd["state"]["0.weight"]["exp_avg_codes"]
    assert isinstance(codes, DTensor) and codes.shape == (6144,) and codes.to_local().shape == (3072,), codes
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=ckpt)
    del model, opt, model_sd, optim_sd

    resumed, resumed_opt = sharded(mesh, seed=1)  # other initial weights: the load must overwrite them
    model_sd, optim_sd = get_state_dict(resumed, resumed_opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=ckpt)
    set_state_dict(resumed, resumed_opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    train(resumed, resumed_opt, K, start=K, rows=rows)

    for (name, a), b in zip(straight.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a.detach().to_local(), b.detach().to_local()), f"rank {rank}: {name} differs"
    for p, q in zip(straight.parameters(), resumed.parameters(), strict=True):
        for key, value in straight_opt.state[p].items():
            assert torch.equal(value, resumed_opt.state[q][key]), f"rank {rank}: state {key} differs"

    # a parameter sharded unevenly (3 rows over 2 ranks): its codes stay local tensors, with a warning
    uneven = torch.nn.Parameter(distribute_tensor(torch.ones(3, 300), mesh, [Shard(0)]))
    uneven_opt = to.AdamW([uneven], state_bits=8, min_quant_numel=0)
    uneven.grad = distribute_tensor(torch.ones(3, 300), mesh, [Shard(0)])
    uneven_opt.step()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        saved = uneven_opt.state_dict()["state"][0]
    assert all(type(saved[k]) is torch.Tensor for k in ("exp_avg_codes", "exp_avg_scales")), saved
    assert any("sharded unevenly" in str(w.message) for w in caught), [str(w.message) for w in caught]
    dist.barrier()
    if rank == 0:
        print("FSDP OK")
    dist.destroy_process_group()

if __name__ == "__main__":
    main(worker, sys.argv[1])
"""


def _run(tmp_path: pathlib.Path, name: str, script: str, *args: str) -> str:
    """Run ``script`` (after the prelude) in a fresh interpreter that spawns 2 gloo ranks; its stdout."""
    path = tmp_path / f"{name}.py"
    path.write_text(_PRELUDE + script)
    src = str(pathlib.Path(to.__file__).parents[2])  # the directory holding the tilewise package
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, str(path), *args], capture_output=True, text=True, env=env, timeout=180)
    return run.stdout + run.stderr[-3000:]


def test_ddp_matches_single_process(tmp_path) -> None:
    """DDP over 2 ranks with 8-bit AdamW: ranks stay identical and match one process on the global batch."""
    out = _run(tmp_path, "ddp", _DDP_SCRIPT)
    assert "DDP OK" in out, out


def test_fsdp2_dcp_resume_is_exact(tmp_path) -> None:
    """FSDP2 + 8-bit AdamW: k steps, save model and optimizer with torch.distributed.checkpoint, reload into a fresh
    model and optimizer, k more steps: parameters and state equal an uninterrupted 2k-step run bit for bit."""
    out = _run(tmp_path, "fsdp", _FSDP_SCRIPT, str(tmp_path / "ckpt"))
    assert "FSDP OK" in out, out
