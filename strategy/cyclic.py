"""FedCyBGD as a Flower strategy: schedule, package, validate, merge, in that order.

The strategy holds the run's global state: the global `ArrayRecord` (updated in place, block by
block), each block's version, the stable node order, and the statistics of each round.
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

from fedcybgd.blocks import Block
from fedcybgd.config import DataConfig, TrainConfig
from fedcybgd.protocol import BLOCK, METRICS, TrainInstruction, VisitMetrics, record_bytes
from strategy import packaging, schedule
from strategy.validation import reply_problem


@dataclass
class RoundStats:
    """What happened in one round, as written to metrics.jsonl."""

    round: int
    assignments: list[dict] = field(default_factory=list)  # {node_id, block, bytes_down, ...}
    rejected: list[dict] = field(default_factory=list)  # {node_id, reason}
    train_loss: float | None = None
    bytes_down: int = 0
    bytes_up: int = 0
    samples_seen: int = 0
    client_seconds: float = 0.0
    client_peak_mem_bytes: int = 0
    round_seconds: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


class CyclicBlockStrategy(Strategy):
    """One client per round trains one block of the global model; its reply overwrites it."""

    def __init__(
        self,
        blocks: list[Block],
        *,
        model_name: str,
        model_spec: str,
        train: TrainConfig,
        data: DataConfig,
        allocation: str = "ascending",
        min_nodes: int = 1,
        seed: int = 0,
    ) -> None:
        self.blocks = blocks
        self.model_name = model_name
        self.model_spec = model_spec
        self.train = train
        self.data = data
        self.allocation = allocation
        self.min_nodes = min_nodes
        self.seed = seed
        self.block_versions = [0] * len(blocks)
        self.node_order: list[int] = []
        self.rounds: dict[int, RoundStats] = {}
        self._global: ArrayRecord | None = None
        self._pending: dict[int, schedule.Assignment] = {}
        self._round_start = 0.0

    def summary(self) -> None:
        log(INFO, "\t├── FedCyBGD: %d blocks, allocation %s, min nodes %d",
            len(self.blocks), self.allocation, self.min_nodes)
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

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._round_start = time.perf_counter()
        self._global = arrays
        stats = self.rounds[server_round] = RoundStats(round=server_round)
        assignments = schedule.assign(
            server_round, self.connected_nodes(grid), len(self.blocks), self.allocation, self.seed
        )
        self._pending = {}
        messages = []
        for a in assignments:
            block = self.blocks[a.block]
            content = packaging.train_content(arrays, block, self._instruction(server_round, block))
            down = record_bytes(content)
            stats.bytes_down += down
            stats.assignments.append({"node_id": a.node_id, "block": a.block, "bytes_down": down})
            self._pending[a.node_id] = a
            messages.append(Message(content, dst_node_id=a.node_id, message_type=MessageType.TRAIN))
        return messages

    def _instruction(self, server_round: int, block: Block) -> TrainInstruction:
        return TrainInstruction(
            round=server_round,
            block=block.index,
            block_version=self.block_versions[block.index],
            block_names=block.names,
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
        merged = False
        for reply in replies:
            node_id = reply.metadata.src_node_id
            assignment = self._pending.pop(node_id, None)
            if assignment is None:
                self._reject(stats, node_id, "reply from a node with no assignment this round")
                continue
            if reply.has_content():
                stats.bytes_up += record_bytes(reply.content)
            block = self.blocks[assignment.block]
            expected = ArrayRecord({name: self._global[name] for name in block.names})
            problem = reply_problem(reply, expected, block.index, self.block_versions[block.index])
            if problem:
                self._reject(stats, node_id, problem)
                continue
            self._merge(block, reply.content.array_records[BLOCK])
            merged = True
            metrics = VisitMetrics.from_record(reply.content.metric_records[METRICS])
            losses.append((metrics.train_loss, metrics.samples_seen))
            stats.samples_seen += metrics.samples_seen
            stats.client_seconds = max(stats.client_seconds, metrics.seconds)
            stats.client_peak_mem_bytes = max(stats.client_peak_mem_bytes, metrics.peak_mem_bytes)
            for entry in stats.assignments:
                if entry["node_id"] == node_id:
                    entry.update(bytes_up=record_bytes(reply.content),
                                 upload_keys=sorted(reply.content.array_records[BLOCK].keys()))
        for node_id in self._pending:
            self._reject(stats, node_id, "no reply within the round timeout")
        self._pending = {}
        if losses:
            stats.train_loss = sum(l * n for l, n in losses) / sum(n for _, n in losses)
        stats.round_seconds = time.perf_counter() - self._round_start
        metrics = MetricRecord({"bytes-down": stats.bytes_down, "bytes-up": stats.bytes_up,
                                "accepted": len(losses), "rejected": len(stats.rejected)})
        if stats.train_loss is not None:
            metrics["train-loss"] = stats.train_loss
        return (self._global if merged else None), metrics

    def _merge(self, block: Block, uploaded: ArrayRecord) -> None:
        """Write the uploaded block into the global record in place and bump its version."""
        assert self._global is not None
        for name in block.names:
            self._global[name] = uploaded[name]
        self.block_versions[block.index] += 1

    @staticmethod
    def _reject(stats: RoundStats, node_id: int, reason: str) -> None:
        log(WARNING, "Round %d: rejected reply from node %d: %s", stats.round, node_id, reason)
        stats.rejected.append({"node_id": node_id, "reason": reason})

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return []  # held-out evaluation runs on the server, on the uncompressed global model

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None
