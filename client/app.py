"""The Flower ClientApp: translates Flower messages to ``train_local`` / ``evaluate`` and back.

Everything about the hospital comes from the node, never from the server's run config:
``context.node_config`` (``flower-supernode --node-config '...'``) holds

- ``site-manifest``: the site manifest TOML (required);
- ``ledger-dir``: where the site's privacy ledger lives (required: a ledger that does not
  persist would let ε restart at zero);
- ``site-name``: optional, overrides the manifest's site name in replies and the ledger;
- ``privacy-settings``: optional TOML of the site's :class:`PrivacySettings` (fields at the top
  level or under ``[privacy]``); default ``PrivacySettings()``: DP-SGD to ε = 3 at δ = 1e-5;
- ``seed``: optional seed of the site's own randomness (shuffling, DP noise, SecAgg+ rounding),
  for tests and reproducible experiments only (warned as a weakening): the server never chooses
  it, and without it every round draws from the operating system's entropy;
- ``report-train-loss``: optional ``true`` to send the training loss under DP (it is computed
  without noise, outside ε; a DP site sends NaN by default);
- ``device``: optional torch device (default ``cpu``).
- ``data-digest``: optional :func:`~fedcare.client.data_digest.data_digest` of the site, recorded
  by ``fedcare node start`` after its data check; while the site's manifest or data files differ
  from it the node refuses every task (``ERROR_DATA_INVALID``) until it is restarted;
- ``policy``: optional TOML of the hospital's own :class:`~fedcare.privacy.policy.SitePolicy`
  (``privacy.policy``); without it the node applies ``node_default_policy()``, the strict
  default: it trains only in SecAgg+ rounds and refuses plain ones (rule ``secure_aggregation``).

Before any training the node states what the round asks (:class:`RoundRequest`: study, model
family, the site's DP values with the noise planned for this round and the accountant's projected
ε after it, δ, C, secure aggregation (true only inside a SecAgg+ round, set by
``client.secure``), the app hash from the environment
variable ``FEDCARE_APP_HASH`` (set by the node's app gate when apps are pinned), the training
cohort size and the ε already spent in this study and over all the site's ledgers in
``ledger-dir``) and calls ``check_round``; a refusal touches neither the model nor the ledger.

The server sends the model (named arrays), its spec and expected data shape, the round, the
rounds planned, the study and the local training settings. A train reply carries the trained
arrays, ``num-examples``, the site's training metrics and its ε / δ spent so far in the study
(MetricRecord: ``num-examples``, ``train-loss``, ``steps``, ``epsilon``, ``delta``,
``noise-multiplier``; ``train-s``, seconds of local training, only on a node whose environment
sets ``FEDCARE_REPORT_TIMING=1``: a timing side channel, warned as a weakening; benchmarks use it)
and, in the ConfigRecord ``config``, its name (``site``), the SHA-256 of
its manifest file (``manifest-sha256``; a digest of the data description for sites built in
memory, never of data) and, under DP, its ``accountant`` and clipping norm ``max-grad-norm``:
the server logs them in the audit log and the privacy report. ``num-examples`` is never the
exact count under a site policy: it is the Laplace-noised count (``count_epsilon``, drawn once per
study and training-set size, stored in the ledger and re-sent every round); the reply also carries
the site's ε per mechanism (``epsilon-training``, ``epsilon-count``, ``epsilon-evaluation``,
``evaluation-queries``, ``evaluation-exact-queries``; ``epsilon`` is their sum). DP-SGD is
calibrated to the site's target ε minus its policy's release reserve
(``release_mechanisms.release_reserve``). An evaluate reply carries what the site's policy
releases (``evaluation``): ``dp`` (default) Laplace-noised sufficient statistics (``stat-*``,
``privacy.release_mechanisms``), charged as one ledger entry per query, refused below
``min_evaluation_cohort`` test records or beyond ``max_evaluation_queries_per_study`` or the ε
budget; ``exact`` the metrics of ``client.metrics.evaluate`` and exact statistics (opt-in,
outside ε, warned); ``off`` nothing. An evaluate message with ``evaluation-split = "validation"``
(the final model's operating threshold, ``server.operating_point``) gets the same release of the
validation split instead, through the same checks and charge (one query of the same budget); any
split other than test and validation is refused. Under ``evaluate-with-train`` a train message carries
``evaluate-received = true`` and, once the policy accepted the round, the train reply's
ConfigRecord adds the same release for the *received* model, computed before training, as
``evaluated-<metric>`` (and ``evaluated-num-examples``). DP-SGD's noise is planned for the
rounds the server plans plus the policy's ``retry_rounds``; a DP round is held in the ledger until
the reply is built and marked released (``PrivacyLedger.release_round``) just before it is
returned to Flower, so a node killed before that point has its round voided on restart, and the
reply says the ledger's ``rounds-charged``, ``rounds-voided``, ``round-retries`` and
``retry-reserve``. A site whose data fails
validation, does not fit the model, whose privacy budget is spent, whose ledger is unusable or
whose policy refuses the round replies with a Flower error (``Message(Error(code, reason), reply_to=msg)``, codes
``ERROR_*`` in ``models.wire``, reason ``site '<name>' refused to <stage>: <why>``) instead.

Loaded data is cached per process (Ray actors and long-lived SuperNode processes reuse it); the
ledger is reopened from disk for every message, since another process may have written it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sys
import tomllib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Final

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from pydantic import ValidationError
from torch import nn

from ..models import ModelSpec, build_for_data, get_weights, set_weights, wire
from ..privacy.engine import plan_noise_multiplier, sample_rate_for, steps_per_epoch
from ..privacy.errors import BudgetExceededError, LedgerCorruptError, PrivacyError, warn_privacy
from ..privacy.ledger import PrivacyLedger
from ..privacy.policy import (
    NO_SECURE_AGGREGATION_WARNING,
    PolicyFileError,
    PolicyViolation,
    RoundRequest,
    Rule,
    SitePolicy,
    check_round,
    load_policy,
    node_default_policy,
)
from ..privacy.release_mechanisms import (
    COUNT,
    EVALUATION,
    EVALUATION_EXACT,
    check_evaluation,
    laplace_scale,
    metrics_from_statistics,
    noisy_count,
    release_reserve,
    release_rng,
    release_statistics,
    statistics_sensitivity,
)
from ..privacy.settings import PrivacySettings
from ..supervise import quiet_flower
from .data_digest import DATA_DIGEST_KEY, data_digest
from .dataset import SiteData, Split
from .errors import DataValidationError
from .loaders import load_site_file
from .metrics import evaluate, evaluation_statistics
from .secure import SecureRoundError, SecureSite, make_secure_train_mod, secure_round_active
from .training import TrainSettings, train_local

__all__ = [
    "NODE_DATA_DIGEST",
    "NODE_DEVICE",
    "NODE_REPORT_TRAIN_LOSS",
    "ENV_APP_HASH",
    "ENV_REPORT_TIMING",
    "NODE_LEDGER_DIR",
    "NODE_POLICY",
    "NODE_PRIVACY_SETTINGS",
    "NODE_SEED",
    "NODE_SITE_MANIFEST",
    "NODE_SITE_NAME",
    "LocalSite",
    "SiteConfigError",
    "SiteDataChangedError",
    "SitePolicyError",
    "SiteProvider",
    "app",
    "make_client_app",
    "round_request",
    "site_from_node_config",
]

logger = logging.getLogger(__name__)


NODE_SITE_MANIFEST: Final = "site-manifest"
NODE_SITE_NAME: Final = "site-name"
NODE_LEDGER_DIR: Final = "ledger-dir"
NODE_PRIVACY_SETTINGS: Final = "privacy-settings"
NODE_SEED: Final = "seed"
NODE_DEVICE: Final = "device"
NODE_REPORT_TRAIN_LOSS: Final = "report-train-loss"
NODE_POLICY: Final = "policy"
NODE_DATA_DIGEST: Final = DATA_DIGEST_KEY
ENV_APP_HASH: Final = "FEDCARE_APP_HASH"
ENV_REPORT_TIMING: Final = "FEDCARE_REPORT_TIMING"


class SiteConfigError(DataValidationError):
    """The node was started without what the ClientApp needs (manifest, ledger folder, settings)."""


class SitePolicyError(SiteConfigError):
    """The node's site policy file is missing or invalid: the node refuses every round (fails closed)."""


