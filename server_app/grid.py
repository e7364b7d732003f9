"""The runtime's Grid, asking for replies every fraction of a second.

Flower's deployment Grid (`HttpGrid`) sleeps 3 s between asks for a round's replies, so a round
its nodes finish in 10 s ends anywhere up to 13 s: 1.5 s more on average, every round, and again
for every holdings query (docs/deployment.md). This wrapper passes every call through to the
runtime's Grid and waits for replies as it does, asking every `interval` seconds.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message, RecordDict
from flwr.proto.node_pb2 import NodeInfo  # pylint: disable=E0611
from flwr.supercore.run import Run
from flwr.serverapp import Grid


class PromptGrid(Grid):
    def __init__(self, grid: Grid, interval: float = 0.2) -> None:
        self.grid = grid
        self.interval = interval

    def set_run(self, run: Run) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Run:
        return self.grid.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def get_nodes(self) -> Iterable[NodeInfo]:
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push `messages`, then collect their replies until all are in or `timeout` seconds pass."""
        waiting = set(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while True:
            arrived = list(self.pull_messages(waiting))
            replies.extend(arrived)
            waiting -= {m.metadata.reply_to_message_id for m in arrived}
            left = None if deadline is None else deadline - time.monotonic()
            if not waiting or (left is not None and left <= 0):
                return replies
            time.sleep(self.interval if left is None else min(self.interval, left))
