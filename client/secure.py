"""Client side of secure aggregation: SecAgg+ (and client-level DP clipping) around the train handler.

:func:`secure_train_mod` is attached to the ClientApp's train handler. A TRAIN message without
flwr's SecAgg+ config record (``secaggplus_configs``) passes straight to the handler: plain
Message-API rounds are unchanged. A message with it goes through

    secaggplus_mod  ->  [range check]  ->  fixedclipping_mod (when the server sent a clipping norm)
                    ->  legacy adapter ->  fedcare's train handler

in that order (flwr's ``fixedclipping_mod`` must run inside ``secaggplus_mod``: the other order
silently skips the round). Only the masked-vector stage reaches the adapter; the key-agreement and
unmask stages are answered by ``secaggplus_mod`` itself.

The legacy adapter turns flwr's legacy fit message (``fitins.parameters`` / ``fitins.config``)
into the Message-API train message fedcare's handler reads (``wire.ARRAYS`` by name,
``wire.CONFIG``) and the reply back into a legacy ``FitRes``:

- parameter names come from ``wire.PARAM_NAMES`` in the config; a count or name mismatch refuses;
- ``num_examples = 1``: SecAgg+ weights the masked sum by it, and client-level DP needs every site
  to weigh the same (each clipped update moves the mean by at most C / m); the true example count
  travels in the plaintext metrics (``num-examples``), with the site name, its sample-level ε and,
  as on the plain path, its manifest digest, DP accountant and clipping norm;
- while the handler runs, ``context.state`` carries :data:`SECURE_ROUND_STATE`, which
  :func:`secure_round_active` reads, so the site policy sees ``secure_aggregation = True`` only in
  a round that really goes through ``secaggplus_mod``, never because the server says so.

A refusal of the handler (policy, budget, data) becomes an error reply with the handler's code and
reason, so the server's secure round fails loudly and names the site.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import OrderedDict
from typing import Final

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.client.mod import fixedclipping_mod, secaggplus_mod  # the legacy mods SecAgg+ composes with
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE
from flwr.compat.common import recorddict_compat as compat
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from ..models import wire

__all__ = ["SECURE_ROUND_STATE", "SecureRoundError", "secure_round_active", "secure_train_mod"]

logger = logging.getLogger(__name__)

SECURE_ROUND_STATE: Final = "fedcare.secure-round"
"""``context.state`` ConfigRecord set only while a SecAgg+ masked-vector stage runs the handler."""


class SecureRoundError(Exception):
    """This site cannot serve a secure round (or its handler refused it); becomes an error reply."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def secure_round_active(context: Context) -> bool:
    """Return whether the handler runs inside a real SecAgg+ round (set by this module only)."""
    record = context.state.config_records.get(SECURE_ROUND_STATE)
    return record is not None and record.get("active") is True


def _decode_config(config: dict[str, object]) -> ConfigRecord:
    """Return the legacy scalar config as the Message-API config the handler reads."""
    out = dict(config)
    out.pop(wire.PARAM_NAMES, None)
    shape = out.get(wire.INPUT_SHAPE)
    if isinstance(shape, str):
        out[wire.INPUT_SHAPE] = [int(d) for d in shape.split(",") if d.strip()]
    return ConfigRecord(out)  # type: ignore[arg-type]


