"""Run a study with secure aggregation (SecAgg+) and, optionally, client-level differential privacy.

flwr 1.41 offers SecAgg+ only in its legacy workflow API, so this path runs a
``flwr.server.workflow.DefaultWorkflow`` inside a ``LegacyContext`` with:

- :class:`StrictSecAggPlusWorkflow` as the fit workflow: flwr's ``SecAggPlusWorkflow``, except that
  a stage that halts (too few shares, a dropped or refusing site) raises
  :class:`SecureAggregationError` instead of logging "Secure aggregation halted" and leaving the
  model unchanged; the run then ends failed, ``history.json`` says ``status = "failed"`` with the
  reason, and no final model is written;
- a legacy ``FedAvg`` (or ``FedProx``) wrapped, with client-level DP, in
  ``DifferentialPrivacyClientSideFixedClipping`` (sites clip their update with
  ``fixedclipping_mod``; the server adds N(0, (σ C / m)²) to the mean of the m clipped updates),
  and wrapped again in :class:`_LegacyRecorder`, which records each site's plaintext metrics,
  refuses a round with any failure and reports the client-level ε (RDP accountant for fixed-size
  sampling of sites without replacement, replace-one neighbours: :func:`client_level_epsilon`);
- an evaluation step that reuses :class:`~fedcare.server.strategy.FedcareStrategy` (Message API,
  the same per-site evaluation, worst site and history as the plain path) and then checkpoints.

Safekeeping is the plain path's (``server.safekeeping``): encrypted checkpoints and final model
with ``artefact-key`` (resume refuses a tampered one), the signed audit log with ``audit-key``
(rounds with ``secure_aggregation = true``; a failed round's site errors and ``round_failed``
before the run fails), and a completed run's privacy report stating SecAgg+ and the client-level
DP of :func:`client_level_privacy`.

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
import math
import random
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from fractions import Fraction
from types import SimpleNamespace
from typing import Any, Final, cast

import dp_accounting
import numpy as np
from dp_accounting.rdp import rdp_privacy_accountant as rdp
from flwr.app import ConfigRecord, Context, MetricRecord, RecordDict
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
from flwr.compat.common import recorddict_compat as compat
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
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.serverapp import Grid
from flwr.supercore.run import RunNotRunningException

from ..models import wire
from ..privacy.report import ClientLevelPrivacy
from .checkpoint import (
    CHECKPOINT_FILE,
    HISTORY_FILE,
    MetricsHistory,
    RoundRecord,
    load_checkpoint,
    write_json_atomic,
)
from .config import RunConfig
from .safekeeping import (
    RunAudit,
    artefact_path,
    load_artefact_key,
    run_identity,
    safe_name,
)
from .strategy import TooFewSitesError, aggregate_train_metrics, build_strategy

__all__ = [
    "CLIENT_DELTA",
    "CLIENT_EPSILON",
    "SecureAggregationError",
    "StrictSecAggPlusWorkflow",
    "client_level_epsilon",
    "client_level_privacy",
    "run_secure",
]

logger = logging.getLogger(__name__)

CLIENT_EPSILON: Final = "client-epsilon"  # train metric: client-level ε after this round
CLIENT_DELTA: Final = "client-delta"
CLIENT_SAMPLE_RATE: Final = "client-sample-rate"  # sampled sites / available sites this round
CLIENT_SITES_SAMPLED: Final = "client-sites-sampled"  # m: sites sampled this round (fixed size)
CLIENT_SITES_AVAILABLE: Final = "client-sites-available"  # n: sites available to sample from
CLIENT_NOISE: Final = "client-noise-multiplier"
_SECURE_STATE_KIND: Final = "fedcare-secagg/1"
CLIENT_DP_MECHANISM: Final = (
    "Gaussian noise on the unweighted mean of site-clipped updates, added by the coordinator "
    "(flwr DifferentialPrivacyClientSideFixedClipping)"
)

SiteError = tuple[int | None, int, str]
"""A site's error reply in a secure stage: (node id or None where unknown, error code, reason)."""


class SecureAggregationError(RuntimeError):
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

    def __init__(self, message: str, *, stage: str = "aggregate", site_errors: tuple[SiteError, ...] = ()) -> None:
        super().__init__(message)
        self.stage = stage
        self.site_errors = tuple(site_errors)


