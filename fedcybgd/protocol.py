"""The message contract between the strategy and the client, in one place.

A train instruction is a `RecordDict` with
- `"block"`: the assigned block's tensors, dense (empty when the node already holds them),
- `"frozen"`: the other tensors this visit needs that the node lacks, as compressed parts keyed
  `name@form/part`,
- `"config"`: a `TrainInstruction` (its `manifest` lists every tensor the client's model needs,
  at which version and in which form).
The reply holds `"block"` (exactly the assigned keys), `"metrics"` (a `VisitMetrics`) and
`"config"` (block id and version echoed, and the digest of the client's cache).
An evaluate instruction (`MessageType.EVALUATE`, `eval.where=nodes`) has the same `"block"`
(empty), `"frozen"` and `"config"` (an `EvalInstruction`) records; the node evaluates the global
model on its own held-out data and replies `"metrics"` (a `NodeEvalMetrics`) and `"config"` (its
cache digest and the task metric's name).
A holdings query (`MessageType.QUERY`, a `HoldingsQuery`) asks a node what its cache holds, who
it is and whether it has data of its own, and has it tokenize its training data. Both sides import these names; neither spells a key by hand.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, fields

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedcybgd import codec
from fedcybgd.lora import adapter_names
from fedcybgd.client_cache import Holding, decode_holdings, encode_holdings
from fedcybgd.config import DataConfig, EvalConfig, LoraConfig, TrainConfig
from fedcybgd.node_config import NodeConfig

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
    # The version the block takes if the server accepts this upload: the round number, so a
    # rejected upload a client kept can never pass for a later, accepted one.
    upload_version: int
    block_names: tuple[str, ...]
    manifest: tuple[Holding, ...]  # every tensor the client's model needs this visit
    dropped_layers: tuple[int, ...]  # decoder layers left out of this visit's model
    model_name: str  # where the client finds the tokenizer
    model_spec: str  # HF config JSON: the architecture to build
    train: TrainConfig
    data: DataConfig
    seed: int
    # LoRA: the modules that get adapters. Their initial values come with the download when the
    # global model holds them (fedlora), else they start fresh from `seed`; the upload is then
    # the adapters instead of `block_names`.
    lora: LoraConfig | None = None
    lora_modules: tuple[str, ...] = ()
    # The server writes the upload back as is (fedcybgd): the client may keep it as the block's
    # next version. Not when the server averages or merges it.
    keep_upload: bool = True
    # Names the node's cache for this run; it outlives a Flower run, so a resumed run finds it.
    cache_id: str = ""

    def upload_names(self) -> tuple[str, ...]:
        """The tensors the reply must carry."""
        if self.lora_modules:
            return tuple(n for m in self.lora_modules for n in adapter_names(m))
        return self.block_names

    def to_record(self) -> ConfigRecord:
        return ConfigRecord({
            "round": self.round,
            "block": self.block,
            "block-version": self.block_version,
            "upload-version": self.upload_version,
            "block-names": json.dumps(list(self.block_names)),
            "manifest": encode_holdings(list(self.manifest)),
            "dropped-layers": json.dumps(list(self.dropped_layers)),
            "model-name": self.model_name,
            "model-spec": self.model_spec,
            "train": json.dumps(asdict(self.train)),
            "data": json.dumps(asdict(self.data)),
            "seed": self.seed,
            "lora": json.dumps(asdict(self.lora) if self.lora else None),
            "lora-modules": json.dumps(list(self.lora_modules)),
            "keep-upload": self.keep_upload,
            "cache-id": self.cache_id,
        })

    @classmethod
    def from_record(cls, record: ConfigRecord) -> TrainInstruction:
        return cls(
            round=int(record["round"]),
            block=int(record["block"]),
            block_version=int(record["block-version"]),
            upload_version=int(record["upload-version"]),
            block_names=tuple(json.loads(str(record["block-names"]))),
            manifest=tuple(decode_holdings(str(record["manifest"]))),
            dropped_layers=tuple(json.loads(str(record["dropped-layers"]))),
            model_name=str(record["model-name"]),
            model_spec=str(record["model-spec"]),
            train=TrainConfig(**json.loads(str(record["train"]))),
            data=DataConfig(**json.loads(str(record["data"]))),
            seed=int(record["seed"]),
            lora=LoraConfig(**spec) if (spec := json.loads(str(record["lora"]))) else None,
            lora_modules=tuple(json.loads(str(record["lora-modules"]))),
            keep_upload=bool(record["keep-upload"]),
            cache_id=str(record["cache-id"]),
        )


@dataclass(frozen=True)
class VisitMetrics:
    train_loss: float
    num_examples: int  # size of the client's training partition
    samples_seen: int
    steps: int
    seconds: float
    peak_mem_bytes: int  # the visit's peak above what its process held before it (memory.py)
    process_peak_bytes: int  # the client process's peak in its life so far: what the device pays

    def to_record(self) -> MetricRecord:
        return _to_metrics(self)

    @classmethod
    def from_record(cls, record: MetricRecord) -> VisitMetrics:
        return cls(**_from_metrics(cls, record))


@dataclass(frozen=True)
class EvalInstruction:
    """Evaluate the global model, as the `manifest` lists it, on the node's held-out data."""

    round: int
    manifest: tuple[Holding, ...]  # every tensor of the model, at its current version
    model_name: str
    model_spec: str
    data: DataConfig  # how the node splits its data: the same rule as the server's
    eval: EvalConfig
    max_seq_len: int
    lora: LoraConfig | None  # adapters in the manifest are merged with it (fedlora)
    cache_id: str
    # The manifest holds compressed forms (eval.node_model=compressed): an approximation.
    approximate: bool = False

    def to_record(self) -> ConfigRecord:
        return ConfigRecord({
            "round": self.round,
            "manifest": encode_holdings(list(self.manifest)),
            "model-name": self.model_name,
            "model-spec": self.model_spec,
            "data": json.dumps(asdict(self.data)),
            "eval": json.dumps(asdict(self.eval)),
            "max-seq-len": self.max_seq_len,
            "lora": json.dumps(asdict(self.lora) if self.lora else None),
            "cache-id": self.cache_id,
            "approximate": self.approximate,
        })

    @classmethod
    def from_record(cls, record: ConfigRecord) -> EvalInstruction:
        return cls(
            round=int(record["round"]),
            manifest=tuple(decode_holdings(str(record["manifest"]))),
            model_name=str(record["model-name"]),
            model_spec=str(record["model-spec"]),
            data=DataConfig(**json.loads(str(record["data"]))),
            eval=EvalConfig(**json.loads(str(record["eval"]))),
            max_seq_len=int(record["max-seq-len"]),
            lora=LoraConfig(**spec) if (spec := json.loads(str(record["lora"]))) else None,
            cache_id=str(record["cache-id"]),
            approximate=bool(record["approximate"]),
        )


