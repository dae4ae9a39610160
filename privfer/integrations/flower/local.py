"""LocalGrid: a Grid that runs a ClientApp for several Flower nodes in this process."""

from __future__ import annotations

import time
import uuid
from typing import Any, Callable, Iterable, Mapping

from privfer.integrations.flower.common import Context, Error, Grid, Message, RecordDict


# --------------------------------------------------------------------------------------------------------------------
# LocalGrid: Flower nodes in this process
# --------------------------------------------------------------------------------------------------------------------
class LocalGrid(Grid):
    """A ``Grid`` that runs ``client_app`` for each node in this process.

    Each node keeps a ``Context`` that is serialized to Flower's protobuf
    between messages (as a SuperNode holds it), and every message and reply
    goes through protobuf too, so ``bytes_sent``/``bytes_received`` are what
    the wire would carry. ``answers`` maps a node id to the number of messages
    it answers before it vanishes (a dropout: its later messages get no
    reply). An exception in the ``ClientApp`` becomes an error reply, as on a
    SuperNode.
    """

    def __init__(
        self,
        client_app: Any,
        num_nodes: int,
        *,
        run_config: Mapping[str, Any] | None = None,
        node_config: Callable[[int], Mapping[str, Any]] | None = None,
        answers: Mapping[int, int] | None = None,
        run_id: int = 1,
    ) -> None:
        from flwr.common.serde import context_to_proto

        _ensure_task_identity(run_id)
        self.client_app = client_app
        self.node_ids = [1000 + index for index in range(num_nodes)]
        self.answers = dict(answers or {})
        self._run_id = run_id
        self._contexts = {
            node: context_to_proto(Context(run_id=run_id, node_id=node,
                                           node_config=dict(node_config(index) if node_config else {}),
                                           state=RecordDict(), run_config=dict(run_config or {}))).SerializeToString()
            for index, node in enumerate(self.node_ids)
        }
        self._replies: dict[str, Message] = {}
        self.handled: dict[int, int] = {node: 0 for node in self.node_ids}
        self.bytes_sent = 0  # server -> nodes
        self.bytes_received = 0  # nodes -> server
        self.client_seconds = 0.0

    @property
    def run(self):  # type: ignore[override]
        try:
            from flwr.supercore.run import Run
        except ImportError:  # flwr < 1.41
            from flwr.common.typing import Run  # type: ignore[attr-defined,no-redef]
        return Run.create_empty(self._run_id)

    def set_run(self, run: Any) -> None:
        self._run_id = int(getattr(run, "run_id", run))

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        from flwr.common.serde import context_from_proto, context_to_proto, message_from_proto, message_to_proto
        from flwr.proto.message_pb2 import Context as ContextProto

        ids = []
        for message in messages:
            node = message.metadata.dst_node_id
            if node not in self._contexts:
                raise ValueError(f"no node {node} in this LocalGrid")
            message_id = uuid.uuid4().hex
            message.metadata.__dict__["_message_id"] = message_id  # as Flower's grids do on push
            proto = message_to_proto(message)
            proto.metadata.message_id = message_id
            self.bytes_sent += proto.ByteSize()
            ids.append(message_id)
            self.handled[node] += 1
            if node in self.answers and self.handled[node] > self.answers[node]:
                continue  # gone: no reply will ever come
            delivered = message_from_proto(proto)
            context = context_from_proto(ContextProto.FromString(self._contexts[node]))
            started = time.perf_counter()
            try:
                reply = self.client_app(delivered, context)
            except Exception as exc:  # noqa: BLE001 - a SuperNode turns any ClientApp failure into an error reply
                reply = Message(Error(code=2, reason=f"{type(exc).__name__}: {exc}"), reply_to=delivered)
            self.client_seconds += time.perf_counter() - started
            self._contexts[node] = context_to_proto(context).SerializeToString()
            reply_proto = message_to_proto(reply)
            reply_proto.metadata.message_id = uuid.uuid4().hex
            self.bytes_received += reply_proto.ByteSize()
            self._replies[message_id] = message_from_proto(reply_proto)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))

    def context(self, node: int) -> Context:
        """The node's current ``Context`` (a copy)."""
        from flwr.common.serde import context_from_proto
        from flwr.proto.message_pb2 import Context as ContextProto

        return context_from_proto(ContextProto.FromString(self._contexts[node]))


def _ensure_task_identity(run_id: int) -> None:
    """Flower >= 1.41 builds instruction messages from the process's task identity, which a ServerApp process has."""
    try:
        from flwr.supercore.task_identity import TaskIdentity
    except ImportError:  # older Flower: messages need no task identity
        return
    try:
        TaskIdentity.run_id
    except RuntimeError:
        from flwr.common.constant import SUPERLINK_NODE_ID

        TaskIdentity.run_id = run_id
        TaskIdentity.node_id = SUPERLINK_NODE_ID
        TaskIdentity.task_id = 0
