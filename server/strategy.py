"""Strategies by name: flwr's message-API strategies, built from a RunConfig and wrapped.

``STRATEGIES`` maps a name to a builder of an *unmodified* ``flwr.serverapp.strategy`` object;
:class:`FedcareStrategy` wraps it (as flwr's own DP wrappers do) and adds, without changing
how flwr aggregates:

- a round offset, so a resumed run continues its round numbers (FedAdam's bias correction
  and the ``server-round`` the sites see stay those of an uninterrupted run);
- per-site train and evaluation metrics keyed by the site name each site reports, the worst
  site of each round, and every refusal (error reply) with the site and its reason, in a
  :class:`~fedcare.server.checkpoint.MetricsHistory`;
- replies aggregated in site-name order rather than arrival order (reproducible sums);
- every training reply's update checked before aggregation (``server.update_checks``: NaN / Inf,
  names, shapes, dtypes, weight, and the L2 norm against ``max-update-norm``): a bad one is
  refused, recorded with the site and its reason (code ``wire.ERROR_UPDATE_REFUSED``, hence in
  the audit log) and the round goes on with the others;
- a minimum of successful training replies: below ``min_sites`` the run stops with
  :class:`TooFewSitesError` instead of aggregating one or two sites silently; likewise when
  fewer than ``min_sites`` sites connect within ``round-timeout-s`` (flwr waits forever);
- with ``evaluate-with-train``: the train message of round r + 1 asks the sites to evaluate the
  model it carries, their replies' ``evaluated-*`` values are recorded as round r's evaluation,
  and the evaluate stage runs after the last round only (one message exchange per round);
- ``state_dict()`` / ``load_state_dict()`` of the strategy's own state (FedOpt's ``m_t`` and
  ``v_t``, FedAvgM's ``momentum_vector``) for checkpoints.

The server optimisers (``fedavgm``: server momentum, Hsu et al. 2019; ``fedadam``, ``fedyogi``,
``fedadagrad``: Reddi et al. 2021) are flwr's classes, unmodified; they post-process the
example-weighted mean of the site models, so a site's DP guarantee is unchanged by them. flwr
1.42 has no SCAFFOLD (control variates would need a second array record per site each round).

Global evaluation metrics are computed from the **sum of the sites' sufficient statistics**
(``privacy.release_mechanisms``: Laplace-noised histograms / confusion matrices and clipped loss
sums under a site's ``evaluation = "dp"`` policy, exact ones under ``"exact"``), i.e. the
metrics of the pooled test patients, with AUROC / AUPRC approximated from the probability
histograms. Each site's own evaluation metrics are its exact ones (``exact``) or computed here from
its noisy statistics (``dp``); the statistics themselves are not kept in the history. Replies
without statistics (older sites) fall back to flwr's example-weighted average (what
``aggregate_metricrecords`` computes), except that a metric a site reports as NaN leaves that
site out of that metric's average. Training metrics keep that weighted average (weights: each
site's noised example count); ``epsilon`` / ``delta`` and the per-mechanism ε are the maximum over
sites (the worst-off site's privacy, not a meaningless mean).
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any, Final

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    Strategy,
)

from ..models import Registry
from ..models import wire
from ..privacy.release_mechanisms import STAT_PREFIX, metrics_from_statistics, sum_statistics
from .checkpoint import MetricsHistory
from .config import STRATEGY_NAMES, RunConfig
from .update_checks import UpdateCheck

__all__ = [
    "STRATEGIES",
    "FedcareStrategy",
    "StrategyStateError",
    "TooFewSitesError",
    "aggregate_evaluate_metrics",
    "aggregate_train_metrics",
    "build_strategy",
    "site_evaluation",
    "worst_site",
]

logger = logging.getLogger(__name__)

StrategyBuilder = Callable[[RunConfig, dict[str, Any]], Strategy]

STRATEGIES: Registry[StrategyBuilder] = Registry("strategy")

_STATE_KIND: Final = "fedcare-strategy/1"
_STATE_ATTRS: Final = ("m_t", "v_t", "momentum_vector")
#: state attributes flwr keeps as a list of arrays in model order (FedAvgM), not a dict by name
_LIST_STATE_ATTRS: Final = frozenset({"momentum_vector"})
_MAX_OVER_SITES: Final = (wire.EPSILON, wire.DELTA, wire.EPSILON_TRAINING, wire.EPSILON_COUNT, wire.EPSILON_EVALUATION,
                           wire.EVALUATION_QUERIES, wire.EVALUATION_EXACT_QUERIES, wire.EPSILON_BUDGET,
                           wire.ROUNDS_CHARGED, wire.ROUNDS_VOIDED, wire.ROUND_RETRIES, wire.RETRY_RESERVE)
_PRIVACY_KEYS: Final = frozenset(_MAX_OVER_SITES)
_METRIC_NAMES: Final = ("loss", "accuracy", "mae")  # present when a site sent its exact metrics
_REFUSAL = re.compile(r"^site '(?P<site>[^']*)' refused")


class TooFewSitesError(RuntimeError):
    """Fewer sites than ``min-sites`` trained successfully in a round; the run stopped."""


class StrategyStateError(ValueError):
    """A strategy state does not belong to this strategy (another algorithm or another tool)."""


def aggregate_train_metrics(records: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    """Aggregate training metrics like evaluation ones, but report ε and δ as the maximum over sites.

    A DP site sends NaN for its (non-private) training loss; such sites are left out of that
    metric's average (see :func:`aggregate_evaluate_metrics`).
    """
    out = aggregate_evaluate_metrics(records, weighted_by_key)
    for key in _MAX_OVER_SITES:
        values = [
            float(m[key])  # type: ignore[arg-type]
            for r in records
            for m in r.metric_records.values()
            if key in m and not isinstance(m[key], list)
        ]
        if values:
            out[key] = max(values)
    return out


def site_evaluation(values: dict[str, float]) -> dict[str, float]:
    """Return a site's evaluation as the history keeps it: its metrics, count and ε, without statistics.

    A DP release carries only noisy statistics: its metrics are computed from them here
    (post-processing); an exact release keeps the metrics the site computed.
    """
    stats = {k: v for k, v in values.items() if k.startswith(STAT_PREFIX)}
    out = {k: v for k, v in values.items() if not k.startswith(STAT_PREFIX)}
    if stats and not any(m in out for m in _METRIC_NAMES):
        derived = metrics_from_statistics(stats)
        derived.pop("n")
        out |= derived
    return out


def aggregate_evaluate_metrics(records: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    """Return the global evaluation: metrics of the summed statistics, else the example-weighted average.

    When every site sent sufficient statistics (``stat-*``), they are summed and the metrics of the
    pooled test patients computed from the sum (:func:`~fedcare.privacy.release_mechanisms.metrics_from_statistics`).
    Otherwise the metrics are averaged weighted by examples, as flwr does, over the sites where
    each is finite: flwr's ``aggregate_metricrecords`` turns the global value into NaN as soon as
    one site reports NaN (e.g. AUROC on a test split holding one class); here such a site is left
    out of that metric's average only. A metric no site can compute stays NaN. Per-mechanism ε
    and query counts are not averaged (the training aggregate reports their maximum).
    """
    scalars = [
        {k: float(v) for k, v in m.items() if not isinstance(v, list)}
        for r in records for m in r.metric_records.values()
    ]
    if scalars and all(any(k.startswith(STAT_PREFIX) for k in m) for m in scalars):
        derived = metrics_from_statistics(sum_statistics(scalars))
        derived.pop("n")
        return MetricRecord(derived)  # type: ignore[arg-type]
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for record in records:
        for metrics in record.metric_records.values():
            weight = float(metrics[weighted_by_key])  # type: ignore[arg-type]
            for key, value in metrics.items():
                if key == weighted_by_key or isinstance(value, list) or key in _PRIVACY_KEYS or key.startswith(STAT_PREFIX):
                    continue
                sums.setdefault(key, 0.0)
                weights.setdefault(key, 0.0)
                if math.isfinite(float(value)):
                    sums[key] += weight * float(value)
                    weights[key] += weight
    return MetricRecord(
        {k: sums[k] / weights[k] if weights[k] > 0 else float("nan") for k in sums}
    )


def _common(config: RunConfig) -> dict[str, Any]:
    """Return the keyword arguments every FedAvg-family strategy takes."""
    return {
        "fraction_train": config.fraction_train,
        "fraction_evaluate": config.fraction_evaluate,
        "min_train_nodes": config.min_sites,
        "min_evaluate_nodes": config.min_sites if config.fraction_evaluate > 0 else 0,
        "min_available_nodes": config.min_sites,
        "weighted_by_key": wire.NUM_EXAMPLES,
        "arrayrecord_key": wire.ARRAYS,
        "configrecord_key": wire.CONFIG,
        "train_metrics_aggr_fn": aggregate_train_metrics,
        "evaluate_metrics_aggr_fn": aggregate_evaluate_metrics,
    }


@STRATEGIES.register("fedavg")
def _fedavg(config: RunConfig, kwargs: dict[str, Any]) -> Strategy:
    """FedAvg (McMahan et al. 2017)."""
    return FedAvg(**kwargs)


@STRATEGIES.register("fedprox")
def _fedprox(config: RunConfig, kwargs: dict[str, Any]) -> Strategy:
    """FedProx: sends ``proximal-mu`` to the sites, which add the proximal term."""
    return FedProx(**kwargs, proximal_mu=config.proximal_mu)


def _adaptive_moments(config: RunConfig) -> dict[str, float]:
    """Return the server-optimiser settings FedAdam and FedYogi share (η, η_l, β1, β2, τ)."""
    return {"eta": config.eta, "eta_l": config.eta_l, "beta_1": config.beta_1, "beta_2": config.beta_2,
            "tau": config.tau}


@STRATEGIES.register("fedadam")
def _fedadam(config: RunConfig, kwargs: dict[str, Any]) -> Strategy:
    """FedAdam (Reddi et al. 2021): server-side Adam on the averaged update."""
    return FedAdam(**kwargs, **_adaptive_moments(config))


@STRATEGIES.register("fedyogi")
def _fedyogi(config: RunConfig, kwargs: dict[str, Any]) -> Strategy:
    """FedYogi (Reddi et al. 2021): server-side Yogi, whose second moment grows additively."""
    return FedYogi(**kwargs, **_adaptive_moments(config))


@STRATEGIES.register("fedadagrad")
def _fedadagrad(config: RunConfig, kwargs: dict[str, Any]) -> Strategy:
    """FedAdagrad (Reddi et al. 2021): server-side Adagrad on the averaged update."""
    return FedAdagrad(**kwargs, eta=config.eta, eta_l=config.eta_l, tau=config.tau)


@STRATEGIES.register("fedavgm")
def _fedavgm(config: RunConfig, kwargs: dict[str, Any]) -> Strategy:
    """FedAvgM (Hsu et al. 2019): server momentum and learning rate on the averaged update."""
    return FedAvgM(
        **kwargs,
        server_learning_rate=config.server_learning_rate,
        server_momentum=config.server_momentum,
    )


@STRATEGIES.register("fedmedian")
def _fedmedian(config: RunConfig, kwargs: dict[str, Any]) -> Strategy:
    """Coordinate-wise median."""
    return FedMedian(**kwargs)


@STRATEGIES.register("fedtrimmedavg")
def _fedtrimmedavg(config: RunConfig, kwargs: dict[str, Any]) -> Strategy:
    """Coordinate-wise trimmed mean, cutting ``trim-beta`` at each end."""
    return FedTrimmedAvg(**kwargs, beta=config.trim_beta)


@STRATEGIES.register("krum")
def _krum(config: RunConfig, kwargs: dict[str, Any]) -> Strategy:
    """Krum: keeps the one update closest to its neighbours."""
    return Krum(**kwargs, num_malicious_nodes=config.num_malicious_nodes)


if STRATEGIES.names() != sorted(STRATEGY_NAMES):  # RunConfig validates names against STRATEGY_NAMES
    raise RuntimeError(
        f"server.strategy builds {STRATEGIES.names()} but server.config.STRATEGY_NAMES lists "
        f"{sorted(STRATEGY_NAMES)}: register a builder for every name there, and list every builder"
    )


def worst_site(site_metrics: dict[str, dict[str, float]]) -> dict[str, Any] | None:
    """Return ``{"site", "metric", "value"}``: lowest AUROC (else accuracy), or highest RMSE (else MAE)."""
    for metric, pick in (("auroc", min), ("accuracy", min), ("rmse", max), ("mae", max)):
        values = {
            site: float(m[metric])
            for site, m in site_metrics.items()
            if metric in m and isinstance(m[metric], (int, float)) and math.isfinite(m[metric])
        }
        if values:
            site = pick(values, key=lambda s: (values[s], s))
            return {"site": site, "metric": metric, "value": values[site]}
    return None


def _site_of(msg: Message) -> str | None:
    """Return the site name a reply carries in its ConfigRecord, if any."""
    if not msg.has_content():
        return None
    for record in msg.content.config_records.values():
        name = record.get(wire.SITE)
        if isinstance(name, str):
            return name
    return None


def _info_of(msg: Message) -> dict[str, Any]:
    """Return what a train reply says about its site: manifest digest, accountant, clipping norm."""
    out: dict[str, Any] = {}
    for record in msg.content.config_records.values():
        for key, name in ((wire.MANIFEST_SHA256, "manifest_sha256"), (wire.ACCOUNTANT, "accountant")):
            value = record.get(key)
            if isinstance(value, str):
                out[name] = value
        norm = record.get(wire.MAX_GRAD_NORM)
        if isinstance(norm, (int, float)) and not isinstance(norm, bool):
            out["max_grad_norm"] = float(norm)
    return out


def _metrics_of(msg: Message) -> dict[str, float]:
    """Return a reply's scalar metrics (without lists)."""
    out: dict[str, float] = {}
    for record in msg.content.metric_records.values():
        for key, value in record.items():
            if isinstance(value, (int, float)):
                out[key] = float(value)
    return out