CLIENT_DP_NEIGHBOURING: Final = (
    "replace-one site (one site's data replaced by any other; number of sites public); "
    "sum sensitivity 2C, so the accountant's noise multiplier is σ/2"
)
CLIENT_DP_SAMPLING: Final = (
    "each round a fixed number m of the n available sites, uniformly without replacement "
    "(flwr client_manager.sample); q = m/n"
)
CLIENT_DP_ACCOUNTANT: Final = "dp_accounting RDP, SampledWithoutReplacementDpEvent (Wang-Balle-Kasiviswanathan 2019), one event per round"


def _sample_counts(rate: float) -> tuple[int, int]:
    """Return (m, n) with m / n == ``rate`` exactly (older histories recorded the rate only)."""
    frac = Fraction(rate)
    return frac.numerator, frac.denominator


def client_level_epsilon(steps: list[tuple[float, float] | tuple[float, int, int]], delta: float) -> float:
    """Return the client-level ε of rounds ``[(σ, m, n), ...]`` (or ``(σ, m / n)``) at ``delta``.

    Each round the coordinator adds N(0, (σ C / m)²) to the unweighted mean of the m sampled sites'
    updates, each clipped to C, i.e. noise of std σC on their sum; the m sites are a fixed-size
    subset of the n available, drawn without replacement (flwr's sampling). That sampling is
    analysed for **replace-one** neighbours (:data:`CLIENT_DP_NEIGHBOURING`), under which the sum's
    L2 sensitivity is 2C: each round is a ``SampledWithoutReplacementDpEvent(n, m,
    GaussianDpEvent(σ / 2))`` composed in dp_accounting's ``RdpAccountant(neighboring_relation=
    REPLACE_ONE)`` (default orders). With m = n this is the Gaussian mechanism with noise multiplier
    σ/2 composed over the rounds. σ = 0 in any round gives ε = inf; no rounds give 0.
    """
    if not steps:
        return 0.0
    rounds: Counter[tuple[float, int, int]] = Counter()  # composition commutes: equal rounds composed once
    for step in steps:
        sigma = float(step[0])
        sampled, available = (int(step[1]), int(step[2])) if len(step) == 3 else _sample_counts(float(step[1]))
        if not 0 < sampled <= available:
            raise ValueError(f"a round sampled {sampled} of {available} sites; need 0 < sampled ≤ available")
        if sigma <= 0:
            return math.inf
        rounds[(sigma, sampled, available)] += 1
    events = [
        dp_accounting.SelfComposedDpEvent(dp_accounting.SampledWithoutReplacementDpEvent(
            source_dataset_size=n, sample_size=m, event=dp_accounting.GaussianDpEvent(sigma / 2.0)), count)
        for (sigma, m, n), count in rounds.items()
    ]  # fmt: skip
    accountant = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    accountant.compose(dp_accounting.ComposedDpEvent(events))
    return float(accountant.get_epsilon(delta))


def _client_steps(records: list[Any]) -> list[tuple[float, int, int] | tuple[float, float]]:
    """Return each round's (σ, m, n) from its train record (σ, q from records written before counts were)."""
    steps: list[tuple[float, int, int] | tuple[float, float]] = []
    for r in records:
        if CLIENT_NOISE not in r.train:
            continue
        if CLIENT_SITES_SAMPLED in r.train and CLIENT_SITES_AVAILABLE in r.train:
            steps.append((r.train[CLIENT_NOISE], int(r.train[CLIENT_SITES_SAMPLED]), int(r.train[CLIENT_SITES_AVAILABLE])))
        elif CLIENT_SAMPLE_RATE in r.train:
            steps.append((r.train[CLIENT_NOISE], r.train[CLIENT_SAMPLE_RATE]))
    return steps


