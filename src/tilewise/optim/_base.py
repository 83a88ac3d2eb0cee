"""The shared base of tilewise's optimizers: hyperparameter checks, state formats, grouping, state_dict.

A subclass names its ``kind`` (``"adam"``, ``"lion"`` or ``"sgd"``), checks its own hyperparameters in
``_check_group`` and runs one functional step from :mod:`tilewise.ops.optim_step` in ``_step_bucket``. Every
parameter group carries ``state_bits``/``state_format``, ``min_quant_numel``, ``stochastic_round``,
``master_weights``, ``skip_nonfinite``, ``backend`` and ``seed``, so each can be overridden per group.
"""

from __future__ import annotations

import copy
import numbers
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch

from tilewise._backend import BACKENDS, resolve_backend
from tilewise.ops.optim_step import QUANT_FORMATS, RANK1_FORMATS, STATE_FORMATS, init_state

__all__ = ["BITS_TO_FORMAT", "LowBitOptimizer", "resolve_state_format"]

BITS_TO_FORMAT: dict[int, str] = {32: "fp32", 16: "bf16", 8: "q8", 4: "q4"}
# group keys every tilewise optimizer accepts, with their defaults
COMMON_DEFAULTS: dict[str, Any] = {
    "state_bits": 32,
    "state_format": None,
    "min_quant_numel": 4096,
    "stochastic_round": False,
    "master_weights": False,
    "skip_nonfinite": False,
    "backend": "auto",
    "seed": 0,
}
# the group key counting steps, for the stochastic-rounding seed (saved with the param groups: resumes exactly)
_CALLS = "sr_calls"


def resolve_state_format(state_bits: int, state_format: str | None) -> str:
    """The state format name of a group: ``state_format`` when given (``"fp32"``, ``"bf16"``, ``"q8"``, ``"q4"``,
    ``"fp8"``, ``"q4r1"``), else from ``state_bits`` (32 -> fp32, 16 -> bf16, 8 -> q8, 4 -> q4)."""
    if state_format is not None:
        if state_format not in STATE_FORMATS:
            raise ValueError(f"state_format={state_format!r} is unknown; use one of {', '.join(STATE_FORMATS)}")
        return state_format
    if isinstance(state_bits, bool) or state_bits not in BITS_TO_FORMAT:
        raise ValueError(f"state_bits={state_bits!r} is not supported; use 32, 16 (bf16), 8 or 4")
    return BITS_TO_FORMAT[state_bits]


