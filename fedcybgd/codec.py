"""Wire codec: torch tensors <-> `flwr.app.Array`.

A tensor travels as its raw little-endian bytes with the torch dtype name and shape as the Array's
metadata (`stype="torch.raw"`). This is bit-exact for every dtype, bf16 included (numpy has no
bf16, which is why Flower's own torch conversion cannot carry it), and the bytes on the wire are
exactly the tensor's bytes, which is what the byte accounting reports.
"""

from __future__ import annotations

import math
import sys

import torch
from flwr.app import Array, ArrayRecord

STYPE = "torch.raw"
_DTYPES = {
    str(dt).removeprefix("torch."): dt
    for dt in (torch.float32, torch.float16, torch.bfloat16, torch.float64,
               torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool)
}


class CodecError(ValueError):
    """An Array that this codec cannot decode."""


def encode_tensor(tensor: torch.Tensor) -> Array:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    if sys.byteorder != "little":  # pragma: no cover - no big-endian machines in sight
        raise CodecError("the wire format is little-endian")
    raw = flat.view(torch.uint8).numpy().tobytes()
    return Array(dtype=str(tensor.dtype).removeprefix("torch."), shape=tuple(tensor.shape),
                 stype=STYPE, data=raw)


def decode_array(array: Array) -> torch.Tensor:
    if array.stype != STYPE:
        raise CodecError(f"unsupported array type {array.stype!r} (expected {STYPE!r})")
    dtype = _DTYPES.get(array.dtype)
    if dtype is None:
        raise CodecError(f"unsupported dtype {array.dtype!r}")
    expected = dtype.itemsize * math.prod(int(d) for d in array.shape)
    if len(array.data) != expected:
        raise CodecError(
            f"array of shape {tuple(array.shape)} {array.dtype} has {len(array.data)} bytes, "
            f"expected {expected}"
        )
    flat = torch.frombuffer(bytearray(array.data), dtype=torch.uint8).view(dtype)
    return flat.reshape(tuple(array.shape))


def encode_tensors(tensors: dict[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord({name: encode_tensor(t) for name, t in tensors.items()})


def decode_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return {name: decode_array(array) for name, array in record.items()}

