"""The coordinator's check of every model update before aggregation.

A site's training reply is aggregated only if its update is well formed; anything else is
refused (named in the round's record and, through it, in the signed audit log) and the round goes
on with the other sites:

- the reply carries exactly one ArrayRecord, under ``wire.ARRAYS``;
- its arrays have exactly the names and shapes of the global model the server sent, and float
  values (float32 or float64: an aggregate of float32 updates may be float64);
- every value is finite (no NaN, no ±Inf);
- the L2 norm of the update (reply minus the global model sent, over all arrays) is at most
  ``max-update-norm`` (when set, ``> 0``);
- its weight (``num-examples``) is a finite number ``> 0`` (a NaN or negative weight poisons the
  weighted mean as surely as a NaN parameter).

flwr's own aggregation checks none of this: a NaN update turns the global model into NaN, a
broadcastable wrong shape is silently broadcast, and an array named differently crashes the whole
round (``InconsistentMessageReplies``).

Under SecAgg+ the server never sees one site's update, so :func:`check_secure_aggregate` checks
what it can see: the unmasked mean of the surviving sites (before the server's client-level DP
noise). It must be finite and shaped like the model, its update norm at most ``max-update-norm``
(when set) and, with client-level DP, at most the clipping norm C (the mean of updates each
clipped to C cannot be longer; a longer one means a site skipped its clipping mod), up to the
quantisation error. A site's own update is bounded by the site's mods (``fixedclipping_mod``
and the quantisation-range check of ``client.secure``), not by the server.

Reasons name array names, shapes, counts and norms only, never a value of the update.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from flwr.app import Message

from ..models import wire

__all__ = [
    "RefusedUpdate",
    "UpdateCheck",
    "check_secure_aggregate",
    "update_norm",
]

logger = logging.getLogger(__name__)


def update_norm(reference: Mapping[str, np.ndarray], arrays: Mapping[str, np.ndarray]) -> float:
    """Return the L2 norm, in float64 over all arrays, of ``arrays`` minus ``reference`` (same names)."""
    total = 0.0
    for name, ref in reference.items():
        diff = np.asarray(arrays[name], dtype=np.float64) - np.asarray(ref, dtype=np.float64)
        total += float(np.sum(diff * diff))
    return math.sqrt(total)


def _array_problem(reference: Mapping[str, np.ndarray], arrays: Mapping[str, np.ndarray]) -> str | None:
    """Return what is wrong with the names, shapes, dtypes or values of ``arrays`` (None: nothing)."""
    missing = [n for n in reference if n not in arrays]
    extra = [n for n in arrays if n not in reference]
    if missing or extra:
        return (f"its arrays are not the model's: missing {missing[:5]}, unexpected {extra[:5]} "
                f"({len(missing)} missing, {len(extra)} unexpected)")
    for name, ref in reference.items():
        arr = arrays[name]
        if tuple(arr.shape) != tuple(ref.shape):
            return f"array {name!r} has shape {tuple(arr.shape)}, the model's is {tuple(ref.shape)}"
        if arr.dtype.kind != ref.dtype.kind or arr.dtype.kind not in "fc":
            # the same kind of number, not the same width: an aggregate may come back in float64
            # from float32 updates; integers, booleans or objects are never a model update
            return f"array {name!r} has dtype {arr.dtype}, the model's is {ref.dtype} (a float array is expected)"
    for name in reference:
        arr = arrays[name]
        if not bool(np.all(np.isfinite(arr))):
            nan, inf = int(np.count_nonzero(np.isnan(arr))), int(np.count_nonzero(np.isinf(arr)))
            return f"array {name!r} holds {nan} NaN and {inf} infinite value(s)"
    return None


@dataclass(frozen=True)
class RefusedUpdate:
    """A training reply whose update the coordinator refused.

    Attributes
    ----------
    node_id : int
        The node that sent it.
    reason : str
        What is wrong with it (names, shapes, counts and norms only; never a value).
    """

    node_id: int
    reason: str


class UpdateCheck:
    """Check training replies against the global model sent (see the module docstring).

    Parameters
    ----------
    max_update_norm : float
        The largest L2 norm of an accepted update (reply minus the global model sent); ``0``:
        no norm bound (finiteness, names, shapes and weights are always checked).
    """

    def __init__(self, *, max_update_norm: float = 0.0) -> None:
        if not (math.isfinite(max_update_norm) and max_update_norm >= 0.0):
            raise ValueError(f"max_update_norm must be a finite number >= 0 (0: no bound), got {max_update_norm!r}")
        self.max_update_norm = float(max_update_norm)

    def problem(self, reply: Message, reference: Mapping[str, np.ndarray]) -> str | None:
        """Return why ``reply``'s update must not be aggregated (None: accept it)."""
        content = reply.content
        if list(content.array_records.keys()) != [wire.ARRAYS]:
            return f"it carries the array record(s) {list(content.array_records.keys())}, not one {wire.ARRAYS!r}"
        arrays = {name: array.numpy() for name, array in content.array_records[wire.ARRAYS].items()}
        found = _array_problem(reference, arrays)
        if found is not None:
            return found
        if self.max_update_norm > 0:
            norm = update_norm(reference, arrays)
            if not norm <= self.max_update_norm:
                return f"its update has L2 norm {norm:.6g}, above max-update-norm = {self.max_update_norm:g}"
        weights = [m.get(wire.NUM_EXAMPLES) for m in content.metric_records.values()]
        weight = weights[0] if len(weights) == 1 else None
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not (math.isfinite(weight) and weight > 0):
            return f"its weight {wire.NUM_EXAMPLES!r} is not one finite number > 0 (one metric record)"
        return None

    def screen(
        self, replies: list[Message], reference: Mapping[str, np.ndarray]
    ) -> tuple[list[Message], list[RefusedUpdate]]:
        """Return the replies to aggregate (order kept) and the refused ones with their reasons.

        ``replies`` are training replies without an error; ``reference`` is the global model the
        round's training messages carried.
        """
        accepted: list[Message] = []
        refused: list[RefusedUpdate] = []
        for reply in replies:
            reason = self.problem(reply, reference)
            if reason is None:
                accepted.append(reply)
            else:
                refused.append(RefusedUpdate(int(reply.metadata.src_node_id), reason))
        return accepted, refused


