"""Client-level differential privacy of a secure run: how ε is accounted and what the report states.

With ``client-dp-clipping-norm > 0`` (SecAgg+ path only) each site clips its update to C and the
coordinator adds N(0, (σ C / m)²) to the unweighted mean of the m sampled sites' updates
(``server.secagg``). The secure driver records each round's σ and sites sampled / available in
the round's train metrics (the ``CLIENT_*`` keys); :func:`client_level_privacy` recomputes the
run's ε from them for the privacy report (``server.lifecycle``, ``simulations.release``).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from fractions import Fraction
from typing import Any, Final

import dp_accounting
from dp_accounting.rdp import rdp_privacy_accountant as rdp

from ..privacy.report import ClientLevelPrivacy
from .checkpoint import MetricsHistory
from .config import RunConfig

__all__ = [
    "CLIENT_DELTA",
    "CLIENT_DP_ACCOUNTANT",
    "CLIENT_DP_MECHANISM",
    "CLIENT_DP_NEIGHBOURING",
    "CLIENT_DP_SAMPLING",
    "CLIENT_EPSILON",
    "CLIENT_NOISE",
    "CLIENT_SAMPLE_RATE",
    "CLIENT_SITES_AVAILABLE",
    "CLIENT_SITES_SAMPLED",
    "client_level_epsilon",
    "client_level_privacy",
    "client_steps",
]

logger = logging.getLogger(__name__)

CLIENT_EPSILON: Final = "client-epsilon"  # train metric: client-level ε after this round
CLIENT_DELTA: Final = "client-delta"
CLIENT_SAMPLE_RATE: Final = "client-sample-rate"  # sampled sites / available sites this round
CLIENT_SITES_SAMPLED: Final = "client-sites-sampled"  # m: sites sampled this round (fixed size)
CLIENT_SITES_AVAILABLE: Final = "client-sites-available"  # n: sites available to sample from
CLIENT_NOISE: Final = "client-noise-multiplier"
CLIENT_DP_MECHANISM: Final = (
    "Gaussian noise on the unweighted mean of site-clipped updates, added by the coordinator "
    "(flwr DifferentialPrivacyClientSideFixedClipping)"
)

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


def client_steps(records: list[Any]) -> list[tuple[float, int, int] | tuple[float, float]]:
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
    steps = client_steps(list(history.completed))
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
