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


def pairs_met(num_nodes, num_blocks, count, shared_block, allocation, pairing, cycles, seed=0):
    """(block, node) pairs of `cycles` cycles without failures, as the strategy draws them:
    K distinct blocks per round from the allocation order, or one block shared by K nodes."""
    per_round = 1 if shared_block else count
    rounds = -(-cycles * num_blocks // per_round)
    nodes = list(range(num_nodes))
    met, position = set(), 0
    for r in range(1, rounds + 1):
        chosen = nodes_for_round(r, nodes, count, pairing=pairing, num_blocks=num_blocks,
                                 blocks_per_round=per_round)
        assert len(set(chosen)) == count  # a round's nodes are distinct
        blocks = [block_at(position + i, num_blocks, allocation, seed) for i in range(per_round)]
        position += per_round
        met |= {(b, n) for b, n in zip(blocks * count if shared_block else blocks, chosen)}
    return met


CASES = [(n, b, k, shared) for n in range(1, 7) for b in range(1, 13) for k in range(1, n + 1)
         for shared in (False, True) if shared or k <= b]


@pytest.mark.parametrize("allocation", ["ascending", "descending"])
def test_rotate_pairs_every_block_with_every_node_within_n_cycles(allocation):
    for n, b, k, shared in CASES:  # N dividing B or not, K clients per round, FedBAvg's shared block
        assert len(pairs_met(n, b, k, shared, allocation, "rotate", cycles=n)) == n * b, (n, b, k, shared)


def test_fixed_is_the_reference_pairing_and_misses_pairs_when_n_divides_b():
    assert [nodes_for_round(r, [7, 8, 9], pairing="fixed", num_blocks=6) for r in range(1, 8)] == \
        [[7], [8], [9], [7], [8], [9], [7]]
    # 2 nodes, 4 blocks, ascending: node 0 only ever trains blocks 0 and 2.
    assert pairs_met(2, 4, 1, False, "ascending", "fixed", cycles=10) == {(0, 0), (2, 0), (1, 1), (3, 1)}
    assert len(pairs_met(2, 4, 1, False, "ascending", "rotate", cycles=2)) == 8
    missing = [(n, b, k, s) for n, b, k, s in CASES if len(pairs_met(n, b, k, s, "ascending", "fixed", n)) < n * b]
    assert (2, 4, 1, False) in missing and (3, 6, 1, False) in missing


def test_rotate_shifts_only_when_the_pairing_would_repeat():
    # 3 nodes, 3 blocks: every cycle, the visits start one node further.
    assert [nodes_for_round(r, [7, 8, 9], pairing="rotate", num_blocks=3)[0] for r in range(1, 10)] == \
        [7, 8, 9, 8, 9, 7, 9, 7, 8]
    # 3 nodes, 4 blocks: the fixed pairing already meets every pair (lcm = 12 visits): unchanged.
    assert [nodes_for_round(r, [7, 8, 9], pairing="rotate", num_blocks=4) for r in range(1, 13)] == \
        [nodes_for_round(r, [7, 8, 9], pairing="fixed", num_blocks=4) for r in range(1, 13)]


def test_random_allocation_under_rotate_keeps_rounds_valid_and_mixes_pairs():
    # The random order already changes the pairing every cycle; rotate keeps every round's
    # nodes distinct and, over 3N cycles, meets nearly every pair (both pairings do).
    for n, b, k in [(2, 4, 1), (3, 6, 1), (4, 8, 2), (3, 4, 1)]:
        for seed in range(5):
            met = pairs_met(n, b, k, False, "random", "rotate", cycles=3 * n, seed=seed)
            assert len(met) >= 0.8 * n * b, (n, b, k, seed)


def test_unknown_pairing():
    with pytest.raises(ValueError, match="unknown pairing"):
        nodes_for_round(1, [7], pairing="shuffle")
