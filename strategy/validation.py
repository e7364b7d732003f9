"""One validation path for every reply: a bad reply is rejected with a reason, never merged."""

from __future__ import annotations

import torch
from collections.abc import Mapping

from flwr.app import Array, Message

from fedcybgd.codec import CodecError, decode_array
from fedcybgd.protocol import BLOCK, CONFIG, METRICS, REPLY_RECORDS, VisitMetrics


def reply_problem(reply: Message, expected: Mapping[str, Array], block: int, block_version: int) -> str | None:
    """Why `reply` must be rejected, or None when it is a valid upload of `expected`'s keys.

    `expected` is a template of the upload (the block's global Arrays, or adapter-shaped ones):
    the reply must carry exactly these names, with the same shapes and dtypes, and only finite
    values.
    """
    if reply.has_error():
        return f"client error: {reply.error.reason}"
    content = reply.content
    extra = sorted(set(content.keys()) - REPLY_RECORDS)
    if extra:
        return f"unexpected record(s) {extra}"
    if BLOCK not in content.array_records or METRICS not in content.metric_records:
        return "reply lacks the block or the metrics"
    echo = content.config_records.get(CONFIG)
    if echo is None or echo.get("block") != block or echo.get("block-version") != block_version:
        return f"reply is not for block {block} version {block_version}"
    if not isinstance(echo.get("cache-digest"), str):
        return "reply lacks the cache digest"
    uploaded = content.array_records[BLOCK]
    unexpected = sorted(set(uploaded) - set(expected))
    missing = sorted(set(expected) - set(uploaded))
    if unexpected or missing:
        return f"block keys differ: unexpected {unexpected[:3]}, missing {missing[:3]}"
    for name, array in uploaded.items():
        want = expected[name]
        if tuple(array.shape) != tuple(want.shape) or array.dtype != want.dtype:
            return f"{name}: got {array.dtype}{tuple(array.shape)}, expected {want.dtype}{tuple(want.shape)}"
        try:
            tensor = decode_array(array)
        except CodecError as err:
            return f"{name}: {err}"
        if not torch.isfinite(tensor).all():
            return f"{name}: non-finite values"
    try:
        metrics = VisitMetrics.from_record(content.metric_records[METRICS])
    except (KeyError, TypeError) as err:
        return f"metrics incomplete: {err}"
    if metrics.num_examples <= 0:
        return "metrics report no training examples"
    return None
