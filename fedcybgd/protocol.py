"""The message contract between the strategy and the client, in one place.

A train instruction is a `RecordDict` with `"block"` (the assigned block, dense), `"frozen"`
(every other tensor the client needs) and `"config"` (a `TrainInstruction`). The reply holds
`"block"` (exactly the assigned keys), `"metrics"` (a `VisitMetrics`) and `"config"` (the block id
and version echoed back). Both sides import these names; neither spells a key by hand.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields

from flwr.app import ConfigRecord, MetricRecord, RecordDict

from fedcybgd.config import DataConfig, TrainConfig

BLOCK = "block"
FROZEN = "frozen"
CONFIG = "config"
METRICS = "metrics"
REPLY_RECORDS = frozenset({BLOCK, METRICS, CONFIG})


@dataclass(frozen=True)
class TrainInstruction:
    round: int
    block: int
    block_version: int
    block_names: tuple[str, ...]
    model_name: str  # where the client finds the tokenizer
    model_spec: str  # HF config JSON: the architecture to build
    train: TrainConfig
    data: DataConfig
    seed: int

    def to_record(self) -> ConfigRecord:
        return ConfigRecord({
            "round": self.round,
            "block": self.block,
            "block-version": self.block_version,
            "block-names": list(self.block_names),
            "model-name": self.model_name,
            "model-spec": self.model_spec,
            "train": json.dumps(asdict(self.train)),
            "data": json.dumps(asdict(self.data)),
            "seed": self.seed,
        })

    @classmethod
    def from_record(cls, record: ConfigRecord) -> TrainInstruction:
        return cls(
            round=int(record["round"]),
            block=int(record["block"]),
            block_version=int(record["block-version"]),
            block_names=tuple(record["block-names"]),
            model_name=str(record["model-name"]),
            model_spec=str(record["model-spec"]),
            train=TrainConfig(**json.loads(str(record["train"]))),
            data=DataConfig(**json.loads(str(record["data"]))),
            seed=int(record["seed"]),
        )


@dataclass(frozen=True)
class VisitMetrics:
    train_loss: float
    num_examples: int  # size of the client's training partition
    samples_seen: int
    steps: int
    seconds: float
    peak_mem_bytes: int

    def to_record(self) -> MetricRecord:
        return MetricRecord({f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)})

    @classmethod
    def from_record(cls, record: MetricRecord) -> VisitMetrics:
        return cls(**{f.name: record[f.name.replace("_", "-")] for f in fields(cls)})


def reply_echo(block: int, block_version: int) -> ConfigRecord:
    return ConfigRecord({"block": block, "block-version": block_version})


def record_bytes(content: RecordDict) -> int:
    """Bytes of every record in a message's content, as Flower counts them."""
    return sum(record.count_bytes() for record in content.values())