class SiteDataChangedError(DataValidationError):
    """The site's manifest or data files changed since ``fedcare node start`` checked them."""


class ModelMismatchError(DataValidationError):
    """The site's data does not have the shape, task or classes the server's model expects."""


@dataclass(frozen=True)
class LocalSite:
    """What one hospital node trains with: its data, its privacy policy, where its ledger is.

    Attributes
    ----------
    data : SiteData
        The site's validated data.
    privacy : PrivacySettings
        The site's DP settings (the site's policy, not the server's wish).
    ledger_dir : pathlib.Path
        Folder of the site's persistent privacy ledger.
    name : str
        The site name reported to the server and used for the ledger.
    seed : int, optional
        Seed of the site's own randomness (None: fresh entropy).
    device : str
        Torch device for local training.
    report_train_loss : bool
        Send the training loss to the server even under DP. The loss is computed from the
        data without noise (not covered by ε), so by default a DP site sends NaN instead.
    manifest_sha256 : str or None
        SHA-256 of the site's manifest file (nodes); None: a digest of the data description
        (name, kind, task, shapes, split sizes; never data) is sent instead.
    policy : SitePolicy or None
        The hospital's own round policy, checked before every training round.
        :func:`site_from_node_config` always sets one (the file's, else
        ``node_default_policy()``) and so does the simulation runner. ``None`` means NO policy
        check: only for sites built by hand in tests and experiments, warned every round.
    """

    data: SiteData
    privacy: PrivacySettings
    ledger_dir: Path
    name: str
    seed: int | None = None
    device: str = "cpu"
    report_train_loss: bool = False
    policy: SitePolicy | None = None
    manifest_sha256: str | None = None


SiteProvider = Callable[[Context], LocalSite]
"""Return the node's :class:`LocalSite`; raise ``DataValidationError`` to refuse."""


def _stat_key(path: Path) -> tuple[str, int, int]:
    """Return (resolved path, mtime, size): a cache key that changes when the file does."""
    st = path.stat()
    return str(path.resolve()), st.st_mtime_ns, st.st_size


@lru_cache(maxsize=8)
def _load_data(key: tuple[str, int, int]) -> SiteData:
    """Load (once per process and file version) the site described by a manifest."""
    return load_site_file(key[0])


@lru_cache(maxsize=8)
def _load_policy(key: tuple[str, int, int]) -> PrivacySettings:
    """Read a site's privacy settings TOML into PrivacySettings (once per file version)."""
    path = Path(key[0])
    try:
        with path.open("rb") as fh:
            raw = tomllib.load(fh)
        return PrivacySettings.model_validate(raw.get("privacy", raw))
    except (tomllib.TOMLDecodeError, ValidationError, UnicodeDecodeError) as exc:
        raise SiteConfigError(
            f"privacy settings {path} are invalid: {exc}; fix the file (PrivacySettings fields, "
            "optionally under [privacy])",
            path=path,
        ) from None


