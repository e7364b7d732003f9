"""The in-process Grid, plus what tests need: a record of traffic and a way to corrupt replies."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from flwr.app import Message, MessageType

from client_app.app import app as client_app
from scripts.inprocess import InProcessGrid


class FakeGrid(InProcessGrid):
    """Records train messages (`sent`), replies (`received`) and holdings queries (`queries`).

    `tamper(reply) -> reply` lets a test corrupt train replies on their way back.
    """

    def __init__(self, num_nodes: int, tamper: Callable[[Message], Message] | None = None,
                 node_config: Callable[[int], dict] | None = None) -> None:
        configs = [node_config(i) for i in range(num_nodes)] if node_config else None
        super().__init__(client_app, num_nodes, configs)
        self.tamper = tamper
        self.sent: list[Message] = []
        self.received: list[Message] = []
        self.queries: list[Message] = []

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for msg in messages:
            is_train = msg.metadata.message_type == MessageType.TRAIN
            (self.sent if is_train else self.queries).append(msg)
            reply = self.deliver(msg)
            if self.tamper is not None and is_train:
                reply = self.tamper(reply)
            if is_train:
                self.received.append(reply)
            replies.append(reply)
        return replies
