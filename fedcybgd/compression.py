"""How one frozen tensor travels: pruned and/or quantized, as a few plain tensors ("parts").

A `TensorForm` names the transform (`dense`, `int8`, `nf4`, `p0.50`, `p0.50+int8`, `2:4+nf4`, ...).
`encode` turns a tensor into parts, `decode` inverts it. Pruned tensors travel as a packed bitmask
plus only the kept values, so the bytes really shrink; quantized values travel as int8 with one
fp32 scale per output row, or as NF4 codes (two per byte) with one fp32 absmax per 64 values.
Only matrices are transformed: 1-D tensors (norms, biases) always travel dense.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fedcybgd.config import PRUNE_PATTERNS, QUANTIZATIONS

NF4_BLOCK = 64
# The 16 NF4 levels (QLoRA, Dettmers et al. 2023): quantiles of a unit normal, scaled to [-1, 1].
NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
])


@dataclass(frozen=True)
class TensorForm:
    sparsity: float = 0.0  # fraction of entries zeroed (unstructured); 2:4 always prunes half
    pattern: str = "unstructured"
    quant: str = "none"

    def __post_init__(self) -> None:
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if self.pattern not in PRUNE_PATTERNS:
            raise ValueError(f"pattern must be one of {PRUNE_PATTERNS}, got {self.pattern!r}")
        if self.quant not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {self.quant!r}")

    @property
    def prunes(self) -> bool:
        return self.pattern == "2:4" or self.sparsity > 0

    @property
    def key(self) -> str:
        """Canonical name, stable across processes: part of the cache and wire keys."""
        parts = []
        if self.pattern == "2:4":
            parts.append("2:4")
        elif self.sparsity > 0:
            parts.append(f"p{self.sparsity:.2f}")
        if self.quant != "none":
            parts.append(self.quant)
        return "+".join(parts) or "dense"

    @classmethod
    def parse(cls, key: str) -> TensorForm:
        sparsity, pattern, quant = 0.0, "unstructured", "none"
        for part in ([] if key == "dense" else key.split("+")):
            if part == "2:4":
                pattern = "2:4"
            elif part.startswith("p"):
                sparsity = float(part[1:])
            else:
                quant = part
        return cls(sparsity=sparsity, pattern=pattern, quant=quant)


DENSE = TensorForm()


@dataclass(frozen=True)
class Encoded:
    """One tensor as it travelled: its form and the parts that `decode` turns back into it."""

    form: TensorForm
    parts: dict[str, torch.Tensor]

    def decode(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return decode(self.parts, self.form, dtype)

    @property
    def shape(self) -> tuple[int, ...]:
        """The tensor's shape, without decoding it."""
        return parts_shape(self.parts)


def applies_to(tensor: torch.Tensor) -> bool:
    """Whether a form other than dense is used for this tensor (matrices only)."""
    return tensor.dim() >= 2


def encode(tensor: torch.Tensor, form: TensorForm) -> dict[str, torch.Tensor]:
    """Parts that `decode` turns back into (an approximation of) `tensor`."""
    if form == DENSE or not applies_to(tensor):
        return {"v": tensor.detach().contiguous()}
    matrix = tensor.detach().float().reshape(tensor.shape[0], -1)
    parts = {"shape": torch.tensor(tuple(tensor.shape), dtype=torch.int64)}
    if form.prunes:
        mask = _prune_mask(matrix, form)
        parts["mask"] = _pack_bits(mask.reshape(-1))
        values = matrix[mask]
        rows = mask.nonzero()[:, 0]
    else:
        values = matrix.reshape(-1)
        rows = torch.arange(matrix.shape[0]).repeat_interleave(matrix.shape[1])
    if form.quant == "int8":
        scale = torch.zeros(matrix.shape[0]).scatter_reduce(0, rows, values.abs(), "amax") / 127.0
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        parts["q"] = torch.round(values / scale[rows]).clamp(-127, 127).to(torch.int8)
        parts["scale"] = scale
    elif form.quant == "nf4":
        parts["q"], parts["absmax"] = _nf4_encode(values)
    else:
        parts["v"] = values.to(tensor.dtype)
    return parts


