"""The arms a federation is compared with: pooled data, and every site alone.

Every arm uses the **same model** (same family, sizes and initial weights: ``torch.manual_seed``
with the run's seed before building), the **same training settings** and the **same privacy
target** (ε, δ) as the federation, and trains for the same number of epochs in total:
``rounds × local_epochs``, run as ``rounds`` calls of :func:`~fedcare.client.training.train_local`
with ``planned_rounds = rounds``, exactly as a site does in the federation, so DP noise is
calibrated on the same schedule. FedProx's proximal term is a federation device and is off
(``proximal_mu = 0``) in the baselines.

- **pooled**: every site's train (validation, test) split concatenated into one site; the one
  model is evaluated on each site's evaluation split and on the pooled test split.
- **local**: every site trains its own model on its own data; each model is evaluated on its
  own site's evaluation split and on the pooled test split.

A site's *evaluation split* is its test split, else its validation split (as federated
evaluation does); a site with neither is left out of the per-site metrics.

**Global metrics.** An arm's headline metrics (``metrics``, the top level of its summary) are
computed over **every site's evaluation examples taken together** (:func:`~fedcare.client.metrics.global_evaluation`:
exact AUROC, accuracy and balanced accuracy at the arm's operating threshold, Brier score,
calibration error; MAE, RMSE, R²), with 95 % intervals (``intervals``); for ``local`` the
examples of each site are scored by that site's own model. The example-weighted mean of the
per-site metrics, what these figures were before, is kept as ``site_weighted_mean`` for
comparison: it drops a site whose split holds one class from AUROC while that site still counts
with balanced accuracy 1.0. When every site has a test split, ``pooled_test`` of the pooled arm
holds the same numbers as ``metrics`` (one evaluation set, one AUROC).

**Operating threshold.** A binary model's threshold is chosen on the sites' validation splits
(their per-class score histograms summed, Youden's J on the bin edges:
:func:`~fedcare.client.metrics.validation_threshold`); each local model on its own site's.

**Saved models.** With ``out_dir`` every trained model is written as a model file
(``baselines/pooled_model.npz``, ``baselines/local_<site>_model.npz``) with its threshold,
preprocessing and the training sites' data digests, so each can be validated elsewhere with
``fedcare evaluate`` like the federated model.

Privacy accounting goes to a fresh in-memory ledger per trained model
(:meth:`PrivacyLedger.in_memory`, study ``baseline-pooled`` / ``baseline-local``): a baseline
never reads or writes a real site's ledger, and nothing it spends persists.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

import torch
from pydantic import Field
from torch import nn

from ..client.dataset import SiteData, Split
from ..client.metrics import evaluate, global_evaluation, predict, validation_threshold
from ..client.training import TrainResult, TrainSettings, train_local
from ..config_base import FrozenModel
from ..models import ModelSpec, build_for_data, get_weights
from ..models.preprocessing import Preprocessing
from ..server.checkpoint import MODEL_PREPROCESSING, MODEL_THRESHOLD, MODEL_TRAINING_DATA, save_model_file
from ..server.safekeeping import safe_name
from ..privacy.ledger import PrivacyLedger
from ..privacy.settings import PrivacySettings

if TYPE_CHECKING:
    from .scenario import Scenario

__all__ = [
    "CentralEvaluation",
    "evaluate_centrally",
    "ARMS",
    "BaselineResult",
    "IncompatibleSitesError",
    "local_baselines",
    "pool_sites",
    "pooled_baseline",
    "run_baselines",
    "weighted_mean",
]

logger = logging.getLogger(__name__)

Arm = Literal["pooled", "local"]
ARMS: Final[tuple[Arm, ...]] = ("pooled", "local")
POOLED_SITE: Final = "pooled"


class IncompatibleSitesError(ValueError):
    """The sites cannot be pooled or compared: no sites, or different tasks / classes / shapes."""


class BaselineResult(FrozenModel):
    """What one baseline arm achieved.

    Attributes
    ----------
    arm : {"pooled", "local"}
        Which arm.
    metrics : dict of str to float
        Global metrics over every site's evaluation examples taken together (module docstring).
    intervals : dict of str to list of float
        95 % intervals ``[low, high]`` of the global metrics.
    binned : dict of str to float
        Binary: the global AUROC from summed 10-bin histograms (what a DP release supports).
    threshold : float
        The operating threshold (binary; ``local``: each site model at its own, reported as the
        mean over the evaluation examples).
    site_weighted_mean : dict of str to float
        Example-weighted mean over sites of each site's metrics (the old headline; NaN skipped).
    model_files : dict of str to str
        Where each trained model was written (``pooled`` or the site's name), when saved.
    pooled_test : dict of str to float
        Metrics on the pooled test split; for ``local``, the example-weighted mean over the
        site models (weights: each site's evaluation examples).
    sites : dict of str to dict of str to float
        Each site's evaluation metrics (of the pooled model, or of the site's own model).
    site_pooled_test : dict of str to dict of str to float
        ``local`` only: each site's model on the pooled test split.
    num_examples : dict of str to int
        Each site's evaluation examples (the weights).
    epsilon, delta : float
        Privacy spent by the arm: the largest ε over its models, and δ.
    site_epsilon : dict of str to float
        ``local`` only: ε each site's model spent.
    epochs : int
        Epochs trained in total (``rounds × local_epochs``).
    num_train : int
        Training examples used (all sites').
    train_loss : float
        Last training loss (``local``: example-weighted over sites).
    """

    arm: Arm
    metrics: dict[str, float]
    intervals: dict[str, list[float]] = Field(default_factory=dict)
    binned: dict[str, float] = Field(default_factory=dict)
    threshold: float = 0.5
    site_weighted_mean: dict[str, float] = Field(default_factory=dict)
    model_files: dict[str, str] = Field(default_factory=dict)
    pooled_test: dict[str, float]
    sites: dict[str, dict[str, float]]
    site_pooled_test: dict[str, dict[str, float]] = Field(default_factory=dict)
    num_examples: dict[str, int]
    epsilon: float
    delta: float
    site_epsilon: dict[str, float] = Field(default_factory=dict)
    epochs: int
    num_train: int
    train_loss: float

    def to_summary(self) -> dict[str, Any]:
        """Return a JSON-ready dict: the metrics at the top level, everything else nested.

        Keys added by issue 14 (beside the earlier ones, unchanged): ``intervals`` (95 % intervals
        of the top-level metrics), ``binned`` (binary: AUROC from summed 10-bin histograms),
        ``operating_point`` (``threshold``), ``site_weighted_mean`` (the earlier headline: the
        example-weighted mean of per-site metrics) and ``model_files`` (saved models).
        """
        return {
            **self.metrics,
            "intervals": self.intervals,
            "binned": self.binned,
            "operating_point": {"threshold": self.threshold, "chosen_on": "validation splits (Youden's J)"},
            "site_weighted_mean": self.site_weighted_mean,
            "model_files": self.model_files,
            "pooled_test": self.pooled_test,
            "sites": self.sites,
            "site_pooled_test": self.site_pooled_test,
            "num_examples": self.num_examples,
            "privacy": {"epsilon": self.epsilon, "delta": self.delta, "site_epsilon": self.site_epsilon},
            "training": {"epochs": self.epochs, "num_train": self.num_train, "train_loss": self.train_loss},
        }


def pool_sites(sites: Sequence[SiteData], *, name: str = POOLED_SITE) -> SiteData:
    """Concatenate the sites' train, validation and test splits into one site called ``name``.

    Group ids become ``"<site>:<group>"`` so that two sites' patients never merge.
    """
    first = _check_compatible(sites)
    return dataclasses.replace(
        first,
        name=name,
        train=Split.concat([s.train for s in sites], names=[s.name for s in sites]),
        val=Split.concat([s.val for s in sites], names=[s.name for s in sites]),
        test=Split.concat([s.test for s in sites], names=[s.name for s in sites]),
    )


def pooled_baseline(
    sites: Sequence[SiteData],
    *,
    spec: ModelSpec,
    train: TrainSettings,
    privacy: PrivacySettings,
    rounds: int,
    seed: int,
    out_dir: Path | None = None,
    training_data: Sequence[Mapping[str, object]] = (),
) -> BaselineResult:
    """Train one model on all sites' data pooled, under the federation's budget; evaluate it.

    Parameters
    ----------
    sites : sequence of SiteData
        The federation's sites.
    spec : ModelSpec
        The federation's model.
    train : TrainSettings
        The federation's local training settings (``local_epochs`` per round).
    privacy : PrivacySettings
        The federation's DP settings (the same ε, δ target).
    rounds : int
        The federation's number of rounds.
    seed : int
        Seed of the initial weights and of training.
    out_dir : path, optional
        Where to save the model (``baselines/pooled_model.npz``); not saved when omitted.
    training_data : sequence of dict
        The training sites' data digests, stored in the saved model (overlap warnings).
    """
    pooled = pool_sites(sites)
    model, result = _train_arm(
        pooled, spec=spec, train=train, privacy=privacy, rounds=rounds, seed=seed, study="baseline-pooled"
    )
    central = evaluate_centrally(model, sites, seed=seed)
    files = {}
    if out_dir is not None:
        files[POOLED_SITE] = str(save_baseline_model(out_dir / "pooled_model.npz", model, pooled, spec=spec,
                                                     threshold=central.threshold, training_data=training_data))
    out = BaselineResult(
        arm="pooled",
        metrics=central.metrics,
        intervals=central.intervals,
        binned=central.binned,
        threshold=central.threshold,
        site_weighted_mean=central.site_weighted_mean,
        model_files=files,
        pooled_test=central.pooled_test,
        sites=central.sites,
        num_examples=central.num_examples,
        epsilon=float(result.epsilon),
        delta=float(result.delta),
        epochs=rounds * _local_epochs(train),
        num_train=len(pooled.train),
        train_loss=float(result.loss),
    )
    logger.info("pooled baseline: %s (ε = %.3g)", out.metrics, out.epsilon)
    return out


@dataclasses.dataclass(frozen=True)
class CentralEvaluation:
    """One model scored by the researcher on every site's evaluation split and on the pooled test split.

    Attributes
    ----------
    metrics : dict of str to float
        Global metrics over every site's evaluation examples together (exact; at ``threshold``).
    pooled_test : dict of str to float
        Metrics on the pooled test split (empty when no site has a test split): the same values
        as ``metrics`` when every site evaluates on its test split (``metrics`` adds more keys).
    sites : dict of str to dict of str to float
        Each site's evaluation metrics (at ``threshold``).
    num_examples : dict of str to int
        Each site's evaluation examples.
    intervals : dict of str to list of float
        95 % intervals of ``metrics``.
    binned : dict of str to float
        Binary: the global AUROC from the summed 10-bin histograms (a DP release's approximation).
    threshold : float
        The operating threshold (chosen on the sites' validation splits unless given).
    site_weighted_mean : dict of str to float
        Example-weighted mean of the per-site metrics (the pre-issue-14 headline, for comparison).
    """

    metrics: dict[str, float]
    pooled_test: dict[str, float]
    sites: dict[str, dict[str, float]]
    num_examples: dict[str, int]
    intervals: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    binned: dict[str, float] = dataclasses.field(default_factory=dict)
    threshold: float = 0.5
    site_weighted_mean: dict[str, float] = dataclasses.field(default_factory=dict)


def evaluate_centrally(
    model: nn.Module, sites: Sequence[SiteData], *, threshold: float | None = None, seed: int = 0
) -> CentralEvaluation:
    """Score ``model`` on every site's evaluation split (globally and per site) and the pooled test split.

    A simulation's researcher holds every virtual hospital's data, so the federated model is
    scored exactly like the pooled and local arms it is compared with. (A deployment has no such
    view: there, sites release only what their policy allows, e.g. DP-noised statistics.)
    ``threshold``: the operating threshold (default: chosen on the sites' validation splits).
    """
    _check_compatible(sites)
    task = sites[0].task
    if threshold is None:
        threshold = validation_threshold(model, [s.val for s in sites], task)
    per_site: dict[str, dict[str, float]] = {}
    weights: dict[str, int] = {}
    splits = []
    for site in sites:
        split = _eval_split(site)
        if split is not None:
            per_site[site.name] = _evaluate(model, split, site, threshold)
            weights[site.name] = len(split)
            splits.append(split)
    if not splits:
        raise IncompatibleSitesError("no site has a test or validation split; give the sites evaluation data")
    overall = global_evaluation(model, splits, task, threshold=threshold, seed=seed)
    pooled = pool_sites(sites)  # the same examples as ``overall`` when every site evaluates on its test split
    pooled_test = _evaluate(model, pooled.test, pooled, threshold) if len(pooled.test) else {}
    return CentralEvaluation(metrics=overall.metrics, pooled_test=dict(pooled_test), sites=per_site,
                             num_examples=weights, intervals=overall.intervals, binned=overall.binned,
                             threshold=float(threshold), site_weighted_mean=weighted_mean(per_site, weights))  # fmt: skip


def local_baselines(
    sites: Sequence[SiteData],
    *,
    spec: ModelSpec,
    train: TrainSettings,
    privacy: PrivacySettings,
    rounds: int,
    seed: int,
    out_dir: Path | None = None,
    training_data: Sequence[Mapping[str, object]] = (),
) -> BaselineResult:
    """Train one model per site on that site's data alone, under the federation's budget.

    Parameters are those of :func:`pooled_baseline`. Each site's model starts from the same
    initial weights, takes its threshold from its own validation split, and is evaluated on its
    own evaluation split and on the pooled test split; the global metrics score every site's
    evaluation examples with that site's model. Saved as ``baselines/local_<site>_model.npz``.
    """
    pooled = pool_sites(sites)
    files: dict[str, str] = {}
    own_thresholds: list[float] = []
    outputs: list[torch.Tensor] = []
    eval_splits: list[Split] = []
    per_site: dict[str, dict[str, float]] = {}
    on_pool: dict[str, dict[str, float]] = {}
    weights: dict[str, int] = {}
    eps: dict[str, float] = {}
    deltas, losses, train_sizes = [], [], []
    for site in sites:
        model, result = _train_arm(
            site, spec=spec, train=train, privacy=privacy, rounds=rounds, seed=seed, study="baseline-local"
        )
        eps[site.name] = float(result.epsilon)
        deltas.append(float(result.delta))
        losses.append(float(result.loss))
        train_sizes.append(len(site.train))
        threshold = validation_threshold(model, [site.val], site.task)
        if out_dir is not None:
            own = [d for d in training_data if d.get("site") == site.name]
            files[site.name] = str(save_baseline_model(out_dir / f"local_{safe_name(site.name)}_model.npz", model,
                                                       site, spec=spec, threshold=threshold, training_data=own))
        split = _eval_split(site)
        if split is not None:
            per_site[site.name] = _evaluate(model, split, site, threshold)
            weights[site.name] = len(split)
            eval_splits.append(split)
            own_thresholds.append(threshold)
            outputs.append(predict(model, split))
            if len(pooled.test):
                on_pool[site.name] = _evaluate(model, pooled.test, pooled, threshold)
    overall = global_evaluation(_Replay(outputs), _Replay.replay_splits(eval_splits),
                                sites[0].task, threshold=own_thresholds, seed=seed)
    out = BaselineResult(
        arm="local",
        metrics=overall.metrics,
        intervals=overall.intervals,
        binned=overall.binned,
        threshold=overall.threshold,
        site_weighted_mean=weighted_mean(per_site, weights),
        model_files=files,
        pooled_test=weighted_mean(on_pool, weights),
        sites=per_site,
        site_pooled_test=on_pool,
        num_examples=weights,
        epsilon=max(eps.values()),
        delta=max(deltas),
        site_epsilon=eps,
        epochs=rounds * _local_epochs(train),
        num_train=sum(train_sizes),
        train_loss=_weighted([*losses], [*train_sizes]),
    )
    logger.info("local baselines: %s (max ε = %.3g)", out.metrics, out.epsilon)
    return out


def run_baselines(
    scenario: Scenario,
    sites: Sequence[SiteData],
    *,
    which: Sequence[str],
    out_dir: Path | None = None,
    training_data: Sequence[Mapping[str, object]] = (),
) -> dict[str, dict[str, Any]]:
    """Run the baseline arms ``which`` (``pooled``, ``local``) for a scenario; return their summaries.

    ``out_dir``: save every trained model under ``out_dir / "baselines"``; ``training_data``: the
    sites' data digests stored in the saved models.
    """
    unknown = sorted(set(which) - set(ARMS))
    if unknown:
        raise ValueError(f"unknown baseline(s) {unknown}; known baselines: {', '.join(ARMS)}")
    train = TrainSettings(
        local_epochs=scenario.training.local_epochs,
        batch_size=scenario.training.batch_size,
        lr=scenario.training.lr,
        clip_grad_norm=scenario.training.clip_grad_norm,
        seed=scenario.seed,
    )
    kwargs: dict[str, Any] = {
        "spec": scenario.model, "train": train, "privacy": scenario.privacy,
        "rounds": scenario.rounds, "seed": scenario.seed,
        "out_dir": None if out_dir is None else Path(out_dir) / "baselines", "training_data": training_data,
    }
    arms = {"pooled": pooled_baseline, "local": local_baselines}
    return {arm: arms[arm](sites, **kwargs).to_summary() for arm in ARMS if arm in which}


def weighted_mean(per_site: Mapping[str, Mapping[str, float]], weights: Mapping[str, int]) -> dict[str, float]:
    """Return each metric's mean over sites weighted by ``weights`` (NaN values skipped)."""
    names = sorted({k for m in per_site.values() for k in m})
    out = {}
    for name in names:
        pairs = [(m[name], weights[s]) for s, m in per_site.items() if name in m]
        out[name] = _weighted([v for v, _ in pairs], [w for _, w in pairs])
    return out


# --------------------------------------------------------------------------- helpers


def _weighted(values: Sequence[float], weights: Sequence[int]) -> float:
    """Return the weighted mean of the finite ``values`` (NaN when none)."""
    pairs = [(float(v), w) for v, w in zip(values, weights, strict=True) if math.isfinite(float(v)) and w > 0]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else math.nan


def _local_epochs(train: TrainSettings) -> int:
    """Return the settings' epochs per round."""
    return int(train.local_epochs)


def _round_settings(train: TrainSettings, *, seed: int, arm_site: str, round_index: int) -> TrainSettings:
    """Return ``train`` with this round's seed and no proximal term."""
    round_seed = zlib.crc32(f"{seed}:{arm_site}:{round_index}".encode()) & 0x7FFFFFFF
    return train.model_copy(update={"seed": round_seed, "proximal_mu": 0.0})


def _train_arm(
    data: SiteData,
    *,
    spec: ModelSpec,
    train: TrainSettings,
    privacy: PrivacySettings,
    rounds: int,
    seed: int,
    study: str,
) -> tuple[nn.Module, TrainResult]:
    """Build the model from the shared seed and train it ``rounds`` times on ``data``."""
    if rounds < 1:
        raise ValueError(f"rounds = {rounds}: a baseline trains for at least one round")
    torch.manual_seed(seed)  # the same initial weights for every arm
    model = build_for_data(
        spec, task=data.task, num_classes=data.num_classes, input_shape=tuple(data.input_shape),
        has_mask=data.has_mask,
    )
    ledger = PrivacyLedger.in_memory(site=data.name, study=study)
    for r in range(1, rounds + 1):
        result = train_local(
            model, data,
            train=_round_settings(train, seed=seed, arm_site=data.name, round_index=r),
            privacy=privacy, ledger=ledger, planned_rounds=rounds, round_index=r,
        )
    return model, result  # rounds >= 1, so result is bound


def _eval_split(site: SiteData) -> Split | None:
    """Return the split a site evaluates on: test, else validation, else None."""
    if len(site.test):
        return site.test
    if len(site.val):
        return site.val
    logger.warning("site %s has no test or validation examples; left out of the baseline metrics", site.name)
    return None


def _evaluate(model: nn.Module, split: Split, site: SiteData, threshold: float = 0.5) -> dict[str, float]:
    """Return the model's metrics on ``split`` at ``threshold``."""
    model.eval()
    return {k: float(v) for k, v in evaluate(model, split, site.task, threshold=threshold).items()}


def save_baseline_model(
    path: Path,
    model: nn.Module,
    data: SiteData,
    *,
    spec: ModelSpec,
    threshold: float,
    training_data: Sequence[Mapping[str, object]],
) -> Path:
    """Write a baseline model as a model file ``fedcare evaluate`` reads (threshold, preprocessing, data digests)."""
    meta = {
        "model_spec": spec.model_dump(),
        "task": data.task,
        "num_classes": data.num_classes if data.task != "regression" else 1,
        "input_shape": list(data.input_shape),
        "has_mask": data.has_mask,
        "study": f"baseline-{data.name}",
        MODEL_THRESHOLD: float(threshold),
        MODEL_PREPROCESSING: Preprocessing().to_meta(),
        MODEL_TRAINING_DATA: [dict(d) for d in training_data],
    }
    save_model_file(path, get_weights(model), meta)
    logger.info("baseline model written to %s", path)
    return path


class _Replay(nn.Module):
    """A stand-in model that returns precomputed outputs (each local model's, on its own site's split).

    :func:`replay_splits` gives the splits whose single input is the row index into the outputs.
    """

    def __init__(self, outputs: Sequence[torch.Tensor]) -> None:
        super().__init__()
        self.register_buffer("table", torch.cat(list(outputs)))
        self.anchor = nn.Parameter(torch.zeros(()), requires_grad=False)  # predict() reads a parameter's device

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        """Return the stored outputs at ``index``."""
        return self.table[index]

    @staticmethod
    def replay_splits(splits: Sequence[Split]) -> list[Split]:
        """Return ``splits`` with their inputs replaced by consecutive row indices into the stored outputs."""
        out, start = [], 0
        for split in splits:
            out.append(Split(inputs=(torch.arange(start, start + len(split)),), targets=split.targets))
            start += len(split)
        return out


def _check_compatible(sites: Sequence[SiteData]) -> SiteData:
    """Return the first site after checking that all sites describe the same kind of data."""
    if not sites:
        raise IncompatibleSitesError("no sites given; a baseline needs at least one site")
    first = sites[0]
    key = (first.kind, first.task, first.num_classes, tuple(first.input_shape), first.has_mask)
    for site in sites[1:]:
        other = (site.kind, site.task, site.num_classes, tuple(site.input_shape), site.has_mask)
        if other != key:
            raise IncompatibleSitesError(
                f"sites {first.name} and {site.name} hold different data ({key} vs {other}); "
                "baselines compare sites of one federation, which share kind, task, classes and shape"
            )
    return first
