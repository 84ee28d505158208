"""``flower-supernode`` with a shorter idle poll: flwr waits a fixed 3 s between pulls.

flwr's SuperNode loop asks the SuperLink for a message, and when there is none sleeps 3 s
before asking again; while a ClientApp runs it checks for the reply every 0.5 s. Neither is
configurable, and the 3 s wait comes twice per round (train, evaluate): on average 3 s of every
round is spent waiting.

``fedcare node start`` (``NodeSettings.poll_interval``) runs the SuperNode as
``python -m fedcare.client.supernode_main --fedcare-poll-interval S -- <flower-supernode
arguments>``: flwr's own ``flower-supernode`` entry point, unchanged except that the loop waits
at most ``S`` seconds when idle and at most 0.1 s for a local reply
(:func:`fedcare.flower_bridge.shorten_supernode_poll`). Each idle pull is one small
authenticated HTTPS request to the SuperLink. The patch is guarded
(:mod:`fedcare.flower_bridge`): on a flwr it does not recognise the SuperNode polls as flwr
does and says so in one log line. The node also retries objects of a message that are not on
the SuperLink yet after 0.05 s rather than flwr's 1 s
(:func:`fedcare.flower_bridge.shorten_pull_backoff`), guarded the same way.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from ..flower_bridge import (
    FLWR_IDLE_POLL_S,
    run_flower_supernode,
    shorten_pull_backoff,
    shorten_supernode_poll,
)

__all__ = ["IDLE_POLL_S", "POLL_OPTION", "main", "patch_poll_interval"]

POLL_OPTION = "--fedcare-poll-interval"
IDLE_POLL_S = FLWR_IDLE_POLL_S  # flwr's wait in the SuperNode loop when no message was pulled


def patch_poll_interval(idle_s: float) -> bool:
    """Make flwr's SuperNode loop poll every ``idle_s`` s when idle; return whether patched."""
    return shorten_supernode_poll(idle_s)


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
    run_flower_supernode(args)


if __name__ == "__main__":
    main()
