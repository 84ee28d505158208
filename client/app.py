"""The Flower ClientApp: translates Flower messages to ``train_local`` / ``evaluate`` and back.

Everything about the hospital comes from the node, never from the server's run config:
``context.node_config`` (``flower-supernode --node-config '...'``) holds

- ``site-manifest``: the site manifest TOML (required);
- ``ledger-dir``: where the site's privacy ledger lives (required: a ledger that does not
  persist would let ε restart at zero);
- ``site-name``: optional, overrides the manifest's site name in replies and the ledger;
- ``privacy-settings``: optional TOML of the site's :class:`PrivacySettings` (fields at the top
  level or under ``[privacy]``); default ``PrivacySettings()``: DP-SGD to ε = 3 at δ = 1e-5;
- ``seed``: optional seed of the site's own randomness (shuffling, DP noise); the server never
  chooses it, so it cannot predict a site's noise;
- ``report-train-loss``: optional ``true`` to send the training loss under DP (it is computed
  without noise, outside ε; a DP site sends NaN by default);
- ``device``: optional torch device (default ``cpu``).

The server sends the model (named arrays), its spec and expected data shape, the round, the
rounds planned, the study and the local training settings. A train reply carries the trained
arrays, ``num-examples``, the site's training metrics and its ε / δ spent so far in the study
(MetricRecord: ``num-examples``, ``train-loss``, ``steps``, ``epsilon``, ``delta``,
``noise-multiplier``) and its name (ConfigRecord ``config`` → ``site``). An evaluate reply
carries ``num-examples`` and the metrics of ``client.metrics.evaluate`` on the site's test split
(validation when it has no test split): aggregate statistics that are not covered by ε. A site whose data fails
validation, does not fit the model, whose privacy budget is spent or whose ledger is unusable
replies with a Flower error (``Message(Error(code, reason), reply_to=msg)``, codes
``ERROR_*`` in ``models.wire``, reason ``site '<name>' refused to <stage>: <why>``) instead.

Loaded data is cached per process (Ray actors and long-lived SuperNode processes reuse it); the
ledger is reopened from disk for every message, since another process may have written it.
"""

from __future__ import annotations

import logging
import math
import os
import tomllib
import warnings
import zlib
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
from ..privacy.errors import BudgetExceededError, PrivacyError, PrivacyWarning
from ..privacy.ledger import PrivacyLedger
from ..privacy.settings import PrivacySettings
from .dataset import SiteData, Split
from .errors import DataValidationError
from .loaders import load_site_file
from .metrics import evaluate
from .training import TrainSettings, train_local

