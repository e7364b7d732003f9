"""Who trains which block: pure functions of the round, the visit position and the node order."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from fedcybgd.config import PAIRINGS


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


def pairing_period(num_nodes: int, count: int, num_blocks: int, blocks_per_round: int) -> int:
    """Visits after which taking nodes in turn meets the same (node, block) pairs again.

    Visit v (0-based; round r holds visits (r-1)*count ... r*count-1) goes to node v mod N and
    trains the block at allocation position v * blocks_per_round // count, which repeats every
    B * count / blocks_per_round visits (ascending, descending). Both repeat after their lcm.
    """
    if count % blocks_per_round:
        raise ValueError(f"blocks_per_round={blocks_per_round} must divide count={count}")
    return math.lcm(num_nodes, num_blocks * count // blocks_per_round)


def nodes_for_round(server_round: int, nodes: list[int], count: int = 1, *, pairing: str = "fixed",
                    num_blocks: int = 1, blocks_per_round: int = 1) -> list[int]:
    """The `count` nodes of round r, taken in turn from the stable node order (wrapping around).

    `fixed` (the reference's pairing): visit v goes to node v mod N, so with one client per
    round, round r goes to node (r-1) mod N. With ascending blocks and N dividing B, node i then
    trains the same blocks every cycle; under non-IID data each block sees one node's data only.
    `rotate` moves every later visit one node further each time the fixed pairing would repeat
    (every `pairing_period` visits), so within N cycles every block meets every node (ascending
    or descending order, any N, B and count). Nodes still take turns, and a round's nodes are
    distinct: a shift inside a round skips one node, which matters only if count = N, and then
    the period is a multiple of N, so the shift falls between rounds.
    """
    if not nodes:
        raise ValueError("no nodes to assign")
    if count > len(nodes):
        raise ValueError(f"algorithm.clients_per_round={count} exceeds the {len(nodes)} connected nodes")
    if pairing not in PAIRINGS:
        raise ValueError(f"unknown pairing {pairing!r}")
    period = pairing_period(len(nodes), count, num_blocks, blocks_per_round)
    visits = range((server_round - 1) * count, server_round * count)
    return [nodes[(v + (v // period if pairing == "rotate" else 0)) % len(nodes)] for v in visits]


@dataclass(frozen=True)
class MemoryFit:
    """A round's assignments after memory budgets: moved ones, and blocks no node can hold."""

    assignments: list[Assignment]
    moved: list[tuple[Assignment, int]]  # (the scheduled assignment, the node that got its block)
    skipped: list[Assignment]  # no connected node's budget holds the block


def fit_memory(assignments: list[Assignment], nodes: list[int], budgets: dict[int, int | None],
               needs: list[int]) -> MemoryFit:
    """Give each scheduled block to a node whose memory budget holds it.

    `budgets[node]`: the bytes a node declared (None: no limit); `needs[block]`: the estimated
    peak of a visit training that block. A scheduled node that cannot hold its block hands it
    to the next node after it in `nodes` (the run's stable order, wrapping) that can and is not
    already in this round; when no node can, the block is skipped this round.
    """
    def fits(node: int, block: int) -> bool:
        budget = budgets.get(node)
        return budget is None or needs[block] <= budget

    taken = {a.node_id for a in assignments if fits(a.node_id, a.block)}
    fitted, moved, skipped = [], [], []
    for a in assignments:
        if fits(a.node_id, a.block):
            fitted.append(a)
            continue
        start = nodes.index(a.node_id) if a.node_id in nodes else 0
        order = nodes[start + 1:] + nodes[:start + 1]
        substitute = next((n for n in order if n not in taken and fits(n, a.block)), None)
        if substitute is None:
            skipped.append(a)
            continue
        taken.add(substitute)
        fitted.append(Assignment(substitute, a.block))
        moved.append((a, substitute))
    return MemoryFit(fitted, moved, skipped)