@dataclass(frozen=True)
class NodeEvalMetrics:
    eval_loss: float  # mean cross-entropy per response token on the node's held-out examples
    num_examples: int  # held-out examples evaluated
    task_examples: int  # of them, answered by generation (0: no task score)
    task_score: float  # mean task score over those (0.0 when task_examples is 0)
    seconds: float

    def to_record(self) -> MetricRecord:
        return _to_metrics(self)

    @classmethod
    def from_record(cls, record: MetricRecord) -> NodeEvalMetrics:
        return cls(**_from_metrics(cls, record))


def _to_metrics(values: object) -> MetricRecord:
    """A dataclass of numbers as a MetricRecord, its field names dashed."""
    return MetricRecord({f.name.replace("_", "-"): getattr(values, f.name) for f in fields(values)})


def _from_metrics(cls: type, record: MetricRecord) -> dict[str, object]:
    return {f.name: record[f.name.replace("_", "-")] for f in fields(cls)}


def eval_echo(cache_digest: str, task_metric: str) -> ConfigRecord:
    return ConfigRecord({"cache-digest": cache_digest, "task-metric": task_metric})


def reply_echo(block: int, block_version: int, cache_digest: str) -> ConfigRecord:
    return ConfigRecord({"block": block, "block-version": block_version, "cache-digest": cache_digest})


