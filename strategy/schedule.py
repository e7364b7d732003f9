"""Who trains which block: pure functions of the round, the visit position and the node order."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Assignment:
    node_id: int
    block: int


def block_order(cycle: int, num_blocks: int, allocation: str, seed: int) -> list[int]:
    """The blocks of one cycle (one pass over all blocks), in visiting order.

    `random` draws a fresh permutation per cycle (seeded by `seed` and the cycle), so every
    block is still trained exactly once per cycle, as in BAdam's random reshuffling.
    """
    blocks = list(range(num_blocks))
    if allocation == "ascending":
        return blocks
    if allocation == "descending":
        return blocks[::-1]
    if allocation == "random":
        random.Random(f"{seed}:{cycle}").shuffle(blocks)
        return blocks
    raise ValueError(f"unknown allocation {allocation!r}")


def block_at(position: int, num_blocks: int, allocation: str, seed: int) -> int:
    """The block of the `position`-th visit (0-based) in the allocation order."""
    cycle, index = divmod(position, num_blocks)
    return block_order(cycle, num_blocks, allocation, seed)[index]


def nodes_for_round(server_round: int, nodes: list[int], count: int = 1) -> list[int]:
    """Nodes are visited in turn, `count` per round: round r takes the next `count` of the
    stable order (wrapping around), so with one per round, round r goes to node (r-1) mod N."""
    if not nodes:
        raise ValueError("no nodes to assign")
    if count > len(nodes):
        raise ValueError(f"algorithm.clients_per_round={count} exceeds the {len(nodes)} connected nodes")
    start = (server_round - 1) * count
    return [nodes[(start + i) % len(nodes)] for i in range(count)]