def decode(parts: dict[str, torch.Tensor], form: TensorForm, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The tensor `parts` encode, in `dtype`, on the parts' device. Values are computed in fp32
    and cast once, so every dtype sees the same numbers."""
    if "shape" not in parts:
        return parts["v"].to(dtype)
    shape = _shape(parts)
    rows_n = shape[0]
    cols = math.prod(shape[1:])
    if not form.prunes:  # every entry travelled: no index per value needed
        if form.quant == "int8":
            # In place: a frozen matrix is expanded at every use, and one fp32 copy at a time is
            # its whole transient cost (the head's is 113 MB for SmolLM2).
            values = parts["q"].reshape(rows_n, cols).float().mul_(parts["scale"][:, None])
        elif form.quant == "nf4":
            values = _nf4_decode(parts["q"], parts["absmax"], rows_n * cols)
        else:
            values = parts["v"]
        return values.reshape(shape).to(dtype)
    mask = _unpack_bits(parts["mask"], rows_n * cols).reshape(rows_n, cols)
    if form.quant == "int8":
        values = parts["q"].float() * parts["scale"][mask.nonzero()[:, 0]]
    elif form.quant == "nf4":
        values = _nf4_decode(parts["q"], parts["absmax"], int(mask.sum()))
    else:
        values = parts["v"].float()
    out = torch.zeros(rows_n, cols, device=mask.device)
    out[mask] = values
    return out.reshape(shape).to(dtype)


def check_parts(parts: dict[str, torch.Tensor], form: TensorForm) -> None:
    """Raise ValueError unless `parts` are what `encode` makes for `form` (keys and sizes), so
    that bad stored bytes fail when read, not later in a forward pass that decodes them."""
    if "shape" not in parts:
        if set(parts) != {"v"}:
            raise ValueError(f"dense parts must be just 'v', got {sorted(parts)}")
        return
    shape = _shape(parts)
    count = math.prod(shape)
    rows = shape[0] if shape else 0
    if form.prunes:
        mask = parts.get("mask")
        if mask is None or mask.numel() != (count + 7) // 8:
            raise ValueError(f"a pruned {shape} tensor needs a {(count + 7) // 8}-byte mask")
        count = int(_unpack_bits(mask, count).sum())
    expected = {"int8": {"q": count, "scale": rows},
                "nf4": {"q": -(-count // NF4_BLOCK) * NF4_BLOCK // 2, "absmax": -(-count // NF4_BLOCK)},
                "none": {"v": count}}[form.quant]
    for key, numel in expected.items():
        if key not in parts or parts[key].numel() != numel:
            raise ValueError(f"form {form.key} of a {shape} tensor needs part {key!r} of {numel} values")


def _shape(parts: dict[str, torch.Tensor]) -> tuple[int, ...]:
    """The shape of the tensor a compressed form's `parts` encode."""
    return tuple(int(d) for d in parts["shape"])


def parts_shape(parts: dict[str, torch.Tensor]) -> tuple[int, ...]:
    """The shape of the tensor `parts` encode (any form), without decoding it."""
    return _shape(parts) if "shape" in parts else tuple(parts["v"].shape)


def decodes_rows(shape: tuple[int, ...], form: TensorForm) -> bool:
    """Whether `decode_rows` expands only the rows it reads of a `shape` tensor held in `form`:
    an unpruned matrix, dense, int8, or NF4 with whole NF4_BLOCK-value blocks per row. Otherwise
    it expands the whole tensor first."""
    return len(shape) == 2 and not form.prunes and (form.quant != "nf4" or shape[1] % NF4_BLOCK == 0)


def decode_rows(parts: dict[str, torch.Tensor], form: TensorForm, rows: torch.Tensor | slice,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rows `rows` (a slice, or indices of any shape) of the matrix `parts` encode, in `dtype`:
    an embedding lookup, or a frozen matrix expanded a slice of rows at a time. Values are
    those `decode` gives."""
    shape = parts_shape(parts)
    if not decodes_rows(shape, form):
        return decode(parts, form, dtype)[rows]
    if "shape" not in parts:
        return parts["v"][rows].to(dtype)
    rows_n, cols = shape
    if form.quant == "int8":
        values = parts["q"].reshape(rows_n, cols)[rows].float().mul_(parts["scale"][rows].unsqueeze(-1))
    else:
        packed = parts["q"].reshape(rows_n, cols // 2)[rows]
        absmax = parts["absmax"].reshape(rows_n, cols // NF4_BLOCK)[rows]
        values = _nf4_decode(packed.reshape(-1), absmax.reshape(-1), packed.numel() * 2)
        values = values.reshape(*packed.shape[:-1], cols)
    return values.to(dtype)


def _prune_mask(matrix: torch.Tensor, form: TensorForm) -> torch.Tensor:
    """True where an entry is kept: the largest magnitudes (per tensor, or 2 of every 4)."""
    magnitude = matrix.abs()
    if form.pattern == "2:4":
        if matrix.shape[1] % 4:
            raise ValueError(f"2:4 pruning needs a column count divisible by 4, got {matrix.shape[1]}")
        groups = magnitude.reshape(-1, 4)
        keep = torch.zeros_like(groups, dtype=torch.bool)
        keep.scatter_(1, groups.topk(2, dim=1).indices, True)
        return keep.reshape(matrix.shape)
    n_keep = max(1, round(matrix.numel() * (1.0 - form.sparsity)))
    threshold_idx = magnitude.reshape(-1).topk(n_keep).indices
    keep = torch.zeros(matrix.numel(), dtype=torch.bool)
    keep[threshold_idx] = True
    return keep.reshape(matrix.shape)


def _pack_bits(bits: torch.Tensor) -> torch.Tensor:
    padded = torch.zeros((bits.numel() + 7) // 8 * 8, dtype=torch.uint8)
    padded[: bits.numel()] = bits.to(torch.uint8)
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
    return (padded.reshape(-1, 8) * weights).sum(1, dtype=torch.uint8)


def _unpack_bits(packed: torch.Tensor, count: int) -> torch.Tensor:
    shifts = torch.arange(8, dtype=torch.uint8)
    return ((packed.unsqueeze(1) >> shifts) & 1).reshape(-1)[:count].bool()


def _nf4_encode(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = values.numel()
    padded = torch.zeros((n + NF4_BLOCK - 1) // NF4_BLOCK * NF4_BLOCK)
    padded[:n] = values
    blocks = padded.reshape(-1, NF4_BLOCK)
    absmax = blocks.abs().amax(1)
    absmax = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    normalized = (blocks / absmax[:, None]).reshape(-1)
    codes = torch.bucketize(normalized, (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2).to(torch.uint8)
    packed = codes[0::2] | (codes[1::2] << 4)
    return packed, absmax


def _nf4_decode(packed: torch.Tensor, absmax: torch.Tensor, count: int) -> torch.Tensor:
    codes = torch.stack([packed & 0x0F, packed >> 4], dim=1).reshape(-1)
    levels = NF4_LEVELS.to(packed.device).index_select(0, codes.int())  # int32 indices: half of int64's bytes
    return levels.reshape(-1, NF4_BLOCK).mul_(absmax[:, None]).reshape(-1)[:count]