def record_bytes(content: RecordDict) -> int:
    """Bytes of every record in a message's content, as Flower counts them."""
    return sum(record.count_bytes() for record in content.values())


def part_key(holding: Holding, part: str) -> str:
    return f"{holding.name}@{holding.form}/{part}"


def decode_parts(record: ArrayRecord, manifest: tuple[Holding, ...]) -> dict[Holding, dict[str, torch.Tensor]]:
    """Group a `"frozen"` record's parts by the manifest entry they belong to."""
    by_name = {h.name: h for h in manifest}
    out: dict[Holding, dict[str, torch.Tensor]] = {}
    for key, array in record.items():
        head, part = key.rsplit("/", 1)
        name, form = head.rsplit("@", 1)
        holding = by_name.get(name)
        if holding is None or holding.form != form:
            raise ValueError(f"frozen tensor {key!r} is not in this visit's manifest")
        out.setdefault(holding, {})[part] = codec.decode_array(array)
    return out


# Holdings query: the server asks, the node answers with what its cache holds and its stable key.
@dataclass(frozen=True)
class HoldingsQuery:
    """The server asks a node what it holds before the node's first visit (and after a cache
    error). The query also says what the node's training tokens depend on, so the node makes
    them now: in deployment each message runs in a fresh process, and loading the data and the
    tokenizer inside the first visit would keep what it imports in that visit's memory."""

    base_hashes: dict[str, str]  # sha256 of each version-0 tensor, so a node with the base model can match
    cache_id: str  # which of the node's caches to report (the run's, as in `TrainInstruction`)
    data: DataConfig  # the node's data, as its training visits will take it
    model_name: str  # whose tokenizer
    max_seq_len: int  # the training visits' `train.max_seq_len`

    def to_content(self) -> RecordDict:
        return RecordDict({CONFIG: ConfigRecord({
            "base-hashes": json.dumps(self.base_hashes, sort_keys=True), "cache-id": self.cache_id,
            "data": json.dumps(asdict(self.data)), "model-name": self.model_name,
            "max-seq-len": self.max_seq_len})})

    @classmethod
    def from_content(cls, content: RecordDict) -> HoldingsQuery:
        record = content.config_records[CONFIG]
        return cls(json.loads(str(record["base-hashes"])), str(record["cache-id"]),
                   DataConfig(**json.loads(str(record["data"]))), str(record["model-name"]),
                   int(record["max-seq-len"]))


@dataclass(frozen=True)
class HoldingsReply:
    holdings: list[Holding]  # what the node's cache holds
    node_key: str  # its stable key (`node_key`)
    has_data: bool  # it has a data file of its own (node config `data-path`)
    memory_budget: int | None = None  # bytes a visit may use (node config `memory-budget-mb`)

    def to_content(self) -> RecordDict:
        return RecordDict({CONFIG: ConfigRecord({"holdings": encode_holdings(self.holdings),
                                                 "node-key": self.node_key, "has-data": self.has_data,
                                                 "memory-budget": self.memory_budget or 0})})

    @classmethod
    def from_content(cls, content: RecordDict) -> HoldingsReply:
        record = content.config_records[CONFIG]
        return cls(decode_holdings(str(record["holdings"])), str(record["node-key"]),
                   bool(record.get("has-data", False)), int(record.get("memory-budget", 0)) or None)


FALLBACK_KEY_PREFIX = "node-id-"


def node_key(node: NodeConfig, node_id: int) -> str:
    """A name for the node that does not change when Flower assigns new node ids.

    The declared `node-name` (deployment), else the partition (simulation), else the Flower node
    id (`node-id-...`: stable only as long as the node keeps its id; the server warns).
    """
    if node.node_name is not None:
        return f"name-{node.node_name}"
    if node.partition_id is not None:
        return f"partition-{node.partition_id}"
    return f"{FALLBACK_KEY_PREFIX}{node_id}"


def node_order_key(key: str) -> list[object]:
    """Sort keys naturally: partition-2 before partition-10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key)]


def tensor_sha256(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