def _is_dtensor(t: torch.Tensor) -> bool:
    return type(t).__name__ == "DTensor" and hasattr(t, "to_local")


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2 parameter or gradient); other tensors as they are."""
    return t.to_local() if _is_dtensor(t) else t


def _as_dtensor(key: str, value: Any, param: torch.Tensor) -> Any:
    """A state tensor of DTensor ``param`` as a DTensor on ``param``'s mesh (``value`` is the local shard's state).

    Buffers shaped like the local shard (fp32/bf16 moments, ``master``) take ``param``'s placements and global
    shape, as torch.optim's state does under FSDP2. Quantized ``*_codes``/``*_scales`` (and ``"q4r1"``'s
    ``*_row``/``*_col`` maxima) are laid out per local shard; their global tensor is the concatenation of the
    shards', ``Shard(0)`` on each sharded mesh dim, which is a valid DTensor only when every shard has the same
    size, so they stay plain local tensors when ``param`` is sharded unevenly, with a warning
    (``torch.distributed.checkpoint`` cannot save those). Scalars (``step``, ``skips``) stay plain tensors
    (replicated).
    """
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(value, torch.Tensor) or value.ndim == 0:
        return value
    mesh, placements = param.device_mesh, param.placements
    if not key.endswith(("_codes", "_scales", "_row", "_col")):
        return DTensor.from_local(value, mesh, placements, run_check=False, shape=param.shape, stride=param.stride())
    shards = 1
    for dim, placement in enumerate(placements):
        shards *= mesh.size(dim) if isinstance(placement, Shard) else 1
    if _local(param).numel() * shards != param.numel():  # uneven shards: local sizes differ across ranks
        warnings.warn(
            f"optimizer state {key!r} of a parameter of shape {tuple(param.shape)} sharded unevenly over "
            f"{shards} ranks stays a local tensor: torch.distributed.checkpoint cannot save it per rank; shard "
            "evenly (a sharded dim divisible by the number of ranks), use fp32/bf16 state for it, or save each "
            "rank's optimizer.state_dict() with torch.save",
            stacklevel=3,
        )
        return value
    flat = [Shard(0) if isinstance(placement, Shard) else placement for placement in placements]
    return DTensor.from_local(value, mesh, flat, run_check=False, shape=(value.numel() * shards,), stride=(1,))


def _capturing(device: torch.device) -> bool:
    """Whether ``device`` is a CUDA device whose current stream is capturing a CUDA graph (asks CUDA; no sync)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _check_number(name: str, value: Any, low: float, high: float | None = None, *, high_open: bool = True) -> None:
    """``low <= value`` (and ``value < high`` or ``<= high``), else a ``ValueError`` naming ``name``."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number or a one-element tensor, got shape {tuple(value.shape)}")
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    above = high is not None and (value >= high if high_open else value > high)
    if not value >= low or above:
        bound = f"[{low}, {high}{')' if high_open else ']'}" if high is not None else f">= {low}"
        raise ValueError(f"invalid {name}: {value!r}; it must be in {bound}")


class LowBitOptimizer(torch.optim.Optimizer):
    """Base of the tilewise optimizers (a ``torch.optim.Optimizer``); not used directly.

    Subclasses set ``kind`` and implement ``_check_group`` and ``_step_bucket``.

    Example:
        Every tilewise optimizer is one, so ``isinstance`` finds them all, and they share its methods: here
        ``skipped_steps`` (with ``skip_nonfinite=True``, a NaN gradient leaves the weights and state alone) and a
        ``load_state_dict`` that refuses state saved in another format.

        >>> import torch
        >>> import tilewise
        >>> from tilewise.optim import LowBitOptimizer
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(64, 64, bias=False)  # 4096 weights: not below min_quant_numel
        >>> opt = tilewise.optim.AdamW8bit(model.parameters(), skip_nonfinite=True)
        >>> isinstance(opt, LowBitOptimizer), isinstance(opt, torch.optim.Optimizer), opt.kind
        (True, True, 'adam')
        >>> before = model.weight.detach().clone()
        >>> model.weight.grad = torch.full_like(model.weight, float("nan"))
        >>> opt.step()
        >>> torch.equal(model.weight, before), int(opt.skipped_steps())
        (True, 1)
        >>> model.weight.grad = torch.ones_like(model.weight)
        >>> opt.step()
        >>> torch.equal(model.weight, before), int(opt.skipped_steps())
        (False, 1)
        >>> saved = opt.state_dict()
        >>> fp32 = tilewise.optim.AdamW(model.parameters(), skip_nonfinite=True)
        >>> fp32.load_state_dict(saved)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: param group 0: the state_dict was saved with state format 'q8', but this optimizer uses 'fp32'; ...
    """

    kind: str = ""

    def __init__(self, params: Iterable, defaults: dict[str, Any]) -> None:
        super().__init__(params, {**COMMON_DEFAULTS, **defaults})

    # --- param groups -------------------------------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (as ``torch.optim.Optimizer.add_param_group``) after checking its hyperparameters."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._check_common(group)
            self._check_group(group)
        except (ValueError, TypeError):
            self.param_groups.pop()
            raise
        group.setdefault(_CALLS, 0)

    def _check_common(self, group: dict[str, Any]) -> None:
        _check_number("lr", group["lr"], 0.0)
        _check_number("weight_decay", group["weight_decay"], 0.0)
        fmt = resolve_state_format(group["state_bits"], group["state_format"])
        if fmt in RANK1_FORMATS and self.kind != "adam":
            raise ValueError(
                f"{type(self).__name__} does not support state_format={fmt!r}: its rank-1 normalization applies to "
                "Adam's second moment only; use state_format='q4' (the same 4-bit state for this optimizer)"
            )
        n = group["min_quant_numel"]
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"min_quant_numel must be a non-negative int, got {n!r}")
        if group["backend"] not in BACKENDS:
            raise ValueError(f"backend={group['backend']!r} is not a backend; use one of {', '.join(BACKENDS)}")
        for key in ("stochastic_round", "master_weights", "skip_nonfinite", "maximize"):
            if not isinstance(group.get(key, False), bool):
                raise ValueError(f"{key} must be True or False, got {group[key]!r}")
        if not isinstance(group["seed"], int) or isinstance(group["seed"], bool):
            raise ValueError(f"seed must be an int, got {group['seed']!r}")
        for p in group["params"]:
            if p.dtype not in (torch.float32, torch.bfloat16, torch.float16):
                name = type(self).__name__
                raise ValueError(f"{name} supports float32, bfloat16 and float16 parameters, got {p.dtype}")

    def _check_group(self, group: dict[str, Any]) -> None:
        raise NotImplementedError

    def _param_format(self, group: dict[str, Any], p: torch.Tensor) -> str:
        """The state format of ``p``: the group's, except fp32 for quantized formats when ``p`` (its global
        size, for a DTensor) has fewer than ``min_quant_numel`` elements."""
        fmt = resolve_state_format(group["state_bits"], group["state_format"])
        if fmt in QUANT_FORMATS and p.numel() < group["min_quant_numel"]:
            return "fp32"
        return fmt

    def _init_state(self, group: dict[str, Any], p: torch.Tensor, fmt: str) -> dict[str, torch.Tensor]:
        master = group["master_weights"] and p.dtype != torch.float32
        return init_state(
            _local(p),
            self.kind,
            fmt,
            amsgrad=group.get("amsgrad", False),
            master=master,
            momentum=group.get("momentum", 0) != 0,
        )

    # --- the step ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimizer step for every parameter that has a gradient; returns ``closure()``'s loss if given.

        Parameters are bucketed per group by (dtype, device, state format), one functional call per bucket.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        kept = [0, 0]  # tensors and elements that get 32-bit state this step because they are small
        for group in self.param_groups:
            buckets: dict[tuple, tuple[list, list, list]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                fmt = self._param_format(group, p)
                state = self.state[p]
                local = _local(p)
                if not state:
                    if _capturing(local.device):
                        raise RuntimeError(
                            f"{type(self).__name__}.step() is being captured in a CUDA graph before this parameter "
                            f"(shape {tuple(p.shape)}) has optimizer state: take one or more eager steps (warm-up, "
                            "on a side stream) with the gradients the graph will use before capturing"
                        )
                    state.update(self._init_state(group, p, fmt))
                    if fmt != resolve_state_format(group["state_bits"], group["state_format"]):
                        kept[0], kept[1] = kept[0] + 1, kept[1] + p.numel()
                ps, gs, ss = buckets.setdefault((local.dtype, local.device, fmt), ([], [], []))
                ps.append(local)
                gs.append(_local(p.grad))
                ss.append(state)
            # a new seed per call and group, from a counter saved with the group: a resumed run draws the same
            # (kept below 2**31 so the kernel's seed argument keeps one integer type: no recompilation)
            seed = (group["seed"] * 1_000_003 + group[_CALLS] * 7919) % ((1 << 31) - 1)
            group[_CALLS] += 1
            for (_, device, fmt), (ps, gs, ss) in buckets.items():
                if _capturing(device):
                    if fmt in RANK1_FORMATS:
                        raise RuntimeError(
                            f"{type(self).__name__}.step() is being captured in a CUDA graph with state_format="
                            f"{fmt!r}, which runs the reference backend (it reads the step count on the host)"
                        )
                    self._check_capture(group, ps)
                self._step_bucket(group, ps, gs, ss, fmt, seed)
        if kept[0]:  # once, when their state is created: they cost memory, not correctness
            warnings.warn(
                f"{type(self).__name__}: {kept[0]} parameter tensors ({kept[1]} elements) are smaller than "
                "min_quant_numel and keep 32-bit optimizer state (8 bytes/element); lower min_quant_numel in "
                "their param group to quantize them too",
                stacklevel=2,
            )
        return loss

    def _check_capture(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        """Before a bucket's step is captured in a CUDA graph: raise for what would break the capture (a host sync)
        or would leave the replays stale, and warn about what the replays freeze.

        The Triton step reads ``lr`` (a tensor on the parameters' device), ``step`` and the state on the device and
        never syncs; the reference backend reads ``step`` on the host. A Python ``lr`` is baked into the graph.
        """
        name, device = type(self).__name__, params[0].device
        if resolve_backend(group["backend"], *params) != "triton":
            raise RuntimeError(
                f"{name}.step() is being captured in a CUDA graph with the reference backend, which reads the step "
                "count on the host every step; use backend='auto' or 'triton' (needs triton installed)"
            )
        lr = group["lr"]
        if isinstance(lr, torch.Tensor) and lr.device != device:
            raise RuntimeError(
                f"{name}.step() is being captured in a CUDA graph with lr a tensor on {lr.device}, which would be "
                f"copied to {device} with a host sync; create it there (torch.tensor(lr, device='{device}')): LR "
                "schedulers update it in place, and the replays read the new value"
            )
        for key in ("betas", "eps", "weight_decay", "momentum", "dampening"):
            value = group.get(key, ())
            values = value if isinstance(value, (tuple, list)) else (value,)
            if any(isinstance(v, torch.Tensor) and v.device.type != "cpu" for v in values):
                raise RuntimeError(
                    f"{name}.step() is being captured in a CUDA graph with {key} a tensor on {device}, which the "
                    "step reads on the host (a sync); give it as a float (only lr can be a GPU tensor)"
                )
        if not isinstance(lr, torch.Tensor):
            warnings.warn(
                f"{name}.step() captured in a CUDA graph with lr={lr!r}, a Python float: every replay uses this "
                f"value, whatever an LR scheduler sets later; pass lr as a tensor on {device} to schedule it",
                stacklevel=3,
            )
        if group["stochastic_round"]:
            warnings.warn(
                f"{name}.step() captured in a CUDA graph with stochastic_round=True: every replay draws the "
                "captured seed's rounding noise, the same for each step",
                stacklevel=3,
            )

    def _step_bucket(
        self,
        group: dict[str, Any],
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        states: list[dict[str, torch.Tensor]],
        state_format: str,
        seed: int,
    ) -> None:
        raise NotImplementedError

    def _common_step_kwargs(self, group: dict[str, Any], state_format: str, seed: int) -> dict[str, Any]:
        return {
            "lr": group["lr"],
            "weight_decay": group["weight_decay"],
            "maximize": group["maximize"],
            "state_format": state_format,
            "stochastic_round": group["stochastic_round"],
            "skip_nonfinite": group["skip_nonfinite"],
            "seed": seed,
            "backend": group["backend"],
        }

    def skipped_steps(self) -> torch.Tensor:
        """Parameter updates skipped for a non-finite gradient (``skip_nonfinite=True``), summed over parameters,
        as an fp32 scalar tensor (reading its value waits for the device)."""
        counts = [s["skips"].float().cpu() for s in self.state.values() if "skips" in s]
        return torch.stack(counts).sum() if counts else torch.zeros(())

    # --- state_dict -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """``torch.optim.Optimizer.state_dict``, with the state of a DTensor parameter (FSDP2) as DTensors on the
        parameter's mesh, so that ``torch.distributed.checkpoint`` saves each rank's shard (see :func:`_as_dtensor`)."""
        state_dict = super().state_dict()
        params = [p for group in self.param_groups for p in group["params"]]
        for index, saved in state_dict["state"].items():
            if _is_dtensor(params[index]):  # a new dict: the packed state still aliases self.state[p]
                state_dict["state"][index] = {k: _as_dtensor(k, v, params[index]) for k, v in saved.items()}
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved by :meth:`state_dict` of the same optimizer class and state formats.

        Tensors keep their saved dtypes (uint8 codes, fp32 scales and master weights; ``torch.optim`` would cast
        them to the parameter's dtype) and move to the parameter's device.

        Raises:
            ValueError: the saved groups use another state format, or a parameter's saved state does not have the
                keys, dtypes and sizes of its format (e.g. another ``min_quant_numel``).
        """
        # DTensor state (saved for a DTensor parameter) loads as this rank's shard
        state = {i: {k: _local(v) for k, v in saved.items()} for i, saved in state_dict["state"].items()}
        state_dict = {**state_dict, "state": state}
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError(f"state_dict has {len(groups)} param groups, this optimizer has {len(self.param_groups)}")
        saved_state = state_dict["state"]
        # the saved groups' "params" name the state's keys (indices, or FQNs from torch.distributed.checkpoint)
        pairs = []
        for i, (mine, saved) in enumerate(zip(self.param_groups, groups, strict=True)):
            fmt = resolve_state_format(mine["state_bits"], mine["state_format"])
            saved_fmt = resolve_state_format(saved.get("state_bits", 32), saved.get("state_format"))
            if saved_fmt != fmt:
                raise ValueError(
                    f"param group {i}: the state_dict was saved with state format {saved_fmt!r}, but this "
                    f"optimizer uses {fmt!r}; create the optimizer with the same state_bits/state_format to load it"
                )
            # strict=False: torch.optim's load_state_dict below reports groups of other sizes
            for p, key in zip(mine["params"], saved["params"], strict=False):
                if key in saved_state:
                    self._check_saved_state(p, saved_state[key], self._param_format(mine, p), i)
                    pairs.append((p, saved_state[key]))
        super().load_state_dict(state_dict)
        for p, saved in pairs:
            device = _local(p).device
            self.state[p] = {k: v.to(device=device, copy=True) for k, v in saved.items()}

    def _check_saved_state(self, p: torch.Tensor, saved: dict[str, Any], fmt: str, group_index: int) -> None:
        expected = self._init_state(self.param_groups[group_index], _local(p).detach().to("meta"), fmt)
        for key, ref in expected.items():
            got = saved.get(key)
            ok = isinstance(got, torch.Tensor) and got.dtype == ref.dtype and got.shape == ref.shape
            if not ok:
                desc = "missing" if got is None else f"{getattr(got, 'dtype', type(got))} {tuple(got.shape)}"
                raise ValueError(
                    f"param group {group_index}: a parameter's saved state does not match state format {fmt!r}: "
                    f"{key!r} is {desc}, expected {ref.dtype} {tuple(ref.shape)}; was it saved by another "
                    "optimizer or state format?"
                )

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in COMMON_DEFAULTS.items():
                group.setdefault(key, copy.copy(value))
            group.setdefault(_CALLS, 0)
