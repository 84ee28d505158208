"""Experiment tracking: MLflow and TensorBoard sinks behind one small interface (off by default).

The coordinator's side logs what ``summary.json`` / ``history.json`` already hold: the run's
parameters, every round's aggregated and per-site metrics, each site's ε, and (simulations) the
final metrics, baselines and the run's files. Nothing else: no model, no data, no refusal text.

Neither library is a dependency: each is imported only when its option is given
(``pip install 'fedcare[tracking]'``). Two places open a :class:`Tracker`:

- the simulation runner (``fedcare simulate --mlflow-uri URI --tensorboard DIR``,
  :mod:`fedcare.simulations.tracking`), in the researcher's process;
- the ServerApp of a deployment (``fedcare run STUDY --mlflow-uri URI --tensorboard DIR``): the
  two options travel as the run-config overrides ``tracking-mlflow-uri`` / ``tracking-tensorboard``
  (``flwr run --run-config``), whose empty defaults every fedcare app carries
  (:data:`TRACKING_DEFAULTS`), so the app's hash, which hospitals pin, is the same with tracking on
  or off. The ServerApp strips these keys before it parses its :class:`~.config.RunConfig`.

Metric names (MLflow and TensorBoard alike; ``/`` groups them in both UIs)::

    train/<metric>, evaluate/<metric>                   aggregated, per round (step = round)
    site/<site>/train/<metric>, site/<site>/evaluate/<metric>
    epsilon/<site>                                      ε the site has spent in the study so far
    final/<metric>, baseline/<arm>/<metric>             simulations, at the last round

Every run-config value travels to the hospitals too (Flower gives the ClientApps the run
config): a tracking URI with credentials in it (``https://user:secret@host``) is refused; give
MLflow its credentials through ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` (or
a token) in the coordinator's environment.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final, Protocol
from urllib.parse import urlsplit

from pydantic import Field, ValidationError, field_validator

from ..config_base import FrozenModel

__all__ = [
    "MLFLOW_URI_KEY",
    "TENSORBOARD_KEY",
    "TRACKING_DEFAULTS",
    "MlflowSink",
    "Sink",
    "TensorBoardSink",
    "Tracker",
    "TrackingError",
    "TrackingSettings",
    "final_metrics",
    "flatten_params",
    "metric_name",
    "open_run_tracker",
    "round_metrics",
    "split_tracking",
    "tracking_settings",
]

logger = logging.getLogger(__name__)

MLFLOW_URI_KEY: Final = "tracking-mlflow-uri"
TENSORBOARD_KEY: Final = "tracking-tensorboard"
TRACKING_DEFAULTS: Final[dict[str, str]] = {MLFLOW_URI_KEY: "", TENSORBOARD_KEY: ""}
"""Run-config keys every fedcare Flower App carries (empty: off); ``fedcare run`` overrides them."""

_UNSAFE: Final = re.compile(r"[^\w\-. /]")  # MLflow's allowed metric / param name characters
_MAX_PARAM_VALUE: Final = 6000  # MLflow's limit on a parameter value (characters)
_MAX_METRICS_PER_BATCH: Final = 1000
_MAX_PARAMS_PER_BATCH: Final = 100
_STATUS: Final = {"completed": "FINISHED", "failed": "FAILED", "stopped": "KILLED", "blocked": "FINISHED"}


class TrackingError(RuntimeError):
    """A tracking backend could not be opened (library missing, bad URI, unreachable store)."""


class TrackingSettings(FrozenModel):
    """Where a run is tracked: an MLflow tracking URI and / or a TensorBoard folder (both off by default).

    Attributes
    ----------
    mlflow_uri : str, optional
        An MLflow tracking URI: ``sqlite:///PATH/mlflow.db`` (local) or ``http(s)://HOST:PORT``.
    tensorboard_dir : pathlib.Path, optional
        The folder TensorBoard reads (``tensorboard --logdir DIR``); each run writes a subfolder.
    experiment : str
        The MLflow experiment (the scenario's or study's name).
    run_name : str, optional
        The run's name in MLflow and its TensorBoard subfolder (default: experiment + UTC time).
    """

    mlflow_uri: str | None = Field(default=None, min_length=1)
    tensorboard_dir: Path | None = None
    experiment: str = Field(default="fedcare", min_length=1)
    run_name: str | None = Field(default=None, min_length=1)

    @field_validator("mlflow_uri")
    @classmethod
    def _no_credentials(cls, value: str | None) -> str | None:
        """Refuse credentials inside the URI (the run config reaches every hospital) and quotes."""
        if value is None:
            return value
        if urlsplit(value).password is not None or "@" in urlsplit(value).netloc:
            raise ValueError(
                "the MLflow URI holds credentials (user:password@host), which every hospital would see in "
                "the run config: remove them and set MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD "
                "(or MLFLOW_TRACKING_TOKEN) in the coordinator's environment"
            )
        if '"' in value or "'" in value:
            raise ValueError("the MLflow URI may not contain quotes; pass a plain URI")
        return value

    @field_validator("tensorboard_dir")
    @classmethod
    def _no_quotes(cls, value: Path | None) -> Path | None:
        """Refuse quotes in the folder (it travels as a quoted run-config value)."""
        if value is not None and ('"' in str(value) or "'" in str(value)):
            raise ValueError("the TensorBoard folder may not contain quotes; choose another folder")
        return value

    @property
    def enabled(self) -> bool:
        """Return whether any sink is asked for."""
        return self.mlflow_uri is not None or self.tensorboard_dir is not None

    def resolved_run_name(self) -> str:
        """Return the run name: the given one, or ``<experiment>-<UTC time>``."""
        return self.run_name or f"{self.experiment}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"

    def run_config_overrides(self) -> dict[str, str]:
        """Return the run-config keys that carry these settings to a deployment's ServerApp."""
        out: dict[str, str] = {}
        if self.mlflow_uri is not None:
            out[MLFLOW_URI_KEY] = self.mlflow_uri
        if self.tensorboard_dir is not None:
            out[TENSORBOARD_KEY] = str(Path(self.tensorboard_dir).expanduser().resolve())
        return out


