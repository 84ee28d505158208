"""Prompt object pulls: flwr 1.41 retries a not-yet-available object after 1 s, then 2, 4, 8, 10 s.

flwr 1.41 sends a message in two steps: the sender registers the message, then pushes its
objects (records, arrays) one request each. The receiver sees the message after the first
step and pulls its objects with ``flwr.supercore.inflatable.inflatable_utils.pull_objects``;
an object whose content has not arrived yet (``ObjectUnavailableError``) is asked for again
after an exponential backoff starting at ``PULL_INITIAL_BACKOFF`` = 1 s and capped at 10 s.
On a deployment this happens at every hop of every stage, because the receiver is quicker than
the sender's object pushes:

- the SuperNode pulls the server's message while the ServerApp is still pushing its objects;
- a warm ClientApp task (:mod:`fedcare.client.warm_exec`) forks within 0.1 s of the message
  and asks its SuperNode for the objects before the SuperNode has them (1 s, often 1 + 2 s);
- the ServerApp pulls a reply while the SuperNode is still pushing its objects.

Each costs about a second of a round that is otherwise waiting for nothing.
:func:`shorten_pull_backoff` makes the retries start at ``initial_s`` (0.05 s) and cap at
``cap_s`` (0.5 s) in the calling process, with proportionally more tries so that the time a
pull may wait before it fails stays what flwr allows. It changes only the defaults of flwr's
two pull functions (``pull_objects`` and ``pull_and_inflate_object_from_tree``, called with
their defaults by the SuperNode loop, ``flwr-clientapp`` and the ServerApp's Grid), and only
on flwr 1.41, the version fedcare pins; each retry is one small request (loopback Runtime API,
or the SuperLink's Fleet API).
"""

from __future__ import annotations

import logging
import math

__all__ = ["PULL_BACKOFF_CAP_S", "PULL_INITIAL_BACKOFF_S", "shorten_pull_backoff"]

logger = logging.getLogger(__name__)

#: first retry of an unavailable object (flwr 1.41: 1 s)
PULL_INITIAL_BACKOFF_S = 0.05
#: longest wait between retries (flwr 1.41: 10 s)
PULL_BACKOFF_CAP_S = 0.5
_FLWR_BACKOFF = {"initial_backoff": 1, "backoff_cap": 10}  # flwr 1.41's PULL_* constants


def shorten_pull_backoff(
    initial_s: float = PULL_INITIAL_BACKOFF_S, cap_s: float = PULL_BACKOFF_CAP_S
) -> bool:
    """Make flwr 1.41's object pulls in this process retry after ``initial_s`` .. ``cap_s`` seconds.

    Parameters
    ----------
    initial_s : float
        First wait after an unavailable object; doubles per retry.
    cap_s : float
        Longest wait between retries, at least ``initial_s``.

    Returns
    -------
    bool
        True when the defaults were changed (or already were); False on another flwr version,
        whose pulls are left as they are.

    Raises
    ------
    ValueError
        When ``initial_s`` is not positive or ``cap_s`` is below it.
    """
    if not 0 < initial_s <= cap_s:
        raise ValueError(f"need 0 < initial_s <= cap_s, got {initial_s}, {cap_s}")
    import flwr  # noqa: PLC0415
    from flwr.supercore.inflatable import inflatable_utils  # noqa: PLC0415

    functions = (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree)
    version = getattr(flwr, "__version__", "")
    defaults = [getattr(fn, "__kwdefaults__", None) or {} for fn in functions]
    if all(d.get("initial_backoff") == initial_s and d.get("backoff_cap") == cap_s for d in defaults):
        return True
    untouched = all(
        all(d.get(k) == v for k, v in _FLWR_BACKOFF.items()) and "max_tries_per_object" in d for d in defaults
    )
    if not version.startswith("1.41.") or not untouched:
        logger.warning(
            "flwr %s is not the version whose object pulls fedcare tunes (1.41): unavailable "
            "objects are retried after flwr's own backoff (1 s, up to 10 s)",
            version or "?",
        )
        return False
    for kwdefaults in defaults:
        tries = kwdefaults["max_tries_per_object"]
        if tries is not None:  # keep the time a pull may wait: same tries x cap
            kwdefaults["max_tries_per_object"] = math.ceil(tries * _FLWR_BACKOFF["backoff_cap"] / cap_s)
        kwdefaults["initial_backoff"] = initial_s
        kwdefaults["backoff_cap"] = cap_s
    return True