def check_secure_aggregate(
    reference: Mapping[str, np.ndarray],
    aggregate: Mapping[str, np.ndarray],
    *,
    max_update_norm: float,
    clipping_norm: float,
    quantisation_step: float,
) -> str | None:
    """Return why a SecAgg+ mean must not become the model (None: accept it).

    Parameters
    ----------
    reference : mapping of str to ndarray
        The global model the round's sites trained from.
    aggregate : mapping of str to ndarray
        The unmasked mean of the surviving sites' models, before any server-side DP noise.
    max_update_norm : float
        The run's bound on an update's L2 norm (0: none).
    clipping_norm : float
        The client-level DP clipping norm C each site's mod clips its update to (0: none).
    quantisation_step : float
        SecAgg+'s quantisation step (``2 * clipping range / quantisation range``): the mean may
        exceed C by at most this much per value.
    """
    found = _array_problem(reference, aggregate)
    if found is not None:
        return f"the secure aggregate is broken: {found}"
    norm = update_norm(reference, aggregate)
    size = sum(int(np.asarray(r).size) for r in reference.values())
    if max_update_norm > 0 and not norm <= max_update_norm:
        return f"the mean update of the secure aggregate has L2 norm {norm:.6g}, above max-update-norm = {max_update_norm:g}"
    if clipping_norm > 0:
        limit = clipping_norm * (1 + 1e-5) + quantisation_step * math.sqrt(size)
        if not norm <= limit:
            return (f"the mean update of the secure aggregate has L2 norm {norm:.6g}, above the client-level "
                    f"DP clipping norm {clipping_norm:g} every site's update is clipped to: at least one site "
                    "skipped its clipping")
    return None