def _legacy_train(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Serve a legacy fit message with fedcare's Message-API train handler (see the module docstring)."""
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    raw_names = fitins.config.get(wire.PARAM_NAMES)
    if not isinstance(raw_names, str):
        raise SecureRoundError(wire.ERROR_SECURE_ROUND, f"the secure round's config lacks {wire.PARAM_NAMES!r}; "
                               "the server runs another fedcare version: update it")
    names = json.loads(raw_names)
    arrays = parameters_to_ndarrays(fitins.parameters)
    if not isinstance(names, list) or len(names) != len(arrays):
        raise SecureRoundError(
            wire.ERROR_SECURE_ROUND,
            f"the secure round sent {len(arrays)} arrays but {len(names) if isinstance(names, list) else '?'} "
            "names; the server and this site run different fedcare versions",
        )
    content = RecordDict({
        wire.ARRAYS: ArrayRecord(OrderedDict(
            (str(n), Array(np.ascontiguousarray(a))) for n, a in zip(names, arrays, strict=True)
        )),
        wire.CONFIG: _decode_config(dict(fitins.config)),
    })
    inner = Message(content=content, metadata=msg.metadata)
    context.state.config_records[SECURE_ROUND_STATE] = ConfigRecord({"active": True})
    try:
        reply = call_next(inner, context)
    finally:
        del context.state.config_records[SECURE_ROUND_STATE]
    if reply.has_error():
        raise SecureRoundError(int(reply.error.code), str(reply.error.reason))
    record = reply.content[wire.ARRAYS]
    if list(record.keys()) != names:
        raise SecureRoundError(wire.ERROR_SECURE_ROUND, "the trained model's array names differ from the server's")
    metrics: dict[str, bool | bytes | float | int | str] = {
        k: v for k, v in reply.content[wire.METRICS].items() if isinstance(v, (int, float))  # type: ignore[union-attr]
    }
    info = reply.content[wire.CONFIG]
    for key in (wire.SITE, wire.MANIFEST_SHA256, wire.ACCOUNTANT):  # what the plain reply's config says
        value = info.get(key)  # type: ignore[union-attr]
        if isinstance(value, str):
            metrics[key] = value
    norm = info.get(wire.MAX_GRAD_NORM)  # type: ignore[union-attr]
    if isinstance(norm, (int, float)) and not isinstance(norm, bool):
        metrics[wire.MAX_GRAD_NORM] = float(norm)
    metrics[wire.SECURE_AGGREGATION] = 1
    fitres = FitRes(
        status=Status(code=Code.OK, message="ok"),
        parameters=ndarrays_to_parameters([v.numpy() for v in record.values()]),
        num_examples=1,  # equal weights: client-level DP sensitivity C/m (true count in metrics)
        metrics=metrics,
    )
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)


def _within_range(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Refuse to send parameters SecAgg+ would silently clip at its quantisation range.

    Also seeds NumPy's global generator from the parameters about to be quantised: flwr's
    SecAgg+ quantisation rounds stochastically with ``np.random`` (unseeded), which would make two
    runs with the same seed differ (and, through the digest that seeds the next round's DP noise,
    diverge). The rounding only has to be unbiased, not secret (the masks come from the SecAgg+
    key agreement), so a seed derived from the update keeps it unbiased and makes it repeatable.
    """
    out = call_next(msg, context)
    if out.has_error():
        return out
    params = parameters_to_ndarrays(compat.recorddict_to_fitres(out.content, keep_input=True).parameters)
    digest = hashlib.sha256(b"".join(np.ascontiguousarray(a).tobytes() for a in params)).digest()
    np.random.seed(int.from_bytes(digest[:4], "little"))  # noqa: NPY002 - flwr's quantize reads the global generator
    limit = context.state.config_records.get(RECORD_KEY_STATE, ConfigRecord()).get("clipping_range")
    if isinstance(limit, (int, float)) and limit > 0:
        largest = max((float(np.max(np.abs(a))) for a in params if a.size), default=0.0)
        if largest > limit:
            raise SecureRoundError(
                wire.ERROR_SECURE_ROUND,
                f"a model parameter reaches |{largest:.3g}|, beyond the SecAgg+ quantisation range "
                f"{limit:g}; the coordinator must raise secagg-clipping-range (or lower the learning rate)",
            )
    return out


def secure_train_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Route SecAgg+ train messages through secaggplus_mod (+ fixedclipping_mod); pass others through."""
    if msg.metadata.message_type != MessageType.TRAIN or RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, context)

    def adapter(m: Message, c: Context) -> Message:
        return _legacy_train(m, c, call_next)

    def clipped(m: Message, c: Context) -> Message:
        if KEY_CLIPPING_NORM in m.content.config_records["fitins.config"]:
            return fixedclipping_mod(m, c, adapter)
        return adapter(m, c)

    try:
        return secaggplus_mod(msg, context, lambda m, c: _within_range(m, c, clipped))
    except SecureRoundError as exc:
        logger.warning("secure round refused: %s", exc.reason)
        return Message(Error(code=exc.code, reason=exc.reason), reply_to=msg)
