"""A deployed binary model's operating threshold, chosen from the sites' validation histograms.

In a simulation the researcher holds every virtual hospital's data and chooses the threshold
centrally (``simulations.external.store_operating_point``). In a deployment the coordinator holds
no data, so after the last round of a **binary** study it asks every connected site once more,
with the ordinary evaluate message and ``evaluation-split = "validation"`` (``models.wire``), for
the per-class score histograms of the final model on the site's **validation** split: the same
``stat-*`` sufficient statistics federated evaluation releases
(:mod:`fedcare.privacy.release_mechanisms`), released through the same policy path
(``client.app._evaluation_release``):

- ``evaluation = "dp"`` (default): Laplace-noised, charged to the site's ledger as one evaluation
  query (``evaluation_epsilon_per_query``), counted against ``max_evaluation_queries_per_study``;
  a site with no query or ε left refuses and says so;
- ``"exact"``: exact histograms (the hospital's opt-in, already warned by its policy);
- ``"off"``: refused.

The query is one of the study's evaluation queries, so its ε lies inside the reserve every DP
site sets aside before calibrating DP-SGD (``release_reserve``: ``max_evaluation_queries_per_study
× evaluation_epsilon_per_query``): it never takes a site beyond its target ε. It can only be
refused for lack of a query (a study that evaluated every round used them all), which
:func:`warn_if_no_query_left` says at the start of the study.

The coordinator sums the histograms that came back, chooses the threshold with
:func:`~fedcare.privacy.global_metrics.choose_threshold` (Youden's J on the summed 10-bin
histograms, a bin edge) and the study stores it in the final model file's meta
(``MODEL_THRESHOLD``) and how it was chosen in ``history.json`` (``operating_point``). With fewer
than ``min-sites`` answers, or summed histograms holding one class, the model keeps 0.5 (no
threshold stored) and ``history.json`` says why. Multiclass and regression studies ask nothing and
store none. Choosing the threshold is post-processing of the released histograms: no further ε.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from ..models import wire
from ..privacy.global_metrics import DEFAULT_THRESHOLD, choose_threshold, class_histograms
from ..privacy.policy import node_default_policy
from ..privacy.release_mechanisms import STAT_PREFIX, sum_statistics
from ..privacy.report import SitePrivacy
from .checkpoint import MODEL_THRESHOLD
from .config import RunConfig
from .grid_poll import responsive_grid
from .messages import arrays_to_record, evaluate_config

__all__ = [
    "METHOD",
    "OperatingPoint",
    "planned_evaluation_queries",
    "report_sites",
    "validation_operating_point",
    "warn_if_no_query_left",
]

logger = logging.getLogger(__name__)

METHOD: Final = "youden-j-on-summed-validation-histograms"
"""How the threshold is chosen (``history.json``'s ``operating_point.method``)."""
_GROUP: Final = "operating-point"
#: what a validation reply says about the site's ledger after the release (kept in history.json)
_PRIVACY_KEYS: Final = (
    wire.EPSILON, wire.EPSILON_TRAINING, wire.EPSILON_COUNT, wire.EPSILON_EVALUATION,
    wire.EVALUATION_QUERIES, wire.EVALUATION_EXACT_QUERIES,
)  # fmt: skip


@dataclass(frozen=True)
class OperatingPoint:
    """The final model's operating threshold and how it was (or was not) chosen.

    Attributes
    ----------
    threshold : float or None
        The threshold stored in the model file (a bin edge); None: none stored (the model scores
        at 0.5 for a binary task; nothing applies to other tasks).
    sites : tuple of str
        The sites whose validation histograms were summed.
    releases : dict of str to str
        Per contributing site: ``"dp"`` (Laplace-noised, charged) or ``"exact"`` (policy opt-in).
    refusals : tuple of dict
        ``{"site", "node_id", "code", "reason"}`` of every site that released nothing.
    reason : str or None
        Why no threshold was stored (None when one was).
    examples : float
        Validation examples in the summed histograms (noisy under DP; clamped bins).
    site_privacy : dict of str to dict
        Each contributing site's ε per mechanism and queries after the release, as it reported them.
    """

    threshold: float | None
    sites: tuple[str, ...] = ()
    releases: dict[str, str] = field(default_factory=dict)
    refusals: tuple[dict[str, Any], ...] = ()
    reason: str | None = None
    examples: float = 0.0
    site_privacy: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def dp_noised(self) -> bool:
        """Return whether every contribution was DP-noised (False when any was exact, or none came)."""
        return bool(self.releases) and all(kind == "dp" for kind in self.releases.values())

    def model_meta(self) -> dict[str, float]:
        """Return what the final model file's meta gains: ``{MODEL_THRESHOLD: t}``, or nothing."""
        return {} if self.threshold is None else {MODEL_THRESHOLD: float(self.threshold)}

    def to_history(self) -> dict[str, Any]:
        """Return ``history.json``'s ``operating_point`` entry."""
        return {
            "threshold": self.threshold,
            "stored": self.threshold is not None,
            "method": METHOD,
            "split": wire.SPLIT_VALIDATION,
            "sites": list(self.sites),
            "dp_noised": self.dp_noised,
            "releases": dict(sorted(self.releases.items())),
            "examples": float(self.examples),
            "refusals": [dict(r) for r in self.refusals],
            "reason": self.reason,
            "site_privacy": {s: dict(v) for s, v in sorted(self.site_privacy.items())},
        }


def planned_evaluation_queries(config: RunConfig) -> int:
    """Return the most evaluation queries the study asks of one site, the final validation query included.

    One per round when the study evaluates (``fraction-evaluate > 0``; with ``evaluate-with-train``
    the train message of round r + 1 evaluates round r's model and the last round's is evaluated
    separately: one per round as well; ``evaluate-with-train`` alone: rounds 2 to n), plus one for
    the operating threshold of a binary study.
    """
    if config.fraction_evaluate > 0:
        per_round = config.num_rounds
    else:
        per_round = config.num_rounds - 1 if config.evaluate_with_train else 0
    return per_round + (1 if config.task == "binary" else 0)


def warn_if_no_query_left(config: RunConfig) -> None:
    """Log a warning when sites on the node default policy will have no query left for the threshold."""
    if config.task != "binary":
        return
    limit = node_default_policy().max_evaluation_queries_per_study
    planned = planned_evaluation_queries(config)
    if planned > limit:
        logger.warning(
            "study %s: %d evaluation queries per site planned (%d rounds evaluated + the final validation "
            "query for the operating threshold), more than the %d a site on the default policy answers: "
            "those sites will refuse the validation query and the model keeps the threshold 0.5; "
            "evaluate fewer rounds (fraction-evaluate = 0, fewer rounds) to leave one query",
            config.study, planned, config.num_rounds, limit,
        )


def _message(config: RunConfig, arrays: Mapping[str, np.ndarray], node_id: int) -> Message:
    """Return the evaluate message asking ``node_id`` for its validation statistics of the final model."""
    record = ConfigRecord({**dict(evaluate_config(config)), wire.EVALUATION_SPLIT: wire.SPLIT_VALIDATION})
    content = RecordDict({wire.ARRAYS: arrays_to_record(dict(arrays)), wire.CONFIG: record})
    return Message(content, dst_node_id=node_id, message_type=MessageType.EVALUATE, group_id=_GROUP)


def _site_of(msg: Message, names: Mapping[int, str]) -> str:
    """Return the site a reply came from (its own name, else the name its node reported in training)."""
    node = msg.metadata.src_node_id
    if not msg.has_error():
        info = msg.content.config_records.get(wire.CONFIG)
        if info is not None and isinstance(info.get(wire.SITE), str):
            return str(info[wire.SITE])
    else:
        prefix = "site '"
        reason = msg.error.reason or ""
        if reason.startswith(prefix) and "'" in reason[len(prefix):]:
            return reason[len(prefix):].split("'", 1)[0]
    return names.get(node, f"node-{node}")


def query_batch_size(config: RunConfig, num_nodes: int) -> int:
    """Return how many nodes are asked at once: as many as a training round samples (at least ``min-sites``)."""
    return max(1, config.min_sites, math.ceil(config.fraction_train * num_nodes))


def validation_operating_point(
    grid: Grid, config: RunConfig, arrays: Mapping[str, np.ndarray], *, node_sites: Mapping[int, str] | None = None
) -> OperatingPoint:
    """Ask every connected site for its validation histograms of ``arrays``; return the operating point.

    The nodes are asked in batches of :func:`query_batch_size` (as many as a training round
    samples), one batch after another, each bounded by ``round-timeout-s``: 50 nodes on one test
    machine all starting a task process at once exhausted its memory (BENCHMARKS.md, "Load").

    Not a binary study: nothing is asked, the threshold is None. ``node_sites``: the site names the
    nodes reported in training (for error replies without one).
    """
    if config.task != "binary":
        return OperatingPoint(threshold=None, reason=f"a {config.task} study has no operating threshold")
    names = dict(node_sites or {})
    nodes = sorted(grid.get_node_ids())
    replies: list[Message] = []
    step = query_batch_size(config, len(nodes))
    for start in range(0, len(nodes), step):  # as many at once as a round trains: bounded load at the sites' hosts
        messages = [_message(config, arrays, node) for node in nodes[start : start + step]]
        replies += responsive_grid(grid).send_and_receive(messages, timeout=config.round_timeout_s)
    stats: list[dict[str, float]] = []
    sites: list[str] = []
    releases: dict[str, str] = {}
    privacy: dict[str, dict[str, float]] = {}
    refusals: list[dict[str, Any]] = []
    for msg in sorted(replies, key=lambda m: m.metadata.src_node_id):
        site = _site_of(msg, names)
        if msg.has_error():
            refusals.append({"site": site, "node_id": msg.metadata.src_node_id, "code": msg.error.code,
                             "reason": msg.error.reason or "(no reason given)"})
            logger.warning("operating threshold: site %s sent no validation histograms: %s", site, msg.error.reason)
            continue
        metrics = {k: float(v) for k, v in msg.content.metric_records[wire.METRICS].items()}  # type: ignore[arg-type]
        if not any(k.startswith(f"{STAT_PREFIX}hist-") for k in metrics):
            refusals.append({"site": site, "node_id": msg.metadata.src_node_id, "code": None,
                             "reason": "the reply holds no validation histograms"})
            continue
        info = msg.content.config_records.get(wire.CONFIG)
        kind = str(info.get(wire.EVALUATION_RELEASE, "unreported")) if info is not None else "unreported"
        sites.append(site)
        releases[site] = kind
        stats.append(metrics)
        privacy[site] = {k: metrics[k] for k in _PRIVACY_KEYS if k in metrics}
    answered = {m.metadata.src_node_id for m in replies}
    for node in nodes:
        if node not in answered:
            refusals.append({"site": names.get(node, f"node-{node}"), "node_id": node, "code": None,
                             "reason": f"no reply within round-timeout-s = {config.round_timeout_s:g}"})
    return _choose(config, stats, sites=sites, releases=releases, refusals=refusals, privacy=privacy)


def _choose(
    config: RunConfig,
    stats: Sequence[Mapping[str, float]],
    *,
    sites: Sequence[str],
    releases: dict[str, str],
    refusals: Sequence[dict[str, Any]],
    privacy: dict[str, dict[str, float]],
) -> OperatingPoint:
    """Sum the released histograms and choose the threshold, or say why the model keeps 0.5."""
    neg, pos = class_histograms(sum_statistics(stats))
    common = {"sites": tuple(sites), "releases": releases, "refusals": tuple(refusals),
              "examples": float(neg.sum() + pos.sum()), "site_privacy": privacy}  # fmt: skip
    reason: str | None = None
    if len(sites) < config.min_sites:
        reason = (f"only {len(sites)} site(s) released validation histograms, fewer than min-sites = "
                  f"{config.min_sites}: the model keeps the threshold {DEFAULT_THRESHOLD}")
    elif pos.sum() <= 0 or neg.sum() <= 0:
        reason = (f"the summed validation histograms hold one class only: the model keeps the threshold "
                  f"{DEFAULT_THRESHOLD}")
    if reason is not None:
        logger.warning("study %s: %s", config.study, reason)
        return OperatingPoint(threshold=None, reason=reason, **common)
    threshold = choose_threshold(neg, pos)
    logger.info("study %s: operating threshold %.2f chosen on the validation histograms of %d site(s) (%s)",
                config.study, threshold, len(sites), "DP-noised" if all(v == "dp" for v in releases.values())
                else "not all DP-noised")  # fmt: skip
    return OperatingPoint(threshold=threshold, **common)


def report_sites(sites: Sequence[SitePrivacy], point: OperatingPoint | None) -> list[SitePrivacy]:
    """Return ``sites`` (the privacy report's per-site ε) with each site's ledger after the validation release.

    The report's figures come from the sites' round replies; the validation query's charge is
    reported by its own reply, so a site's ε and evaluation figures are taken from that reply
    where it reports more ε (the ledger only grows).
    """
    if point is None or not point.site_privacy:
        return list(sites)
    out = []
    for entry in sites:
        after = point.site_privacy.get(entry.site)
        eps = None if after is None else after.get(wire.EPSILON)
        if after is None or eps is None or not math.isfinite(eps) or (entry.epsilon is not None and eps < entry.epsilon):
            out.append(entry)
            continue
        update: dict[str, Any] = {}
        if entry.dp_enabled:
            update |= {"epsilon": eps, "epsilon_evaluation": after.get(wire.EPSILON_EVALUATION, entry.epsilon_evaluation)}
        for key, name in ((wire.EVALUATION_QUERIES, "evaluation_queries"),
                          (wire.EVALUATION_EXACT_QUERIES, "exact_evaluations")):
            if key in after:
                update[name] = int(after[key])
        out.append(entry.model_copy(update=update))
    return out
