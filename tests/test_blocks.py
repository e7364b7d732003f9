import pytest
import torch
from torch import nn

from fedcybgd import models
from fedcybgd.blocks import UnsupportedModelError, find_layer_path, partition_blocks

STRUCTURES = {"tiny-llama": "model.layers", "tiny-gpt2": "transformer.h", "tiny-neox": "gpt_neox.layers"}


@pytest.fixture(scope="module", params=sorted(STRUCTURES))
def tiny(request):
    return request.param, models.load_pretrained(models.resolve_model_dir(request.param))


def test_layer_list_found_by_structure(tiny):
    name, model = tiny
    assert find_layer_path(model) == STRUCTURES[name]


def test_one_layer_per_block_covers_layers_and_leaves_head_out(tiny):
    name, model = tiny
    blocks = partition_blocks(model, layers_per_block=1)
    prefix = STRUCTURES[name]
    assert [b.layers for b in blocks] == [(0,), (1,), (2,), (3,)]
    for b in blocks:
        assert b.names and all(n.startswith(f"{prefix}.{b.layers[0]}.") for n in b.names)
    in_blocks = [n for b in blocks for n in b.names]
    assert len(in_blocks) == len(set(in_blocks))
    head = {n for n, _ in model.named_parameters()} - set(in_blocks)
    assert head and not any(n.startswith(prefix + ".") for n in head)


def test_layers_per_block_groups_consecutive_layers_last_shorter(tiny):
    _, model = tiny
    blocks = partition_blocks(model, layers_per_block=3)
    assert [b.layers for b in blocks] == [(0, 1, 2), (3,)]


def test_a_block_part_keeps_the_index_and_only_its_layers_parameters(tiny):
    _, model = tiny
    prefix = find_layer_path(model) + "."
    block = partition_blocks(model, layers_per_block=3)[0]
    part = block.part((1, 2), prefix)
    assert part.index == block.index and part.layers == (1, 2)
    assert part.names == tuple(n for n in block.names if not n.startswith(f"{prefix}0."))
    assert part.names and all(n.startswith((f"{prefix}1.", f"{prefix}2.")) for n in part.names)
    with pytest.raises(ValueError, match="not all in block 0"):
        block.part((2, 3), prefix)


def test_train_head_adds_one_block_with_every_non_layer_parameter(tiny):
    _, model = tiny
    blocks = partition_blocks(model, layers_per_block=2, train_head=True)
    assert len(blocks) == 3 and blocks[-1].layers == ()
    all_names = [n for b in blocks for n in b.names]
    assert sorted(all_names) == sorted(n for n, _ in model.named_parameters())


def test_more_layers_per_block_than_layers_is_an_error(tiny):
    _, model = tiny
    with pytest.raises(ValueError, match="layers_per_block=5 exceeds the model's 4 layers"):
        partition_blocks(model, layers_per_block=5)


def test_unsupported_structure_names_the_supported_ones():
    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.ModuleList([nn.Linear(2, 2)])

    with pytest.raises(UnsupportedModelError, match="model.layers.*transformer.h.*gpt_neox.layers"):
        partition_blocks(Encoder(), 1)


def test_tied_embeddings_appear_once():
    model = models.load_pretrained(models.resolve_model_dir("tiny-gpt2"))
    assert model.lm_head.weight is model.transformer.wte.weight
    names = [n for b in partition_blocks(model, 1, train_head=True) for n in b.names]
    assert "lm_head.weight" not in names and "transformer.wte.weight" in names
    skeleton, _ = models.build_skeleton(models.model_spec(model))
    models.load_tensors(skeleton, models.named_tensors(model))
    assert torch.equal(skeleton.lm_head.weight, model.lm_head.weight)
