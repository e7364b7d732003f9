"""Who trains which block: pure functions of the round, the visit position and the node order."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from fedcybgd.config import PAIRINGS


@dataclass(frozen=True)
class Assignment:
    node_id: int
    block: int
    # The block's decoder layers this visit trains: None for the whole block, else the part a
    # node's memory budget holds (`fit_memory`).
    layers: tuple[int, ...] | None = None


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
    """A round's assignments after memory budgets: moved, split, and parts no node can hold."""

    assignments: list[Assignment]
    moved: list[tuple[Assignment, int]]  # (the scheduled assignment, the node that got its whole block)
    split: list[tuple[Assignment, list[Assignment]]]  # (the scheduled assignment, the parts it became)
    skipped: list[Assignment]  # what no connected node's budget holds (`layers`: the part left)


def fit_memory(assignments: list[Assignment], nodes: list[int], budgets: dict[int, int | None],
               block_layers: Sequence[tuple[int, ...]], need: Callable[[int, tuple[int, ...]], int],
               split: bool) -> MemoryFit:
    """Give each scheduled block to nodes whose memory budgets hold it.

    `budgets[node]`: the bytes a node declared (None: no limit); `need(block, layers)`: the
    estimated peak of a visit training those decoder layers of the block (`block_layers[block]`:
    all of them). A scheduled node that holds its whole block trains it. Otherwise:
    - with `split` (blocks one client trains), a scheduled node that holds part of its block
      trains the largest upper part it holds (upper layers need less: the gradient keeps
      activations only from the lowest trained layer up);
    - what is left goes whole to the first free node after it in `nodes` (the run's stable order,
      wrapping; free: not already in this round, nor keeping its round for a block of its own);
    - with `split`, when no free node holds all that is left, each free node in turn takes the
      largest upper part of it that it holds;
    - what no node takes is skipped this round.
    """
    def fits(node: int, block: int, layers: tuple[int, ...]) -> bool:
        budget = budgets.get(node)
        return budget is None or need(block, layers) <= budget

    def upper_part(node: int, block: int, layers: tuple[int, ...]) -> int | None:
        """Where the largest upper part of `layers` that `node` holds starts (0: all of them)."""
        cuts = range(len(layers)) if split and len(layers) > 1 else range(1)  # the head block has no layers
        return next((i for i in cuts if fits(node, block, layers[i:])), None)

    # A scheduled node keeps its round for its own block where it holds all or part of it.
    reserved = {a.node_id for a in assignments if upper_part(a.node_id, a.block, block_layers[a.block]) is not None}
    taken = set(reserved)
    fitted: list[Assignment] = []
    moved: list[tuple[Assignment, int]] = []
    parts_of: list[tuple[Assignment, list[Assignment]]] = []
    skipped: list[Assignment] = []
    for a in assignments:
        whole = block_layers[a.block]
        cut = upper_part(a.node_id, a.block, whole) if a.node_id in reserved else None
        if cut == 0:
            fitted.append(a)
            continue
        parts = [] if cut is None else [Assignment(a.node_id, a.block, whole[cut:])]
        left = whole if cut is None else whole[:cut]
        start = nodes.index(a.node_id) if a.node_id in nodes else 0
        free = [n for n in nodes[start + 1:] + nodes[:start] if n not in taken]
        holder = next((n for n in free if fits(n, a.block, left)), None)
        done = False
        for node in [holder] if holder is not None else free if split else []:
            cut = upper_part(node, a.block, left)
            if cut is None:
                continue
            taken.add(node)
            parts.append(Assignment(node, a.block, None if left[cut:] == whole else left[cut:]))
            done, left = cut == 0, left[:cut]
            if done:
                break
        fitted.extend(parts)
        if not done:
            skipped.append(Assignment(a.node_id, a.block, None if left == whole else left))
        if len(parts) == 1 and parts[0].layers is None:
            moved.append((a, parts[0].node_id))
        elif parts:
            parts_of.append((a, parts))
    return MemoryFit(fitted, moved, parts_of, skipped)