@lru_cache(maxsize=8)
def _load_site_policy(key: tuple[str, int, int]) -> SitePolicy:
    """Read a site policy TOML (once per file version); refuse an invalid one."""
    try:
        return load_policy(key[0])
    except PolicyFileError as exc:
        raise SitePolicyError(str(exc), path=Path(key[0])) from None


def _required_path(node_config: dict[str, Any], key: str, example: str) -> Path:
    """Return node_config[key] as a path, or refuse with how to set it."""
    value = node_config.get(key)
    if not isinstance(value, str) or not value:
        raise SiteConfigError(
            f"node config lacks {key!r}; start the node with --node-config '{key}=\"{example}\"'"
        )
    return Path(value).expanduser()


def site_from_node_config(context: Context) -> LocalSite:
    """The default provider: read the site from ``context.node_config`` (see the module docstring)."""
    node = dict(context.node_config)
    manifest = _required_path(node, NODE_SITE_MANIFEST, "/path/to/site.toml")
    ledger_dir = _required_path(node, NODE_LEDGER_DIR, "/var/lib/fedcare/ledger")
    if not manifest.is_file():
        raise SiteConfigError(f"site manifest {manifest} (node config {NODE_SITE_MANIFEST!r}) not found",
                              path=manifest)
    recorded = node.get(NODE_DATA_DIGEST)
    if recorded is not None and data_digest(manifest) != str(recorded):
        raise SiteDataChangedError(
            "the site's data changed since the node started; restart the node after `fedcare node check`",
            path=manifest,
        )
    data = _load_data(_stat_key(manifest))
    policy = node.get(NODE_PRIVACY_SETTINGS)
    if isinstance(policy, str) and policy:
        policy_path = Path(policy).expanduser()
        if not policy_path.is_file():
            raise SiteConfigError(f"privacy settings {policy_path} not found", path=policy_path)
        privacy = _load_policy(_stat_key(policy_path))
    else:
        privacy = PrivacySettings()
    site_policy = node_default_policy()
    policy_file = node.get(NODE_POLICY)
    if policy_file is None:
        logger.info(
            "no site policy file (node config %r): applying the strict default policy (SecAgg+ rounds "
            "only; plain rounds are refused)", NODE_POLICY,
        )
    else:
        if not isinstance(policy_file, str) or not policy_file:
            raise SitePolicyError(f"node config {NODE_POLICY!r} must be the path of the site policy TOML")
        path = Path(policy_file).expanduser()
        if not path.is_file():
            raise SitePolicyError(
                f"site policy file {path} (node config {NODE_POLICY!r}) not found; fix the path, or "
                "remove the key for the default policy",
                path=path,
            )
        site_policy = _load_site_policy(_stat_key(path))
    seed = node.get(NODE_SEED)
    if seed is not None:
        message = (
            f"node config {NODE_SEED} is set: this site's DP noise and sampling are a function of "
            "that seed, the round and the global model, and anyone who learns or guesses it can "
            "remove the noise; remove the key on a deployed node (fresh OS entropy every round)"
        )
        warn_privacy(message, logger=logger)
    name = node.get(NODE_SITE_NAME)
    report_loss = node.get(NODE_REPORT_TRAIN_LOSS) is True
    if report_loss and privacy.enabled:
        message = (
            f"node config {NODE_REPORT_TRAIN_LOSS} = true: this site sends its training loss, "
            "computed without DP noise and not covered by its ε; remove it unless approved"
        )
        warn_privacy(message, logger=logger)
    return LocalSite(
        data=data,
        privacy=privacy,
        ledger_dir=ledger_dir,
        name=name if isinstance(name, str) and name else data.name,
        seed=int(seed) if isinstance(seed, (int, float)) and not isinstance(seed, bool) else None,
        device=str(node.get(NODE_DEVICE, "cpu")),
        report_train_loss=report_loss,
        policy=site_policy,
        manifest_sha256=_manifest_digest(manifest),
    )


@lru_cache(maxsize=8)
def _manifest_digest_cached(key: tuple[str, int, int]) -> str:
    """Return the SHA-256 of a manifest file (once per file version)."""
    return hashlib.sha256(Path(key[0]).read_bytes()).hexdigest()


def _manifest_digest(path: Path) -> str:
    """Return the SHA-256 (hex) of the site manifest file's bytes."""
    return _manifest_digest_cached(_stat_key(path))


def site_digest(site: LocalSite) -> str:
    """Return the digest a train reply carries: the manifest's SHA-256, else one of the data description.

    The description is the site name, data kind, task, classes, input shape, mask flag, feature
    names and split sizes: nothing about any patient.
    """
    if site.manifest_sha256:
        return site.manifest_sha256
    data = site.data
    description = {
        "name": site.name, "kind": data.kind, "task": data.task, "num_classes": data.num_classes,
        "input_shape": list(data.input_shape), "has_mask": data.has_mask,
        "feature_names": list(data.feature_names),
        "splits": [len(data.train), len(data.val), len(data.test)],
    }
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode("utf-8")).hexdigest()


def _guess_name(context: Context) -> str:
    """Return a name for a site whose data could not be loaded."""
    node = context.node_config
    for key in (NODE_SITE_NAME, NODE_SITE_MANIFEST):
        value = node.get(key)
        if isinstance(value, str) and value:
            return value if key == NODE_SITE_NAME else Path(value).stem
    if "partition-id" in node:
        return f"partition-{node['partition-id']}"
    return f"node-{context.node_id}"


def _refuse(msg: Message, site: str, stage: str, code: int, reason: str) -> Message:
    """Return a Flower error reply saying which site refused and why."""
    text = wire.REFUSAL_FORMAT.format(site=site, stage=stage, reason=reason)
    logger.warning("%s", text)
    return Message(Error(code=code, reason=text), reply_to=msg)


