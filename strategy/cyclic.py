"""FedCyBGD as a Flower strategy: schedule, package, validate, merge, in that order.

The strategy holds the run's global state: the global `ArrayRecord` (updated in place, block by
block), each block's version, the stable node order, what every node holds (in its `Packager`),
and the statistics of each round.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from logging import INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from fedcybgd import protocol
from fedcybgd.blocks import Block, ModelLayout
from fedcybgd.config import CompressionConfig, DataConfig, TrainConfig
from fedcybgd.protocol import BLOCK, CONFIG, FROZEN, METRICS, TrainInstruction, VisitMetrics, record_bytes
from strategy import schedule
from strategy.packaging import Packager, VisitPlan
from strategy.validation import reply_problem


@dataclass
class RoundStats:
    """What happened in one round, as written to metrics.jsonl."""

    round: int
    assignments: list[dict] = field(default_factory=list)  # {node_id, block, visit, bytes_down, ...}
    rejected: list[dict] = field(default_factory=list)  # {node_id, reason}
    train_loss: float | None = None
    bytes_down: int = 0  # everything sent: block + frozen + config records, holdings queries
    bytes_down_block: int = 0
    bytes_down_frozen: int = 0
    bytes_up: int = 0
    samples_seen: int = 0
    client_seconds: float = 0.0
    client_peak_mem_bytes: int = 0
    round_seconds: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class _Visit:
    assignment: schedule.Assignment
    plan: VisitPlan
    entry: dict  # this visit's row in RoundStats.assignments


class CyclicBlockStrategy(Strategy):
    """One client per round trains one block of the global model; its reply overwrites it."""

    def __init__(
        self,
        layout: ModelLayout,
        *,
        model_name: str,
        model_spec: str,
        train: TrainConfig,
        data: DataConfig,
        compression: CompressionConfig,
        base_hashes: dict[str, str],
        allocation: str = "ascending",
        min_nodes: int = 1,
        round_timeout: float = 3600.0,
        seed: int = 0,
    ) -> None:
        self.blocks: list[Block] = list(layout.blocks)
        self.model_name = model_name
        self.model_spec = model_spec
        self.train = train
        self.data = data
        self.compression = compression
        self.base_hashes = base_hashes
        self.allocation = allocation
        self.min_nodes = min_nodes
        self.round_timeout = round_timeout
        self.seed = seed
        self.packager = Packager(layout, compression, seed)
        self.block_versions = [0] * len(self.blocks)
        self.node_order: list[int] = []
        self.visits: dict[int, int] = {}
        self.position = 0  # visits taken from the allocation order so far
        self.retry: list[int] = []  # blocks whose visit failed: handed to the next node first
        self.rounds: dict[int, RoundStats] = {}
        self._block_of = layout.block_of()
        self._global: ArrayRecord | None = None
        self._pending: dict[int, _Visit] = {}
        self._round_start = 0.0

    def summary(self) -> None:
        log(INFO, "\t├── FedCyBGD: %d blocks, allocation %s, min nodes %d",
            len(self.blocks), self.allocation, self.min_nodes)
        log(INFO, "\t├── compression %s", self.compression)
        log(INFO, "\t└── local steps %d, lr %g, batch %d", self.train.local_steps,
            self.train.lr, self.train.batch_size)

    def connected_nodes(self, grid: Grid) -> list[int]:
        """Connected nodes in a stable order: first come first, ties broken by id."""
        _, connected = sample_nodes(grid, self.min_nodes, 0)
        for node_id in sorted(connected):
            if node_id not in self.node_order:
                self.node_order.append(node_id)
        online = set(connected)
        return [n for n in self.node_order if n in online]

    def tensor_versions(self) -> dict[str, int]:
        """Current version of every tensor: its block's version; 0 for the frozen head."""
        assert self._global is not None
        return {name: self.block_versions[self._block_of[name]] if name in self._block_of else 0
                for name in self._global.keys()}

    # -- train ----------------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._round_start = time.perf_counter()
        self._global = arrays
        stats = self.rounds[server_round] = RoundStats(round=server_round)
        assignments = [schedule.Assignment(schedule.node_for_round(server_round, self.connected_nodes(grid)),
                                           self._next_block())]
        self._sync_holdings(grid, [a.node_id for a in assignments if not self.packager.knows(a.node_id)], stats)
        versions = self.tensor_versions()
        self._pending = {}
        messages = []
        for a in assignments:
            block = self.blocks[a.block]
            plan = self.packager.plan(a.node_id, block, versions, server_round)
            content = self.packager.content(arrays, plan, self._instruction(server_round, block, plan))
            self.visits[a.node_id] = self.visits.get(a.node_id, 0) + 1
            entry = {"node_id": a.node_id, "block": a.block, "visit": self.visits[a.node_id],
                     "bytes_down": record_bytes(content),
                     "bytes_down_block": content[BLOCK].count_bytes(),
                     "bytes_down_frozen": content[FROZEN].count_bytes(),
                     "dropped_layers": list(plan.dropped_layers)}
            stats.assignments.append(entry)
            stats.bytes_down += entry["bytes_down"]
            stats.bytes_down_block += entry["bytes_down_block"]
            stats.bytes_down_frozen += entry["bytes_down_frozen"]
            self._pending[a.node_id] = _Visit(a, plan, entry)
            messages.append(Message(content, dst_node_id=a.node_id, message_type=MessageType.TRAIN))
        return messages

    def _next_block(self) -> int:
        if self.retry:
            return self.retry.pop(0)
        block = schedule.block_at(self.position, len(self.blocks), self.allocation, self.seed)
        self.position += 1
        return block

    def _sync_holdings(self, grid: Grid, node_ids: list[int], stats: RoundStats) -> None:
        """Ask nodes whose cache state is unknown what they hold (first contact, after a failure)."""
        if not node_ids:
            return
        queries = [Message(protocol.holdings_query(self.base_hashes), dst_node_id=n,
                           message_type=MessageType.QUERY) for n in node_ids]
        stats.bytes_down += sum(record_bytes(q.content) for q in queries)
        answered = set()
        for reply in grid.send_and_receive(queries, timeout=self.round_timeout):
            node_id = reply.metadata.src_node_id
            if reply.has_error():
                log(WARNING, "Node %d did not say what it holds (%s): sending it everything",
                    node_id, reply.error.reason)
                continue
            stats.bytes_up += record_bytes(reply.content)
            self.packager.set_holdings(node_id, protocol.parse_holdings_reply(reply.content))
            answered.add(node_id)
        for node_id in set(node_ids) - answered:
            self.packager.set_holdings(node_id, [])

    def _instruction(self, server_round: int, block: Block, plan: VisitPlan) -> TrainInstruction:
        return TrainInstruction(
            round=server_round,
            block=block.index,
            block_version=self.block_versions[block.index],
            block_names=block.names,
            manifest=plan.manifest,
            dropped_layers=plan.dropped_layers,
            model_name=self.model_name,
            model_spec=self.model_spec,
            train=self.train,
            data=self.data,
            seed=self.seed * 1_000_003 + server_round,
        )

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        assert self._global is not None, "configure_train must run first"
        stats = self.rounds[server_round]
        losses: list[tuple[float, int]] = []
        for reply in replies:
            node_id = reply.metadata.src_node_id
            visit = self._pending.pop(node_id, None)
            if visit is None:
                self._reject(stats, node_id, "reply from a node with no assignment this round")
                continue
            if reply.has_content():
                visit.entry["bytes_up"] = record_bytes(reply.content)
                stats.bytes_up += visit.entry["bytes_up"]
            block = self.blocks[visit.assignment.block]
            expected = ArrayRecord({name: self._global[name] for name in block.names})
            problem = reply_problem(reply, expected, block.index, self.block_versions[block.index])
            if problem:
                self._reject(stats, node_id, problem, visit.assignment.block)
                continue
            self._merge(block, reply.content.array_records[BLOCK])
            self._confirm_cache(node_id, visit, block, str(reply.content[CONFIG]["cache-digest"]))
            metrics = VisitMetrics.from_record(reply.content.metric_records[METRICS])
            losses.append((metrics.train_loss, metrics.samples_seen))
            stats.samples_seen += metrics.samples_seen
            stats.client_seconds = max(stats.client_seconds, metrics.seconds)
            stats.client_peak_mem_bytes = max(stats.client_peak_mem_bytes, metrics.peak_mem_bytes)
            visit.entry["upload_keys"] = sorted(reply.content.array_records[BLOCK].keys())
        for node_id, visit in self._pending.items():
            self._reject(stats, node_id, "no reply within the round timeout", visit.assignment.block)
        self._pending = {}
        if losses:
            stats.train_loss = sum(l * n for l, n in losses) / sum(n for _, n in losses)
        stats.round_seconds = time.perf_counter() - self._round_start
        metrics = MetricRecord({"bytes-down": stats.bytes_down, "bytes-up": stats.bytes_up,
                                "accepted": len(losses), "rejected": len(stats.rejected)})
        if stats.train_loss is not None:
            metrics["train-loss"] = stats.train_loss
        return (self._global if losses else None), metrics

    def _merge(self, block: Block, uploaded: ArrayRecord) -> None:
        """Write the uploaded block into the global record in place and bump its version."""
        assert self._global is not None
        for name in block.names:
            self._global[name] = uploaded[name]
        self.block_versions[block.index] += 1

    def _confirm_cache(self, node_id: int, visit: _Visit, block: Block, reported: str) -> None:
        expected = self.packager.confirm(node_id, visit.plan, block, self.block_versions[block.index])
        if reported != expected:
            log(WARNING, "Node %d cache digest %s != expected %s: asking it what it holds next time",
                node_id, reported, expected)
            self.packager.forget(node_id)

    def _reject(self, stats: RoundStats, node_id: int, reason: str, block: int | None = None) -> None:
        """Log and record a failed visit; its block goes back to the queue for the next node."""
        log(WARNING, "Round %d: rejected reply from node %d: %s", stats.round, node_id, reason)
        stats.rejected.append({"node_id": node_id, "reason": reason})
        self.packager.forget(node_id)  # its cache may not be what we think: ask next time
        if block is not None:
            self.retry.append(block)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return []  # held-out evaluation runs on the server, on the uncompressed global model

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None
