"""What a SuperNode's node config may hold: every key, its type, default and meaning, once.

A SuperNode is given them as `flower-supernode --node-config 'data-path="/srv/a.jsonl" cache-dir="/cache"'`
(Flower reads each value as TOML: strings are quoted, numbers bare); Flower's simulation sets
`partition-id` and `num-partitions` itself. The ClientApp reads its node's config with
`NodeConfig.from_mapping`, which names an unknown key or a value of the wrong type; the launchers
and compose files write `--node-config` with `to_flower_arg`.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import get_args, get_type_hints

# How Flower splits `--node-config` into TOML key-value pairs (flwr.common.config.parse_config_args).
_FLOWER_PAIR = re.compile(r"(\S+?)=(\'[^\']*\'|\"[^\"]*\"|\S+)")


class NodeConfigError(ValueError):
    """A node config key that is unknown, or a value of the wrong type or range."""


@dataclass(frozen=True)
class NodeConfig:
    """One node's settings; each field is the node config key with `-` for `_`."""

    # This node's own data file (.jsonl/.json/.csv/.parquet, Alpaca- or chat-style), de-duplicated
    # and split by prompt as the server splits its data, so its held-out part is never trained on.
    # With a partition as well, a data-path that holds nothing (no such path, or an empty folder:
    # what Docker mounts for a missing host folder) falls back to the partition.
    data_path: str | None = None
    # Where this node keeps its frozen copy of the model between visits, a folder per run
    # (unset: ~/.cache/fedcybgd/client-cache/run-<id>/<node key>).
    cache_dir: str | None = None
    # This node's share of the run's data source: partition `partition_id` of `num_partitions`.
    # Without a `node-name`, the partition is also the node's stable key.
    partition_id: int | None = None
    num_partitions: int | None = None
    # Where the ClientApp trains and evaluates: `auto`, `cpu`, `cuda`, `cuda:1`, ...
    device: str = "auto"
    # Past runs' caches (each a copy of the model) that survive when the node meets a new run.
    cache_keep_runs: int = 2
    # A local path or hub id of the base model this node already holds: the tensors identical to
    # the server's seed the cache, so the first visit sends only what differs.
    base_model: str | None = None
    # The node's stable name: the server orders nodes, and so pairs them with blocks, by it across
    # restarts and resumes (unset: the partition, else Flower's node id, which may change).
    node_name: str | None = None
    # The memory, in MB (1e6 bytes), this node can give one training visit. The server then gives
    # it only blocks whose visit it estimates to fit (fedcybgd/memory_estimate.py, Llama-family
    # models) and hands the others to nodes that can hold them. Unset: no limit. Set, the node's
    # training hands freed memory back to the system as it goes (`memory.returning_freed_memory`):
    # a lower peak for some step time (README "Memory of one client").
    memory_budget_mb: float | None = None
    # Fault injection for tests and `make bench-faults`, read only where the node's environment
    # has FEDCYBGD_FAULT_INJECTION=1 (client_app/faults.py): `<kind>@<n>[,...]`, and how long a
    # `hang` sleeps.
    fault: str | None = None
    fault_hang_s: float = 3600.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None or f.default is not None:
                _check_type(_key(f.name), value, _TYPES[f.name])
        if self.cache_keep_runs < 0:
            raise NodeConfigError(f"node_config cache-keep-runs={self.cache_keep_runs} must be >= 0")
        if self.memory_budget_mb is not None and self.memory_budget_mb <= 0:
            raise NodeConfigError(f"node_config memory-budget-mb={self.memory_budget_mb} must be > 0")

    @property
    def partition(self) -> tuple[int, int] | None:
        """(partition-id, num-partitions) where both are set."""
        if self.partition_id is None or self.num_partitions is None:
            return None
        return self.partition_id, self.num_partitions

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, object]) -> NodeConfig:
        """A node config as Flower hands it to the ClientApp (`context.node_config`)."""
        unknown = sorted(set(mapping) - set(KEYS))
        if unknown:
            raise NodeConfigError(f"node_config has unknown key(s) {', '.join(unknown)}; "
                                  f"the known keys are {', '.join(KEYS)}")
        return cls(**{_field(key): value for key, value in mapping.items()})

    @classmethod
    def from_flower_arg(cls, text: str) -> NodeConfig:
        """A `--node-config` string, read as Flower reads it."""
        pairs = "\n".join(f"{key} = {value}" for key, value in _FLOWER_PAIR.findall(text))
        try:
            return cls.from_mapping(tomllib.loads(pairs))
        except tomllib.TOMLDecodeError as err:
            raise NodeConfigError(f"--node-config {text!r} is not key=value pairs with TOML values "
                                  f'(strings quoted: data-path="/x.jsonl"): {err}') from err

    def to_mapping(self) -> dict[str, object]:
        """The keys set to something other than their default, in declaration order."""
        return {_key(f.name): getattr(self, f.name) for f in fields(self) if getattr(self, f.name) != f.default}

    def to_flower_arg(self) -> str:
        """The `--node-config` string: Flower reads each value as TOML, so strings are quoted."""
        return config_text(self.to_mapping())


def _key(field_name: str) -> str:
    return field_name.replace("_", "-")


def _field(key: str) -> str:
    return key.replace("-", "_")


def _check_type(key: str, value: object, allowed: tuple[type, ...]) -> None:
    if isinstance(value, bool) or not isinstance(value, allowed):
        what = {str: f'a string (quoted in --node-config: {key}="...")', int: "an integer"}.get(allowed[0], "a number")
        raise NodeConfigError(f"node_config {key}={value!r} must be {what}")


def config_text(values: Mapping[str, object]) -> str:
    """`key=value ...` text as Flower's parser reads `--node-config` and `--run-config`, whatever
    characters a string holds: the parser takes a double-quoted value up to the next `"` and reads
    it as a TOML basic string, so `"`, backslashes and control characters go in as \\u escapes
    (spaces and `'` need none)."""
    return " ".join(f"{key}={_toml_value(value)}" for key, value in values.items())


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return str(value)
    return '"' + "".join(f"\\u{ord(c):04x}" if c in '"\\\x7f' or c < " " else c for c in str(value)) + '"'


def _accepted_types(hint: object) -> tuple[type, ...]:
    """`int | None` -> (int,); a float field takes an integer too (`fault-hang-s=5`)."""
    types = tuple(t for t in get_args(hint) or (hint,) if t is not type(None))
    return types + (int,) if float in types else types


_TYPES = {name: _accepted_types(hint) for name, hint in get_type_hints(NodeConfig).items()}
KEYS = tuple(_key(f.name) for f in fields(NodeConfig))
