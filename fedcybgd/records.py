"""What a run records, typed: a visit, a round (a line of metrics.jsonl), the run (summary.json).

The strategy, the runners and every reader share these dataclasses; `to_json` and `from_json`
are the one place they become JSON and come back, and `from_json` refuses an unknown or a
missing field, so a renamed field fails where it is read, not as a silent `None` in a table.

Two field markers keep the files' shape: an `optional` field is left out while it is None (a
visit whose reply never came has no `bytes_up`), and a `flat` group of fields is written inline,
all of them or none (the nodes' evaluation in summary.json, what only federated runs add).
"""

from __future__ import annotations

import json
import types
import typing
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Self

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"


class RecordError(ValueError):
    """A record file does not hold the fields its type declares."""


def optional() -> Any:
    """A field left out of the JSON while None."""
    return field(default=None, metadata={"optional": True})


def flat(*, required: bool = False) -> Any:
    """A group of fields (a `Record`) written inline into its parent; left out while None."""
    return field(metadata={"flat": True}) if required else field(default=None, metadata={"flat": True})


class Record:
    """A dataclass that converts to and from its JSON object, fields in declaration order."""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if value is None and (f.metadata.get("optional") or f.metadata.get("flat")):
                continue
            if f.metadata.get("flat"):
                out.update(value.to_json())
            else:
                out[f.name] = _encode(value)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Self:
        rest = dict(data)
        record = cls._take(rest)
        if rest:
            raise RecordError(f"{cls.__name__}: unknown field(s) {sorted(rest)}")
        return record

    @classmethod
    def _take(cls, data: dict[str, Any]) -> Self:
        """Build from (and remove) this record's keys in `data`; others stay for the caller."""
        kwargs = {}
        hints = typing.get_type_hints(cls)
        for f in fields(cls):  # type: ignore[arg-type]
            nested = _record_type(hints[f.name])
            if f.metadata.get("flat"):
                assert nested is not None
                required = f.default is MISSING
                if required or any(name in data for name in nested._json_names()):
                    kwargs[f.name] = nested._take(data)
            elif f.name in data:
                kwargs[f.name] = _decode(hints[f.name], data.pop(f.name))
            elif not f.metadata.get("optional"):
                raise RecordError(f"{cls.__name__}: missing field {f.name!r}")
        return cls(**kwargs)

    @classmethod
    def _json_names(cls) -> list[str]:
        hints = typing.get_type_hints(cls)
        names = []
        for f in fields(cls):  # type: ignore[arg-type]
            nested = _record_type(hints[f.name])
            names += nested._json_names() if f.metadata.get("flat") and nested else [f.name]
        return names


def _encode(value: Any) -> Any:
    if isinstance(value, Record):
        return value.to_json()
    if isinstance(value, list):
        return [_encode(v) for v in value]
    return value


def _decode(hint: Any, value: Any) -> Any:
    if value is None:
        return None
    if typing.get_origin(hint) is list and (item := _record_type(typing.get_args(hint)[0])):
        return [item.from_json(v) for v in value]
    nested = _record_type(hint)
    return nested.from_json(value) if nested else value


def _record_type(hint: Any) -> type[Record] | None:
    """The `Record` class of a field typed `R` or `R | None`; None for any other type."""
    if isinstance(hint, types.UnionType):
        records = [_record_type(h) for h in typing.get_args(hint)]
        return next((r for r in records if r), None)
    return hint if isinstance(hint, type) and issubclass(hint, Record) and is_dataclass(hint) else None


# -- a round -----------------------------------------------------------------------------------
@dataclass(kw_only=True)
class VisitRecord(Record):
    """One client visit (a centralized round: one visit with only `block` and `peak_mem_bytes`).

    Filled in as the visit goes: what was sent, then what came back (`bytes_up`, once a reply
    arrives), then what was accepted (`upload_keys`, `peak_mem_bytes`, `cache_confirmed`).
    """

    node_id: int | None = optional()
    node_key: str | None = optional()
    block: int | None  # None: every parameter (centralized-full)
    layers: list[int] | None = optional()  # the block's layers trained, where a memory budget split it
    visit: int | None = optional()  # the node's n-th visit
    bytes_down: int | None = optional()
    bytes_down_block: int | None = optional()
    bytes_down_frozen: int | None = optional()
    dropped_layers: list[int] | None = optional()
    checkpointing: bool | None = optional()  # trained with gradient checkpointing (run-wide, or to fit a budget)
    bytes_up: int | None = optional()
    upload_keys: list[str] | None = optional()
    peak_mem_bytes: int | None = optional()
    process_peak_bytes: int | None = optional()  # the client process's peak RSS so far
    cache_confirmed: bool | None = optional()  # the node's cache digest was the expected one


@dataclass(kw_only=True)
class RejectedVisit(Record):
    node_id: int
    kind: str  # a short stable label (strategy/validation.py)
    reason: str