def tracking_settings(
    *, mlflow_uri: str | None = None, tensorboard_dir: Path | str | None = None, experiment: str | None = None
) -> TrackingSettings:
    """Return validated tracking settings from command-line or run-config values ("" or None: off).

    Raises
    ------
    TrackingError
        When a value is refused (a URI with credentials or quotes); the message never repeats the URI.
    """
    uri = str(mlflow_uri or "").strip()
    board = str(tensorboard_dir or "").strip()
    try:
        named = {} if experiment is None else {"experiment": experiment}  # unset: the caller names it later
        return TrackingSettings(mlflow_uri=uri or None, tensorboard_dir=Path(board) if board else None, **named)
    except ValidationError as exc:
        raise TrackingError("; ".join(str(e["msg"]).removeprefix("Value error, ") for e in exc.errors())) from None


def split_tracking(
    run_config: Mapping[str, Any], *, experiment: str | None = None
) -> tuple[TrackingSettings, dict[str, Any]]:
    """Return the tracking settings a run config carries and the run config without them.

    Raises
    ------
    TrackingError
        When a tracking key holds an invalid value (e.g. a URI with credentials).
    """
    rest = {k: v for k, v in run_config.items() if k not in TRACKING_DEFAULTS}
    settings = tracking_settings(mlflow_uri=run_config.get(MLFLOW_URI_KEY), tensorboard_dir=run_config.get(TENSORBOARD_KEY),
                                 experiment=experiment)  # fmt: skip
    return settings, rest


# --------------------------------------------------------------------------- what is logged


def metric_name(*parts: str) -> str:
    """Return a metric name both backends accept: parts joined by ``/``, other characters ``_``."""
    return "/".join(_UNSAFE.sub("_", str(p)) for p in parts)


def _number(value: Any) -> float | None:
    """Return ``value`` as a finite float, or None (missing, NaN, text, bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _add(out: dict[str, float], metrics: Mapping[str, Any] | None, *prefix: str) -> None:
    """Add every finite number of ``metrics`` under ``prefix``."""
    for key, value in (metrics or {}).items():
        number = _number(value)
        if number is not None:
            out[metric_name(*prefix, key)] = number


def round_metrics(record: Mapping[str, Any]) -> dict[str, float]:
    """Return the metrics of one round dict (``RoundRecord.to_dict()``, as ``summary.json`` holds it)."""
    out: dict[str, float] = {}
    _add(out, record.get("train"), "train")
    _add(out, record.get("evaluate"), "evaluate")
    for site, metrics in (record.get("site_train") or {}).items():
        _add(out, {k: v for k, v in metrics.items() if k != "epsilon"}, "site", site, "train")
        epsilon = _number(metrics.get("epsilon"))
        if epsilon is not None:
            out[metric_name("epsilon", site)] = epsilon
    for site, metrics in (record.get("site_evaluate") or {}).items():
        _add(out, metrics, "site", site, "evaluate")
    return out


def final_metrics(summary: Mapping[str, Any]) -> dict[str, float]:
    """Return a simulation summary's final metrics (``final/…``) and its baselines (``baseline/<arm>/…``)."""
    out: dict[str, float] = {}
    _add(out, summary.get("final_global"), "final")
    for arm, result in (summary.get("baselines") or {}).items():
        if isinstance(result, Mapping):
            _add(out, {k: v for k, v in result.items() if not isinstance(v, Mapping)}, "baseline", arm)
    return out


