"""Run a study with secure aggregation (SecAgg+) and, optionally, client-level differential privacy.

flwr 1.41 offers SecAgg+ only in its legacy workflow API, so this path runs a
``flwr.server.workflow.DefaultWorkflow`` inside a ``LegacyContext`` with:

- :class:`StrictSecAggPlusWorkflow` as the fit workflow: flwr's ``SecAggPlusWorkflow``, except that
  a stage that halts (too few shares, too few sites left) raises :class:`SecureAggregationError`
  instead of logging "Secure aggregation halted" and leaving the model unchanged; the run then
  ends failed, ``history.json`` says ``status = "failed"`` with the reason, no final model is
  written, and the study resumes from its last checkpoint. Dropouts (a site that dies, refuses or
  does not reply) are tolerated as far as SecAgg+ allows: from the masked-vector stage on, while
  every surviving site keeps ``reconstruction-threshold`` active neighbours and at least
  ``min-sites`` sites remain; the round then aggregates the survivors and records each dropped
  site (stage, node, reason) in the round's refusals (hence the audit log). Before the masked
  vectors (setup, share-keys) a lost site fails the round: its key shares were never dealt, so
  its masks could not be removed. A site's policy refusal at unmask (its secure-cohort rule) is
  never overridden: the round fails before anything is unmasked;
- a legacy ``FedAvg`` (or ``FedProx``) wrapped, with client-level DP, in
  ``DifferentialPrivacyClientSideFixedClipping`` (sites clip their update with
  ``fixedclipping_mod``; the server adds N(0, (σ C / m)²) to the mean of the m clipped updates),
  and wrapped again in :class:`_LegacyRecorder`, which records each site's plaintext metrics,
  checks the unmasked mean (``server.update_checks.check_secure_aggregate``: finite, the model's
  shapes, update norm within ``max-update-norm`` and, with client-level DP, within the clipping
  norm), sizes the server's noise to the sites actually summed (σ C / m' for m' survivors) and
  reports the client-level ε (RDP accountant for fixed-size sampling of sites without replacement,
  replace-one neighbours: :func:`client_level_epsilon`; the sample rate stays that of the m sites
  sampled, never lower);
- an evaluation step that reuses :class:`~fedcare.server.strategy.FedcareStrategy` (Message API,
  the same per-site evaluation, worst site and history as the plain path) and then closes the round.

Everything else is the plain path's :class:`~fedcare.server.lifecycle.Study`: resume (a tampered
or plain run's checkpoint is refused), encrypted checkpoints and final model with
``artefact-key``, the signed audit log with ``audit-key`` (rounds with ``secure_aggregation =
true``; a failed round's site errors and ``round_failed`` before the run fails), and a completed
run's privacy report stating SecAgg+ and the client-level DP of
:func:`~fedcare.server.client_dp.client_level_privacy`.

Weighting: every site reports ``num_examples = 1`` to SecAgg+ (its true example count travels in
the plaintext metrics), so the aggregate is the *unweighted* mean of the sites' updates. Client-level
DP needs this (each clipped update moves the mean by at most C / m, the sensitivity the noise is
calibrated to); it also keeps the sites' sizes out of the masked sum.

Parameter names: legacy ``Parameters`` are an ordered list; the fit config carries the ordered
names (``wire.PARAM_NAMES``, a JSON string: legacy configs hold scalars only) so the client adapter
(``client.secure``) rebuilds the named arrays, and a mismatch is refused on both sides.
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any, Final, cast

import numpy as np
from flwr.app import Context, MetricRecord, RecordDict
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server import LegacyContext, ServerConfig
from flwr.server.client_manager import ClientManager, SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    FedAvg,
    FedProx,
    Strategy,
)
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid

from ..flower_bridge import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, RunNotRunningException
from ..flower_bridge import WorkflowKey as Key
from ..flower_bridge import recorddict_compat as compat
from ..models import wire
from .checkpoint import MetricsHistory, RoundRecord
from .client_dp import (
    CLIENT_DELTA,
    CLIENT_EPSILON,
    CLIENT_NOISE,
    CLIENT_SAMPLE_RATE,
    CLIENT_SITES_AVAILABLE,
    CLIENT_SITES_SAMPLED,
    client_level_epsilon,
    client_level_privacy,
    client_steps,
)
from .config import RunConfig
from .lifecycle import RoundCallback, RoundFailedError, SiteError, Study
from .messages import arrays_to_record, evaluate_config, train_config
from .strategy import FedcareStrategy, TooFewSitesError, aggregate_train_metrics, build_strategy
from .update_checks import check_secure_aggregate

__all__ = [
    "CLIENT_DELTA",
    "CLIENT_EPSILON",
    "CLIENT_NOISE",
    "CLIENT_SAMPLE_RATE",
    "CLIENT_SITES_AVAILABLE",
    "CLIENT_SITES_SAMPLED",
    "SITES_LOST",
    "SecureAggregationError",
    "StrictSecAggPlusWorkflow",
    "client_level_epsilon",
    "client_level_privacy",
    "run_secure",
]

logger = logging.getLogger(__name__)

_SECURE_STATE_KIND: Final = "fedcare-secagg/1"
_QUANTISATION_RANGE: Final = 4194304  # 2**22, flwr's default: integers each parameter is quantised to
SITES_LOST: Final = "secagg-sites-lost"  # train metric: sites a tolerated secure round lost (not summed)


class SecureAggregationError(RoundFailedError):
    """A secure round failed (a stage halted, a site dropped or refused): the run stops, failed.

    Parameters
    ----------
    message : str
        What failed and what to do next.
    stage : str
        Where it failed: a SecAgg+ stage (``setup``, ``share-keys``, ``collect-masked-vectors``,
        ``unmask``) or ``aggregate``.
    site_errors : sequence of (node id or None, code, reason)
        The sites' error replies in that stage.
    """


def _failure_reasons(failures: list[Any]) -> list[str]:
    """Return the distinct reasons of SecAgg+ failures (error replies or exceptions)."""
    reasons: list[str] = []
    for failure in failures:
        if isinstance(failure, tuple):  # (proxy, FitRes) with a non-OK status
            proxy, res = failure
            text = f"node {proxy.node_id}: {res.status.message}"
        else:
            arg = failure.args[0] if isinstance(failure, BaseException) and failure.args else failure
            reason = getattr(arg, "reason", None)
            text = str(reason) if reason else str(arg)
        if text not in reasons:
            reasons.append(text)
    return reasons


#: error codes a site answers the unmask stage with when it must not be unmasked: never overridden
_UNMASK_REFUSALS: Final = frozenset({wire.ERROR_POLICY, wire.ERROR_SECURE_ROUND})
#: stages after which flwr's SecAgg+ can still remove a lost site's masks (its shares were dealt)
_TOLERANT_STAGES: Final = frozenset({"collect-masked-vectors", "unmask"})

Dropout = tuple[str, int, int, str]
"""A site lost in a tolerated SecAgg+ stage: (stage, node id, error code or -1, reason)."""


class _StageGrid:
    """Delegate one SecAgg+ stage's exchange to a Grid; note which sent node answered, erred or was silent.

    At the unmask stage, an error reply carrying a site's refusal to be unmasked
    (:data:`_UNMASK_REFUSALS`) raises :class:`SecureAggregationError` at once, before flwr
    reconstructs any secret from the other sites' shares.
    """

    def __init__(self, grid: Grid, stage: str) -> None:
        self._grid = grid
        self.stage = stage
        self.sent: list[int] = []
        self.answered: set[int] = set()
        self.errors: dict[int | None, list[tuple[int, str]]] = {}

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list[Any]:
        """Send through the wrapped grid; sort the replies into answers and errors by sending node."""
        messages = list(messages)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        sent = {m.metadata.message_id: int(m.metadata.dst_node_id) for m in messages if m.metadata.message_id}
        dsts = {int(m.metadata.dst_node_id) for m in messages}
        self.sent += [int(m.metadata.dst_node_id) for m in messages]
        for reply in replies:
            node: int | None = sent.get(reply.metadata.reply_to_message_id)
            if node is None and int(reply.metadata.src_node_id) in dsts:
                node = int(reply.metadata.src_node_id)
            if not reply.has_error():
                if node is not None:
                    self.answered.add(node)
                continue
            self.errors.setdefault(node, []).append((int(reply.error.code), str(reply.error.reason)))
        if self.stage == "unmask":
            refusals = [(n, c, r) for n, errs in self.errors.items() for c, r in errs if c in _UNMASK_REFUSALS]
            if refusals:
                raise SecureAggregationError(
                    f"secure aggregation failed in its unmask stage: {len(refusals)} site(s) refused to be "
                    "unmasked: " + "; ".join(dict.fromkeys(r for _, _, r in refusals))
                    + ". Nothing was unmasked and the model was NOT updated; the last checkpoint holds the "
                    "previous round. Bring back enough sites for every site's minimum secure cohort, then resume.",
                    stage="unmask", site_errors=tuple(refusals),
                )
        return replies

    def lost(self) -> list[Dropout]:
        """Return each node sent to that did not answer: its error reply, or silence until the timeout."""
        out: list[Dropout] = []
        for node in dict.fromkeys(self.sent):
            if node in self.answered:
                continue
            errs = self.errors.get(node) or self.errors.get(None) or []
            code, reason = errs[0] if errs else (-1, "no reply within round-timeout-s (the node stopped or is unreachable)")
            out.append((self.stage, node, code, reason))
        return out

    def site_errors(self) -> tuple[SiteError, ...]:
        """Return every error reply of the stage as (node id or None, code, reason)."""
        return tuple((n, c, r) for n, errs in self.errors.items() for c, r in errs)

    def __getattr__(self, name: str) -> Any:
        """Delegate everything else to the wrapped grid."""
        return getattr(self._grid, name)


class StrictSecAggPlusWorkflow(SecAggPlusWorkflow):
    """flwr's SecAgg+ workflow; a stage that halts raises, and dropouts are tolerated only where SecAgg+ can.

    Setup and share-keys: any lost site fails the round (its key shares were not dealt, flwr could
    not remove its masks). Masked vectors and unmask: lost sites are tolerated while flwr's
    threshold check passes and at least ``min_sites`` sites remain; they are kept in
    ``dropped`` (the round's, cleared at setup). A halted stage, too few survivors, or a site's
    refusal to be unmasked raises :class:`SecureAggregationError` naming the stage and the reason.
    ``stages_s`` holds the last round's time per stage.

    Parameters
    ----------
    *args, **kwargs
        flwr's ``SecAggPlusWorkflow`` arguments.
    min_sites : int
        Fewest sites whose masked vectors a round may sum (the run's ``min-sites``).
    """

    def __init__(self, *args: Any, min_sites: int = 2, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.min_sites = min_sites
        self.stages_s: dict[str, float] = {}
        self.dropped: list[Dropout] = []
        #: called with (run round, stage) when a round enters a SecAgg+ stage (the study's progress file)
        self.on_stage: Callable[[int, str], None] | None = None
        self.round_offset = 0  # rounds done before this run (a resumed study): flwr counts from 1

    def _strict(self, name: str, stage: Callable[..., bool], grid: Grid, context: Any, state: Any) -> bool:
        """Run one stage through a :class:`_StageGrid`; raise when it halts or loses a site it cannot lose."""
        if name == "setup":
            self.dropped = []
        if self.on_stage is not None:
            server_round = cast(int, context.state.config_records[MAIN_CONFIGS_RECORD][Key.CURRENT_ROUND])
            self.on_stage(server_round + self.round_offset, name)
        watched = _StageGrid(grid, name)
        started = time.perf_counter()
        ok = stage(watched, context, state)
        self.stages_s[name] = time.perf_counter() - started
        lost = watched.lost()
        survivors = len(state.active_node_ids)
        if ok and name in _TOLERANT_STAGES and name != "unmask" and lost and survivors < self.min_sites:
            ok = False
            why = [f"only {survivors} site(s) remain, fewer than min-sites = {self.min_sites}"]
        else:
            why = []
        if not ok or (lost and name not in _TOLERANT_STAGES):
            reasons = why + (_failure_reasons(state.failures) or [r for *_, r in lost]
                             or ["too few sites or shares to continue"])
            if not ok and name in _TOLERANT_STAGES and not why:
                reasons.insert(0, f"{survivors} site(s) remain, too few for the reconstruction threshold "
                                  f"{state.threshold} (or a lost site's shares)")
            errors = watched.site_errors() or tuple((n, c, r) for _, n, c, r in lost)
            raise SecureAggregationError(  # the count is the one the audit log records (site_errors)
                f"secure aggregation failed in its {name} stage ({len(errors)} site failure(s)): "
                + "; ".join(dict.fromkeys(reasons))
                + ". The model was NOT updated; the last checkpoint holds the previous round. Bring back "
                "the sites (a secure round tolerates losing sites only from its collect-masked-vectors stage "
                "on, down to its reconstruction threshold and min-sites), then resume.",
                stage=name,
                site_errors=errors,
            )
        if lost:
            logger.warning("secure round: %d site(s) lost in the %s stage (%s); %d remain, the round goes on",
                           len(lost), name, ", ".join(f"node {n}" for _, n, _, _ in lost), survivors)
            self.dropped += lost
        return True

    def setup_stage(self, grid: Grid, context: LegacyContext, state: Any) -> bool:
        """Run flwr's setup stage strictly."""
        return self._strict("setup", super().setup_stage, grid, context, state)

    def share_keys_stage(self, grid: Grid, context: LegacyContext, state: Any) -> bool:
        """Run flwr's share-keys stage strictly."""
        return self._strict("share-keys", super().share_keys_stage, grid, context, state)

    def collect_masked_vectors_stage(self, grid: Grid, context: LegacyContext, state: Any) -> bool:
        """Run flwr's masked-vector stage; lost sites are tolerated down to the threshold and min-sites."""
        return self._strict("collect-masked-vectors", super().collect_masked_vectors_stage, grid, context, state)

    def unmask_stage(self, grid: Grid, context: LegacyContext, state: Any) -> bool:
        """Run flwr's unmask stage; a site refusing to be unmasked stops it before anything is unmasked."""
        return self._strict("unmask", super().unmask_stage, grid, context, state)


class _LegacyRecorder(Strategy):
    """Wrap the legacy (DP) strategy: bounded wait, per-site metrics, no silent failure, client ε."""

    def __init__(
        self,
        strategy: Strategy,
        config: RunConfig,
        history: MetricsHistory,
        initial: Parameters,
        round_offset: int,
        dp: DifferentialPrivacyClientSideFixedClipping | None,
    ) -> None:
        super().__init__()
        self.strategy = strategy
        self.config = config
        self.history = history
        self.initial = initial
        self.round_offset = round_offset
        self.dp = dp
        self.sample_rate = 1.0
        self.sampled, self.available = 1, 1  # set by configure_fit: sites sampled / available this round
        self.names: list[str] = []  # the model's array names, in Parameters order (set by _legacy_strategy)
        self.sent: list[np.ndarray] = []  # the global model of this round's fit messages

    def __repr__(self) -> str:
        """Return the wrapped strategy's description."""
        return f"fedcare secure({self.strategy!r})"

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        """Return the initial (or checkpointed) model."""
        return self.initial

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """Wait (bounded) for min-sites, sample as the wrapped strategy does, size the DP noise."""
        rnd = server_round + self.round_offset
        deadline = time.monotonic() + self.config.round_timeout_s
        while (available := client_manager.num_available()) < self.config.min_sites:
            if time.monotonic() >= deadline:
                raise TooFewSitesError(
                    f"round {rnd}: only {available} site(s) connected after "
                    f"{self.config.round_timeout_s:g} s, fewer than min-sites = {self.config.min_sites}; "
                    "start the hospitals' nodes or lower min-sites, then resume"
                )
            time.sleep(min(1.0, self.config.round_timeout_s))
        instructions = self.strategy.configure_fit(rnd, parameters, client_manager)
        self.sent = parameters_to_ndarrays(parameters)
        self.sample_rate = len(instructions) / max(available, 1)
        self.sampled, self.available = len(instructions), available
        if self.dp is not None:  # noise std σC/m must use this round's m
            self.dp.num_sampled_clients = max(len(instructions), 1)
        return instructions

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Record each site's plaintext metrics; check the unmasked mean; aggregate; add client-level ε.

        ``failures`` are the sites the workflow lost in stages where SecAgg+ tolerates it
        (:class:`StrictSecAggPlusWorkflow` raised on any other); ``results`` are the sites summed.
        """
        rnd = server_round + self.round_offset
        if failures:
            logger.warning("round %d: the secure round lost site(s) and sums %d: %s", rnd, len(results),
                           "; ".join(_failure_reasons(list(failures))))
        if len(results) < self.config.min_sites:
            raise TooFewSitesError(
                f"round {rnd}: only {len(results)} site(s) trained, fewer than min-sites = "
                f"{self.config.min_sites}; fix the sites or lower min-sites, then resume"
            )
        record = self.history.round(rnd)
        records = []
        for proxy, res in sorted(results, key=lambda r: (str(r[1].metrics.get(wire.SITE, "")), r[0].node_id)):
            site = str(res.metrics.get(wire.SITE) or f"node-{proxy.node_id}")
            if site in record.site_train:
                site = f"{site}@node-{proxy.node_id}"
            self.history.node_sites[proxy.node_id] = site
            scalars = {
                k: float(v) for k, v in res.metrics.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != wire.MAX_GRAD_NORM
            }
            record.site_train[site] = scalars
            record.site_info[site] = _site_info(res.metrics)
            if wire.NUM_EXAMPLES in scalars:
                records.append(RecordDict({wire.METRICS: MetricRecord(scalars)}))
        self._check_mean(rnd, results)
        if self.dp is not None:  # the noise std σC/m' must use the m' sites actually summed, not those sampled
            self.dp.num_sampled_clients = max(len(results), 1)
        params, _ = self.strategy.aggregate_fit(rnd, results, [])  # flwr's DP wrapper drops a round with failures
        if params is None:
            raise SecureAggregationError(
                f"round {rnd}: the secure aggregate is empty (the strategy returned no model); "
                "the model was NOT updated"
            )
        train = {k: float(v) for k, v in aggregate_train_metrics(records, wire.NUM_EXAMPLES).items()} if records else {}
        train[wire.SECURE_AGGREGATION] = 1.0
        if self.config.client_dp:
            train[CLIENT_NOISE] = self.config.client_dp_noise_multiplier
            train[CLIENT_SAMPLE_RATE] = self.sample_rate
            train[CLIENT_SITES_SAMPLED] = float(self.sampled)
            train[CLIENT_SITES_AVAILABLE] = float(self.available)
            steps = client_steps([r for r in self.history.rounds if r.complete and r.round < rnd]) + [
                (self.config.client_dp_noise_multiplier, self.sampled, self.available)
            ]
            train[CLIENT_EPSILON] = client_level_epsilon(steps, self.config.client_dp_delta)
            train[CLIENT_DELTA] = self.config.client_dp_delta
            logger.info("round %d: client-level ε = %.4g at δ = %g (RDP, fixed-size sampling without "
                        "replacement, replace-one; σ = %g, %d of %d sites)", rnd, train[CLIENT_EPSILON],
                        self.config.client_dp_delta, self.config.client_dp_noise_multiplier, self.sampled,
                        self.available)  # fmt: skip
        record.train = train
        return params, {}

    def _check_mean(self, rnd: int, results: list[tuple[ClientProxy, FitRes]]) -> None:
        """Raise SecureAggregationError when the unmasked mean fails ``check_secure_aggregate``."""
        if not results or not self.names or len(self.sent) != len(self.names):
            return
        mean = parameters_to_ndarrays(results[0][1].parameters)  # SecAgg+ gives every result the mean
        if len(mean) != len(self.names):
            problem: str | None = (f"the secure aggregate has {len(mean)} arrays, the model {len(self.names)}: the "
                                   "sites run another model version")
        else:
            reference = dict(zip(self.names, self.sent, strict=True))
            problem = check_secure_aggregate(
                reference,  # SecAgg+ dequantises to float64: compared in the model's dtypes
                {n: np.asarray(a).astype(reference[n].dtype) for n, a in zip(self.names, mean, strict=True)},
                max_update_norm=self.config.max_update_norm,
                clipping_norm=self.config.client_dp_clipping_norm,
                quantisation_step=2 * self.config.secagg_clipping_range / _QUANTISATION_RANGE,
            )
        if problem is not None:
            raise SecureAggregationError(
                f"round {rnd}: {problem}. The aggregate was refused and the model NOT updated; the last "
                "checkpoint holds the previous round. Find the site (its node log, its mods), then resume.",
                stage="aggregate",
            )

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        """Federated evaluation runs in the Message API (see ``run_secure``), not here."""
        return []

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        """Nothing to aggregate (see ``configure_evaluate``)."""
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        """No centralised evaluation."""
        return None


def _site_info(metrics: dict[str, Scalar]) -> dict[str, Any]:
    """Return what a site's secure reply says about it: manifest digest, accountant, clipping norm."""
    out: dict[str, Any] = {}
    for key, name in ((wire.MANIFEST_SHA256, "manifest_sha256"), (wire.ACCOUNTANT, "accountant")):
        value = metrics.get(key)
        if isinstance(value, str):
            out[name] = value
    norm = metrics.get(wire.MAX_GRAD_NORM)
    if isinstance(norm, (int, float)) and not isinstance(norm, bool):
        out["max_grad_norm"] = float(norm)
    return out


class _StoppableGrid:
    """Delegate to a Grid; after ``stop()`` flwr's node-polling thread ends (it gets RunNotRunning).

    It also keeps the error replies it passes back (``errors``: node id, code, reason), so that a
    failed secure stage can name the sites that failed in the audit log.
    """

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self._stopped = False
        self.errors: list[SiteError] = []

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list[Any]:
        """Send through the wrapped grid; remember each error reply's node, code and reason."""
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        for reply in replies:
            if reply.has_error():
                self.errors.append((int(reply.metadata.src_node_id), int(reply.error.code), str(reply.error.reason)))
        return replies

    def stop(self) -> None:
        """Make the polling thread end at its next poll."""
        self._stopped = True

    def get_node_ids(self) -> list[int]:
        """Return the connected nodes (raise RunNotRunningException once stopped)."""
        if self._stopped:
            raise RunNotRunningException("fedcare secure run finished")
        return list(self._grid.get_node_ids())

    @property
    def run(self) -> Any:
        """Return the grid's run (an in-process grid without one gets a stand-in with run_id 0)."""
        try:
            return self._grid.run
        except NotImplementedError:
            return SimpleNamespace(run_id=0)

    def __getattr__(self, name: str) -> Any:
        """Delegate everything else to the wrapped grid."""
        return getattr(self._grid, name)


def _legacy_fit_config(config: RunConfig, names: list[str]) -> Callable[[int], dict[str, Scalar]]:
    """Return ``on_fit_config_fn``: the plain path's train config as legacy scalars, plus the names."""
    base: dict[str, Scalar] = {}
    for key, value in train_config(config).items():
        base[key] = ",".join(str(v) for v in value) if isinstance(value, list) else value  # type: ignore[assignment]
    base[wire.PARAM_NAMES] = json.dumps(names)
    if config.strategy == "fedprox":
        base[wire.PROXIMAL_MU] = config.proximal_mu

    def fit_config(server_round: int) -> dict[str, Scalar]:
        """Return the round's legacy fit config (``server_round`` already counts resumed rounds)."""
        return {**base, wire.SERVER_ROUND: server_round}

    return fit_config


def _named(parameters: Parameters, reference: OrderedDict[str, np.ndarray]) -> OrderedDict[str, np.ndarray]:
    """Return legacy Parameters as named arrays of the reference's shapes and dtypes."""
    arrays = parameters_to_ndarrays(parameters)
    if len(arrays) != len(reference):
        raise SecureAggregationError(
            f"the secure aggregate has {len(arrays)} arrays, the model {len(reference)}: the sites "
            "run another model version; update them"
        )
    out: OrderedDict[str, np.ndarray] = OrderedDict()
    for (name, ref), arr in zip(reference.items(), arrays, strict=True):
        if arr.size != ref.size:
            raise SecureAggregationError(f"secure aggregate array {name!r} has {arr.size} values, expected {ref.size}")
        out[name] = np.asarray(arr, dtype=ref.dtype).reshape(ref.shape)
    return out



def _legacy_strategy(config: RunConfig, study: Study) -> _LegacyRecorder:
    """Return flwr's legacy FedAvg / FedProx, with client-level DP when configured, in the recorder."""
    legacy_cls = FedProx if config.strategy == "fedprox" else FedAvg
    legacy_kwargs: dict[str, Any] = {"proximal_mu": config.proximal_mu} if config.strategy == "fedprox" else {}
    inner: Strategy = legacy_cls(
        fraction_fit=config.fraction_train,
        fraction_evaluate=0.0,
        min_fit_clients=config.min_sites,
        min_evaluate_clients=0,
        min_available_clients=config.min_sites,
        on_fit_config_fn=_legacy_fit_config(config, list(study.arrays)),
        fit_metrics_aggregation_fn=lambda _: {},
        **legacy_kwargs,
    )
    dp = None
    if config.client_dp:
        dp = DifferentialPrivacyClientSideFixedClipping(
            inner,
            noise_multiplier=config.client_dp_noise_multiplier,
            clipping_norm=config.client_dp_clipping_norm,
            num_sampled_clients=config.min_sites,  # reset every round to the sites sampled
        )
        inner = dp
    initial = ndarrays_to_parameters(list(study.arrays.values()))
    recorder = _LegacyRecorder(inner, config, study.history, initial, study.done, dp)
    recorder.names = list(study.arrays)
    return recorder


def _secagg_workflow(config: RunConfig) -> StrictSecAggPlusWorkflow:
    """Return the strict SecAgg+ fit workflow with the run's shares, threshold, range and timeout."""
    return StrictSecAggPlusWorkflow(
        config.secagg_num_shares,
        config.secagg_reconstruction_threshold,
        max_weight=1.0,  # every site reports weight 1 (unweighted mean), so no precision is lost
        clipping_range=config.secagg_clipping_range,
        quantization_range=_QUANTISATION_RANGE,
        timeout=config.round_timeout_s,
        min_sites=config.min_sites,
    )


class _RoundCloser:
    """The workflow's evaluate step: evaluate the round's secure aggregate on the sites, then close the round."""

    def __init__(self, study: Study, evaluator: FedcareStrategy, workflow: StrictSecAggPlusWorkflow) -> None:
        self.study = study
        self.evaluator = evaluator
        self.workflow = workflow
        self.reference = OrderedDict((k, v.copy()) for k, v in study.arrays.items())  # names, shapes, dtypes

    def __call__(self, grid: Grid, context: Context) -> None:
        """Evaluate the round's model on the sites (Message API), then checkpoint and audit the round."""
        legacy = cast(LegacyContext, context)
        server_round = cast(int, legacy.state.config_records[MAIN_CONFIGS_RECORD][Key.CURRENT_ROUND])
        rnd = server_round + self.study.done
        record = self.study.history.round(rnd)
        if not record.train:
            raise SecureAggregationError(f"round {rnd} ended without a secure aggregate; the model was NOT updated")
        params = compat.arrayrecord_to_parameters(legacy.state.array_records[MAIN_PARAMS_RECORD], keep_input=True)
        arrays = _named(params, self.reference)
        self._record_dropouts(record)
        if self.study.config.fraction_evaluate > 0:
            self.study.progress.stage(rnd, "evaluate")
            self._evaluate(grid, server_round, arrays)
        record.train.update({f"secagg-{k}-s": v for k, v in self.workflow.stages_s.items()})
        self.study.close_round(rnd, arrays, strategy_state={"kind": _SECURE_STATE_KIND})

    def _record_dropouts(self, record: RoundRecord) -> None:
        """Add each site the workflow lost (and tolerated) to the round's refusals, hence the audit log."""
        for stage, node, code, reason in self.workflow.dropped:
            site = self.study.history.node_sites.get(node, f"node-{node}")
            record.refusals.append({"stage": stage, "node_id": node, "site": site, "code": code, "reason": reason})
        if self.workflow.dropped:
            record.train[SITES_LOST] = float(len({node for _, node, _, _ in self.workflow.dropped}))

    def _evaluate(self, grid: Grid, server_round: int, arrays: OrderedDict[str, np.ndarray]) -> None:
        """Send the model to the sites to evaluate and aggregate their replies into the history."""
        config = self.study.config
        messages = list(self.evaluator.configure_evaluate(server_round, arrays_to_record(arrays),
                                                          evaluate_config(config), grid))  # fmt: skip
        replies = list(grid.send_and_receive(messages, timeout=config.round_timeout_s)) if messages else []
        self.evaluator.aggregate_evaluate(server_round, replies)


def run_secure(
    grid: Grid,
    config: RunConfig,
    *,
    on_round: RoundCallback | None = None,
    write_report: bool = True,
    operating_point: bool = False,
) -> MetricsHistory:
    """Run ``config`` with SecAgg+ (and client-level DP when configured); return the metrics history.

    Writes, like the plain path (:class:`~fedcare.server.lifecycle.Study`), ``checkpoint.npz``
    after each complete round and ``final_model.npz`` + ``history.json`` (status "completed") at
    the end (with ``artefact-key``: the AES-GCM artefacts ``checkpoint.npz.enc`` /
    ``final_model.npz.enc`` bound to the study, kind, round and configuration hash), and a
    completed run's ``privacy_report.json`` / ``.md`` (SecAgg+ on, the client-level ε of
    :func:`client_level_privacy`; not with ``write_report = False``). With ``audit-key`` the run
    start, each round (``secure_aggregation = true``, L2 norm of the aggregate update), each
    checkpoint and a failed round (its sites' error replies, then ``round_failed``) are appended
    to the signed audit log. A failed secure round writes ``history.json`` with status "failed"
    and the reason, and no final model.

    Raises
    ------
    SecureAggregationError
        When a secure round fails (a stage halts, a site drops out, refuses or errs).
    TooFewSitesError
        When fewer than ``min-sites`` sites connect or train.
    CheckpointExistsError
        When a checkpoint exists and ``resume`` is false.
    ResumeMismatchError
        When resuming from a checkpoint of another study, model or strategy, or of a plain run.
    CheckpointTamperedError
        When the encrypted checkpoint to resume from fails authentication or is another run's file.
    CheckpointKeyError
        When the checkpoint is encrypted and no key is configured, or the reverse.
    """
    study = Study.open(config, on_round=on_round, write_report=write_report)
    if operating_point:  # the deployed ServerApp: the final model's threshold (server.operating_point)
        study.ask_operating_point()
    recorder = _legacy_strategy(config, study)
    workflow = _secagg_workflow(config)
    workflow.on_stage, workflow.round_offset = study.progress.stage, study.done  # the status page's current stage
    close_round = _RoundCloser(study, build_strategy(config, history=study.history, round_offset=study.done), workflow)

    def play_rounds(remaining: int) -> None:
        """Run flwr's legacy round loop (SecAgg+ fit, then our evaluate-and-close step) for the rounds left."""
        stoppable = _StoppableGrid(grid)
        context = LegacyContext(
            Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
            config=ServerConfig(num_rounds=remaining, round_timeout=config.round_timeout_s),
            strategy=recorder,
            client_manager=SimpleClientManager(),
        )
        try:
            DefaultWorkflow(fit_workflow=workflow, evaluate_workflow=close_round)(stoppable, context)  # type: ignore[arg-type]
        finally:
            stoppable.stop()

    return study.run(grid, play_rounds)
