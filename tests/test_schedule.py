import pytest

from strategy.schedule import block_at, block_order, nodes_for_round


def blocks(allocation, visits, num_blocks=4, seed=0):
    return [block_at(p, num_blocks, allocation, seed) for p in range(visits)]


def test_ascending_and_descending():
    assert blocks("ascending", 6) == [0, 1, 2, 3, 0, 1]
    assert blocks("descending", 5) == [3, 2, 1, 0, 3]


def test_nodes_are_visited_in_turn():
    assert [nodes_for_round(r, [7, 8, 9]) for r in range(1, 6)] == [[7], [8], [9], [7], [8]]
    assert [nodes_for_round(r, [7, 8, 9], 2) for r in range(1, 4)] == [[7, 8], [9, 7], [8, 9]]


def test_random_trains_every_block_once_per_cycle_and_is_seeded():
    seq = blocks("random", 12)
    for cycle in range(3):
        assert sorted(seq[4 * cycle: 4 * cycle + 4]) == [0, 1, 2, 3]
    assert seq == blocks("random", 12)
    assert any(block_order(c, 8, "random", 0) != list(range(8)) for c in range(3))
    assert block_order(0, 8, "random", 0) != block_order(0, 8, "random", 1)


def test_unknown_allocation_and_no_nodes():
    with pytest.raises(ValueError):
        blocks("zigzag", 1)
    with pytest.raises(ValueError):
        nodes_for_round(1, [])
    with pytest.raises(ValueError, match="clients_per_round=3 exceeds the 2 connected nodes"):
        nodes_for_round(1, [7, 8], 3)
