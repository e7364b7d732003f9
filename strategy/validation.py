"""One validation path for every reply: a bad reply is rejected with a reason, never merged.

Each rejection has a `kind` (a short stable label: metrics.jsonl records it beside the reason and
summary.json counts rejections by it) and a human-readable `reason`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from flwr.app import Array, ConfigRecord, Message
from flwr.common.constant import ErrorCode

from fedcybgd.codec import CodecError, decode_array
from fedcybgd.protocol import BLOCK, CONFIG, METRICS, REPLY_RECORDS, NodeEvalMetrics, VisitMetrics, record_bytes

# Room for the reply's metrics and config records on top of the block's own bytes.
REPLY_OVERHEAD_BYTES = 64 * 1024

# Errors Flower itself reports for a visit (the SuperLink or the SuperNode, not our ClientApp).
_FLOWER_ERRORS = {
    ErrorCode.NODE_UNAVAILABLE: "node-unavailable",
    ErrorCode.MESSAGE_UNAVAILABLE: "reply-unavailable",
    ErrorCode.REPLY_MESSAGE_UNAVAILABLE: "reply-unavailable",
    ErrorCode.CLIENT_APP_CRASHED: "client-crashed",
    ErrorCode.LOAD_CLIENT_APP_EXCEPTION: "client-load-failed",
}
# Exceptions our ClientApp raises on purpose, by class name (Flower's reason reads
# "<class 'module.Name'>:<'message'>"); any other exception is a plain `client-error`.
_CLIENT_ERRORS = {
    "CacheMissError": "cache-lost",
    "CacheCorruptError": "cache-corrupt",
    "CacheWriteError": "cache-write-failed",
    "DataError": "client-data",
    "NodeConfigError": "node-config",
}
_EXCEPTION_CLASS = re.compile(r"^<class '(?:[\w.]*\.)?(\w+)'>")


@dataclass(frozen=True)
class Rejection:
    kind: str
    reason: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.reason}"


def error_rejection(reply: Message) -> Rejection:
    """The rejection for an error reply, named by what failed (Flower's code or our exception)."""
    code, reason = reply.error.code, reply.error.reason
    if code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION:
        match = _EXCEPTION_CLASS.match(reason)
        kind = _CLIENT_ERRORS.get(match.group(1), "client-error") if match else "client-error"
        return Rejection(kind, reason)
    return Rejection(_FLOWER_ERRORS.get(code, "flower-error"), f"Flower error {code}: {reason}")


@dataclass(frozen=True)
class UploadRules:
    """What a valid upload for one visit looks like.

    `expected` is a template of the upload (the block's global Arrays, or adapter-shaped ones):
    the reply must carry exactly these names, with the same shapes and dtypes. `current` is the
    block's present value where the upload replaces it (None for adapters): the norm bound
    compares against it. `owner` maps every global tensor to its block, to name a reply that
    carries another block's tensors.
    """

    expected: Mapping[str, Array]
    block: int
    block_version: int
    owner: Mapping[str, int]
    max_upload_ratio: float
    max_norm_ratio: float | None = None
    current: Mapping[str, Array] | None = None

    def max_bytes(self) -> int:
        return int(self.max_upload_ratio * sum(len(a.data) for a in self.expected.values())) + REPLY_OVERHEAD_BYTES


def reply_problem(reply: Message, rules: UploadRules) -> Rejection | None:
    """Why `reply` must be rejected, or None when it is a valid upload under `rules`.

    Cheap checks come first: the size before anything is decoded, then records, echo, keys,
    shapes and dtypes from the Arrays' metadata; values are decoded last.
    """
    if reply.has_error():
        return error_rejection(reply)
    content = reply.content
    size, limit = record_bytes(content), rules.max_bytes()
    if size > limit:
        return Rejection("oversize", f"reply of {size} bytes exceeds the limit of {limit} for block {rules.block} "
                                     "(algorithm.max_upload_ratio)")
    extra = sorted(set(content.keys()) - REPLY_RECORDS)
    if extra:
        return Rejection("unexpected-records", f"unexpected record(s) {extra}")
    if BLOCK not in content.array_records or METRICS not in content.metric_records:
        return Rejection("missing-records", "reply lacks the block or the metrics")
    echo = content.config_records.get(CONFIG)
    if echo is None or echo.get("block") != rules.block:
        return Rejection("wrong-block", f"reply is not for block {rules.block}")
    if echo.get("block-version") != rules.block_version:
        return Rejection("stale-version", f"reply is for block {rules.block} version {echo.get('block-version')}, "
                                          f"current version {rules.block_version}")
    if not isinstance(echo.get("cache-digest"), str):
        return Rejection("missing-digest", "reply lacks the cache digest")
    problem = _keys_problem(content.array_records[BLOCK], rules)
    if problem:
        return problem
    uploaded = content.array_records[BLOCK]
    for name, array in uploaded.items():
        want = rules.expected[name]
        if tuple(array.shape) != tuple(want.shape):
            return Rejection("wrong-shape", f"{name}: got {array.dtype}{tuple(array.shape)}, "
                                            f"expected {want.dtype}{tuple(want.shape)}")
        if array.dtype != want.dtype:
            return Rejection("wrong-dtype", f"{name}: got {array.dtype}{tuple(array.shape)}, "
                                            f"expected {want.dtype}{tuple(want.shape)}")
    tensors = {}
    for name, array in uploaded.items():
        try:
            tensors[name] = decode_array(array)
        except CodecError as err:
            return Rejection("undecodable", f"{name}: {err}")
        if not torch.isfinite(tensors[name]).all():
            return Rejection("non-finite", f"{name}: non-finite values")
    if rules.max_norm_ratio is not None and rules.current is not None:
        problem = _norm_problem(tensors, rules)
        if problem:
            return problem
    try:
        metrics = VisitMetrics.from_record(content.metric_records[METRICS])
    except (KeyError, TypeError) as err:
        return Rejection("bad-metrics", f"metrics incomplete: {err}")
    if metrics.num_examples <= 0:
        return Rejection("bad-metrics", "metrics report no training examples")
    return None


def _keys_problem(uploaded: Mapping[str, Array], rules: UploadRules) -> Rejection | None:
    unexpected = sorted(set(uploaded) - set(rules.expected))
    missing = sorted(set(rules.expected) - set(uploaded))
    if not unexpected and not missing:
        return None
    others = sorted({rules.owner[n] for n in unexpected if n in rules.owner} - {rules.block})
    if others:
        return Rejection("other-block-keys", f"reply for block {rules.block} carries tensors of block(s) {others}: "
                                             f"{unexpected[:3]}")
    kind = "unexpected-keys" if unexpected else "missing-keys"
    return Rejection(kind, f"block keys differ: unexpected {unexpected[:3]}, missing {missing[:3]}")


def _norm_problem(tensors: Mapping[str, torch.Tensor], rules: UploadRules) -> Rejection | None:
    """The upload's L2 norm against the block's present one (an update that blows a block up)."""
    assert rules.current is not None and rules.max_norm_ratio is not None
    new = math.sqrt(sum(float(t.double().square().sum()) for t in tensors.values()))
    old = math.sqrt(sum(float(decode_array(rules.current[n]).double().square().sum()) for n in tensors))
    if new > rules.max_norm_ratio * old:
        return Rejection("norm-bound", f"upload norm {new:.4g} exceeds {rules.max_norm_ratio:g} x the block's "
                                       f"norm {old:.4g} (algorithm.max_norm_ratio)")
    return None


def read_evaluation(reply: Message) -> tuple[NodeEvalMetrics, ConfigRecord] | Rejection:
    """An evaluation reply's results and echo, or why they cannot be used."""
    if reply.has_error():
        return error_rejection(reply)
    content = reply.content
    if METRICS not in content.metric_records or CONFIG not in content.config_records:
        return Rejection("malformed", "evaluation reply without metrics or config record")
    echo = content.config_records[CONFIG]
    if "cache-digest" not in echo:
        return Rejection("malformed", "evaluation reply lacks 'cache-digest'")
    try:
        result = NodeEvalMetrics.from_record(content.metric_records[METRICS])
    except (KeyError, TypeError) as err:
        return Rejection("malformed", f"evaluation reply lacks {err}")
    return result, echo
