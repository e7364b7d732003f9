"""A Grid that runs the ClientApp in this process: benchmarks and tests without Flower's runtime.

Messages and replies are the same `RecordDict`s Flower would carry, so byte counts are those of
a real run; only the transport (SuperLink, Ray, gRPC) is skipped.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity


class InProcessGrid(Grid):
    """Nodes 101, 102, ...; node i gets `node_configs[i]` (default: partition i of N)."""

    def __init__(self, client_app: ClientApp, num_nodes: int, node_configs: list[dict] | None = None) -> None:
        self.client_app = client_app
        self.node_ids = [101 + i for i in range(num_nodes)]
        configs = node_configs or [{"partition-id": i, "num-partitions": num_nodes} for i in range(num_nodes)]
        run_id = random.getrandbits(48)  # like Flower: a fresh id, so node caches never mix runs
        # flwr 1.42 stamps every instruction Message with the task identity of the process;
        # outside Flower's runtime nobody sets it, so the grid plays the ServerApp's part.
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, 0, 1
        self._contexts = {node_id: Context(run_id=run_id, node_id=node_id, node_config=configs[i],
                                           state=RecordDict(), run_config={})
                          for i, node_id in enumerate(self.node_ids)}

    def context(self, node_id: int) -> Context:
        return self._contexts[node_id]

    def set_run(self, run_id: int) -> None:
        pass

    @property
    def run(self):
        raise NotImplementedError("an in-process grid has no Flower run")

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError("use send_and_receive")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError("use send_and_receive")

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return [self.deliver(msg) for msg in messages]

    def deliver(self, msg: Message) -> Message:
        """Run the ClientApp on one message; an exception becomes an error reply, as in Flower."""
        msg.metadata.__dict__["_message_id"] = str(uuid4())
        try:
            return self.client_app(msg, self._contexts[msg.metadata.dst_node_id])
        except Exception as ex:  # noqa: BLE001 - Flower turns any ClientApp exception into this
            return Message(Error(code=2, reason=f"{type(ex)}:<'{ex}'>"), reply_to=msg)
