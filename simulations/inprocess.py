"""An in-process Grid: the ServerApp and a ClientApp in one process, no Ray, no network.

For tests, debugging of the ServerApp / ClientApp contract, and the membership audit's shadow
federations (``simulations.membership_audit``).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid

from ..flower_bridge import ErrorCode, Run, TaskIdentity

__all__ = ["InProcessGrid"]


class InProcessGrid(Grid):
    """A Grid that runs a ClientApp synchronously in this process: no Ray, no network.

    For tests and debugging of the ServerApp / ClientApp contract (deterministic and fast).
    Node ``i`` has id ``i + 1`` and node config ``partition-id = i``, ``num-partitions = n``;
    an exception in the ClientApp becomes an error reply, as Flower's engines do.

    Parameters
    ----------
    client_app : flwr.clientapp.ClientApp
        The app every node runs.
    num_nodes : int
        How many nodes.
    node_config : dict, optional
        Extra node config given to every node.
    """

    def __init__(
        self, client_app: ClientApp, num_nodes: int, node_config: dict[str, Any] | None = None
    ) -> None:
        if TaskIdentity._run_id is None:  # what flwr's run_simulation sets for its ServerApp
            TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
        self._app = client_app
        self._contexts = {
            i + 1: Context(
                run_id=TaskIdentity.run_id,
                node_id=i + 1,
                node_config={"partition-id": i, "num-partitions": num_nodes, **(node_config or {})},
                state=RecordDict(),
                run_config={},
            )
            for i in range(num_nodes)
        }
        self._ids = itertools.count(1)
        self.calls = 0

    def set_run(self, run: Run) -> None:
        """Not used in process."""

    @property
    def run(self) -> Run:
        """Not used in process."""
        raise NotImplementedError("InProcessGrid has no Run")

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        """Not used by message-API strategies."""
        raise NotImplementedError("build messages with flwr.app.Message")

    def get_node_ids(self) -> list[int]:
        """Return the node ids."""
        return list(self._contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Not supported: use send_and_receive."""
        raise NotImplementedError("InProcessGrid only implements send_and_receive")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Not supported: use send_and_receive."""
        raise NotImplementedError("InProcessGrid only implements send_and_receive")

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Run the ClientApp on every message, in order; return the replies."""
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = f"msg-{next(self._ids)}"
            node = msg.metadata.dst_node_id
            self.calls += 1
            try:
                reply = self._app(msg, self._contexts[node])
            except Exception as exc:  # noqa: BLE001 - mirrors flwr: a ClientApp crash is an error reply
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(exc).__name__}: {exc}"),
                                reply_to=msg)
            reply.metadata.__dict__["_src_node_id"] = node
            replies.append(reply)
        return replies