def client_level_privacy(config: RunConfig, history: MetricsHistory) -> ClientLevelPrivacy | None:
    """Return the client-level DP of the run's complete rounds for the privacy report (None without it).

    ε is recomputed with :func:`client_level_epsilon` (fixed-size sampling without replacement,
    replace-one neighbours, one event per round) from each complete round's σ and sites sampled /
    available as ``history`` records them, so a resumed run accounts every round. The report
    states the relation and the sampling assumption. σ = 0 (clipping only) gives no guarantee:
    None, with a warning.
    """
    if not config.client_dp:
        return None
    steps = _client_steps(list(history.completed))
    if not steps:
        return None
    epsilon = client_level_epsilon(steps, config.client_dp_delta)
    if not math.isfinite(epsilon):
        logger.warning(
            "study %s: client-dp-noise-multiplier = 0 gives client-level ε = inf; the privacy report "
            "states no client-level DP. Set client-dp-noise-multiplier > 0 for a guarantee", config.study,
        )
        return None
    return ClientLevelPrivacy(
        mechanism=CLIENT_DP_MECHANISM, epsilon=epsilon, delta=config.client_dp_delta,
        noise_multiplier=config.client_dp_noise_multiplier, clipping_norm=config.client_dp_clipping_norm,
        accountant=CLIENT_DP_ACCOUNTANT, rounds=len(steps),
        sample_rate=max(st[1] / st[2] if len(st) == 3 else st[1] for st in steps),  # type: ignore[misc]
        neighbouring=CLIENT_DP_NEIGHBOURING, sampling=CLIENT_DP_SAMPLING,
    )  # fmt: skip


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


