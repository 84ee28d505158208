"""``flower-supernode`` with a shorter idle poll: flwr 1.41 waits a fixed 3 s between pulls.

flwr 1.41's SuperNode loop (``flwr.supernode.start_client_internal``) asks the SuperLink for a
message, and when there is none sleeps ``time.sleep(3)`` before asking again; while a ClientApp
runs it checks for the reply every 0.5 s. Neither is configurable, and the 3 s wait comes
twice per round (train, evaluate): on average 3 s of every round is spent waiting.

``fedcare node start`` (``NodeSettings.poll_interval``) runs the SuperNode as
``python -m fedcare.client.supernode_main --fedcare-poll-interval S -- <flower-supernode
arguments>``: flwr's own ``flower-supernode`` entry point, unchanged except that the loop's
module sees a ``time`` whose ``sleep`` waits at most ``S`` seconds when idle (the 3 s wait) and
at most 0.1 s while waiting for a local reply. Each idle pull is one small authenticated HTTPS
request to the SuperLink. Only flwr 1.41 is patched (the version fedcare pins); with another
version the SuperNode runs unpatched and says so. The node also retries objects of a message
that are not on the SuperLink yet after 0.05 s rather than flwr's 1 s (:mod:`fedcare.pull_backoff`).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import Any

from ..pull_backoff import shorten_pull_backoff

__all__ = ["IDLE_POLL_S", "POLL_OPTION", "main", "patch_poll_interval"]

POLL_OPTION = "--fedcare-poll-interval"
IDLE_POLL_S = 3.0  # flwr 1.41: start_client_internal's sleep when no message was pulled
_REPLY_WAIT_S = 0.1


class _ShortSleeps:
    """Stands in for the ``time`` module inside flwr's SuperNode loop."""

    def __init__(self, idle_s: float) -> None:
        self._idle_s = idle_s

    def sleep(self, seconds: float) -> None:
        if seconds >= IDLE_POLL_S:
            time.sleep(min(seconds, self._idle_s))
        else:
            time.sleep(min(seconds, _REPLY_WAIT_S))

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def patch_poll_interval(idle_s: float) -> bool:
    """Make flwr 1.41's SuperNode loop poll every ``idle_s`` s when idle; return whether patched."""
    import flwr  # noqa: PLC0415
    import flwr.supernode.start_client_internal as loop  # noqa: PLC0415

    version = getattr(flwr, "__version__", "")
    if not version.startswith("1.41.") or getattr(loop, "time", None) is not time:
        sys.stderr.write(
            f"fedcare: flwr {version or '?'} is not the version whose SuperNode loop fedcare "
            "tunes (1.41): polling every 3 s as flwr does\n"
        )
        return False
    loop.time = _ShortSleeps(idle_s)  # type: ignore[assignment]
    return True


def main(argv: Sequence[str] | None = None) -> None:
    """``[--fedcare-poll-interval S] [--] <flower-supernode arguments>``."""
    args = list(sys.argv[1:] if argv is None else argv)
    idle_s = IDLE_POLL_S
    if args[:1] == [POLL_OPTION]:
        idle_s = float(args[1])
        if not 0.05 <= idle_s <= IDLE_POLL_S:
            raise SystemExit(f"{POLL_OPTION} must be between 0.05 and 3 s, got {idle_s}")
        args = args[2:]
    if args[:1] == ["--"]:
        args = args[1:]
    if idle_s < IDLE_POLL_S:
        patch_poll_interval(idle_s)
    shorten_pull_backoff()  # the server's message: its objects are pulled as soon as they arrive
    from flwr.supernode.cli.flower_supernode import flower_supernode  # noqa: PLC0415

    sys.argv = ["flower-supernode", *args]
    flower_supernode()


if __name__ == "__main__":
    main()
