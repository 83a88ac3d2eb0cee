"""``QuantizedTensor``: codes, per-block scales and what is needed to rebuild the original tensor."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from tilewise.ops.blockquant import dequantize_blockwise
from tilewise.quant.codebooks import _build as _codebook_table  # cached, shared: read only
from tilewise.quant.codebooks import codebook_bits

__all__ = ["QuantizedTensor"]

_FORMAT_VERSION = 1
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Double quantization of the scales (QLoRA): dynamic8 codes in blocks of 256.
SCALE_CODEBOOK, SCALE_BLOCK = "dynamic8", 256


def _name_to_tensor(name: str) -> torch.Tensor:
    return torch.tensor(list(name.encode("ascii")), dtype=torch.uint8)


def _tensor_to_name(t: torch.Tensor) -> str:
    return bytes(t.to("cpu", torch.uint8).tolist()).decode("ascii")


@dataclass(frozen=True, eq=False)
class QuantizedTensor:
    """A tensor stored block by block as codes into a codebook plus one scale per block.

    Fields: ``codes`` (``uint8``; ``[n]`` for 8-bit codebooks, ``[ceil(n/2)]`` packed for 4-bit), ``scales`` (fp32
    ``[nb]``, or ``None`` when double-quantized: then ``scale_codes`` (uint8 ``[nb]``), ``scale_scales`` (fp32
    ``[ceil(nb/256)]``) and ``scale_offset`` (fp32 ``[1]``) hold them), ``codebook`` (name), ``block_size``,
    ``shape`` and ``dtype`` of the original, and ``rotate`` (blocks were Hadamard-rotated; ``n`` is then the shape's
    numel rounded up to a whole block).

    Build one with :func:`tilewise.quant.quantize`; get the tensor back with :meth:`dequantize`.

    Example:
        >>> import torch
        >>> from tilewise.quant import QuantizedTensor, quantize
        >>> _ = torch.manual_seed(0)
        >>> x = torch.randn(4, 100)
        >>> q = quantize(x, "nf4", block_size=64)
        >>> q
        QuantizedTensor(shape=(4, 100), dtype=torch.float32, codebook='nf4', block_size=64, nbytes=228, device=cpu)
        >>> q.codes.dtype, q.codes.shape, q.scales.shape  # 400 codes packed two per byte; 7 blocks of 64
        (torch.uint8, torch.Size([200]), torch.Size([7]))
        >>> q.bits, q.numel(), q.nbytes == q.codes.numel() + 4 * q.scales.numel()
        (4, 400, True)
        >>> q.dequantize().shape, q.dequantize(torch.bfloat16).dtype
        (torch.Size([4, 100]), torch.bfloat16)

        :meth:`state_dict` holds plain tensors only, and :meth:`from_state_dict` rebuilds the same tensor:

        >>> state = q.state_dict()
        >>> all(isinstance(v, torch.Tensor) for v in state.values())
        True
        >>> torch.equal(QuantizedTensor.from_state_dict(state).dequantize(), q.dequantize())
        True
    """

    codes: torch.Tensor
    scales: torch.Tensor | None
    codebook: str
    block_size: int
    shape: torch.Size
    dtype: torch.dtype
    rotate: bool = False
    scale_codes: torch.Tensor | None = None
    scale_scales: torch.Tensor | None = None
    scale_offset: torch.Tensor | None = None

    @property
    def bits(self) -> int:
        """Bits per code (8 or 4)."""
        return codebook_bits(self.codebook)

    @property
    def device(self) -> torch.device:
        return self.codes.device

    @property
    def double_quant(self) -> bool:
        return self.scales is None

    def numel(self) -> int:
        """Number of elements of the original tensor."""
        return self.shape.numel()

    @property
    def coded_numel(self) -> int:
        """Number of coded elements (the numel, padded to a whole block when rotated)."""
        n = self.numel()
        return -(-n // self.block_size) * self.block_size if self.rotate else n

    @property
    def nbytes(self) -> int:
        """Bytes of all stored tensors (codes and scales)."""
        parts = (self.codes, self.scales, self.scale_codes, self.scale_scales, self.scale_offset)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    def block_scales(self, backend: str = "auto") -> torch.Tensor:
        """The fp32 per-block scales ``[nb]`` (rebuilt from their codes when double-quantized)."""
        if self.scales is not None:
            return self.scales
        nb = self.scale_codes.numel()
        rebuilt = dequantize_blockwise(
            self.scale_codes, self.scale_scales, _codebook_table(SCALE_CODEBOOK), SCALE_BLOCK, nb, backend=backend
        )
        # a zero-scale block may come back as a tiny negative number: scales are absmaxes, never below zero
        return (rebuilt + self.scale_offset).clamp_(min=0)

    def dequantize(self, dtype: torch.dtype | None = None, *, backend: str = "auto") -> torch.Tensor:
        """Rebuild the tensor with its original shape, in ``dtype`` (default: the original dtype)."""
        dtype = self.dtype if dtype is None else dtype
        n = self.coded_numel
        if not self.rotate:
            flat = dequantize_blockwise(
                self.codes, self.block_scales(backend), _codebook_table(self.codebook), self.block_size, n,
                bits=self.bits, dtype=dtype, backend=backend,
            )  # fmt: skip
            return flat.view(self.shape)
        from tilewise.ops import hadamard

        flat = dequantize_blockwise(
            self.codes, self.block_scales(backend), _codebook_table(self.codebook), self.block_size, n,
            bits=self.bits, dtype=torch.float32, backend=backend,
        )  # fmt: skip
        rows = hadamard(flat.view(-1, self.block_size), backend=backend)
        return rows.reshape(-1)[: self.numel()].to(dtype).view(self.shape)

    def to(self, device: torch.device | str) -> QuantizedTensor:
        """A copy with every stored tensor moved to ``device``."""

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return replace(
            self,
            codes=move(self.codes),
            scales=move(self.scales),
            scale_codes=move(self.scale_codes),
            scale_scales=move(self.scale_scales),
            scale_offset=move(self.scale_offset),
        )

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Plain tensors only (codes, scales and metadata encoded as small integer tensors), so the dict saves with
        ``safetensors`` and loads with ``torch.load(weights_only=True)``."""
        dtype_name = str(self.dtype).removeprefix("torch.")
        out = {
            "format_version": torch.tensor([_FORMAT_VERSION], dtype=torch.int64),
            "codes": self.codes,
            "codebook": _name_to_tensor(self.codebook),
            "dtype": _name_to_tensor(dtype_name),
            "block_size": torch.tensor([self.block_size], dtype=torch.int64),
            "shape": torch.tensor(list(self.shape), dtype=torch.int64),
            "rotate": torch.tensor([int(self.rotate)], dtype=torch.int64),
        }
        if self.scales is not None:
            out["scales"] = self.scales
        else:
            out.update(scale_codes=self.scale_codes, scale_scales=self.scale_scales, scale_offset=self.scale_offset)
        return out

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> QuantizedTensor:
        """Inverse of :meth:`state_dict`; raises ``ValueError`` on a dict that is not one."""
        required = ("format_version", "codes", "codebook", "dtype", "block_size", "shape", "rotate")
        missing = [k for k in required if k not in state]
        if missing:
            raise ValueError(f"not a QuantizedTensor state_dict: missing {missing}")
        version = int(state["format_version"][0])
        if version != _FORMAT_VERSION:
            raise ValueError(f"QuantizedTensor format version {version} is not supported (expected {_FORMAT_VERSION})")
        dtype_name = _tensor_to_name(state["dtype"])
        if dtype_name not in _DTYPES:
            raise ValueError(f"QuantizedTensor state_dict has unknown dtype {dtype_name!r}")
        double = "scales" not in state
        return cls(
            codes=state["codes"],
            scales=None if double else state["scales"],
            codebook=_tensor_to_name(state["codebook"]),
            block_size=int(state["block_size"][0]),
            shape=torch.Size(state["shape"].tolist()),
            dtype=_DTYPES[dtype_name],
            rotate=bool(state["rotate"][0]),
            scale_codes=state.get("scale_codes"),
            scale_scales=state.get("scale_scales"),
            scale_offset=state.get("scale_offset"),
        )

    def __repr__(self) -> str:
        extra = ", double_quant" if self.double_quant else ""
        extra += ", rotate" if self.rotate else ""
        return (
            f"QuantizedTensor(shape={tuple(self.shape)}, dtype={self.dtype}, codebook={self.codebook!r}, "
            f"block_size={self.block_size}{extra}, nbytes={self.nbytes}, device={self.device})"
        )
