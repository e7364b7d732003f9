"""The frozen rest of the model, held compact in memory while a block trains.

A visit trains one block; every other matrix only carries activations forward (and, above the
block, gradients back). Expanded to fp32 those matrices would cost the client the whole model's
fp32 size, whatever the download saved. `load` keeps each frozen matrix of a linear or embedding
module in the form it travelled in (`compact`: int8, NF4, pruned, or dense as sent) or in bf16,
and expands it when its module runs, a slice of rows at a time: in forward, and again in backward
rather than keeping the expanded copy for it (autograd would otherwise hold every expanded
matrix above the block until the backward pass reaches it). `fp32` expands everything up front,
as ordinary parameters. Norms, biases and the block itself are always fp32 parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from fedcybgd import compression, lora, models
from fedcybgd.compression import DENSE, Encoded
from fedcybgd.config import FROZEN_FORMS


# A frozen matrix is expanded a slice of rows at a time, each about this size, so a visit's
# transient is a slice, not the largest matrix (SmolLM2's tied head: 113 MB in fp32). Measured on
# the 2-core CPU (2026-12-07, batch 4 x 128, int8, one fresh process per row, three runs each,
# alternating with the whole-matrix code): visit peak of the top block 481 -> 385 MB, middle
# 974 -> 848 MB, bottom 1,500 -> 1,369 MB; step time unchanged (top block, both ways alternating
# in one process: 1.051 s whole, 1.064 s in slices). Slices much smaller than this cost Python
# overhead per slice for no memory that matters.
EXPAND_SLICE_BYTES = 4 << 20


def expansion_rows(rows: int, cols: int, itemsize: int) -> int:
    """How many of a matrix's `rows` (of `cols` values) are expanded at once to `itemsize`-byte
    values: the memory estimate counts the same."""
    return min(rows, max(1, EXPAND_SLICE_BYTES // (cols * itemsize)))


class FrozenWeight(nn.Module):
    """One frozen matrix in its compact parts (buffers, so `.to(device)` moves them)."""

    def __init__(self, encoded: Encoded) -> None:
        super().__init__()
        self.form = encoded.form
        self.matrix_shape = encoded.shape
        self.part_names = tuple(encoded.parts)
        for part, tensor in encoded.parts.items():
            self.register_buffer(part, tensor, persistent=False)

    def parts(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self.part_names}

    def expand(self, dtype: torch.dtype, rows: slice = slice(None)) -> torch.Tensor:
        """Rows `rows` of the matrix (all of it by default) in `dtype`, for one use."""
        if rows == slice(None):
            return compression.decode(self.parts(), self.form, dtype)
        return compression.decode_rows(self.parts(), self.form, rows, dtype)

    def row_slices(self, dtype: torch.dtype) -> list[slice]:
        """The slices of rows to expand one at a time (see EXPAND_SLICE_BYTES): the whole matrix
        where its form cannot expand a slice alone, or where expanding it copies nothing."""
        copies = not (self.form == DENSE and self.v.dtype == dtype)
        if not copies or not compression.decodes_rows(self.matrix_shape, self.form):
            return [slice(None)]
        rows, cols = self.matrix_shape
        step = expansion_rows(rows, cols, dtype.itemsize)
        return [slice(None)] if step == rows else [slice(start, start + step) for start in range(0, rows, step)]

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` in fp32, expanding only those where the form allows."""
        return compression.decode_rows(self.parts(), self.form, ids)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.parts().values())


def _times_transposed(x: torch.Tensor, weight: FrozenWeight, dtype: torch.dtype) -> torch.Tensor:
    """`x @ W.T`, W expanded a slice of rows (a slice of the output's features) at a time."""
    slices = weight.row_slices(dtype)
    if len(slices) == 1:
        return F.linear(x, weight.expand(dtype))
    out = x.new_empty(*x.shape[:-1], weight.matrix_shape[0])
    for rows in slices:
        out[..., rows] = F.linear(x, weight.expand(dtype, rows))
    return out


def _times(x: torch.Tensor, weight: FrozenWeight, dtype: torch.dtype) -> torch.Tensor:
    """`x @ W`, W expanded a slice of rows (a slice of x's features) at a time, summed."""
    out = None
    for rows in weight.row_slices(dtype):
        part = x[..., rows] @ weight.expand(dtype, rows)
        out = part if out is None else out.add_(part)
    return out