__all__ = [
    "NODE_DEVICE",
    "NODE_REPORT_TRAIN_LOSS",
    "NODE_LEDGER_DIR",
    "NODE_PRIVACY_SETTINGS",
    "NODE_SEED",
    "NODE_SITE_MANIFEST",
    "NODE_SITE_NAME",
    "LocalSite",
    "SiteConfigError",
    "SiteProvider",
    "app",
    "make_client_app",
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


class SiteConfigError(DataValidationError):
    """The node was started without what the ClientApp needs (manifest, ledger folder, settings)."""


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
    """

    data: SiteData
    privacy: PrivacySettings
    ledger_dir: Path
    name: str
    seed: int | None = None
    device: str = "cpu"
    report_train_loss: bool = False


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
    data = _load_data(_stat_key(manifest))
    policy = node.get(NODE_PRIVACY_SETTINGS)
    if isinstance(policy, str) and policy:
        policy_path = Path(policy).expanduser()
        if not policy_path.is_file():
            raise SiteConfigError(f"privacy settings {policy_path} not found", path=policy_path)
        privacy = _load_policy(_stat_key(policy_path))
    else:
        privacy = PrivacySettings()
    seed = node.get(NODE_SEED)
    name = node.get(NODE_SITE_NAME)
    report_loss = node.get(NODE_REPORT_TRAIN_LOSS) is True
    if report_loss and privacy.enabled:
        message = (
            f"node config {NODE_REPORT_TRAIN_LOSS} = true: this site sends its training loss, "
            "computed without DP noise and not covered by its ε; remove it unless approved"
        )
        logger.warning("PRIVACY WARNING: %s", message)
        warnings.warn(message, PrivacyWarning, stacklevel=2)
    return LocalSite(
        data=data,
        privacy=privacy,
        ledger_dir=ledger_dir,
        name=name if isinstance(name, str) and name else data.name,
        seed=int(seed) if isinstance(seed, (int, float)) and not isinstance(seed, bool) else None,
        device=str(node.get(NODE_DEVICE, "cpu")),
        report_train_loss=report_loss,
    )


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
    """Return this round's seed of the site's randomness (None: fresh entropy)."""
    if site.seed is None:
        return None
    return zlib.crc32(f"{site.seed}:{site.name}:{server_round}".encode()) & 0x7FFFFFFF


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
    client_app = ClientApp()

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        """Train the received model on the site's data under the site's privacy policy."""
        config: ConfigRecord = msg.content[wire.CONFIG]  # type: ignore[assignment]
        try:
            site = provider(context)
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
            seed=_site_seed(site, server_round),
            device=site.device,
        )
        try:
            ledger = _open_ledger(site, str(config[wire.STUDY]))
            result = train_local(
                model,
                site.data,
                train=settings,
                privacy=site.privacy,
                ledger=ledger,
                planned_rounds=int(config[wire.NUM_ROUNDS]),  # type: ignore[arg-type]
                round_index=server_round,
            )
        except BudgetExceededError as exc:
            return _refuse(msg, site.name, "train", wire.ERROR_BUDGET_SPENT, str(exc))
        except PrivacyError as exc:  # ledger locked, corrupt or of other terms: refuse, never train
            return _refuse(msg, site.name, "train", wire.ERROR_LEDGER, f"{type(exc).__name__}: {exc}")
        metrics = MetricRecord(
            {
                wire.NUM_EXAMPLES: int(result.num_examples),
                "train-loss": float(result.loss) if _may_report_loss(site) else math.nan,
                "steps": int(result.steps),
                wire.EPSILON: float(result.epsilon),
                wire.DELTA: float(result.delta),
                "noise-multiplier": float(result.noise_multiplier),
            }
        )
        content = RecordDict(
            {
                wire.ARRAYS: ArrayRecord(
                    OrderedDict((k, Array(np.ascontiguousarray(v))) for k, v in get_weights(model).items())
                ),
                wire.METRICS: metrics,
                wire.CONFIG: ConfigRecord({wire.SITE: site.name}),
            }
        )
        return Message(content, reply_to=msg)

    @client_app.evaluate()
    def evaluate_(msg: Message, context: Context) -> Message:
        """Evaluate the received global model on the site's test split."""
        config: ConfigRecord = msg.content[wire.CONFIG]  # type: ignore[assignment]
        try:
            site = provider(context)
        except DataValidationError as exc:
            return _refuse(msg, _guess_name(context), "evaluate", wire.ERROR_DATA_INVALID, str(exc))
        try:
            model = _build_model(config, site.data)
            _load_arrays(model, msg.content[wire.ARRAYS])  # type: ignore[arg-type]
            split = _eval_split(site.data)
        except (DataValidationError, ValueError) as exc:
            return _refuse(msg, site.name, "evaluate", wire.ERROR_DATA_INVALID, str(exc))
        values = evaluate(model, split, site.data.task)
        metrics = MetricRecord({wire.NUM_EXAMPLES: len(split), **{k: float(v) for k, v in values.items()}})
        content = RecordDict({wire.METRICS: metrics, wire.CONFIG: ConfigRecord({wire.SITE: site.name})})
        return Message(content, reply_to=msg)

    return client_app


os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

app = make_client_app()
"""The ClientApp deployments load (``fedcare.client.app:app``)."""
