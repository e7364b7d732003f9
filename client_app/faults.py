"""Fault injection for tests and `make bench-faults`: off unless the node's environment says so.

Only when `FEDCYBGD_FAULT_INJECTION=1` is set in a SuperNode's environment (it reaches the
ClientApp processes that node starts) does the ClientApp get the mod below, and the mod then reads
one node config key, `fault`: `<kind>@<n>` (this node's n-th train message), several separated
by commas, each kind one of

- `hang@n`: never answer that message (sleep `fault-hang-s` seconds),
- `lose-cache@n`: delete this run's cache directory first (a node back with an empty disk),
- `corrupt-cache@n`: overwrite every cached tensor file with garbage first,
- `disk-full@n`: every cache write of that visit fails with ENOSPC, leaving a partial file.

Without the variable, `mods()` is empty and nothing here runs: the product's path never sees a
`fault` key. Counting train messages needs state across ClientApp processes: a counter file in
the node's `cache-dir` (required with `fault`).
"""

from __future__ import annotations

import errno
import os
import shutil
import time
from pathlib import Path
from unittest import mock

from flwr.app import Context, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable, Mod

from fedcybgd.client_cache import run_dir_name
from fedcybgd.files import write_atomic
from fedcybgd.node_config import NodeConfig, NodeConfigError
from fedcybgd.protocol import CONFIG, TrainInstruction

ENV = "FEDCYBGD_FAULT_INJECTION"
KINDS = ("hang", "lose-cache", "corrupt-cache", "disk-full")


def mods() -> list[Mod]:
    return [inject] if os.environ.get(ENV) == "1" else []


def inject(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Apply this node's configured fault on its n-th train message; otherwise pass through."""
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, context)
    node = NodeConfig.from_mapping(context.node_config)
    spec = node.fault
    if not spec:
        return call_next(msg, context)
    if node.cache_dir is None:
        raise NodeConfigError(f"node_config fault={spec!r} needs cache-dir (it counts train messages there)")
    plan = {}
    for item in spec.split(","):
        kind, _, at = item.strip().partition("@")
        if kind not in KINDS or not at.isdigit():
            raise ValueError(f"node_config fault={spec!r}: expected <kind>@<n>[,...], kind one of {KINDS}")
        plan[int(at)] = kind
    root = Path(node.cache_dir).expanduser()
    kind = plan.get(_count_train_message(root))
    if kind is None:
        return call_next(msg, context)
    run_cache = root / run_dir_name(TrainInstruction.from_record(msg.content.config_records[CONFIG]).cache_id)
    if kind == "hang":
        time.sleep(node.fault_hang_s)
    elif kind == "lose-cache":
        shutil.rmtree(run_cache, ignore_errors=True)
    elif kind == "corrupt-cache":
        for path in run_cache.glob("t-*.safetensors"):
            path.write_bytes(b"\x00garbage" * 64)
    elif kind == "disk-full":
        with mock.patch("fedcybgd.client_cache.save_file", _disk_full):
            return call_next(msg, context)
    return call_next(msg, context)


def _count_train_message(root: Path) -> int:
    """This node's train messages so far, this one included (1-based)."""
    root.mkdir(parents=True, exist_ok=True)
    counter = root / "fault-train-count"
    count = int(counter.read_text()) + 1 if counter.exists() else 1
    write_atomic(counter, str(count))
    return count


def _disk_full(tensors: dict, filename: str, metadata: dict | None = None) -> None:
    """What `save_file` does on a full disk: part of the file written, then ENOSPC."""
    Path(filename).write_bytes(b"\x00" * 128)
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
