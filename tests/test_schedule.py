import pytest

from strategy.schedule import assign, block_order


def visits(allocation, rounds, nodes=(7, 8, 9), num_blocks=4, seed=0):
    return [(a.node_id, a.block) for r in range(1, rounds + 1)
            for a in assign(r, list(nodes), num_blocks, allocation, seed)]


def test_ascending_visits_nodes_in_turn_and_blocks_in_order():
    assert visits("ascending", 6) == [(7, 0), (8, 1), (9, 2), (7, 3), (8, 0), (9, 1)]


def test_descending():
    assert [b for _, b in visits("descending", 5)] == [3, 2, 1, 0, 3]


def test_random_trains_every_block_once_per_cycle_and_is_seeded():
    blocks = [b for _, b in visits("random", 12)]
    for cycle in range(3):
        assert sorted(blocks[4 * cycle: 4 * cycle + 4]) == [0, 1, 2, 3]
    assert blocks == [b for _, b in visits("random", 12)]
    assert any(block_order(c, 8, "random", 0) != list(range(8)) for c in range(3))
    assert block_order(0, 8, "random", 0) != block_order(0, 8, "random", 1)


def test_unknown_allocation_and_no_nodes():
    with pytest.raises(ValueError):
        visits("zigzag", 1)
    with pytest.raises(ValueError):
        assign(1, [], 4, "ascending", 0)
