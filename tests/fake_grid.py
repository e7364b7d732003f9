"""The in-process Grid, plus what tests need: a record of traffic and a way to corrupt replies."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from flwr.app import Message, MessageType

from client_app.app import app as client_app
from scripts.inprocess import InProcessGrid


class FakeGrid(InProcessGrid):
    """Records train messages (`sent`), their replies (`received`), evaluate messages
    (`evaluations`, replies in `evaluated`) and holdings queries (`queries`).

    `tamper(reply) -> reply` lets a test corrupt train replies on their way back;
    `tamper_evaluate(message, reply) -> reply | None` does the same to evaluate replies (None: lost).
    """

    def __init__(self, num_nodes: int, tamper: Callable[[Message], Message] | None = None,
                 node_config: Callable[[int], dict] | None = None,
                 tamper_evaluate: Callable[[Message, Message], Message | None] | None = None) -> None:
        configs = [node_config(i) for i in range(num_nodes)] if node_config else None
        super().__init__(client_app, num_nodes, configs)
        self.tamper = tamper
        self.tamper_evaluate = tamper_evaluate
        self.sent: list[Message] = []
        self.received: list[Message] = []
        self.evaluations: list[Message] = []
        self.evaluated: list[Message] = []
        self.queries: list[Message] = []

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for msg in messages:
            kind = msg.metadata.message_type
            reply = self.deliver(msg)
            if kind == MessageType.TRAIN:
                self.sent.append(msg)
                reply = self.tamper(reply) if self.tamper else reply
                self.received.append(reply)
            elif kind == MessageType.EVALUATE:
                self.evaluations.append(msg)
                reply = self.tamper_evaluate(msg, reply) if self.tamper_evaluate else reply
                if reply is None:
                    continue
                self.evaluated.append(reply)
            else:
                self.queries.append(msg)
            replies.append(reply)
        return replies