def _build_model(config: ConfigRecord, data: SiteData) -> nn.Module:
    """Build the server's model for this site, refusing data that does not fit it."""
    spec = ModelSpec.model_validate_json(str(config[wire.MODEL_SPEC]))
    task = str(config[wire.TASK])
    num_classes = int(config[wire.NUM_CLASSES])  # type: ignore[arg-type]
    shape = tuple(int(d) for d in config[wire.INPUT_SHAPE])  # type: ignore[union-attr]
    has_mask = bool(config[wire.HAS_MASK])
    problems = []
    if data.task != task:
        problems.append(f"task {data.task!r} (study: {task!r})")
    if task != "regression" and data.num_classes != num_classes:
        problems.append(f"{data.num_classes} classes (study: {num_classes})")
    if tuple(data.input_shape) != shape:
        problems.append(f"input shape {tuple(data.input_shape)} (study: {shape})")
    if data.has_mask != has_mask:
        problems.append(f"has_mask {data.has_mask} (study: {has_mask})")
    if problems:
        raise ModelMismatchError(
            "the site's data does not fit the study's model: " + ", ".join(problems)
            + "; fix the site manifest (features, classes) or join a matching study"
        )
    return build_for_data(spec, task=task, num_classes=num_classes, input_shape=shape,  # type: ignore[arg-type]
                          has_mask=has_mask)


def _load_arrays(model: nn.Module, record: ArrayRecord) -> None:
    """Load the server's named arrays into ``model``."""
    set_weights(model, OrderedDict((k, v.numpy()) for k, v in record.items()))


def _open_ledger(site: LocalSite, study: str) -> PrivacyLedger:
    """Open (or create) the site's persistent ledger for ``study``."""
    return PrivacyLedger.open(site.ledger_dir, site=site.name, study=study)


def _site_seed(site: LocalSite, server_round: int) -> int | None:
    """Return this round's seed of the site's randomness (None: fresh OS entropy every round).

    Only the site's own seed (node config ``seed``, or a simulation's) is used, never anything
    in the server's message; the round index is mixed in as a stream. SHA-256 keeps the seed's
    full entropy (a 32-bit checksum would make every round's noise seed brute-forceable).
    """
    if site.seed is None:
        return None
    digest = hashlib.sha256(f"{site.seed}:{site.name}:{server_round}".encode()).digest()
    return int.from_bytes(digest[:16], "big")


def _report_timing() -> bool:
    """Return whether this node sends its local training time (``FEDCARE_REPORT_TIMING=1``; warned)."""
    if os.environ.get(ENV_REPORT_TIMING) != "1":
        return False
    message = (
        f"{ENV_REPORT_TIMING}=1: this node sends its local training time ({wire.TRAIN_SECONDS}), a timing "
        "side channel on its data outside ε; unset it outside benchmarks"
    )
    warn_privacy(message, logger=logger)
    return True


def _may_report_loss(site: LocalSite) -> bool:
    """Return whether the site sends its (non-private) training loss."""
    return site.report_train_loss or not site.privacy.enabled


def _eval_split(data: SiteData) -> Split:
    """Return the split federated evaluation reports on: test, else validation."""
    if len(data.test) > 0:
        return data.test
    if len(data.val) > 0:
        return data.val
    raise DataValidationError(
        f"site {data.name!r} has no test or validation examples to evaluate on; "
        "give the manifest's [split] a test fraction"
    )


def _requested_split(config: ConfigRecord) -> str:
    """Return the split an evaluate message names (``wire.EVALUATION_SPLIT``; test when absent); refuse any other.

    Only the test split (federated evaluation) and the validation split (the final model's
    operating threshold) are ever released; a request for the training split or anything else
    is refused before the model is run.
    """
    name = config.get(wire.EVALUATION_SPLIT, wire.SPLIT_TEST)
    if name not in (wire.SPLIT_TEST, wire.SPLIT_VALIDATION):
        raise DataValidationError(
            f"the evaluate message asks for split {str(name)[:40]!r}; a site releases statistics of its "
            f"{wire.SPLIT_TEST!r} or {wire.SPLIT_VALIDATION!r} split only: the coordinator must name one of them"
        )
    return str(name)


def _split_for(data: SiteData, split_name: str) -> Split:
    """Return the split an evaluation releases: the validation split when asked for it, else ``_eval_split``."""
    if split_name != wire.SPLIT_VALIDATION:
        return _eval_split(data)
    if len(data.val) == 0:
        raise DataValidationError(
            f"site {data.name!r} has no validation examples for the operating threshold; give the "
            "manifest's [split] a validation fraction"
        )
    return data.val


def _release_kind(site: LocalSite) -> str:
    """Return how the site's evaluations are released: ``"dp"`` (Laplace-noised) or ``"exact"``."""
    return "dp" if site.policy is not None and site.policy.evaluation == "dp" else "exact"


def _privacy_fields(ledger: PrivacyLedger) -> dict[str, float]:
    """Return the site's ε per mechanism in this study, and its evaluations so far (reply metrics)."""
    return {
        wire.EPSILON: ledger.spent_epsilon(),
        wire.EPSILON_TRAINING: ledger.training_epsilon(),
        wire.EPSILON_COUNT: ledger.release_epsilon(COUNT),
        wire.EPSILON_EVALUATION: ledger.release_epsilon(EVALUATION),
        wire.EVALUATION_QUERIES: float(ledger.release_count(EVALUATION)),
        wire.EVALUATION_EXACT_QUERIES: float(ledger.release_count(EVALUATION_EXACT)),
        # every reply carries the same keys (flwr refuses to aggregate replies whose keys differ):
        # -1 while the ledger has no budget bound yet (a site that refused before any round)
        wire.EPSILON_BUDGET: -1.0 if ledger.epsilon_budget is None else float(ledger.epsilon_budget),
    }


