import pytest
import torch
from flwr.app import Array

from fedcybgd.codec import CodecError, decode_array, decode_record, encode_tensor, encode_tensors


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.int64, torch.bool])
def test_round_trip_is_bit_exact(dtype):
    t = (torch.randn(3, 5) * 100).to(dtype)
    array = encode_tensor(t)
    back = decode_array(array)
    assert back.dtype == dtype and back.shape == t.shape
    assert torch.equal(back.view(torch.uint8), t.view(torch.uint8))


def test_bytes_on_the_wire_are_the_tensor_bytes():
    t = torch.zeros(7, 11, dtype=torch.bfloat16)
    assert len(encode_tensor(t).data) == 7 * 11 * 2


def test_record_round_trip_and_non_contiguous_input():
    t = torch.arange(12.0).reshape(3, 4).t()
    out = decode_record(encode_tensors({"a": t, "b": torch.ones(2)}))
    assert torch.equal(out["a"], t) and torch.equal(out["b"], torch.ones(2))


def test_truncated_or_foreign_arrays_are_rejected():
    array = encode_tensor(torch.ones(4))
    with pytest.raises(CodecError, match="has 12 bytes, expected 16"):
        decode_array(Array(dtype=array.dtype, shape=array.shape, stype=array.stype, data=array.data[:12]))
    with pytest.raises(CodecError, match="unsupported array type"):
        decode_array(Array(torch.ones(2).numpy()))
    with pytest.raises(CodecError, match="unsupported dtype"):
        decode_array(Array(dtype="complex64", shape=(1,), stype=array.stype, data=b"\0" * 8))
