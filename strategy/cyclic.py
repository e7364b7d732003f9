"""The block strategy family as one Flower strategy: schedule, package, validate, merge.

FedCyBGD and its baselines differ only in their `Algorithm` (strategy/algorithms.py): how many
blocks a round trains, what its clients train and upload, and how the uploads merge.

The strategy holds the run's global state: the global `ArrayRecord` (updated in place, block by
block), each block's version, the node order by stable key (strategy/state.py checkpoints it),
what every node holds (in its `Packager`), and the statistics of each round.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from logging import INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from fedcybgd import memory_estimate, protocol
from fedcybgd.blocks import Block
from fedcybgd.client_cache import Holding
from fedcybgd.config import AlgorithmConfig, CompressionConfig, DataConfig, EvalConfig, TrainConfig
from fedcybgd.protocol import (BLOCK, CONFIG, FROZEN, METRICS, EvalInstruction, HoldingsReply,
                               TrainInstruction, VisitMetrics, record_bytes)
from fedcybgd.records import (FailedNodeEval, NodeEvalResult, NodeEvaluation, RejectedVisit, RoundRecord, RoundStats,
                              VisitRecord)
from strategy import schedule
from strategy.algorithms import Algorithm
from strategy.packaging import Packager, VisitPlan
from strategy.state import RunState
from strategy.validation import Rejection, UploadRules, read_evaluation, reply_problem


@dataclass(frozen=True)
class _Visit:
    assignment: schedule.Assignment
    block: Block  # what it trains: the assigned block, or the part of it a memory budget holds
    plan: VisitPlan
    record: VisitRecord  # this visit's row in RoundStats.assignments, filled in as it goes
    # The instruction sent; the Grid gives it its message id when it pushes it, and every reply,
    # the node's or Flower's own error for it (from the SuperLink, node 1), names that id.
    message: Message


@dataclass(frozen=True)
class _NodeEval:
    node_id: int
    plan: VisitPlan
    bytes_down: int
    message: Message


@dataclass(frozen=True)
class _Upload:
    visit: _Visit
    arrays: ArrayRecord
    metrics: VisitMetrics
    cache_digest: str


class CyclicBlockStrategy(Strategy):
    """Each round, the algorithm's clients train blocks of the global model; replies merge in."""

    def __init__(
        self,
        algorithm: Algorithm,
        *,
        model_name: str,
        model_spec: str,
        train: TrainConfig,
        data: DataConfig,
        compression: CompressionConfig,
        base_hashes: dict[str, str],
        algorithm_config: AlgorithmConfig | None = None,
        evaluation: EvalConfig | None = None,
        seed: int = 0,
    ) -> None:
        """`algorithm_config`: the run's `algorithm` settings (allocation, pairing, nodes,
        timeout, upload limits); `algorithm` (built from them) is what trains and merges."""
        algorithm_config = algorithm_config or AlgorithmConfig()
        layout = algorithm.layout
        self.blocks: list[Block] = list(layout.blocks)
        self.algorithm = algorithm
        self.model_name = model_name
        self.model_spec = model_spec
        self.train = train
        self.data = data
        self.compression = compression
        self.base_hashes = base_hashes
        self.allocation = algorithm_config.allocation
        self.pairing = algorithm_config.pairing
        self.min_nodes = algorithm_config.nodes_needed  # at least clients_per_round
        self.round_timeout = algorithm_config.round_timeout
        self.max_upload_ratio = algorithm_config.max_upload_ratio
        self.max_norm_ratio = algorithm_config.max_norm_ratio
        self.seed = seed
        self.evaluation = evaluation or EvalConfig()
        # Whether evaluation rounds also run on the nodes: the server sets it once it has
        # resolved `eval.where` against the connected nodes (`nodes_with_data`).
        self.evaluate_on_nodes = False
        self.node_evals: dict[int, NodeEvaluation] = {}
        self.packager = Packager(layout, compression, seed)
        # A block's version: the round of its last accepted upload (0: not trained yet).
        self.block_versions = [0] * len(self.blocks)
        # Nodes are ordered by a key they report (partition, declared node-name), never by
        # Flower's random node ids, so a seed reproduces a run and a resumed run maps its nodes.
        self.node_order: list[str] = []
        self.node_keys: dict[int, str] = {}  # Flower node id -> stable key, this session
        self.has_data: dict[str, bool] = {}  # by node key: whether it has a data-path of its own
        self.memory_budgets: dict[str, int | None] = {}  # by node key: bytes a visit may use
        # Estimated peak of a visit by (block, its layers trained), for memory budgets (on demand),
        # without and with gradient checkpointing.
        self._visit_needs: dict[bool, dict[tuple[int, tuple[int, ...]], int]] = {}
        self.visits: dict[str, int] = {}  # by node key
        self.cache_id = secrets.token_hex(8)  # names the nodes' caches; kept across a resume
        self.completed_round = 0
        self.position = 0  # blocks taken from the allocation order so far
        # Blocks to assign before the allocation order: those whose visits all failed, and those
        # deferred because a round had already drawn them.
        self.retry: list[int] = []
        self.rounds: dict[int, RoundStats] = {}
        self._block_of = layout.block_of()
        self._layer_prefix = layout.layer_prefix
        self._global: ArrayRecord | None = None
        self._pending: dict[int, _Visit] = {}
        self._pending_eval: dict[int, _NodeEval] = {}  # by node id
        self._num_rounds = 0
        self._round_start = 0.0
        self._round_offset = 0  # rounds done before this session's `start` (a resumed run)

    def summary(self) -> None:
        log(INFO, "\t├── %s: %d blocks, %d client(s) per round, allocation %s, pairing %s, min nodes %d",
            self.algorithm.name, len(self.blocks), self.algorithm.clients_per_round,
            self.allocation, self.pairing, self.min_nodes)
        log(INFO, "\t├── compression %s", self.compression)
        log(INFO, "\t└── local work %s, lr %g %s, batch %d",
            f"{self.train.local_steps} steps" if self.train.local_steps else f"{self.train.local_epochs} epochs",
            self.train.lr, self.train.lr_schedule, self.train.batch_size)

    def connected_nodes(self, grid: Grid) -> list[int]:
        """Connected nodes in a stable order: first come first, ties by key (not by node id).

        Waits (up to the round timeout) until `min_nodes` are connected, then fails naming the
        shortfall, instead of waiting forever for nodes that will never come (a simulation with
        fewer SuperNodes than the round needs).
        """
        deadline = time.monotonic() + self.round_timeout
        reported = -1
        while len(connected := list(grid.get_node_ids())) < self.min_nodes:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(connected)} node(s) connected after {self.round_timeout:.0f} s; "
                                   f"this run needs {self.min_nodes} (algorithm.min_nodes, clients_per_round)")
            if len(connected) != reported:
                log(INFO, "Waiting for nodes: %d connected, %d needed", len(connected), self.min_nodes)
                reported = len(connected)
            time.sleep(1)
        return self._identify(grid, connected)

    def _identify(self, grid: Grid, connected: list[int]) -> list[int]:
        """`connected` nodes that said who they are (new ones are asked), in the run's node order."""
        self._sync_holdings(grid, [n for n in connected if n not in self.node_keys], None)
        new_keys = {self.node_keys[n] for n in connected if n in self.node_keys} - set(self.node_order)
        self.node_order.extend(sorted(new_keys, key=protocol.node_order_key))
        node_of_key = {}
        for node_id in sorted(connected):
            key = self.node_keys.get(node_id)
            if key is None:
                continue  # did not say who it is: asked again next round
            if key in node_of_key:
                log(WARNING, "Nodes %d and %d both report key %r: using %d; give each node its own "
                    "node-name", node_of_key[key], node_id, key, node_id)
            node_of_key[key] = node_id
        return [node_of_key[k] for k in self.node_order if k in node_of_key]

    def nodes_with_data(self, node_ids: list[int]) -> list[bool]:
        """For each node, whether it said it has a data file of its own."""
        return [self.has_data.get(self.node_keys.get(n, ""), False) for n in node_ids]

    def tensor_versions(self) -> dict[str, int]:
        """Current version of every tensor: its block's version; 0 for what never trains."""
        assert self._global is not None
        return {name: self.block_versions[self._block_of[name]] if name in self._block_of else 0
                for name in self._global.keys()}

    # -- train ----------------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        server_round += self._round_offset
        self._round_start = time.perf_counter()
        self._global = arrays
        stats = self.rounds[server_round] = RoundStats(round=server_round)
        connected = self.connected_nodes(grid)
        assignments = self._assign(server_round, connected)
        self._sync_holdings(grid, [a.node_id for a in assignments if not self.packager.knows(a.node_id)], stats)
        versions = self.tensor_versions()
        self.packager.evict(versions, connected)
        self._pending = {}
        messages = []
        for a in assignments:
            block = self._trained_block(a)
            key = self.node_keys[a.node_id]
            plan = self.packager.plan(a.node_id, block, versions, server_round, node_key=key)
            train = self._train_settings(a)
            if train is not self.train:
                log(INFO, "Node %s (%s) trains block %d%s with gradient checkpointing (about %.2f GB; "
                    "%.2f GB without)", key, self._budget_text(a.node_id), a.block,
                    "" if a.layers is None else f" (layers {_span(a.layers)})",
                    self.visit_needs(checkpointing=True)[a.block, block.layers] / 1e9,
                    self.visit_needs(checkpointing=False)[a.block, block.layers] / 1e9)
            content = self.packager.content(arrays, plan, self._instruction(server_round, block, plan, train))
            self.visits[key] = self.visits.get(key, 0) + 1
            record = VisitRecord(node_id=a.node_id, node_key=key, block=a.block,
                                 layers=None if a.layers is None else list(a.layers), visit=self.visits[key],
                                 bytes_down=record_bytes(content), bytes_down_block=content[BLOCK].count_bytes(),
                                 bytes_down_frozen=content[FROZEN].count_bytes(),
                                 dropped_layers=list(plan.dropped_layers), checkpointing=train.gradient_checkpointing)
            stats.assignments.append(record)
            stats.bytes_down += record.bytes_down
            stats.bytes_down_block += record.bytes_down_block
            stats.bytes_down_frozen += record.bytes_down_frozen
            message = Message(content, dst_node_id=a.node_id, message_type=MessageType.TRAIN)
            self._pending[a.node_id] = _Visit(a, block, plan, record, message)
            messages.append(message)
        return messages

    def _assign(self, server_round: int, nodes: list[int]) -> list[schedule.Assignment]:
        """This round's (node, block) pairs: K nodes in turn, sharing the round's blocks evenly
        (one block each, or all on one block)."""
        k, per_round = self.algorithm.clients_per_round, self.algorithm.blocks_per_round
        chosen = schedule.nodes_for_round(server_round, nodes, k, pairing=self.pairing, num_blocks=len(self.blocks),
                                          blocks_per_round=per_round)
        blocks = self._next_blocks(per_round)
        return self._fit_memory([schedule.Assignment(n, blocks[i * per_round // k]) for i, n in enumerate(chosen)],
                                nodes)

    def _trained_block(self, a: schedule.Assignment) -> Block:
        block = self.blocks[a.block]
        return block if a.layers is None else block.part(a.layers, self._layer_prefix)

    def _fit_memory(self, assignments: list[schedule.Assignment], nodes: list[int]) -> list[schedule.Assignment]:
        """`assignments` after the nodes' declared memory budgets: a block moves to a node that
        holds it, or (algorithms whose blocks split) is shared between nodes that each hold part."""
        budgets = {n: self.memory_budgets.get(self.node_keys.get(n, "")) for n in nodes}
        # What a visit needs at the least: with checkpointing where a visit may turn it on.
        checkpointing = self.train.gradient_checkpointing or self.train.checkpoint_to_fit
        if all(b is None for b in budgets.values()) or not (needs := self.visit_needs(checkpointing)):
            return assignments
        fit = schedule.fit_memory(assignments, nodes, budgets, [b.layers for b in self.blocks],
                                  lambda block, layers: needs[block, layers], self.algorithm.splits_blocks)
        for scheduled, node in fit.moved:
            log(INFO, "Node %s (%s) cannot hold block %d (about %.2f GB): node %s trains it",
                self.node_keys[scheduled.node_id], self._budget_text(scheduled.node_id), scheduled.block,
                needs[scheduled.block, self.blocks[scheduled.block].layers] / 1e9, self.node_keys[node])
        for scheduled, parts in fit.split:
            log(INFO, "Node %s (%s) cannot hold block %d (about %.2f GB): %s", self.node_keys[scheduled.node_id],
                self._budget_text(scheduled.node_id), scheduled.block,
                needs[scheduled.block, self.blocks[scheduled.block].layers] / 1e9,
                ", ".join(f"node {self.node_keys[p.node_id]} trains layers {_span(p.layers)} "
                          f"(about {needs[p.block, p.layers] / 1e9:.2f} GB)" for p in parts))
        for skipped in fit.skipped:
            layers = self._trained_block(skipped).layers
            log(WARNING, "Block %d%s needs about %.2f GB and no connected node free this round declares that much "
                "memory (node config memory-budget-mb): skipped this round", skipped.block,
                "" if skipped.layers is None else f" (layers {_span(skipped.layers)})", needs[skipped.block, layers] / 1e9)
        return fit.assignments

    def _budget_text(self, node_id: int) -> str:
        """A node's declared budget, as the placement logs give it."""
        budget = self.memory_budgets.get(self.node_keys.get(node_id, ""))
        return "no limit" if budget is None else f"memory budget {budget / 1e9:.2f} GB"

    def visit_needs(self, checkpointing: bool | None = None) -> dict[tuple[int, tuple[int, ...]], int]:
        """The estimated visit peak in bytes (fedcybgd/memory_estimate.py) by (block, the decoder
        layers trained): every block whole and, where blocks split, every run of its layers; for
        the clients' batch, sequence length and frozen form, with gradient checkpointing or not
        (None: as `train.gradient_checkpointing` says). Empty where the model has no estimate."""
        checkpointing = self.train.gradient_checkpointing if checkpointing is None else checkpointing
        if checkpointing not in self._visit_needs:
            parts = list(self.blocks) + [
                b.part(b.layers[i:j], self._layer_prefix) for b in self.blocks if self.algorithm.splits_blocks
                for i in range(len(b.layers)) for j in range(i + 1, len(b.layers) + 1) if j - i < len(b.layers)]
            try:
                peaks = memory_estimate.visit_peaks(
                    json.loads(self.model_spec), [(b.names, b.layers) for b in parts],
                    "bfloat16" if self.train.precision == "bf16" else "float32", self.train.batch_size,
                    self.train.max_seq_len, memory_estimate.held_form(self.train.frozen_weights,
                                                                      self.compression.quantize),
                    checkpointing)
                needs = {(b.index, b.layers): peak for b, peak in zip(parts, peaks)}
                whole = [needs[b.index, b.layers] for b in self.blocks]
                log(INFO, "Estimated visit memory%s: %.2f to %.2f GB by block",
                    " with gradient checkpointing" if checkpointing else "", min(whole) / 1e9, max(whole) / 1e9)
            except memory_estimate.UnsupportedArchitectureError as err:
                log(WARNING, "Node memory budgets are ignored: %s", err)
                needs = {}
            self._visit_needs[checkpointing] = needs
        return self._visit_needs[checkpointing]

    def _next_blocks(self, count: int) -> list[int]:
        """The next `count` distinct blocks: failed ones first, then the allocation order.

        A block drawn twice (a retry still due, or a cycle boundary under `random`) waits for
        the next round, so a round never assigns one block to two groups.
        """
        chosen: list[int] = []
        later: list[int] = []
        while len(chosen) < count:
            if self.retry:
                block = self.retry.pop(0)
            else:
                block = schedule.block_at(self.position, len(self.blocks), self.allocation, self.seed)
                self.position += 1
            (later if block in chosen else chosen).append(block)
        self.retry[:0] = later
        return chosen

    def _sync_holdings(self, grid: Grid, node_ids: list[int], stats: RoundStats | None) -> None:
        """Ask nodes what they hold and who they are (first contact, after a failure, on resume).

        A holding newer than the last completed round is an upload the server never accepted
        (kept by the node in a round a crash cut short and a resume runs again): not counted.
        """
        if not node_ids:
            return
        query = protocol.HoldingsQuery(self.base_hashes, self.cache_id, self.data, self.model_name,
                                       self.train.max_seq_len)
        queries = [Message(query.to_content(), dst_node_id=n, message_type=MessageType.QUERY) for n in node_ids]
        if stats is not None:
            stats.bytes_down += sum(record_bytes(q.content) for q in queries)
        answered = set()
        replies = list(grid.send_and_receive(queries, timeout=self.round_timeout))
        asked = {q.metadata.message_id: q.metadata.dst_node_id for q in queries}
        for reply in replies:
            node_id = asked.get(reply.metadata.reply_to_message_id)
            if node_id is None:
                continue  # answers no query of ours
            if reply.has_error():
                log(WARNING, "Node %d did not say what it holds (%s): sending it everything",
                    node_id, reply.error.reason)
                continue
            if stats is not None:
                stats.bytes_up += record_bytes(reply.content)
            answer = HoldingsReply.from_content(reply.content)
            key = answer.node_key
            if key.startswith(protocol.FALLBACK_KEY_PREFIX) and node_id not in self.node_keys:
                log(WARNING, "Node %d declares no node-name (node config): ordered by its node id, "
                    "so a restart or resume may pair it with other blocks", node_id)
            self.node_keys[node_id] = key
            self.has_data[key] = answer.has_data
            self.memory_budgets[key] = answer.memory_budget
            self.packager.set_holdings(node_id, [h for h in answer.holdings if h.version <= self.completed_round])
            answered.add(node_id)
        for node_id in set(node_ids) - answered:
            self.packager.set_holdings(node_id, [])

    def _train_settings(self, a: schedule.Assignment) -> TrainConfig:
        """The run's training settings, with gradient checkpointing for a visit whose node's
        budget holds it only so (`train.checkpoint_to_fit`; see `_fit_memory`)."""
        if self.train.gradient_checkpointing or not self.train.checkpoint_to_fit:
            return self.train
        budget = self.memory_budgets.get(self.node_keys.get(a.node_id, ""))
        plain = self.visit_needs(checkpointing=False)
        if budget is None or not plain or plain[a.block, self._trained_block(a).layers] <= budget:
            return self.train
        return replace(self.train, gradient_checkpointing=True)

    def _instruction(self, server_round: int, block: Block, plan: VisitPlan, train: TrainConfig) -> TrainInstruction:
        return TrainInstruction(
            round=server_round,
            block=block.index,
            block_version=self.block_versions[block.index],
            upload_version=server_round,
            block_names=block.names,
            manifest=plan.manifest,
            dropped_layers=plan.dropped_layers,
            model_name=self.model_name,
            model_spec=self.model_spec,
            train=train,
            data=self.data,
            seed=self.seed * 1_000_003 + server_round,
            lora=self.algorithm.lora,
            lora_modules=self.algorithm.adapted_modules(block),
            keep_upload=self.algorithm.keeps_upload,
            cache_id=self.cache_id,
        )

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        assert self._global is not None, "configure_train must run first"
        server_round += self._round_offset
        stats = self.rounds[server_round]
        accepted: dict[Block, list[_Upload]] = {}  # by what the visit trained
        # Match each reply to the visit whose message it answers, not to its source node: Flower's
        # error for an unreachable node comes from the SuperLink (node 1), not from the node.
        waiting = {v.message.metadata.message_id: v for v in self._pending.values()}
        for reply in replies:
            visit = waiting.pop(reply.metadata.reply_to_message_id, None)
            if visit is None:
                self._reject(stats, reply.metadata.src_node_id, Rejection(
                    "unmatched-reply", "reply to no message of this round (late, duplicate or forged)"))
                continue
            node_id = visit.assignment.node_id
            if not reply.has_error():  # an error reply has no content; reply_problem names the error
                visit.record.bytes_up = record_bytes(reply.content)
                stats.bytes_up += visit.record.bytes_up
            block = visit.block
            problem = reply_problem(reply, self._upload_rules(block))
            if problem:
                self._reject(stats, node_id, problem)
                continue
            metrics = VisitMetrics.from_record(reply.content.metric_records[METRICS])
            visit.record.upload_keys = sorted(reply.content.array_records[BLOCK].keys())
            visit.record.peak_mem_bytes = metrics.peak_mem_bytes
            visit.record.process_peak_bytes = metrics.process_peak_bytes
            accepted.setdefault(block, []).append(_Upload(
                visit, reply.content.array_records[BLOCK], metrics, str(reply.content[CONFIG]["cache-digest"])))
        for visit in waiting.values():
            self._reject(stats, visit.assignment.node_id, Rejection(
                "timeout", f"no reply within the round timeout ({self.round_timeout:g} s)"))
        self._discard_incomplete_splits(stats, accepted, list(self._pending.values()))
        self._pending = {}
        assigned = {a.block for a in stats.assignments}
        self.retry.extend(sorted(assigned - {block.index for block in accepted}))

        uploads = [u for group in accepted.values() for u in group]
        for block, group in accepted.items():
            self._merge(server_round, block, group)
        for u in uploads:
            stats.samples_seen += u.metrics.samples_seen
            stats.client_seconds = max(stats.client_seconds, u.metrics.seconds)
            stats.client_peak_mem_bytes = max(stats.client_peak_mem_bytes, u.metrics.peak_mem_bytes)
        if uploads:
            stats.train_loss = (sum(u.metrics.train_loss * u.metrics.samples_seen for u in uploads)
                                / sum(u.metrics.samples_seen for u in uploads))
        stats.round_seconds = time.perf_counter() - self._round_start
        metrics = MetricRecord({"bytes-down": stats.bytes_down, "bytes-up": stats.bytes_up,
                                "accepted": len(uploads), "rejected": len(stats.rejected)})
        if stats.train_loss is not None:
            metrics["train-loss"] = stats.train_loss
        self.completed_round = server_round
        return (self._global if uploads else None), metrics

    def _discard_incomplete_splits(self, stats: RoundStats, accepted: dict[Block, list[_Upload]],
                                   visits: list[_Visit]) -> None:
        """Take out of `accepted` the parts of a block shared out by layers (memory budgets) whose
        other parts did not all come back: the block merges whole or not at all, and is retried.

        Its parts share one upload version; merging some would make that the block's version,
        and a node that kept its refused part would then hold "the current version" of it.
        """
        delivered = {id(u.visit) for group in accepted.values() for u in group}
        incomplete = {v.assignment.block for v in visits if v.assignment.layers is not None and id(v) not in delivered}
        for index in sorted(incomplete):
            log(WARNING, "Round %d: block %d was shared out by layers and not every part came back: "
                "none is merged, the block is trained again", stats.round, index)
        for block in [b for b in accepted if b.index in incomplete]:
            for upload in accepted.pop(block):  # the node kept it: record that, at its own version
                self._confirm_cache(upload, block, stats.round)

    def _upload_rules(self, block: Block) -> UploadRules:
        """What this round accepts for `block`: see strategy/validation.py."""
        assert self._global is not None
        return UploadRules(
            expected=self.algorithm.upload_template(block, self._global), block=block.index,
            block_version=self.block_versions[block.index], owner=self._block_of,
            max_upload_ratio=self.max_upload_ratio, max_norm_ratio=self.max_norm_ratio,
            current=self.algorithm.replaced(block, self._global))

    def _merge(self, server_round: int, block: Block, group: list[_Upload]) -> None:
        """Fold a block's accepted uploads into the global record in place; its version is now the round."""
        assert self._global is not None
        new = self.algorithm.merge(block, self._global, [u.arrays for u in group],
                                   [u.metrics.num_examples for u in group])
        for name in block.names:
            self._global[name] = new[name]
        self.block_versions[block.index] = server_round  # unique per upload: see TrainInstruction
        for upload in group:
            self._confirm_cache(upload, block, server_round)

    def _confirm_cache(self, upload: _Upload, block: Block, server_round: int) -> None:
        """Check the node's cache digest; under an algorithm whose nodes keep their upload, as
        this round's version of the block."""
        kept_version = server_round if self.algorithm.keeps_upload else None
        upload.visit.record.cache_confirmed = self._confirm_holdings(
            upload.visit.assignment.node_id, upload.visit.plan.manifest, upload.cache_digest, block.names, kept_version)

    def _confirm_holdings(self, node_id: int, manifest: tuple[Holding, ...], reported: str, kept: tuple[str, ...] = (),
                          kept_version: int | None = None) -> bool:
        """Record what a node now holds (`Packager.confirm`); a digest other than the one that
        implies means its cache is not what we think, so it is asked before its next visit."""
        expected = self.packager.confirm(node_id, manifest, kept, kept_version)
        if reported != expected:
            log(WARNING, "Node %d cache digest %s != expected %s: asking it what it holds next time",
                node_id, reported, expected)
            self.packager.forget(node_id)
        return reported == expected

    def _reject(self, stats: RoundStats, node_id: int, rejection: Rejection) -> None:
        """Log and record a failed visit (`aggregate_train` re-queues blocks nobody delivered)."""
        log(WARNING, "Round %d: rejected the visit of node %d: %s", stats.round, node_id, rejection)
        stats.rejected.append(RejectedVisit(node_id=node_id, kind=rejection.kind, reason=rejection.reason))
        self.packager.forget(node_id)  # its cache may not be what we think: ask next time

    # -- run state: resume and checkpoint --------------------------------------------------
    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, timeout: float = 3600,
              train_config: ConfigRecord | None = None, evaluate_config: ConfigRecord | None = None,
              evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None) -> Result:
        """Flower's round loop over the rounds not yet completed (all of them, unless `restore`d).

        Flower counts this session's rounds from 1; the strategy and `evaluate_fn` see the
        run's true round numbers. A resumed run does not evaluate round 0 again. Round 0 is
        evaluated on the nodes here: Flower's loop asks them only after each round.
        """
        offset = self._round_offset = self.completed_round
        self._num_rounds = num_rounds
        self._global = initial_arrays
        if self.evaluate_on_nodes and not offset:
            messages = list(self.configure_evaluate(0, initial_arrays, ConfigRecord(), grid))
            self.aggregate_evaluate(0, grid.send_and_receive(messages, timeout=timeout))

        def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            if server_round == 0 and offset:
                return None
            assert evaluate_fn is not None
            return evaluate_fn(server_round + offset, arrays)

        return super().start(grid, initial_arrays, num_rounds - offset, timeout, train_config,
                             evaluate_config, evaluate if evaluate_fn else None)

    def state(self, *, identity: dict[str, object], rows: list[RoundRecord], evals: dict[int, float],
              task_scores: dict[int, float], rng: dict[str, object]) -> RunState:
        """A snapshot after the last completed round. The arrays are copied by reference: a merge
        replaces a record's `Array`s, never changes one, so later rounds leave the snapshot as is."""
        assert self._global is not None, "start must run first"
        return RunState(
            identity=identity, cache_id=self.cache_id, completed_round=self.completed_round,
            arrays=dict(self._global.items()), block_versions=list(self.block_versions),
            position=self.position, retry=list(self.retry), node_order=list(self.node_order),
            visits=dict(self.visits), rows=list(rows), evals=dict(evals), rng=rng,
            task_scores=dict(task_scores), node_evals=dict(self.node_evals),
        )

    def restore(self, state: RunState) -> ArrayRecord:
        """Continue from `state`; returns the global model to `start` from."""
        if len(state.block_versions) != len(self.blocks):
            raise ValueError(f"the checkpoint has {len(state.block_versions)} blocks, the model {len(self.blocks)}")
        self.cache_id = state.cache_id
        self.completed_round = state.completed_round
        self.block_versions = list(state.block_versions)
        self.position = state.position
        self.retry = list(state.retry)
        self.node_order = list(state.node_order)
        self.visits = dict(state.visits)
        self.node_evals = dict(state.node_evals)
        return ArrayRecord(dict(state.arrays))

    # -- evaluation on the nodes (eval.where nodes or both) -----------------------------------
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """In an evaluation round, ask every connected node to evaluate the global model on its
        own held-out data; each is sent only what its cache lacks of the model to evaluate."""
        server_round += self._round_offset
        if not self.evaluate_on_nodes or not self.evaluation.due(server_round, self._num_rounds):
            return []
        self._global = arrays
        exact = self.evaluation.node_model == "exact"
        evaluation = self.node_evals[server_round] = NodeEvaluation(
            round=server_round, model="exact" if exact else "compressed (approximation)")
        nodes = self._identify(grid, list(grid.get_node_ids()))
        self._sync_holdings(grid, [n for n in nodes if not self.packager.knows(n)], None)
        versions = self.tensor_versions()
        self.packager.evict(versions, nodes)
        self._pending_eval = {}
        messages = []
        for node_id in nodes:
            plan = self.packager.plan_evaluation(node_id, versions, exact)
            instruction = EvalInstruction(
                round=server_round, manifest=plan.manifest, model_name=self.model_name,
                model_spec=self.model_spec, data=self.data, eval=self.evaluation,
                max_seq_len=self.train.max_seq_len, lora=self.algorithm.lora, cache_id=self.cache_id,
                approximate=not exact)
            content = self.packager.content(arrays, plan, instruction)
            bytes_down = record_bytes(content)
            evaluation.bytes_down += bytes_down
            message = Message(content, dst_node_id=node_id, message_type=MessageType.EVALUATE)
            messages.append(message)
            self._pending_eval[node_id] = _NodeEval(node_id, plan, bytes_down, message)
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """The nodes' results, weighted by their examples; a node that failed is left out."""
        server_round += self._round_offset
        evaluation = self.node_evals.get(server_round)
        if evaluation is None:
            return None
        waiting = {e.message.metadata.message_id: e for e in self._pending_eval.values()}
        for reply in replies:
            pending = waiting.pop(reply.metadata.reply_to_message_id, None)
            if pending is None:
                continue  # answers no evaluation of this round (late or duplicate)
            answer = read_evaluation(reply)
            if isinstance(answer, Rejection):
                self._eval_failed(evaluation, pending.node_id, answer)
                continue
            result, echo = answer
            node = NodeEvalResult(
                node_id=pending.node_id, node_key=self.node_keys[pending.node_id], bytes_down=pending.bytes_down,
                eval_loss=result.eval_loss, num_examples=result.num_examples,
                task_score=result.task_score if result.task_examples else None,
                task_examples=result.task_examples, bytes_up=record_bytes(reply.content), seconds=result.seconds)
            evaluation.bytes_up += node.bytes_up
            evaluation.nodes.append(node)
            if result.task_examples:
                evaluation.task_metric = str(echo["task-metric"])
            self._confirm_holdings(pending.node_id, pending.plan.manifest, str(echo["cache-digest"]))
        for pending in waiting.values():
            self._eval_failed(evaluation, pending.node_id, Rejection(
                "timeout", f"no evaluation reply within the round timeout ({self.round_timeout:g} s)"))
        self._pending_eval = {}
        evaluation.nodes.sort(key=lambda e: protocol.node_order_key(e.node_key))
        done = [e for e in evaluation.nodes if e.num_examples > 0]
        if done:
            evaluation.eval_loss = sum(e.eval_loss * e.num_examples for e in done) / sum(e.num_examples for e in done)
        scored = [e for e in done if e.task_examples and e.task_score is not None]
        if scored:
            evaluation.task_score = (sum(e.task_score * e.task_examples for e in scored)
                                     / sum(e.task_examples for e in scored))
        if evaluation.eval_loss is None:
            return None
        metrics = MetricRecord({"nodes-eval-loss": evaluation.eval_loss, "nodes": len(done),
                                "eval-bytes-down": evaluation.bytes_down})
        if evaluation.task_score is not None:
            metrics["nodes-task-score"] = evaluation.task_score
        return metrics

    def _eval_failed(self, evaluation: NodeEvaluation, node_id: int, problem: Rejection) -> None:
        log(WARNING, "Round %d: node %d did not evaluate: %s", evaluation.round, node_id, problem)
        evaluation.failed.append(FailedNodeEval(node_id=node_id, node_key=self.node_keys.get(node_id),
                                                kind=problem.kind, reason=problem.reason))
        self.packager.forget(node_id)


def _span(layers: tuple[int, ...]) -> str:
    return f"{layers[0]}-{layers[-1]}" if len(layers) > 1 else str(layers[0])