def _retry_rounds(site: LocalSite) -> int:
    """Return the site policy's retry reserve (``retry_rounds``; 0 without a policy: no reserve, no voids)."""
    return 0 if site.policy is None else int(site.policy.retry_rounds)


def _retry_fields(ledger: PrivacyLedger) -> dict[str, float]:
    """Return the ledger's rounds charged, voided and retried and the retry reserve (reply metrics)."""
    summary = ledger.retry_summary()
    return {
        wire.ROUNDS_CHARGED: float(summary["rounds_charged"]),
        wire.ROUNDS_VOIDED: float(summary["rounds_voided"]),
        wire.ROUND_RETRIES: float(summary["retries"]),
        wire.RETRY_RESERVE: float(summary["retry_reserve"]),
    }


def _training_privacy(site: LocalSite) -> PrivacySettings:
    """Return the settings DP-SGD runs with: the site's target ε minus its policy's release reserve.

    The reserve (``release_mechanisms.release_reserve``: the count's ε and, under ``evaluation =
    "dp"``, the study's evaluation allowance) stays free for those releases, so training plus
    count plus evaluations never exceed the site's target. The study's budget stays the site's.
    Fixed-σ settings, DP off, or no policy (hand-built sites): unchanged.
    """
    privacy, policy = site.privacy, site.policy
    if policy is None or not privacy.enabled or privacy.target_epsilon is None:
        return privacy
    reserve = release_reserve(policy)
    target = privacy.target_epsilon - reserve
    if target <= 0:
        raise PolicyViolation(
            Rule.EPSILON_STUDY,
            f"the site's target ε {privacy.target_epsilon:g} leaves nothing for DP-SGD once its policy's "
            f"reserve for the count and evaluations ({reserve:g}) is set aside; the hospital must raise "
            "target_epsilon or lower count_epsilon / evaluation_epsilon_per_query / max_evaluation_queries_per_study",
            asked=reserve, limit=privacy.target_epsilon,
        )
    return PrivacySettings.model_validate(
        {**privacy.model_dump(), "target_epsilon": target, "epsilon_budget": privacy.budget}
    )


def _released_count(site: LocalSite, ledger: PrivacyLedger, n: int) -> int:
    """Return the training example count the site sends: Laplace-noised once per study and size.

    Drawn from the site's own randomness, charged (``count_epsilon``) and stored in the ledger
    before it is sent, then re-sent unchanged every round (nothing new released). A hand-built
    site without a policy sends its exact count (it runs no policy at all, and warns so).
    """
    policy = site.policy
    if policy is None:
        return n
    for entry in reversed(ledger.releases):
        if entry["mechanism"] == COUNT and entry.get("of") == n:
            return int(entry["value"])
    epsilon = float(policy.count_epsilon)
    rng = release_rng(seed=site.seed, stream=f"{COUNT}:{site.name}:{ledger.study}:{ledger.release_count(COUNT)}")
    value = noisy_count(n, epsilon=epsilon, rng=rng)
    ledger.record_release(mechanism=COUNT, epsilon=epsilon, sensitivity=1.0,
                          scale=laplace_scale(sensitivity=1.0, epsilon=epsilon), value=value, of=n)
    return value


def _evaluation_release(
    model: nn.Module, site: LocalSite, study: str, ledger: PrivacyLedger | None = None,
    *, split_name: str = wire.SPLIT_TEST,
) -> dict[str, float | int]:
    """Return what the site releases about ``model`` on its test split, as its policy decides.

    ``dp`` (default): the split's sufficient statistics with Laplace noise, charged to the study's
    ledger as one ``evaluation`` entry before anything is released; ``exact`` (opt-in, warned):
    the exact metrics and statistics, recorded as an ``evaluation-exact`` entry (outside ε);
    ``off``, a split below ``min_evaluation_cohort``, a spent query budget or ε budget: raises
    ``PolicyViolation``. Also carries the site's ε per mechanism after the release. A hand-built
    site without a policy (tests) sends exact metrics and warns. ``ledger``: the study's ledger
    when the caller already holds its session (the train handler), else it is opened here.
    ``split_name = "validation"`` (the final model's operating threshold, ``server.operating_point``)
    releases the validation split's statistics instead, through the same checks, noise and charge
    (one query of the same budget; its ledger entry says ``split = "validation"``).
    """
    split = _split_for(site.data, split_name)
    where = {"split": split_name} if split_name == wire.SPLIT_VALIDATION else {}
    task = site.data.task
    policy = site.policy
    if policy is None:
        message = f"site {site.name!r} carries no site policy: its evaluation is released EXACTLY (hand-built sites only)"
        warn_privacy(message, logger=logger)
        stats = evaluation_statistics(model, split, task)
        return {wire.NUM_EXAMPLES: len(split), **evaluate(model, split, task), **stats}
    ledger = ledger if ledger is not None else _open_ledger(site, study)
    with ledger.session():
        spent = _site_ledger_epsilons(site, ledger)
        budget = ledger.epsilon_budget if ledger.epsilon_budget is not None else site.privacy.budget
        queries = ledger.release_count(EVALUATION) + ledger.release_count(EVALUATION_EXACT)
        epsilon = check_evaluation(policy, cohort=len(split), queries_done=queries, spent_study=spent[study],
                                   spent_total=sum(spent.values()), budget=budget)
        stats = evaluation_statistics(model, split, task)
        if epsilon is None:
            message = (f"site {site.name!r}: exact evaluation released by the site's policy (evaluation = "
                       '"exact"): the coordinator sees exact metrics of the test patients, outside ε')
            warn_privacy(message, logger=logger, site=site.name, study=study)  # logged once per study
            ledger.record_release(mechanism=EVALUATION_EXACT, epsilon=None, records=len(split), **where)
            values: dict[str, float | int] = {wire.NUM_EXAMPLES: len(split), **evaluate(model, split, task), **stats}
        else:
            sensitivity, _ = statistics_sensitivity(stats)
            ledger.record_release(mechanism=EVALUATION, epsilon=epsilon, sensitivity=sensitivity,
                                  scale=laplace_scale(sensitivity=sensitivity, epsilon=epsilon), **where)
            rng = release_rng(seed=site.seed, stream=f"{EVALUATION}:{site.name}:{study}:{queries}")
            noisy = release_statistics(stats, epsilon=epsilon, rng=rng)
            values = {wire.NUM_EXAMPLES: max(1, round(metrics_from_statistics(noisy)["n"])), **noisy}
        return {**values, **_privacy_fields(ledger)}