class _ExpandedLinear(torch.autograd.Function):
    """`x @ W.T + b` with W expanded from its compact form in forward and again in backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: FrozenWeight, bias: torch.Tensor | None,  # noqa: ANN001
                transposed: bool) -> torch.Tensor:
        dtype = _compute_dtype(x)
        ctx.weight, ctx.transposed, ctx.input_dtype = weight, transposed, x.dtype
        out = (_times if transposed else _times_transposed)(x.to(dtype), weight, dtype)
        return out if bias is None else out.add_(bias.to(dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:  # noqa: ANN001
        grad_input = (_times_transposed if ctx.transposed else _times)(grad, ctx.weight, grad.dtype)
        return grad_input.to(ctx.input_dtype), None, None, None


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a linear layer computes in: autocast's where it is on, else the input's."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


class FrozenLinear(nn.Module):
    """A frozen `nn.Linear` (or transformers' `Conv1D`, weight stored (in, out): `transposed`)."""

    def __init__(self, weight: FrozenWeight, bias: nn.Parameter | None, transposed: bool) -> None:
        super().__init__()
        self.frozen_weight = weight
        self.bias = bias
        self.transposed = transposed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ExpandedLinear.apply(x, self.frozen_weight, self.bias, self.transposed)


class FrozenEmbedding(nn.Module):
    """A frozen `nn.Embedding`: a lookup expands only the rows it reads."""

    def __init__(self, weight: FrozenWeight) -> None:
        super().__init__()
        self.frozen_weight = weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.frozen_weight.rows(ids)


def load(model: nn.Module, tensors: dict[str, Encoded], trainable: set[str], frozen_form: str = "compact") -> None:
    """Put `tensors` (model-local names, as they travelled) into `model`.

    `trainable`: the parameters this visit trains (fp32). Those it does not find in `tensors`
    are LoRA adapters, already in place. Every other parameter must be in `tensors`. Frozen
    matrices of `nn.Linear`, `Conv1D` and `nn.Embedding` modules are held in `frozen_form`
    (one of FROZEN_FORMS); tied matrices (embeddings and lm_head) share one compact copy.
    """
    if frozen_form not in FROZEN_FORMS:
        raise ValueError(f"frozen_form must be one of {FROZEN_FORMS}, got {frozen_form!r}")
    params = dict(model.named_parameters())
    travelled = {name: lora.unwrapped(name) for name in params
                 if name not in trainable or lora.unwrapped(name) in tensors}
    models.check_names(travelled.values(), tensors)

    name_of = {id(param): name for name, param in params.items()}
    compact: dict[int, FrozenWeight] = {}  # by the skeleton parameter's id: tied ones share
    for module_name, module in list(model.named_modules()):
        weight = getattr(module, "weight", None)
        if (frozen_form == "fp32" or not isinstance(module, (nn.Linear, Conv1D, nn.Embedding))
                or not isinstance(weight, nn.Parameter) or name_of[id(weight)] in trainable):
            continue
        if id(weight) not in compact:
            encoded = tensors[travelled[name_of[id(weight)]]]
            models.check_shape(travelled[name_of[id(weight)]], encoded.shape, weight.shape)
            if frozen_form == "bf16":
                encoded = Encoded(DENSE, {"v": encoded.decode(torch.bfloat16)})
            compact[id(weight)] = FrozenWeight(encoded)
        _replace(model, module_name, _frozen_module(module, compact[id(weight)]))

    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in travelled:
                tensor = tensors[travelled[name]].decode()
                models.check_shape(travelled[name], tensor.shape, param.shape)
                param.data = tensor  # replaces the skeleton's storage, never touched, instead of copying into it


def _frozen_module(module: nn.Module, weight: FrozenWeight) -> nn.Module:
    if isinstance(module, nn.Embedding):
        return FrozenEmbedding(weight)
    return FrozenLinear(weight, module.bias, transposed=isinstance(module, Conv1D))


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def frozen_bytes(model: nn.Module) -> int:
    """Bytes the model's compact frozen matrices hold (each shared copy once)."""
    return sum(m.nbytes() for m in model.modules() if isinstance(m, FrozenWeight))
