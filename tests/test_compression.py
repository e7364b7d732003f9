import pytest
import torch

from fedcybgd import models
from fedcybgd.blocks import layer_index
from fedcybgd.compression import DENSE, TensorForm, decode, encode


def wire_bytes(parts):
    return sum(t.numel() * t.element_size() for t in parts.values())


@pytest.fixture
def weight():
    torch.manual_seed(0)
    return torch.randn(64, 96) * 0.05


def test_dense_is_exact(weight):
    assert torch.equal(decode(encode(weight, DENSE), DENSE), weight)


def test_int8_error_is_within_half_a_step_per_row(weight):
    form = TensorForm(quant="int8")
    parts = encode(weight, form)
    err = (decode(parts, form) - weight).abs().amax(1)
    assert (err <= weight.abs().amax(1) / 254 + 1e-7).all()
    assert wire_bytes(parts) < 0.27 * weight.numel() * 4


def test_nf4_error_is_within_half_the_widest_level_gap(weight):
    form = TensorForm(quant="nf4")
    parts = encode(weight, form)
    err = (decode(parts, form) - weight).reshape(-1, 64).abs().amax(1)
    assert (err <= 0.152 * weight.reshape(-1, 64).abs().amax(1) + 1e-7).all()
    assert wire_bytes(parts) < 0.16 * weight.numel() * 4


def test_pruning_keeps_the_largest_exactly_zeroes_the_rest_and_shrinks_the_bytes(weight):
    form = TensorForm(sparsity=0.5)
    parts = encode(weight, form)
    out = decode(parts, form)
    kept = out != 0
    assert kept.sum() == weight.numel() // 2
    assert torch.equal(out[kept], weight[kept])
    assert weight[kept].abs().min() >= weight[~kept].abs().max()
    assert wire_bytes(parts) < 0.54 * weight.numel() * 4


def test_two_four_pruning_keeps_two_of_every_four(weight):
    form = TensorForm(pattern="2:4")
    out = decode(encode(weight, form), form)
    assert ((out.reshape(-1, 4) != 0).sum(1) == 2).all()


def test_pruned_and_quantized(weight):
    form = TensorForm(sparsity=0.3, quant="int8")
    out = decode(encode(weight, form), form)
    pruned = out == 0
    assert pruned.sum() >= round(0.3 * weight.numel())
    assert ((out - weight).abs()[~pruned] <= weight.abs().amax() / 254 + 1e-7).all()


def test_vectors_always_travel_dense():
    bias = torch.randn(10)
    assert torch.equal(decode(encode(bias, TensorForm(sparsity=0.5, quant="nf4")), TensorForm()), bias)


@pytest.mark.parametrize("key", ["dense", "int8", "nf4", "p0.30", "p0.50+int8", "2:4+nf4"])
def test_form_keys_round_trip(key):
    assert TensorForm.parse(key).key == key


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-neox"])
def test_rebuilt_model_matches_the_full_model_and_dropping_skips_layers(name):
    full = models.load_pretrained(models.resolve_model_dir(name))
    tensors = models.named_tensors(full)
    ids = torch.randint(0, 250, (2, 12))

    same, layer_map = models.build_skeleton(models.model_spec(full))
    models.load_tensors(same, {layer_map.to_local(n): t for n, t in tensors.items()})
    assert torch.equal(_logits(same.eval(), ids), _logits(full, ids))

    dropped, layer_map = models.build_skeleton(models.model_spec(full), dropped_layers=(1, 2))
    kept = {layer_map.to_local(n): t for n, t in tensors.items()
            if layer_index(n, layer_map.prefix) not in (1, 2)}
    models.load_tensors(dropped, kept)
    assert dropped.config.num_hidden_layers == 2
    assert [layer_map.to_local(f"{layer_map.prefix}{i}.x") for i in (0, 3)] == \
        [f"{layer_map.prefix}0.x", f"{layer_map.prefix}1.x"]

    # Reference: the full model with layers 1 and 2 turned into the identity.
    layers = full.get_submodule(layer_map.prefix[:-1])
    hooks = [layers[i].register_forward_hook(
        lambda mod, args, out: (args[0],) + tuple(out[1:]) if isinstance(out, tuple) else args[0])
        for i in (1, 2)]
    try:
        expected = _logits(full, ids)
    finally:
        for h in hooks:
            h.remove()
    got = _logits(dropped.eval(), ids)
    assert got.shape == (2, 12, full.config.vocab_size)
    assert torch.allclose(got, expected, atol=1e-5)