def _evaluated_of(msg: Message) -> dict[str, float] | None:
    """Return the received model's evaluation a train reply carries (``evaluated-*``), if any."""
    prefix = wire.EVALUATED_PREFIX
    for record in msg.content.config_records.values():
        values = {
            key.removeprefix(prefix): float(value)
            for key, value in record.items()
            if key.startswith(prefix) and isinstance(value, (int, float)) and not isinstance(value, bool)
        }
        if wire.NUM_EXAMPLES in values:
            return values
    return None


def _in_site_order(replies: Iterable[Message]) -> list[Message]:
    """Return replies sorted by site name (then node id), not by arrival.

    Floating-point sums depend on their order; sorting makes aggregation independent of which
    site answered first, so a run is reproducible (and a resumed run matches an uninterrupted
    one) even though node ids and arrival order change from run to run.
    """
    return sorted(replies, key=lambda m: (_site_of(m) or "", m.metadata.src_node_id))


class FedcareStrategy(Strategy):
    """Wrap a flwr strategy: round offset, per-site metrics, refusals, minimum sites, state.

    Parameters
    ----------
    strategy : flwr.serverapp.strategy.Strategy
        The wrapped strategy; it does all sampling and aggregation.
    min_sites : int
        Fewest successful training replies a round may aggregate.
    history : MetricsHistory, optional
        Where rounds are recorded (a new one when omitted).
    round_offset : int
        Rounds completed before this ``start()`` (a resumed run's checkpointed round).
    connect_timeout_s : float
        How long a round waits for ``min_sites`` connected sites before stopping the run.
    evaluate_with_train : bool
        Sites evaluate the model each train message brings (the previous round's global model)
        and reply with those metrics; they are recorded as that round's evaluation, and the
        evaluate stage is skipped except after round ``num_rounds``.
    num_rounds : int or None
        The run's last round (counted like :meth:`run_round`); needed with ``evaluate_with_train``.
    update_check : UpdateCheck, optional
        Checks each training reply's update before aggregation (default: finiteness, names,
        shapes, dtypes and weight, no norm bound).
    """

    def __init__(
        self,
        strategy: Strategy,
        *,
        min_sites: int,
        history: MetricsHistory | None = None,
        round_offset: int = 0,
        connect_timeout_s: float = 600.0,
        evaluate_with_train: bool = False,
        num_rounds: int | None = None,
        update_check: UpdateCheck | None = None,
    ) -> None:
        if evaluate_with_train and num_rounds is None:
            raise ValueError("evaluate_with_train needs num_rounds (the run's last round evaluates separately)")
        self.strategy = strategy
        self.min_sites = min_sites
        self.history = history if history is not None else MetricsHistory()
        self.round_offset = round_offset
        self.connect_timeout_s = connect_timeout_s
        self.evaluate_with_train = evaluate_with_train
        self.num_rounds = num_rounds
        self.update_check = update_check if update_check is not None else UpdateCheck()
        self._sent: dict[str, np.ndarray] = {}  # the global model of the round's train messages
        #: called with (round, stage) when a round enters a stage (the study's progress file)
        self.on_stage: Callable[[int, str], None] | None = None

    def __repr__(self) -> str:
        """Return the wrapped strategy's name."""
        return f"FedcareStrategy({type(self.strategy).__name__})"

    def run_round(self, server_round: int) -> int:
        """Return the run's round number for ``start()``'s ``server_round``."""
        return server_round + self.round_offset

    def _stage(self, rnd: int, stage: str) -> None:
        """Tell ``on_stage`` (the study's progress file, when set) that round ``rnd`` entered ``stage``."""
        if self.on_stage is not None:
            self.on_stage(rnd, stage)

    def summary(self) -> None:
        """Log the wrapped strategy's configuration."""
        logger.info(
            "fedcare strategy wrapper: min sites %d, round offset %d", self.min_sites, self.round_offset
        )
        self.strategy.summary()

    def _wait_for_sites(self, grid: Grid, server_round: int) -> None:
        """Wait (at most ``connect_timeout_s``) until ``min_sites`` nodes are connected.

        flwr's own sampling waits for them without a bound; a federation whose hospitals never
        connect would hang forever.
        """
        deadline = time.monotonic() + self.connect_timeout_s
        while (connected := len(list(grid.get_node_ids()))) < self.min_sites:
            if time.monotonic() >= deadline:
                raise TooFewSitesError(
                    f"round {server_round}: only {connected} site(s) connected after "
                    f"{self.connect_timeout_s:g} s, fewer than min-sites = {self.min_sites}; start "
                    "the hospitals' nodes (fedcare node start) or lower min-sites, then resume"
                )
            logger.info("waiting for sites: %d of %d connected", connected, self.min_sites)
            time.sleep(min(1.0, self.connect_timeout_s))

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Let the wrapped strategy sample sites and build the training messages."""
        rnd = self.run_round(server_round)
        self._stage(rnd, "train")
        self._wait_for_sites(grid, rnd)
        if self.evaluate_with_train and rnd > 1:  # the arrays are round rnd - 1's global model
            config = ConfigRecord({**config, wire.EVALUATE_RECEIVED: True})
        self._sent = {name: np.array(array.numpy(), copy=True) for name, array in arrays.items()}
        return self.strategy.configure_train(rnd, arrays, config, grid)

    def _skips_evaluate_stage(self, rnd: int) -> bool:
        """Return whether round ``rnd``'s model is evaluated by the next train message instead."""
        return self.evaluate_with_train and self.num_rounds is not None and rnd < self.num_rounds

    def _record_evaluation(self, server_round: int, per_site: dict[str, dict[str, float]]) -> None:
        """Record the sites' evaluation of round ``server_round``'s model, its aggregate and worst site."""
        self.history.round(server_round).site_evaluate.update({s: site_evaluation(m) for s, m in per_site.items()})
        records = [RecordDict({"m": MetricRecord(m)}) for _, m in sorted(per_site.items())]  # type: ignore[arg-type]
        self._set_evaluation(server_round, aggregate_evaluate_metrics(records, wire.NUM_EXAMPLES) if records else None)

    def _set_evaluation(self, server_round: int, metrics: MetricRecord | None) -> None:
        """Store round ``server_round``'s aggregated evaluation and its worst site (logged)."""
        record = self.history.round(server_round)
        if metrics is not None:
            record.evaluate = _metrics_of_record(metrics)
        record.worst_site = worst_site(record.site_evaluate)
        if record.worst_site is not None:
            logger.info(
                "round %d: worst site %s (%s %.4f)",
                server_round, record.worst_site["site"], record.worst_site["metric"], record.worst_site["value"],
            )

    def _record_received_evaluation(self, server_round: int, replies: list[Message]) -> None:
        """Record what the train replies of ``server_round`` say of the model they received.

        Sites are keyed as :meth:`_record_replies` keyed these replies (``history.node_sites``).
        """
        per_site: dict[str, dict[str, float]] = {}
        for msg in replies:
            values = _evaluated_of(msg)
            if values is not None:
                per_site[self.history.node_sites[msg.metadata.src_node_id]] = values
        if per_site and server_round > 1:
            self._record_evaluation(server_round - 1, per_site)

    def _record_replies(
        self, server_round: int, replies: list[Message], stage: str
    ) -> tuple[list[Message], list[Message]]:
        """Record each reply's site metrics or refusal; return (valid, errors)."""
        record = self.history.round(server_round)
        valid = [m for m in replies if not m.has_error()]
        errors = [m for m in replies if m.has_error()]
        per_site = record.site_train if stage == "train" else record.site_evaluate
        for msg in valid:
            node = msg.metadata.src_node_id
            site = _site_of(msg) or f"node-{node}"
            if site in per_site:  # two nodes claim one site: keep both, say so
                logger.warning("round %d: node %d also reports site %r; check the nodes' site names",
                               server_round, node, site)
                site = f"{site}@node-{node}"
            self.history.node_sites[node] = site
            per_site[site] = _metrics_of(msg) if stage == "train" else site_evaluation(_metrics_of(msg))
            if stage == "train":
                record.site_info[site] = _info_of(msg)
        for msg in errors:
            node = msg.metadata.src_node_id
            reason = msg.error.reason or "(no reason given)"
            match = _REFUSAL.match(reason)
            site = match.group("site") if match else self.history.node_sites.get(node, f"node-{node}")
            record.refusals.append(
                {"stage": stage, "node_id": node, "site": site, "code": msg.error.code, "reason": reason}
            )
            logger.warning("round %d: site %s (node %d) sent no %s result: %s",
                           server_round, site, node, stage, reason)
        return valid, errors

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Record per-site results, stop below ``min_sites``, then aggregate as the wrapped strategy does."""
        rnd = self.run_round(server_round)
        self._stage(rnd, "aggregate")
        replies = _in_site_order(replies)
        valid, errors = self._record_replies(rnd, replies, "train")
        sent = len(valid)
        valid = self._refuse_bad_updates(rnd, valid)
        if self.evaluate_with_train:  # the previous round's model, evaluated by these sites
            self._record_received_evaluation(rnd, valid)
        if len(valid) < self.min_sites:
            refused = "; ".join(r["reason"] for r in self.history.round(rnd).refusals) or "none replied"
            raise TooFewSitesError(
                f"round {rnd}: only {len(valid)} site(s) trained, fewer than min-sites = "
                f"{self.min_sites} ({len(errors)} error replies, {sent - len(valid)} updates refused: "
                f"{refused}). The last checkpoint "
                "holds the model of the previous round; fix the sites or lower min-sites, then resume."
            )
        arrays, metrics = self.strategy.aggregate_train(rnd, valid + errors)
        if metrics is not None:
            self.history.round(rnd).train = _metrics_of_record(metrics)
        return arrays, metrics

    def _refuse_bad_updates(self, rnd: int, valid: list[Message]) -> list[Message]:
        """Return the replies whose update passes :attr:`update_check`; record each refused one."""
        if not self._sent:  # aggregate_train without configure_train (a caller's own replies): names from the first
            return valid
        accepted, refused = self.update_check.screen(valid, self._sent)
        record = self.history.round(rnd)
        for item in refused:
            site = self.history.node_sites.get(item.node_id, f"node-{item.node_id}")
            reason = f"the coordinator refused the update of site '{site}': {item.reason}"
            record.refusals.append({"stage": "train", "node_id": item.node_id, "site": site,
                                    "code": wire.ERROR_UPDATE_REFUSED, "reason": reason})
            logger.warning("round %d: %s; the round goes on without it", rnd, reason)
        return accepted

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Let the wrapped strategy sample sites and build the evaluation messages."""
        rnd = self.run_round(server_round)
        if self._skips_evaluate_stage(rnd):
            return []
        self._stage(rnd, "evaluate")
        if getattr(self.strategy, "fraction_evaluate", 1.0) > 0:
            self._wait_for_sites(grid, rnd)
        return self.strategy.configure_evaluate(rnd, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Record per-site metrics and the worst site, then aggregate as the wrapped strategy does."""
        rnd = self.run_round(server_round)
        replies = _in_site_order(replies)
        if self._skips_evaluate_stage(rnd) and not replies:
            return None  # the next round's train replies evaluate this round's model
        self._record_replies(rnd, replies, "evaluate")
        metrics = self.strategy.aggregate_evaluate(rnd, replies)
        self._set_evaluation(rnd, metrics)
        return metrics

    def state_dict(self) -> dict[str, Any]:
        """Return the wrapped strategy's state: its class and moment / momentum arrays."""
        arrays: dict[str, OrderedDict[str, np.ndarray]] = {}
        for attr in _STATE_ATTRS:
            value = getattr(self.strategy, attr, None)
            if value and isinstance(value, list):  # FedAvgM: arrays in model order, stored as "0", "1", …
                arrays[attr] = OrderedDict((str(i), np.array(v, copy=True)) for i, v in enumerate(value))
            elif value:
                arrays[attr] = OrderedDict((k, np.array(v, copy=True)) for k, v in value.items())
        return {"kind": _STATE_KIND, "strategy": type(self.strategy).__name__, "arrays": arrays}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output, refusing another kind or another strategy class."""
        if not isinstance(state, dict) or state.get("kind") != _STATE_KIND:
            raise StrategyStateError(
                f"not a fedcare strategy state (kind {state.get('kind') if isinstance(state, dict) else None!r})"
            )
        name = type(self.strategy).__name__
        if state.get("strategy") != name:
            raise StrategyStateError(
                f"the state is of strategy {state.get('strategy')!r}, this run uses {name!r}: "
                "resume with the strategy the checkpoint was written by"
            )
        for attr, arrays in (state.get("arrays") or {}).items():
            if attr not in _STATE_ATTRS or not hasattr(self.strategy, attr):
                raise StrategyStateError(f"{name} has no state attribute {attr!r}")
            if attr in _LIST_STATE_ATTRS:
                if sorted(arrays) != sorted(str(i) for i in range(len(arrays))):
                    raise StrategyStateError(f"{name}'s {attr} must be stored as arrays '0' … '{len(arrays) - 1}'")
                setattr(self.strategy, attr, [np.array(arrays[str(i)], copy=True) for i in range(len(arrays))])
            else:
                setattr(self.strategy, attr, {k: np.array(v, copy=True) for k, v in arrays.items()})


def _metrics_of_record(record: MetricRecord) -> dict[str, float]:
    """Return a MetricRecord's scalar values as floats."""
    return {k: float(v) for k, v in record.items() if isinstance(v, (int, float))}


def build_strategy(
    config: RunConfig, *, history: MetricsHistory | None = None, round_offset: int = 0
) -> FedcareStrategy:
    """Build the configured flwr strategy and wrap it in a :class:`FedcareStrategy`."""
    inner = STRATEGIES.get(config.strategy)(config, _common(config))
    return FedcareStrategy(
        inner,
        min_sites=config.min_sites,
        history=history,
        round_offset=round_offset,
        connect_timeout_s=config.round_timeout_s,
        evaluate_with_train=config.evaluate_with_train,
        num_rounds=config.num_rounds,
        update_check=UpdateCheck(max_update_norm=config.max_update_norm),
    )
