"""Client side of secure aggregation: SecAgg+ (and client-level DP clipping) around the train handler.

:func:`make_secure_train_mod` returns the mod attached to the ClientApp's train handler. A TRAIN
message without flwr's SecAgg+ config record (``secaggplus_configs``) passes straight to the handler: plain
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

The site's own policy bounds the secure round before any share leaves the site (rule
``secure_cohort``, ``SitePolicy.min_secure_cohort`` = m, default 3; :func:`check_secure_setup`):

- setup: the round must sum at least m sites (flwr's ``sample_num``): with two, each site reads
  the other's update from the aggregate it receives; the reconstruction threshold t must be at
  least m - 1 (t sites holding shares of this site's mask key, with the coordinator, rebuild its
  masks: isolating its update must take as many colluders as reading it from a sum of m) and
  more than half the shares (2t > ``share_num``: a coordinator that tells some neighbours this
  site dropped and others that it is active cannot collect t shares of both its mask seed and
  its mask key);
- unmask: at least m sites must still be active (dropping sites after the masked vectors are in
  would shrink the sum), and no site may be listed both active and dropped, this one included.

Stochastic rounding: flwr's SecAgg+ quantisation rounds with NumPy's legacy global generator.
For the masked-vector stage that generator is seeded from the operating system's entropy (a
deployed site), or from the site's own seed and the round when the site has an explicit seed
(simulations and tests repeat exactly), and the caller's generator state is restored afterwards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict
from flwr.client.mod import fixedclipping_mod, secaggplus_mod  # the legacy mods SecAgg+ composes with
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays

from .. import flower_bridge
from ..flower_bridge import KEY_CLIPPING_NORM, ClientAppCallable, MessageType
from ..flower_bridge import recorddict_compat as compat
from ..models import wire
from ..privacy import randomness  # noqa: F401 - reseeds global generators after every fork
from ..privacy.errors import warn_privacy
from ..privacy.policy import PolicyViolation, Rule, SitePolicy

# flwr's SecAgg+ names the secure-cohort check reads; fails closed (UnsupportedFlowerError) on a
# flwr whose SecAgg+ constants fedcare does not know
RECORD_KEY_CONFIGS, RECORD_KEY_STATE, Key, Stage = flower_bridge.secaggplus_names()

__all__ = [
    "SECURE_ROUND_STATE",
    "SecureRoundError",
    "SecureSite",
    "check_secure_setup",
    "make_secure_train_mod",
    "secure_round_active",
]

logger = logging.getLogger(__name__)

SECURE_ROUND_STATE: Final = "fedcare.secure-round"
"""``context.state`` ConfigRecord set only while a SecAgg+ masked-vector stage runs the handler."""


class SecureRoundError(Exception):
    """This site cannot serve a secure round (or its handler refused it); becomes an error reply."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass(frozen=True)
class SecureSite:
    """What the SecAgg+ mod needs to know about the site, from the site's own configuration.

    Attributes
    ----------
    name : str
        The site name used in refusals.
    policy : SitePolicy or None
        The site's policy (``None``: a hand-built test site without one; no cohort check, warned).
    seed : int or None
        The site's own seed (``None``: stochastic rounding from OS entropy).
    """

    name: str
    policy: SitePolicy | None
    seed: int | None = None


SecureSiteProvider = Callable[[Context], SecureSite]
"""Return the node's :class:`SecureSite`; raise :class:`SecureRoundError` to refuse."""


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


