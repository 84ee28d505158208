"""Attack on the client-level ε: a report that accounts site sampling as it did not happen.

flwr samples a **fixed number** m of the n available sites each round, uniformly without
replacement (``client_manager.sample``), and the coordinator adds N(0, (σC)²) to the sum of the m
clipped updates. That sampling is analysed for replace-one neighbours (one site's data replaced
by another's; n public), under which the sum's sensitivity is 2C. The attacker's point: an
accountant that assumes Poisson sampling with add/remove neighbours and sensitivity C (Opacus's
``RDPAccountant``, what the report used) states a smaller ε than the mechanism that ran has.

These tests pin the client-level ε to values computed here independently of dp_accounting:
with every site sampled (m = n) the mechanism is the Gaussian mechanism with noise multiplier
σ/2 composed over the rounds, whose Rényi DP at order α is ``T · α / (2 (σ/2)²)``, converted to
(ε, δ) with Balle et al. 2020 (Prop. 12 of arXiv:2004.00010, the conversion dp_accounting uses)
over dp_accounting's default orders.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from opacus.accountants import RDPAccountant

from fedcare.privacy.report import ClientLevelPrivacy, PrivacyReport, SitePrivacy, render_markdown
from fedcare.server.checkpoint import MetricsHistory
from fedcare.server.config import RunConfig
from fedcare.server.secagg import (
    CLIENT_NOISE,
    CLIENT_SAMPLE_RATE,
    CLIENT_SITES_AVAILABLE,
    CLIENT_SITES_SAMPLED,
    client_level_epsilon,
    client_level_privacy,
)

# dp_accounting's default RDP orders (rdp_privacy_accountant.DEFAULT_RDP_ORDERS), written out.
ORDERS = np.array([1 + x / 10.0 for x in range(1, 100)] + list(range(11, 64)) + [128, 256, 512, 1024], dtype=float)


def _gaussian_epsilon(*, sigma_eff: float, rounds: int, delta: float) -> float:
    """(ε, δ) of the Gaussian mechanism (std / sensitivity = sigma_eff) composed ``rounds`` times, via RDP."""
    rdp = rounds * ORDERS / (2.0 * sigma_eff**2)
    eps = rdp + np.log1p(-1.0 / ORDERS) - np.log(delta * ORDERS) / (ORDERS - 1.0)
    return float(max(0.0, eps[ORDERS > 1.01].min()))


@pytest.mark.parametrize(("sigma", "rounds", "sites", "delta"), [(1.0, 5, 4, 1e-5), (2.5, 20, 10, 1e-3), (8.0, 100, 3, 1e-6)])
def test_every_site_sampled_is_the_gaussian_mechanism_at_half_the_noise_multiplier(
    sigma: float, rounds: int, sites: int, delta: float
) -> None:
    # Prepare: q = 1, replace-one sensitivity 2C: noise multiplier σ/2 per round
    expected = _gaussian_epsilon(sigma_eff=sigma / 2.0, rounds=rounds, delta=delta)

    # Execute
    epsilon = client_level_epsilon([(sigma, sites, sites)] * rounds, delta)

    # Assert
    assert epsilon == pytest.approx(expected, rel=1e-9)


def test_known_value_sigma_one_five_rounds_all_sites() -> None:
    # σ = 1, 5 rounds, δ = 1e-5: RDP 10α; the best default order is α = 2.0 → ε = 20 + ln(1/2) − ln(2e-5)
    assert client_level_epsilon([(1.0, 4, 4)] * 5, 1e-5) == pytest.approx(
        20.0 + math.log(0.5) - math.log(2e-5), rel=1e-12
    )


def test_poisson_add_remove_accounting_understates_fixed_size_sampling() -> None:
    # Prepare: 2 of 4 sites each round, σ = 1, 10 rounds; what the old report computed
    poisson = RDPAccountant()
    poisson.history = [(1.0, 0.5, 10)]
    understated = poisson.get_epsilon(1e-5)

    # Execute
    epsilon = client_level_epsilon([(1.0, 2, 4)] * 10, 1e-5)

    # Assert: the mechanism that ran has a larger ε than the Poisson / add-remove figure, and
    # sampling half of the sites still helps relative to sampling all of them
    assert epsilon > understated * 2
    assert epsilon < client_level_epsilon([(1.0, 4, 4)] * 10, 1e-5)


def test_rates_recorded_by_older_histories_give_the_same_epsilon_as_counts() -> None:
    assert client_level_epsilon([(1.3, 0.25)] * 3 + [(1.3, 1.0)], 1e-5) == pytest.approx(
        client_level_epsilon([(1.3, 1, 4)] * 3 + [(1.3, 4, 4)], 1e-5), rel=1e-12
    )


def test_no_noise_is_no_guarantee_and_an_impossible_sample_is_refused() -> None:
    assert client_level_epsilon([(1.0, 2, 2), (0.0, 2, 2)], 1e-5) == math.inf
    assert client_level_epsilon([], 1e-5) == 0.0
    with pytest.raises(ValueError, match="sampled 5 of 4"):
        client_level_epsilon([(1.0, 5, 4)], 1e-5)


def test_the_report_states_the_relation_and_the_sampling_assumption() -> None:
    # Prepare: a secure run with client-level DP, 3 complete rounds sampling 2 of 3 sites
    config = RunConfig(input_shape=(4,), secure_aggregation=True, client_dp_clipping_norm=1.0,
                       client_dp_noise_multiplier=2.0, client_dp_delta=1e-5)  # fmt: skip
    history = MetricsHistory()
    for rnd in (1, 2, 3):
        record = history.round(rnd)
        record.train = {CLIENT_NOISE: 2.0, CLIENT_SAMPLE_RATE: 2 / 3, CLIENT_SITES_SAMPLED: 2.0,
                        CLIENT_SITES_AVAILABLE: 3.0}  # fmt: skip
        record.complete = True

    # Execute
    client = client_level_privacy(config, history)
    assert client is not None
    report = PrivacyReport(study="s", round=3, secure_aggregation=True, client_level=client,
                           sites=(SitePrivacy(site="a", dp_enabled=False),))  # fmt: skip
    markdown = render_markdown(report)

    # Assert
    assert client.epsilon == pytest.approx(client_level_epsilon([(2.0, 2, 3)] * 3, 1e-5), rel=1e-12)
    assert client.rounds == 3 and client.sample_rate == pytest.approx(2 / 3)
    assert client.neighbouring is not None and client.neighbouring.startswith("replace-one site")
    assert client.sampling is not None and "without replacement" in client.sampling
    assert "Neighbouring relation: replace-one site" in markdown
    assert "Sampling assumption: each round a fixed number m of the n available sites" in markdown
    assert isinstance(client, ClientLevelPrivacy)