def flatten_params(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Return a nested configuration as ``{"a.b": "value"}`` (lists as JSON; None as ``"None"``)."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten_params(value, prefix=f"{name}."))
        elif isinstance(value, (list, tuple, Mapping)):
            out[name] = json.dumps(value, default=str)
        else:
            out[name] = str(value)
    return out


# --------------------------------------------------------------------------- sinks


class Sink(Protocol):
    """One tracking backend."""

    name: str

    def log_params(self, params: Mapping[str, str]) -> None:
        """Record the run's parameters (flat, text values)."""

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Record metrics at ``step`` (the round)."""

    def log_artifacts(self, paths: Sequence[Path]) -> None:
        """Store files with the run (where the backend stores files)."""

    def close(self, status: str) -> None:
        """End the run with ``status`` ("completed", "stopped", "blocked" or "failed")."""


class MlflowSink:
    """An MLflow run, written through ``mlflow.tracking.MlflowClient`` (no global active run)."""

    name = "mlflow"

    def __init__(self, uri: str, *, experiment: str, run_name: str, tags: Mapping[str, str] | None = None) -> None:
        try:
            from mlflow.exceptions import MlflowException  # noqa: PLC0415 - optional, only when asked for
            from mlflow.tracking import MlflowClient  # noqa: PLC0415
        except ImportError:
            raise TrackingError(
                "--mlflow-uri needs MLflow: pip install 'fedcare[tracking]' (or mlflow-skinny)"
            ) from None
        self.uri = uri
        try:
            self.client = MlflowClient(tracking_uri=uri)
            found = self.client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found is not None else self.client.create_experiment(
                experiment, artifact_location=_local_artifact_root(uri, experiment)
            )
            self.run_id: str = self.client.create_run(
                experiment_id, run_name=run_name, tags=dict(tags or {})
            ).info.run_id
        except (MlflowException, OSError) as exc:
            raise TrackingError(
                f"cannot open MLflow at {uri}: {' '.join(str(exc).split())[:300]}; use sqlite:///PATH/mlflow.db "
                "for a local store or the http(s):// address of a running MLflow server"
            ) from None

    def log_params(self, params: Mapping[str, str]) -> None:
        """Log ``params`` (values over MLflow's 6000 characters are cut, marked with '…')."""
        from mlflow.entities import Param  # noqa: PLC0415

        items = [Param(k[:250], v if len(v) <= _MAX_PARAM_VALUE else v[: _MAX_PARAM_VALUE - 1] + "…")
                 for k, v in params.items()]  # fmt: skip
        for i in range(0, len(items), _MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + _MAX_PARAMS_PER_BATCH])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log ``metrics`` at ``step``."""
        from mlflow.entities import Metric  # noqa: PLC0415

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, int(step)) for k, v in metrics.items()]
        for i in range(0, len(items), _MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=items[i : i + _MAX_METRICS_PER_BATCH])

    def log_artifacts(self, paths: Sequence[Path]) -> None:
        """Upload each file to the run's artefact store."""
        for path in paths:
            self.client.log_artifact(self.run_id, str(path))

    def close(self, status: str) -> None:
        """Mark the run FINISHED, KILLED (stopped) or FAILED."""
        self.client.set_terminated(self.run_id, status=_STATUS.get(status, "FAILED"))


def _local_artifact_root(uri: str, experiment: str) -> str | None:
    """Return where a local sqlite store keeps a new experiment's files: beside the database.

    MLflow's default for a store without a server is ``./mlruns`` in the current folder; files
    then land wherever the command happened to run. A server decides for itself (None).
    """
    if not uri.startswith("sqlite:///"):
        return None
    database = Path(uri.removeprefix("sqlite:///")).expanduser()
    database = database if database.is_absolute() else Path.cwd() / database
    return (database.parent / "mlartifacts" / _UNSAFE.sub("_", experiment)).resolve().as_uri()


class TensorBoardSink:
    """A TensorBoard event file (``torch.utils.tensorboard.SummaryWriter``) in ``folder/run_name``."""

    name = "tensorboard"

    def __init__(self, folder: Path, *, run_name: str) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415 - optional, only when asked for
        except ImportError:
            raise TrackingError(
                "--tensorboard needs TensorBoard: pip install 'fedcare[tracking]' (or tensorboard)"
            ) from None
        self.folder = Path(folder).expanduser().resolve() / _UNSAFE.sub("_", run_name).replace("/", "_")
        try:
            self.writer = SummaryWriter(log_dir=str(self.folder))
        except OSError as exc:
            raise TrackingError(f"cannot write TensorBoard events to {self.folder}: {exc.strerror}; "
                                "choose a writable --tensorboard folder") from None  # fmt: skip

    def log_params(self, params: Mapping[str, str]) -> None:
        """Write the parameters as one text summary ``params`` (a JSON object in a code block)."""
        self.writer.add_text("params", "```\n" + json.dumps(dict(params), indent=1, sort_keys=True) + "\n```", 0)
        self.writer.flush()

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Write one scalar per metric at ``step``."""
        for key, value in metrics.items():
            self.writer.add_scalar(key, float(value), int(step))
        self.writer.flush()

    def log_artifacts(self, paths: Sequence[Path]) -> None:
        """Write the files' names as text ``artefacts`` (TensorBoard stores no files)."""
        if paths:
            self.writer.add_text("artefacts", "\n".join(f"- {p}" for p in paths), 0)
            self.writer.flush()

    def close(self, status: str) -> None:
        """Write the final status as text ``status`` and close the event file."""
        self.writer.add_text("status", status, 0)
        self.writer.close()


class Tracker:
    """Every sink the settings ask for, behind one interface.

    A sink that fails while the run goes on is logged (ERROR) and dropped: an unreachable
    tracking server never stops a federated study. Opening a sink fails loudly
    (:class:`TrackingError`), before the run starts.
    """

    def __init__(self, sinks: Iterable[Sink] = ()) -> None:
        self.sinks: list[Sink] = list(sinks)

    @classmethod
    def open(cls, settings: TrackingSettings | None, *, tags: Mapping[str, str] | None = None) -> Tracker:
        """Open the sinks ``settings`` asks for (none: a tracker that does nothing).

        Raises
        ------
        TrackingError
            When a library is missing or a backend cannot be opened.
        """
        if settings is None or not settings.enabled:
            return cls()
        run_name = settings.resolved_run_name()
        sinks: list[Sink] = []
        if settings.mlflow_uri is not None:
            sinks.append(MlflowSink(settings.mlflow_uri, experiment=settings.experiment, run_name=run_name, tags=tags))
        if settings.tensorboard_dir is not None:
            sinks.append(TensorBoardSink(settings.tensorboard_dir, run_name=run_name))
        logger.info("tracking run %s to %s", run_name, ", ".join(s.name for s in sinks))
        return cls(sinks)

    @property
    def active(self) -> bool:
        """Return whether any sink is (still) logging."""
        return bool(self.sinks)

    def _each(self, what: str, call: Any) -> None:
        """Call ``call(sink)`` on every sink; drop a sink that raises."""
        for sink in list(self.sinks):
            try:
                call(sink)
            except Exception as exc:  # noqa: BLE001 - a tracking outage must not stop the study
                logger.error("%s tracking failed while logging %s (%s); it stops for this run",
                             sink.name, what, type(exc).__name__)  # fmt: skip
                self.sinks.remove(sink)

    def log_params(self, params: Mapping[str, str]) -> None:
        """Log the run's parameters (flat text values, see :func:`flatten_params`)."""
        self._each("parameters", lambda s: s.log_params(params))

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log metrics at ``step``."""
        if metrics:
            self._each("metrics", lambda s: s.log_metrics(metrics, step))

    def log_round(self, record: Mapping[str, Any]) -> None:
        """Log one finished round (a ``RoundRecord.to_dict()``) at step = its round number."""
        self.log_metrics(round_metrics(record), int(record["round"]))

    def round_callback(self, then: Callable[[Any], None] | None = None) -> Callable[[Any], None] | None:
        """Return an ``on_round`` callback that logs each ``RoundRecord`` and then calls ``then``.

        ``then`` itself when nothing is tracked.
        """
        if not self.active:
            return then

        def on_round(record: Any) -> None:
            self.log_round(record.to_dict())
            if then is not None:
                then(record)

        return on_round

    def log_artifacts(self, paths: Sequence[Path | str]) -> None:
        """Store the existing files among ``paths`` with the run."""
        files = [Path(p) for p in paths if Path(p).is_file()]
        self._each("files", lambda s: s.log_artifacts(files))

    def close(self, status: str) -> None:
        """End the run with ``status``; the tracker logs nothing afterwards."""
        self._each("the end of the run", lambda s: s.close(status))
        self.sinks = []


def open_run_tracker(
    settings: TrackingSettings, *, experiment: str, params: Mapping[str, Any], tags: Mapping[str, str] | None = None
) -> Tracker:
    """Open the sinks of ``settings`` (experiment: ``experiment`` unless the settings name one) and log ``params``.

    For the ServerApp of a deployment: ``params`` is the run config (flat, kebab-case keys).

    Raises
    ------
    TrackingError
        When a library is missing or a backend cannot be opened.
    """
    if not settings.enabled:
        return Tracker()
    if "experiment" not in settings.model_fields_set:
        settings = settings.model_copy(update={"experiment": experiment})
    tracker = Tracker.open(settings, tags=tags)
    tracker.log_params(flatten_params(params))
    return tracker