def _within_range(msg: Message, context: Context, call_next: ClientAppCallable, site: SecureSite) -> Message:
    """Refuse parameters SecAgg+ would silently clip at its quantisation range; seed the rounding.

    flwr's SecAgg+ quantisation, which runs right after this returns, rounds stochastically with
    NumPy's legacy global generator: it is seeded here from OS entropy, or from the site's own
    seed and the round when the site has one (see the module docstring). Never from the update:
    that would make the rounding a deterministic function of the data.
    """
    out = call_next(msg, context)
    if out.has_error():
        return out
    params = parameters_to_ndarrays(compat.recorddict_to_fitres(out.content, keep_input=True).parameters)
    limit = context.state.config_records.get(RECORD_KEY_STATE, ConfigRecord()).get("clipping_range")
    if isinstance(limit, (int, float)) and limit > 0:
        if not all(bool(np.all(np.isfinite(a))) for a in params):  # flwr would quantise NaN / Inf to garbage
            raise SecureRoundError(
                wire.ERROR_SECURE_ROUND,
                "the trained model holds NaN or infinite parameters (training diverged); nothing was sent: "
                "the coordinator must lower the learning rate (or the site check its data)",
            )
        largest = max((float(np.max(np.abs(a))) for a in params if a.size), default=0.0)
        if largest > limit:
            raise SecureRoundError(
                wire.ERROR_SECURE_ROUND,
                f"a model parameter reaches |{largest:.3g}|, beyond the SecAgg+ quantisation range "
                f"{limit:g}; the coordinator must raise secagg-clipping-range (or lower the learning rate)",
            )
    if site.seed is None:
        entropy = secrets.token_bytes(32)
    else:
        fit_config = msg.content.config_records.get("fitins.config", ConfigRecord())
        server_round = fit_config.get(wire.SERVER_ROUND)
        entropy = hashlib.sha256(f"{site.seed}:{site.name}:{server_round}:secagg-rounding".encode()).digest()
    np.random.seed(np.frombuffer(entropy, dtype=np.uint32))  # noqa: NPY002 - flwr's quantize reads the global generator
    return out


def _refusal(site: SecureSite, exc: PolicyViolation) -> str:
    """Return the reason of a secure-round refusal, in the handler's refusal format."""
    return wire.REFUSAL_FORMAT.format(site=site.name, stage="join the secure round", reason=str(exc))


def check_secure_setup(policy: SitePolicy, *, sample_number: object, share_number: object,
                       threshold: object) -> None:
    """Raise ``PolicyViolation`` (rule ``secure_cohort``) when a SecAgg+ setup breaks the site's minimum cohort.

    Parameters
    ----------
    policy : SitePolicy
        The site's policy (``min_secure_cohort`` = m).
    sample_number, share_number, threshold : int
        flwr's setup values (``Key.SAMPLE_NUMBER``, ``Key.SHARE_NUMBER``, ``Key.THRESHOLD``):
        sites in the round, shares of each site's secrets (its neighbours, itself included) and
        shares needed to reconstruct a secret.
    """
    m = policy.min_secure_cohort
    values = (sample_number, share_number, threshold)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
        raise PolicyViolation(
            Rule.SECURE_COHORT,
            f"the SecAgg+ setup does not state its sites, shares and threshold as positive integers "
            f"({values!r}); the coordinator must run flwr's SecAgg+ workflow",
            limit=m,
        )
    n, k, t = (int(v) for v in values)  # type: ignore[call-overload]
    if n < m:
        raise PolicyViolation(
            Rule.SECURE_COHORT,
            f"the secure round sums the updates of {n} site(s), fewer than the site's minimum {m}: "
            "each site could read the others' updates from the aggregate; the coordinator must select "
            f"at least {m} sites (min-sites >= {m})",
            asked=n,
            limit=m,
        )
    if t < m - 1:
        raise PolicyViolation(
            Rule.SECURE_COHORT,
            f"a SecAgg+ reconstruction threshold of {t} lets {t} other site(s) and the coordinator rebuild "
            f"this site's masks, fewer than the {m - 1} its minimum secure cohort of {m} requires; the "
            f"coordinator must raise secagg-reconstruction-threshold so that at least {m - 1} shares are needed",
            asked=t,
            limit=m - 1,
        )
    if 2 * t <= k:
        raise PolicyViolation(
            Rule.SECURE_COHORT,
            f"a SecAgg+ reconstruction threshold of {t} out of {k} shares lets a coordinator that reports "
            "this site dropped to some sites and active to others rebuild both its mask seed and its mask "
            f"key; the coordinator must raise secagg-reconstruction-threshold above half the shares (> {k / 2:g})",
            asked=t,
            limit=k // 2 + 1,
        )


