"""A Grid that collects the sites' replies promptly: flwr's deployment Grid waits 3 s between pulls.

flwr's deployment Grid's ``send_and_receive`` (what every Message-API strategy calls once per
stage) pushes the messages, then pulls the replies with ``time.sleep(3)``
between pulls, a fixed interval flwr does not expose. A reply that arrives just after a pull
waits up to 3 s, twice per round (train and evaluate). :class:`PollingGrid` wraps the Grid the
ServerApp receives and does the same push/pull through the Grid's public API, pulling every
``interval`` seconds (0.2 s by default: a small HTTP request to the SuperLink on loopback).
Everything else is delegated unchanged. A reply's objects that the SuperNode is still pushing
are retried after 0.05 s, not flwr's 1 s (:func:`fedcare.flower_bridge.shorten_pull_backoff`).
Both are guarded speed patches (:mod:`fedcare.flower_bridge`, ``serverapp-poll`` and
``pull-backoff``): on a flwr whose Grid they do not recognise, the Grid is left as flwr made it
and one log line says so. ``FEDCARE_SERVERAPP_PULL_INTERVAL`` in the SuperLink's environment sets the interval in
seconds, or ``off`` for flwr's own behaviour (both).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from typing import Any

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from ..flower_bridge import polls_deployment_grid, shorten_pull_backoff

__all__ = ["DEFAULT_PULL_INTERVAL_S", "PULL_INTERVAL_ENV", "PollingGrid", "responsive_grid"]

DEFAULT_PULL_INTERVAL_S = 0.2
PULL_INTERVAL_ENV = "FEDCARE_SERVERAPP_PULL_INTERVAL"


class PollingGrid(Grid):
    """Delegate to ``inner``; :meth:`send_and_receive` pulls replies every ``interval`` seconds."""

    def __init__(self, inner: Grid, interval: float = DEFAULT_PULL_INTERVAL_S) -> None:
        if not interval > 0:
            raise ValueError(f"pull interval must be > 0 s, got {interval}")
        self._inner = inner
        self._interval = float(interval)

    @property
    def inner(self) -> Grid:
        """Return the wrapped Grid."""
        return self._inner

    def set_run(self, run: Any) -> None:
        """Delegate."""
        self._inner.set_run(run)

    @property
    def run(self) -> Any:
        """Delegate."""
        return self._inner.run

    def create_message(  # noqa: PLR0913 - flwr's signature
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        """Delegate."""
        return self._inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        """Delegate."""
        return self._inner.get_node_ids()

    def get_nodes(self) -> Iterable[Any]:
        """Delegate."""
        return self._inner.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Delegate."""
        return self._inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Delegate."""
        return self._inner.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push ``messages``, then pull replies every ``interval`` s until all came or ``timeout``."""
        msg_ids = set(self._inner.push_messages(messages))
        del messages
        if not msg_ids:  # a skipped stage (evaluate-with-train): nothing to wait for
            return []
        end_time = time.time() + (timeout if timeout is not None else 0.0)
        replies: list[Message] = []
        while timeout is None or time.time() < end_time:
            got = list(self._inner.pull_messages(msg_ids))
            replies.extend(got)
            msg_ids.difference_update(m.metadata.reply_to_message_id for m in got)
            if not msg_ids:
                break
            time.sleep(self._interval)
        return replies

    def __getattr__(self, name: str) -> Any:
        # anything else the concrete Grid offers (close, ...)
        return getattr(self._inner, name)


def responsive_grid(grid: Grid, interval: float | None = None) -> Grid:
    """Return ``grid`` wrapped in :class:`PollingGrid` when it is flwr's deployment (HTTP) Grid.

    ``interval`` defaults to ``$FEDCARE_SERVERAPP_PULL_INTERVAL`` (``off``: return ``grid``
    unchanged), else :data:`DEFAULT_PULL_INTERVAL_S`.
    """
    if interval is None:
        raw = os.environ.get(PULL_INTERVAL_ENV, "").strip().lower()
        if raw in ("off", "0", "none", "flwr"):
            return grid
        try:
            interval = float(raw) if raw else DEFAULT_PULL_INTERVAL_S
        except ValueError:
            interval = DEFAULT_PULL_INTERVAL_S
        if not 0 < interval <= 60:
            interval = DEFAULT_PULL_INTERVAL_S
    if polls_deployment_grid(grid):
        shorten_pull_backoff()  # a reply's objects, pulled while the SuperNode still pushes them
        return PollingGrid(grid, interval)
    return grid