class StrictSecAggPlusWorkflow(SecAggPlusWorkflow):
    """flwr's SecAgg+ workflow, but any stage that halts or loses a site raises SecureAggregationError.

    flwr logs "Secure aggregation halted" and keeps the old model; here a round either aggregates
    every sampled site or fails the run. ``stages_s`` holds the last round's time per stage.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stages_s: dict[str, float] = {}

    def _strict(self, name: str, stage: Callable[..., bool], grid: Grid, context: Any, state: Any) -> bool:
        """Run one stage; raise when it halts or any site failed in it."""
        seen: list[SiteError] | None = getattr(grid, "errors", None)
        if seen is not None:
            seen.clear()
        started = time.perf_counter()
        ok = stage(grid, context, state)
        self.stages_s[name] = time.perf_counter() - started
        if not ok or state.failures:
            reasons = _failure_reasons(state.failures) or ["too few sites or shares to continue"]
            raise SecureAggregationError(
                f"secure aggregation failed in its {name} stage ({len(state.failures)} failure(s)): "
                + "; ".join(reasons)
                + ". The model was NOT updated; the last checkpoint holds the previous round. Fix or "
                "bring back the sites (every sampled site must complete a secure round), then resume.",
                stage=name,
                site_errors=tuple(seen) if seen else _site_errors(state.failures),
            )
        return True

    def setup_stage(self, grid: Grid, context: LegacyContext, state: Any) -> bool:
        """Run flwr's setup stage strictly."""
        return self._strict("setup", super().setup_stage, grid, context, state)

    def share_keys_stage(self, grid: Grid, context: LegacyContext, state: Any) -> bool:
        """Run flwr's share-keys stage strictly."""
        return self._strict("share-keys", super().share_keys_stage, grid, context, state)

    def collect_masked_vectors_stage(self, grid: Grid, context: LegacyContext, state: Any) -> bool:
        """Run flwr's masked-vector stage strictly."""
        return self._strict("collect-masked-vectors", super().collect_masked_vectors_stage, grid, context, state)

    def unmask_stage(self, grid: Grid, context: LegacyContext, state: Any) -> bool:
        """Run flwr's unmask stage strictly."""
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
        """Record each site's plaintext metrics; refuse failures; aggregate; add client-level ε."""
        rnd = server_round + self.round_offset
        if failures:
            raise SecureAggregationError(
                f"round {rnd}: {len(failures)} site(s) failed in the secure round: "
                + "; ".join(_failure_reasons(list(failures)))
                + ". The model was NOT updated; fix the sites, then resume."
            )
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
        params, _ = self.strategy.aggregate_fit(rnd, results, failures)
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
            steps = _client_steps([r for r in self.history.rounds if r.complete and r.round < rnd]) + [
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


def _site_errors(failures: list[Any]) -> tuple[SiteError, ...]:
    """Return SecAgg+ failures (``Exception(Error)``) as site errors without node ids."""
    out: list[SiteError] = []
    for failure in failures:
        error = failure.args[0] if isinstance(failure, BaseException) and failure.args else failure
        code = getattr(error, "code", None)
        out.append((None, int(code) if isinstance(code, int) else -1, str(getattr(error, "reason", "") or error)))
    return tuple(out)


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
    from .app import train_config  # noqa: PLC0415 - app.py dispatches here

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


def run_secure(
    grid: Grid, config: RunConfig, *, on_round: Callable[[RoundRecord], None] | None = None
) -> MetricsHistory:
    """Run ``config`` with SecAgg+ (and client-level DP when configured); return the metrics history.

    Writes, like the plain path, ``checkpoint.npz`` after each complete round and
    ``final_model.npz`` + ``history.json`` (status "completed") at the end (with ``artefact-key``:
    the AES-GCM artefacts ``checkpoint.npz.enc`` / ``final_model.npz.enc`` bound to the study, kind,
    round and configuration hash), and a completed run's ``privacy_report.json`` / ``.md`` (SecAgg+
    on, the client-level ε of :func:`client_level_privacy`). With ``audit-key`` the run start, each
    round (``secure_aggregation = true``, L2 norm of the aggregate update), each checkpoint and a
    failed round (its sites' error replies, then ``round_failed``) are appended to the signed audit
    log. A failed secure round writes ``history.json`` with status "failed" and the reason, and no
    final model.

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
    from . import app as plain  # noqa: PLC0415 - app.py dispatches here; reuse its helpers

    plain._quiet_flower()
    random.seed(config.seed)  # the legacy client manager samples sites with the random module
    history = MetricsHistory()
    arrays = plain.initial_arrays(config)
    reference = OrderedDict((k, v.copy()) for k, v in arrays.items())
    folder = config.checkpoint_dir
    key = load_artefact_key(config.artefact_key)
    ckpt_path = artefact_path(folder, CHECKPOINT_FILE, key) if folder is not None else None
    if folder is not None:
        plain._refuse_other_format(folder, key)
    done = 0
    if ckpt_path is not None and ckpt_path.exists():
        if not config.resume:
            raise plain.CheckpointExistsError(
                f"a checkpoint exists at {ckpt_path}; set resume = true to continue that run, "
                "or use another checkpoint-dir"
            )
        ckpt = load_checkpoint(ckpt_path, key=key,
                               expected={"study": safe_name(config.study), "kind": "checkpoint"})
        plain._check_resumable(ckpt, config, ckpt_path)
        if ckpt.run_config.get("secure-aggregation") is not True:
            raise plain.ResumeMismatchError(
                f"{ckpt_path} was written by a run without secure aggregation; resume it without "
                "secure-aggregation, or start the secure run in another checkpoint-dir"
            )
        if list(ckpt.arrays) != list(arrays) or any(ckpt.arrays[k].shape != arrays[k].shape for k in arrays):
            raise plain.ResumeMismatchError(f"the model in {ckpt_path} does not fit the configured model")
        arrays = ckpt.arrays
        history.load_state_dict(ckpt.history)
        history.drop_incomplete()
        if ckpt.rng_state is not None:
            random.setstate(plain._rng_from_json(ckpt.rng_state))
        done = ckpt.round
        logger.info("resuming secure study %s from %s after round %d of %d", config.study, ckpt_path, done,
                    config.num_rounds)
    elif config.resume:
        logger.warning("resume requested but no checkpoint in %s: starting from round 1", folder)

    names = list(arrays)
    legacy_cls = FedProx if config.strategy == "fedprox" else FedAvg
    legacy_kwargs: dict[str, Any] = {"proximal_mu": config.proximal_mu} if config.strategy == "fedprox" else {}
    inner: Strategy = legacy_cls(
        fraction_fit=config.fraction_train,
        fraction_evaluate=0.0,
        min_fit_clients=config.min_sites,
        min_evaluate_clients=0,
        min_available_clients=config.min_sites,
        on_fit_config_fn=_legacy_fit_config(config, names),
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
    recorder = _LegacyRecorder(
        inner, config, history, ndarrays_to_parameters(list(arrays.values())), done, dp
    )
    evaluator = build_strategy(config, history=history, round_offset=done)
    final: dict[str, OrderedDict[str, np.ndarray]] = {"arrays": arrays}
    workflow = StrictSecAggPlusWorkflow(
        config.secagg_num_shares,
        config.secagg_reconstruction_threshold,
        max_weight=1.0,  # every site reports weight 1 (unweighted mean), so no precision is lost
        clipping_range=config.secagg_clipping_range,
        timeout=config.round_timeout_s,
    )

    def evaluate_and_checkpoint(grid_: Grid, context: Context) -> None:
        """Evaluate the round's model on the sites (Message API), then checkpoint the round."""
        legacy = cast(LegacyContext, context)
        server_round = cast(int, legacy.state.config_records[MAIN_CONFIGS_RECORD][Key.CURRENT_ROUND])
        rnd = server_round + done
        record = history.round(rnd)
        if not record.train:
            raise SecureAggregationError(f"round {rnd} ended without a secure aggregate; the model was NOT updated")
        params = compat.arrayrecord_to_parameters(legacy.state.array_records[MAIN_PARAMS_RECORD], keep_input=True)
        previous, final["arrays"] = final["arrays"], _named(params, reference)
        if config.fraction_evaluate > 0:
            record_arrays = plain._to_record(final["arrays"])
            eval_config = ConfigRecord({wire.STUDY: config.study, **plain._model_fields(config)})
            messages = list(evaluator.configure_evaluate(server_round, record_arrays, eval_config, grid_))
            replies = list(grid_.send_and_receive(messages, timeout=config.round_timeout_s)) if messages else []
            evaluator.aggregate_evaluate(server_round, replies)
        record.train.update({f"secagg-{k}-s": v for k, v in workflow.stages_s.items()})
        plain.record_round_end(
            config, history, rnd, arrays=final["arrays"], previous=previous,
            strategy_state={"kind": _SECURE_STATE_KIND}, ckpt_path=ckpt_path, key=key, audit=audit,
            secure_aggregation=True, on_round=on_round,
        )

    remaining = config.num_rounds - done
    started = time.perf_counter()
    stoppable = _StoppableGrid(grid)
    context = LegacyContext(
        Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
        config=ServerConfig(num_rounds=remaining, round_timeout=config.round_timeout_s),
        strategy=recorder,
        client_manager=SimpleClientManager(),
    )
    audit = RunAudit.open(config)
    try:
        run_id, app_hash = run_identity(grid, config)
        audit.run_start(config, run_id=run_id, app_hash=app_hash)
        try:
            if remaining > 0:
                DefaultWorkflow(fit_workflow=workflow, evaluate_workflow=evaluate_and_checkpoint)(
                    stoppable, context  # type: ignore[arg-type]
                )
            else:
                logger.info("checkpoint already holds all %d rounds; writing the final outputs", done)
        except SecureAggregationError as exc:
            logger.error("study %s FAILED: %s", config.study, exc)
            rnd = _current_round(context, done)
            audit.round_failed(
                rnd, stage=exc.stage, secure_aggregation=True,
                failures=[(_site_name(history, node), code, reason) for node, code, reason in exc.site_errors],
            )  # fmt: skip
            _write_history(config, history, "failed", str(exc))
            raise
        except TooFewSitesError as exc:
            logger.error("study %s stopped: %s", config.study, exc)
            for rec in history.rounds:
                if not rec.complete:
                    audit.refusals(rec)
            plain._write_outputs(
                config, final["arrays"], history, "stopped", key=key, audit=audit, secure_aggregation=True,
                run_id=run_id, client_level=client_level_privacy(config, history), reason=str(exc),
            )  # fmt: skip
            raise
        finally:
            stoppable.stop()
        logger.info("secure study %s completed after %.1f s", config.study, time.perf_counter() - started)
        plain._write_outputs(
            config, final["arrays"], history, "completed", key=key, audit=audit, secure_aggregation=True,
            run_id=run_id, client_level=client_level_privacy(config, history),
        )  # fmt: skip
    finally:
        audit.close()
    return history


def _current_round(context: LegacyContext, done: int) -> int:
    """Return the round the workflow was in (counting resumed rounds); ``done + 1`` before the first."""
    try:
        current = context.state.config_records[MAIN_CONFIGS_RECORD][Key.CURRENT_ROUND]
    except KeyError:
        return done + 1
    return done + max(int(cast(int, current)), 1)


def _site_name(history: MetricsHistory, node_id: int | None) -> str:
    """Return the site name a node reported (``node-<id>`` before it reported one; ``unknown``)."""
    if node_id is None:
        return "unknown"
    return history.node_sites.get(node_id) or f"node-{node_id}"


def _write_history(config: RunConfig, history: MetricsHistory, status: str, reason: str | None) -> None:
    """Write history.json with the run's status (and why it did not complete)."""
    if config.checkpoint_dir is None:
        return
    config.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(
        config.checkpoint_dir / HISTORY_FILE,
        {"status": status, "reason": reason, "run_config": config.to_run_config(), **history.state_dict()},
    )
