"""Who trains which block in a round: a pure function of the round and the node order."""

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


def assign(server_round: int, nodes: list[int], num_blocks: int, allocation: str, seed: int) -> list[Assignment]:
    """FedCyBGD: round r is visit r-1; nodes are visited in turn, blocks in allocation order."""
    if not nodes:
        raise ValueError("no nodes to assign")
    visit = server_round - 1
    cycle, position = divmod(visit, num_blocks)
    block = block_order(cycle, num_blocks, allocation, seed)[position]
    return [Assignment(node_id=nodes[visit % len(nodes)], block=block)]