def _count_still_to_charge(site: LocalSite, ledger: PrivacyLedger, n: int) -> float:
    """Return the ε the count of ``n`` examples will still cost in this study (0 once charged)."""
    if site.policy is None or any(r["mechanism"] == COUNT and r.get("of") == n for r in ledger.releases):
        return 0.0
    return float(site.policy.count_epsilon)


def _evaluate_received(model: nn.Module, site: LocalSite, study: str, ledger: PrivacyLedger) -> dict[str, float | int]:
    """Return the received (global) model's evaluation release on the site's test split, keys ``evaluated-*``.

    Asked by a train message under ``evaluate-with-train``, after the site's policy accepted the
    round (a refused round releases and charges nothing); the values are those the evaluate
    stage would send (:func:`_evaluation_release`, charged the same way, in the round's ledger session). A site without a test
    or validation split, or whose policy refuses the evaluation, reports none (and says so);
    it still trains.
    """
    try:
        values = _evaluation_release(model, site, study, ledger)
    except (DataValidationError, PolicyViolation, PrivacyError) as exc:
        logger.warning("site %s: no evaluation of the received model: %s", site.name, exc)
        return {}
    prefix = wire.EVALUATED_PREFIX
    return {f"{prefix}{k}": v if k == wire.NUM_EXAMPLES else float(v) for k, v in values.items()}


def _model_family(config: ConfigRecord) -> str:
    """Return the model family the server's spec names."""
    return ModelSpec.model_validate_json(str(config[wire.MODEL_SPEC])).family