@dataclass(kw_only=True)
class RoundStats(Record):
    """What the training of one round did (every algorithm, same fields)."""

    round: int
    assignments: list[VisitRecord] = field(default_factory=list)
    rejected: list[RejectedVisit] = field(default_factory=list)
    train_loss: float | None = None
    bytes_down: int = 0  # everything sent: block + frozen + config records, holdings queries after a
    # failure (those at first contact, before the node's first round, are not counted: a few hundred bytes)
    bytes_down_block: int = 0
    bytes_down_frozen: int = 0
    bytes_up: int = 0
    samples_seen: int = 0  # training examples processed this round, all clients
    client_seconds: float = 0.0  # the slowest client's training time
    client_peak_mem_bytes: int = 0  # the largest client peak this round
    round_seconds: float = 0.0


@dataclass(kw_only=True)
class NodeEvalResult(Record):
    """One node's evaluation of the global model on its own held-out data."""

    node_id: int
    node_key: str
    bytes_down: int
    eval_loss: float
    num_examples: int
    task_score: float | None
    task_examples: int
    bytes_up: int
    seconds: float


@dataclass(kw_only=True)
class FailedNodeEval(Record):
    node_id: int
    node_key: str | None
    kind: str
    reason: str


@dataclass(kw_only=True)
class NodeEvaluation(Record):
    """One round's evaluation on the nodes' own held-out data (`eval.where` nodes or both)."""

    round: int
    model: str  # "exact", or "compressed (approximation)"
    nodes: list[NodeEvalResult] = field(default_factory=list)
    failed: list[FailedNodeEval] = field(default_factory=list)  # left out of the means
    eval_loss: float | None = None  # over the nodes that answered, weighted by their examples
    task_score: float | None = None  # weighted by task examples
    task_metric: str | None = None
    bytes_down: int = 0  # evaluation traffic, apart from training's
    bytes_up: int = 0


@dataclass(kw_only=True)
class RoundRecord(Record):
    """A line of metrics.jsonl: the round's training and its evaluations."""

    algorithm: str
    stats: RoundStats = flat(required=True)
    eval_loss: float | None  # the server's, in rounds it evaluated
    task_score: float | None
    task_metric: str | None
    node_eval: NodeEvaluation | None  # in rounds the nodes evaluated


# -- the run -----------------------------------------------------------------------------------
@dataclass(kw_only=True)
class NodeEvalSummary(Record):
    """The nodes' evaluations over the run (summary.json, when the nodes evaluated)."""

    node_eval_model: str
    initial_nodes_eval_loss: float | None
    final_nodes_eval_loss: float | None
    nodes_eval_losses: dict[str, float]  # by round
    nodes_task_metric: str | None
    initial_nodes_task_score: float | None
    final_nodes_task_score: float | None
    nodes_task_scores: dict[str, float]
    initial_node_evals: list[NodeEvalResult]
    final_node_evals: list[NodeEvalResult]
    node_eval_failures: int
    total_eval_bytes_down: int
    total_eval_bytes_up: int


@dataclass(kw_only=True)
class FederatedTotals(Record):
    """What a federated run adds to summary.json."""

    full_model_bytes: int
    # Total download over what Fed-full would send: the whole uncompressed model every visit.
    download_ratio_vs_fedfull: float | None
    block_bytes: list[int]  # per block
    compressed_tensors_computed: int


@dataclass(kw_only=True)
class RunSummary(Record):
    """summary.json: the run's settings, evaluations and totals."""

    algorithm: str
    model: str
    rounds: int
    clients_per_round: int
    allocation: str
    compression: dict[str, Any]
    eval_where: str
    initial_eval_loss: float | None
    final_eval_loss: float | None
    eval_losses: dict[str, float]  # by round
    task_metric: str | None
    task_examples: int
    initial_task_score: float | None
    final_task_score: float | None
    task_scores: dict[str, float]
    # The server's data (None when it holds none).
    data_rows: int | None
    data_duplicates_dropped: int | None
    data_train_examples: int | None
    data_heldout_examples: int | None
    data_validation_examples: int | None = optional()
    nodes: NodeEvalSummary | None = flat()
    total_bytes_down: int
    total_bytes_down_block: int
    total_bytes_down_frozen: int
    total_bytes_up: int
    samples_seen: int
    # Peak memory of a client visit above what its process held before it (memory.py).
    client_peak_mem_bytes: float | None  # mean over visits
    max_client_peak_mem_bytes: int | None
    # The largest peak resident set of a client process (all it holds, not one visit's part).
    max_client_process_peak_bytes: int | None
    rejected_replies: int
    rejected_by_reason: dict[str, int]
    num_blocks: int
    federated: FederatedTotals | None = flat()
    wall_seconds: float
    config: dict[str, Any]


def metrics_line(row: RoundRecord) -> str:
    return json.dumps(row.to_json()) + "\n"


def summary_text(summary: RunSummary) -> str:
    return json.dumps(summary.to_json(), indent=2) + "\n"


def read_metrics(out_dir: Path) -> list[RoundRecord]:
    """The rounds of the run in `out_dir` (its metrics.jsonl)."""
    text = (out_dir / METRICS_FILE).read_text(encoding="utf-8")
    return [RoundRecord.from_json(json.loads(line)) for line in text.splitlines() if line.strip()]


def read_summary(out_dir: Path) -> RunSummary:
    """The summary of the finished run in `out_dir` (its summary.json)."""
    return RunSummary.from_json(json.loads((out_dir / SUMMARY_FILE).read_text(encoding="utf-8")))