def _check_unmask(site: SecureSite, policy: SitePolicy, configs: ConfigRecord, own_id: int) -> None:
    """Refuse an unmask request revealing a sum of fewer than m sites, or both secrets of one site."""
    active = configs.get(Key.ACTIVE_NODE_ID_LIST)
    dead = configs.get(Key.DEAD_NODE_ID_LIST)
    active_ids = set(active) if isinstance(active, list) else set()
    dead_ids = set(dead) if isinstance(dead, list) else set()
    if active_ids & dead_ids or own_id in dead_ids:
        raise SecureRoundError(
            wire.ERROR_SECURE_ROUND,
            f"site '{site.name}' refused to unmask: the request lists a site both active and dropped (or "
            "this site as dropped), which would reveal both secrets of one site; the coordinator must "
            "restart the round",
        )
    m = policy.min_secure_cohort
    if len(active_ids) < m:
        exc = PolicyViolation(
            Rule.SECURE_COHORT,
            f"only {len(active_ids)} site(s) are still active in the secure round, fewer than the site's "
            f"minimum {m}: unmasking would reveal the sum of fewer than {m} updates; the coordinator must "
            f"restart the round with at least {m} sites that stay connected",
            asked=len(active_ids),
            limit=m,
        )
        raise SecureRoundError(wire.ERROR_POLICY, _refusal(site, exc))


def _check_stage(site: SecureSite, msg: Message, configs: ConfigRecord) -> None:
    """Apply the site's secure-cohort rule to a setup or unmask message (see the module docstring)."""
    stage = configs.get(Key.STAGE)
    if stage not in (Stage.SETUP, Stage.UNMASK):
        return
    policy = site.policy
    if policy is None:
        message = (
            f"site {site.name!r}: this LocalSite carries no site policy, so the SecAgg+ cohort is NOT "
            "checked (hand-built sites only; nodes and simulations always set one)"
        )
        warn_privacy(message, logger=logger)
        return
    if stage == Stage.UNMASK:
        _check_unmask(site, policy, configs, int(msg.metadata.dst_node_id))
        return
    try:
        check_secure_setup(policy, sample_number=configs.get(Key.SAMPLE_NUMBER),
                           share_number=configs.get(Key.SHARE_NUMBER), threshold=configs.get(Key.THRESHOLD))
    except PolicyViolation as exc:
        raise SecureRoundError(wire.ERROR_POLICY, _refusal(site, exc)) from None


def make_secure_train_mod(site_of: SecureSiteProvider) -> Callable[[Message, Context, ClientAppCallable], Message]:
    """Return the train mod: SecAgg+ messages through secaggplus_mod (+ fixedclipping_mod), others through.

    Parameters
    ----------
    site_of : callable
        Maps the node's Context to its :class:`SecureSite` (name, policy, seed), read from the
        site's own configuration, never from the message; it may raise :class:`SecureRoundError`.
    """

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

        saved = np.random.get_state()  # noqa: NPY002 - _within_range seeds the rounding; restored below
        try:
            site = site_of(context)
            _check_stage(site, msg, msg.content.config_records[RECORD_KEY_CONFIGS])
            return secaggplus_mod(msg, context, lambda m, c: _within_range(m, c, clipped, site))
        except SecureRoundError as exc:
            logger.warning("secure round refused: %s", exc.reason)
            return Message(Error(code=exc.code, reason=exc.reason), reply_to=msg)
        finally:
            np.random.set_state(saved)  # noqa: NPY002

    return secure_train_mod