def _site_ledger_epsilons(site: LocalSite, current: PrivacyLedger) -> dict[str, float]:
    """Return ε spent per study over every ledger of ``site`` in its ledger folder (current included).

    Ledgers of other sites sharing the folder are skipped; a file that cannot be read as a
    ledger raises (``LedgerCorruptError``): the node cannot know whose ε it holds, so it refuses.
    """
    spent = {current.study: current.spent_epsilon()}
    folder = Path(site.ledger_dir)
    if not folder.is_dir():
        return spent
    for path in PrivacyLedger.candidate_paths(folder, site=site.name):
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
            owner, study = state["site"], state["study"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise LedgerCorruptError(path, f"cannot tell whose ledger it is ({type(exc).__name__}: {exc})") from None
        if owner != site.name or study in spent:
            continue
        spent[str(study)] = PrivacyLedger.open(folder, site=site.name, study=str(study)).spent_epsilon()
    return spent


def round_request(
    site: LocalSite,
    ledger: PrivacyLedger,
    *,
    study: str,
    model_family: str,
    train: TrainSettings,
    planned_rounds: int,
    round_index: int,
    secure_aggregation: bool = False,
) -> RoundRequest:
    """Return what this round asks of the site, computed from the site's own settings and ledger.

    ``secure_aggregation`` must come from :func:`~fedcare.client.secure.secure_round_active`
    (set by the SecAgg+ client mod), never from anything the server sends.

    With DP the round's σ is planned exactly as ``train_local`` will plan it (fixed σ, or the
    study's calibration to its target ε) and ``epsilon_after_round`` is the accountant's
    projection; a round over the site's own ε budget raises ``BudgetExceededError`` here, as in
    ``train_local``. Nothing is persisted: the ledger changes only when a round is reserved.
    A study or site whose spent ε is unbounded (a round trained without DP) raises
    ``PolicyViolation`` for any DP round, since no ε limit can hold any more.
    """
    privacy = _training_privacy(site)  # DP-SGD's share of the target: the policy's release reserve set aside
    n = len(site.data.train)
    values: dict[str, Any] = {
        "study": study,
        "model_family": model_family,
        "dp_enabled": privacy.enabled,
        "secure_aggregation": secure_aggregation,
        "app_hash": os.environ.get(ENV_APP_HASH) or None,
        "cohort_size": n,
    }
    if privacy.enabled and n > 0:
        ledger.bind(accountant=privacy.accountant, delta=privacy.delta, epsilon_budget=privacy.budget)
        sample_rate = sample_rate_for(num_examples=n, batch_size=train.batch_size)
        steps = steps_per_epoch(sample_rate=sample_rate) * train.local_epochs
        sigma = plan_noise_multiplier(
            privacy=privacy, ledger=ledger, sample_rate=sample_rate, steps_per_round=steps,
            planned_rounds=planned_rounds, round_index=round_index,
        )
        values |= {
            "target_epsilon": privacy.target_epsilon,
            "noise_multiplier": sigma,
            "delta": privacy.delta,
            "max_grad_norm": privacy.max_grad_norm,
            "epsilon_after_round": ledger.check_round(noise_multiplier=sigma, sample_rate=sample_rate, steps=steps)
            + _count_still_to_charge(site, ledger, n),
        }
    spent = _site_ledger_epsilons(site, ledger)
    study_spent, total_spent = spent[study], sum(spent.values())
    if not math.isfinite(total_spent):
        if privacy.enabled:
            rule = Rule.EPSILON_STUDY if not math.isfinite(study_spent) else Rule.EPSILON_TOTAL
            where = f"study {study!r}" if rule is Rule.EPSILON_STUDY else "another study of this site"
            raise PolicyViolation(
                rule,
                f"{where} already released a model trained WITHOUT differential privacy, so the ε "
                "spent is unbounded and no ε limit can hold; the coordinator must leave this site "
                "out (the hospital's DPO decides whether a new study may start)",
                asked=math.inf,
            )
        study_spent = total_spent = sys.float_info.max  # a non-DP round: ε limits do not apply
    values |= {"epsilon_spent_study": study_spent, "epsilon_spent_total": max(total_spent, study_spent)}
    return RoundRequest.from_values(values)


def enforce_policy(site: LocalSite, request: RoundRequest) -> SitePolicy | None:
    """Check ``request`` against the site's policy; return the policy applied.

    Raises ``PolicyViolation`` naming the rule broken. Warns (log + ``PrivacyWarning``) every
    plain round (without secure aggregation) that the site's policy allowed: the server sees
    this site's individual update.
    """
    policy = site.policy
    if policy is None:
        message = (
            f"site {site.name!r}: this LocalSite carries no site policy, so NO policy check runs "
            "(hand-built sites only; nodes and simulations always set one)"
        )
        warn_privacy(message, logger=logger)
    else:
        check_round(policy, request)
    if not request.secure_aggregation:
        message = f"site {site.name!r}: {NO_SECURE_AGGREGATION_WARNING}"
        warn_privacy(message, logger=logger, site=site.name, study=request.study)  # logged once per study
    return policy


def _site_info(site: LocalSite) -> dict[str, Any]:
    """Return what a train reply says about the site: name, manifest digest, DP accountant and C."""
    info: dict[str, Any] = {wire.SITE: site.name, wire.MANIFEST_SHA256: site_digest(site)}
    if site.privacy.enabled:
        info[wire.ACCOUNTANT] = str(site.privacy.accountant)
        info[wire.MAX_GRAD_NORM] = float(site.privacy.max_grad_norm)
    return info


class _ProvidedClientApp(ClientApp):
    """A ClientApp that pickles as a reference: ``(_client_app_for, (provider,))``.

    flwr's Ray backend pickles the ClientApp with every message it sends to a worker; pickled
    whole, the app's train / evaluate functions (closures over the provider) travel by value
    every time. Pickled as a reference, a message carries the provider only (a folder path in a
    simulation), and each worker process builds the app once (:func:`_client_app_for`). The app
    holds no site state: every message still asks the provider for its site and reopens the
    site's ledger, so one worker serving many virtual hospitals keeps them apart.
    """

    def __init__(self, provider: SiteProvider) -> None:
        super().__init__()
        self._fedcare_provider = provider

    def __reduce__(self) -> tuple[Callable[[SiteProvider], ClientApp], tuple[SiteProvider]]:
        """Pickle as the provider and the module-level function that builds the app from it."""
        return _client_app_for, (self._fedcare_provider,)


@lru_cache(maxsize=8)
def _client_app_for(provider: SiteProvider) -> ClientApp:
    """Return the ClientApp of ``provider``, built once per process (unpickling in a Ray worker)."""
    return make_client_app(provider)


def make_client_app(site_provider: SiteProvider | None = None) -> ClientApp:
    """Return the fedcare ClientApp; ``site_provider`` maps a node's Context to its :class:`LocalSite`.

    Parameters
    ----------
    site_provider : callable, optional
        Default :func:`site_from_node_config`. The simulation runner passes one that maps
        ``partition-id`` to an in-memory virtual hospital. It must be picklable (Ray ships it
        to its workers) and should cache what it loads.
    """
    provider = site_provider or site_from_node_config
    client_app = _ProvidedClientApp(provider)

    def secure_site(context: Context) -> SecureSite:
        """Return the site's name, policy and seed for the SecAgg+ mod (a site that fails to load refuses)."""
        try:
            site = provider(context)
        except SitePolicyError as exc:
            raise SecureRoundError(wire.ERROR_POLICY, wire.REFUSAL_FORMAT.format(
                site=_guess_name(context), stage="join the secure round", reason=str(exc))) from None
        except DataValidationError as exc:
            raise SecureRoundError(wire.ERROR_DATA_INVALID, wire.REFUSAL_FORMAT.format(
                site=_guess_name(context), stage="join the secure round", reason=str(exc))) from None
        return SecureSite(name=site.name, policy=site.policy, seed=site.seed)

    # SecAgg+ rounds only (the site's secure-cohort rule, then training); plain rounds pass through
    @client_app.train(mods=[make_secure_train_mod(secure_site)])
    def train(msg: Message, context: Context) -> Message:
        """Train the received model on the site's data under the site's privacy policy."""
        config: ConfigRecord = msg.content[wire.CONFIG]  # type: ignore[assignment]
        try:
            site = provider(context)
        except SitePolicyError as exc:  # an unreadable policy refuses everything (fails closed)
            return _refuse(msg, _guess_name(context), "train", wire.ERROR_POLICY, str(exc))
        except DataValidationError as exc:
            return _refuse(msg, _guess_name(context), "train", wire.ERROR_DATA_INVALID, str(exc))
        try:
            model = _build_model(config, site.data)
            _load_arrays(model, msg.content[wire.ARRAYS])  # type: ignore[arg-type]
        except (DataValidationError, ValueError) as exc:
            return _refuse(msg, site.name, "train", wire.ERROR_DATA_INVALID, str(exc))
        server_round = int(config[wire.SERVER_ROUND])  # type: ignore[arg-type]
        settings = TrainSettings(
            local_epochs=int(config[wire.LOCAL_EPOCHS]),  # type: ignore[arg-type]
            batch_size=int(config[wire.BATCH_SIZE]),  # type: ignore[arg-type]
            lr=float(config[wire.LEARNING_RATE]),  # type: ignore[arg-type]
            proximal_mu=float(config.get(wire.PROXIMAL_MU, 0.0)),  # type: ignore[arg-type]
            clip_grad_norm=float(config.get(wire.CLIP_GRAD_NORM, 0.0)),  # type: ignore[arg-type]
            seed=_site_seed(site, server_round),
            device=site.device,
        )
        study = str(config[wire.STUDY])
        # the noise is planned for the study's rounds plus the policy's retry reserve (privacy.ledger)
        planned_rounds = int(config[wire.NUM_ROUNDS]) + _retry_rounds(site)  # type: ignore[arg-type]
        try:
            ledger = _open_ledger(site, study)
            # one lock from the policy check to the release; a DP round stays pending (voided if
            # this process dies) until release_round marks it handed to Flower, before the reply
            with ledger.session(hold_release=True):
                ledger.set_retry_reserve(_retry_rounds(site))
                request = round_request(
                    site, ledger, study=study, model_family=_model_family(config), train=settings,
                    planned_rounds=planned_rounds, round_index=server_round,
                    secure_aggregation=secure_round_active(context),
                )
                enforce_policy(site, request)
                # the received model, before training changes it; only in a round the policy accepted
                evaluated = _evaluate_received(model, site, study, ledger) if config.get(wire.EVALUATE_RECEIVED) else {}
                count = _released_count(site, ledger, len(site.data.train))  # charged before it is sent
                result = train_local(
                    model,
                    site.data,
                    train=settings,
                    privacy=_training_privacy(site),
                    ledger=ledger,
                    planned_rounds=planned_rounds,
                    round_index=server_round,
                )
                if ledger.pending is not None:  # a DP round: charged for good from here on
                    ledger.release_round()
        except PolicyViolation as exc:
            return _refuse(msg, site.name, "train", wire.ERROR_POLICY, str(exc))
        except BudgetExceededError as exc:
            return _refuse(msg, site.name, "train", wire.ERROR_BUDGET_SPENT, str(exc))
        except PrivacyError as exc:  # ledger locked, corrupt or of other terms: refuse, never train
            return _refuse(msg, site.name, "train", wire.ERROR_LEDGER, f"{type(exc).__name__}: {exc}")
        metrics = MetricRecord(
            {
                wire.NUM_EXAMPLES: count,  # the noised count (policy sites), never the exact one
                "train-loss": float(result.loss) if _may_report_loss(site) else math.nan,
                "steps": int(result.steps),
                wire.EPSILON: float(result.epsilon),
                wire.DELTA: float(result.delta),
                "noise-multiplier": float(result.noise_multiplier),
                **_privacy_fields(ledger),  # ε per mechanism (training, count, evaluation)
                **_retry_fields(ledger),  # rounds charged, voided, retried; the retry reserve
            }
        )
        if _report_timing():  # local compute time (benchmarks/framework_overhead.py)
            metrics[wire.TRAIN_SECONDS] = float(result.duration_s)
        content = RecordDict(
            {
                wire.ARRAYS: ArrayRecord(
                    OrderedDict((k, Array(np.ascontiguousarray(v))) for k, v in get_weights(model).items())
                ),
                wire.METRICS: metrics,
                wire.CONFIG: ConfigRecord({**_site_info(site), **evaluated}),
            }
        )
        return Message(content, reply_to=msg)

    @client_app.evaluate()
    def evaluate_(msg: Message, context: Context) -> Message:
        """Release what the site's policy allows about the received model on its test split (see ``_evaluation_release``)."""
        config: ConfigRecord = msg.content[wire.CONFIG]  # type: ignore[assignment]
        try:
            site = provider(context)
        except SitePolicyError as exc:  # an unreadable policy refuses everything (fails closed)
            return _refuse(msg, _guess_name(context), "evaluate", wire.ERROR_POLICY, str(exc))
        except DataValidationError as exc:
            return _refuse(msg, _guess_name(context), "evaluate", wire.ERROR_DATA_INVALID, str(exc))
        try:
            model = _build_model(config, site.data)
            _load_arrays(model, msg.content[wire.ARRAYS])  # type: ignore[arg-type]
            study = config.get(wire.STUDY)
            if not isinstance(study, str) or not study:
                raise DataValidationError(f"the evaluate message names no {wire.STUDY!r}; the server must send it")
            split_name = _requested_split(config)
            values = _evaluation_release(model, site, study, split_name=split_name)
        except PolicyViolation as exc:
            return _refuse(msg, site.name, "evaluate", wire.ERROR_POLICY, str(exc))
        except PrivacyError as exc:  # ledger locked, corrupt or of other terms: release nothing
            return _refuse(msg, site.name, "evaluate", wire.ERROR_LEDGER, f"{type(exc).__name__}: {exc}")
        except (DataValidationError, ValueError) as exc:
            return _refuse(msg, site.name, "evaluate", wire.ERROR_DATA_INVALID, str(exc))
        metrics = MetricRecord({k: v if k == wire.NUM_EXAMPLES else float(v) for k, v in values.items()})
        info: dict[str, str] = {wire.SITE: site.name}
        if split_name == wire.SPLIT_VALIDATION:  # the operating-threshold query says how it was released
            info[wire.EVALUATION_RELEASE] = _release_kind(site)
        content = RecordDict({wire.METRICS: metrics, wire.CONFIG: ConfigRecord(info)})
        return Message(content, reply_to=msg)

    return client_app


quiet_flower()  # Flower's telemetry and update check off (fedcare.supervise)

app = make_client_app()
"""The ClientApp deployments load (``fedcare.client.app:app``)."""
