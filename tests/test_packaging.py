import random

from fedcybgd.blocks import Block
from fedcybgd.config import CompressionConfig
from strategy.packaging import drop_layers


def test_random_dropping_leaves_out_a_fraction_and_never_the_block():
    block = Block(index=3, names=(), layers=(3,))
    frozen = [i for i in range(10) if i != 3]
    cfg = CompressionConfig(drop_fraction=0.5, drop_mode="random")
    choices = {drop_layers(frozen, block, 10, cfg, random.Random(seed)) for seed in range(20)}
    assert all(len(c) == 4 and 3 not in c for c in choices)
    assert len(choices) > 1  # a fresh choice per visit


def test_keep_near_drops_the_layers_farthest_from_the_block():
    block = Block(index=1, names=(), layers=(2, 3))
    frozen = [i for i in range(10) if i not in (2, 3)]
    cfg = CompressionConfig(drop_fraction=0.5, drop_mode="keep-near")
    assert drop_layers(frozen, block, 10, cfg, random.Random(0)) == (6, 7, 8, 9)


def test_keep_near_for_the_head_block_drops_the_middle():
    head = Block(index=10, names=(), layers=())
    cfg = CompressionConfig(drop_fraction=0.4, drop_mode="keep-near")
    assert drop_layers(list(range(10)), head, 10, cfg, random.Random(0)) == (3, 4, 5, 6)


def test_no_dropping_below_one_layer():
    cfg = CompressionConfig(drop_fraction=0.2)
    assert drop_layers([0, 1, 2], Block(0, (), (3,)), 4, cfg, random.Random(0)) == ()
