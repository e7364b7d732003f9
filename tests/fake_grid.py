"""A Grid that calls the real ClientApp in-process, for strategy tests without Flower's runtime."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid

from client_app.app import app as client_app


class FakeGrid(Grid):
    """Nodes 101, 102, ... each with its partition; records every message sent and received.

    `tamper(reply) -> reply` lets a test corrupt replies on their way back.
    """

    def __init__(self, num_nodes: int, tamper: Callable[[Message], Message] | None = None,
                 node_config: Callable[[int], dict] | None = None) -> None:
        self.node_ids = [101 + i for i in range(num_nodes)]
        self.tamper = tamper
        self.sent: list[Message] = []
        self.received: list[Message] = []
        self._contexts = {
            node_id: Context(
                run_id=1, node_id=node_id,
                node_config=(node_config(i) if node_config else
                             {"partition-id": i, "num-partitions": num_nodes}),
                state=RecordDict(), run_config={},
            )
            for i, node_id in enumerate(self.node_ids)
        }

    def set_run(self, run_id: int) -> None:
        pass

    @property
    def run(self):
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid4())
            self.sent.append(msg)
            try:
                reply = client_app(msg, self._contexts[msg.metadata.dst_node_id])
            except Exception as ex:  # as Flower does: a raising ClientApp becomes an error reply
                reply = Message(Error(code=2, reason=f"{type(ex)}:<'{ex}'>"), reply_to=msg)
            if self.tamper is not None:
                reply = self.tamper(reply)
            self.received.append(reply)
            replies.append(reply)
        return replies
