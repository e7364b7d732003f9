"""The ServerApp's Grid wrapper: replies collected as soon as they arrive, within the timeout."""

from __future__ import annotations

import time
from types import SimpleNamespace

from flwr.serverapp import Grid

from server_app.grid import PromptGrid


class SlowRuntime(Grid):
    """A runtime whose reply to message `i` is ready `delays[i]` seconds after the push."""

    def __init__(self, delays: list[float]) -> None:
        self.delays = delays
        self.pulls = 0

    def set_run(self, run):  # the wrapper passes these through untouched
        raise NotImplementedError

    @property
    def run(self):
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        raise NotImplementedError

    def get_node_ids(self):
        return [1, 2]

    def push_messages(self, messages):
        self.pushed = time.monotonic()
        return [str(i) for i, _ in enumerate(messages)]

    def send_and_receive(self, messages, *, timeout=None):  # the wrapper's own replaces it
        raise NotImplementedError

    def pull_messages(self, message_ids):
        self.pulls += 1
        now = time.monotonic() - self.pushed
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i))
                for i in sorted(message_ids) if self.delays[int(i)] <= now]


def test_replies_are_collected_within_an_interval_of_arriving() -> None:
    runtime = SlowRuntime([0.1, 0.5])
    start = time.monotonic()
    replies = list(PromptGrid(runtime, interval=0.05).send_and_receive(["a", "b"], timeout=10))
    took = time.monotonic() - start
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["0", "1"]
    assert 0.5 <= took < 1.5  # Flower's own deployment Grid would have waited until 3 s
    assert runtime.pulls >= 5
    assert list(PromptGrid(runtime).get_node_ids()) == [1, 2]


def test_the_timeout_returns_what_has_arrived() -> None:
    start = time.monotonic()
    replies = list(PromptGrid(SlowRuntime([0.0, 30.0]), interval=0.05).send_and_receive(["a", "b"], timeout=0.3))
    assert [r.metadata.reply_to_message_id for r in replies] == ["0"]
    assert 0.3 <= time.monotonic() - start < 1.0
