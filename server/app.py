"""The Flower ServerApp: parse the run config once, run the wrapped strategy, checkpoint each round.

``app`` (``fedcare.server.app:app``) reads ``context.run_config``; the simulation runner passes a
:class:`RunConfig` in-process with :func:`make_server_app` (flwr's ``run_simulation`` passes an
empty run config).

Resume: flwr's ``Strategy.start`` always counts rounds from 1, so a resumed run starts it with
the checkpointed model as ``initial_arrays``, ``num_rounds`` = the rounds left, the strategy's
restored state (FedAdam moments), the restored RNG state flwr samples sites with, and a round
offset in the strategy wrapper so that round numbers (in messages, in FedAdam's bias correction,
in the history) continue where they stopped. Nothing the server sends can rewind a site's
privacy ledger: sites account every round they train, including a round redone after a crash.
"""

from __future__ import annotations

import logging
import os
import random
import sys
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from ..models import build_for_data, get_weights, wire
from ..privacy.artefacts import ArtefactKey, sha256_file
from ..privacy.report import ClientLevelPrivacy, write_report
from .checkpoint import (
    CHECKPOINT_FILE,
    ENCRYPTED_SUFFIX,
    FINAL_MODEL_FILE,
    HISTORY_FILE,
    Checkpoint,
    CheckpointKeyError,
    MetricsHistory,
    RoundRecord,
    load_checkpoint,
    save_checkpoint,
    save_model_file,
    write_json_atomic,
)
from .config import RunConfig
from .grid_poll import responsive_grid
from .safekeeping import (
    RunAudit,
    artefact_metadata,
    artefact_path,
    build_privacy_report,
    load_artefact_key,
    run_identity,
    safe_name,
    update_norm,
    warn_plaintext,
)
from .strategy import FedcareStrategy, TooFewSitesError, build_strategy

__all__ = [
    "CheckpointExistsError",
    "ResumeMismatchError",
    "RoundCallback",
    "app",
    "initial_arrays",
    "make_server_app",
    "model_meta",
    "run_server",
    "train_config",
]

logger = logging.getLogger(__name__)

RoundCallback = Callable[[RoundRecord], None]

#: run-config keys that must match between a checkpoint and the run resuming from it
_MUST_MATCH = (
    "study", "strategy", "model-family", "hidden-size", "num-layers", "bidirectional", "width",
    "task", "num-classes", "input-shape", "has-mask", "proximal-mu", "eta", "eta-l", "beta-1",
    "beta-2", "tau", "trim-beta", "num-malicious-nodes",
)  # fmt: skip


class CheckpointExistsError(FileExistsError):
    """A checkpoint exists where a new (not resumed) run would overwrite it."""


class ResumeMismatchError(ValueError):
    """The checkpoint was written by a run with another model, strategy or study."""


def _quiet_flower() -> None:
    """Keep Flower's telemetry and update check off (docs/architecture.md)."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")


def initial_arrays(config: RunConfig) -> OrderedDict[str, np.ndarray]:
    """Build the configured model with ``config.seed`` and return its exchanged tensors."""
    torch.manual_seed(config.seed)
    model = build_for_data(
        config.model,
        task=config.task,
        num_classes=config.num_classes,
        input_shape=config.input_shape,
        has_mask=config.has_mask,
    )
    return get_weights(model)


def model_meta(config: RunConfig) -> dict[str, Any]:
    """Return what is needed to rebuild the model from a saved file (spec, task, shape)."""
    return {
        "model_spec": config.model.model_dump(),
        "task": config.task,
        "num_classes": config.num_classes,
        "input_shape": list(config.input_shape),
        "has_mask": config.has_mask,
        "study": config.study,
    }


def train_config(config: RunConfig) -> ConfigRecord:
    """Return what every site receives with the model: training settings and the model's shape."""
    return ConfigRecord(
        {
            wire.STUDY: config.study,
            wire.NUM_ROUNDS: config.num_rounds,
            wire.LOCAL_EPOCHS: config.local_epochs,
            wire.BATCH_SIZE: config.batch_size,
            wire.LEARNING_RATE: config.lr,
            wire.CLIP_GRAD_NORM: config.clip_grad_norm,
            **_model_fields(config),
        }
    )


def _model_fields(config: RunConfig) -> dict[str, Any]:
    """Return the config fields that describe the model and the data it expects."""
    return {
        wire.MODEL_SPEC: config.model.model_dump_json(),
        wire.TASK: config.task,
        wire.NUM_CLASSES: config.num_classes,
        wire.INPUT_SHAPE: list(config.input_shape),
        wire.HAS_MASK: config.has_mask,
    }


def _to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    """Return named NumPy arrays as an ArrayRecord keyed by name."""
    return ArrayRecord(OrderedDict((k, Array(np.ascontiguousarray(v))) for k, v in arrays.items()))


def _from_record(record: ArrayRecord) -> OrderedDict[str, np.ndarray]:
    """Return an ArrayRecord's arrays by name."""
    return OrderedDict((k, v.numpy()) for k, v in record.items())


def _check_resumable(ckpt: Checkpoint, config: RunConfig, path: Path) -> None:
    """Refuse a checkpoint written by a run with another study, model or strategy."""
    now = config.to_run_config()
    diffs = [
        f"{k}: checkpoint {ckpt.run_config.get(k)!r}, now {now.get(k)!r}"
        for k in _MUST_MATCH
        if ckpt.run_config.get(k) != now.get(k)
    ]
    if diffs:
        raise ResumeMismatchError(
            f"cannot resume from {path}: " + "; ".join(diffs)
            + ". Resume with the run config the checkpoint was written by, or start a new run "
            "in another checkpoint-dir."
        )


def run_server(
    grid: Grid, config: RunConfig, *, on_round: RoundCallback | None = None
) -> MetricsHistory:
    """Run the study ``config`` describes on ``grid``; return the metrics history.

    Writes ``checkpoint.npz`` after every round, and ``final_model.npz`` and ``history.json``
    (with ``status`` "completed", or "stopped" when too few sites trained) at the end, to
    ``config.checkpoint_dir`` (when set); with ``artefact-key`` the checkpoint and the model are
    AES-GCM artefacts ``checkpoint.npz.enc`` / ``final_model.npz.enc`` bound to the study, kind,
    round and configuration hash. A completed run also writes ``privacy_report.json`` / ``.md``.
    With ``audit-key`` every step is appended to the signed audit log (``server.safekeeping``).

    Raises
    ------
    CheckpointExistsError
        When a checkpoint exists and ``resume`` is false.
    ResumeMismatchError
        When resuming from a checkpoint of another study, model or strategy.
    CheckpointTamperedError
        When the encrypted checkpoint to resume from fails authentication or is another run's file.
    CheckpointKeyError
        When the checkpoint is encrypted and no key is configured, or the reverse.
    TooFewSitesError
        When fewer than ``min-sites`` sites train in a round (the run stops).
    """
    if config.secure_aggregation:  # SecAgg+ (+ client-level DP): flwr's legacy workflow path
        from .secagg import run_secure  # noqa: PLC0415 - secagg imports this module

        return run_secure(grid, config, on_round=on_round)
    _quiet_flower()
    random.seed(config.seed)  # flwr samples sites with the random module
    history = MetricsHistory()
    strategy: FedcareStrategy = build_strategy(config, history=history)
    arrays = initial_arrays(config)
    folder = config.checkpoint_dir
    key = load_artefact_key(config.artefact_key)
    ckpt_path = artefact_path(folder, CHECKPOINT_FILE, key) if folder is not None else None
    if folder is not None:
        _refuse_other_format(folder, key)
    done = 0
    if ckpt_path is not None and ckpt_path.exists():
        if not config.resume:
            raise CheckpointExistsError(
                f"a checkpoint exists at {ckpt_path}; set resume = true to continue that run, "
                "or use another checkpoint-dir"
            )
        ckpt = load_checkpoint(ckpt_path, key=key,
                               expected={"study": safe_name(config.study), "kind": "checkpoint"})
        _check_resumable(ckpt, config, ckpt_path)
        if list(ckpt.arrays) != list(arrays) or any(
            ckpt.arrays[k].shape != arrays[k].shape for k in arrays
        ):
            raise ResumeMismatchError(f"the model in {ckpt_path} does not fit the configured model")
        arrays = ckpt.arrays
        history.load_state_dict(ckpt.history)
        history.drop_incomplete()
        strategy.load_state_dict(ckpt.strategy_state)
        if ckpt.rng_state is not None:
            random.setstate(_rng_from_json(ckpt.rng_state))
        done = ckpt.round
        logger.info("resuming %s from %s after round %d of %d", config.study, ckpt_path, done,
                    config.num_rounds)
    elif config.resume:
        logger.warning("resume requested but no checkpoint in %s: starting from round 1", folder)
    strategy.round_offset = done
    final: dict[str, OrderedDict[str, np.ndarray]] = {"arrays": arrays}
    secure = bool(getattr(config, "secure_aggregation", False))
    audit = RunAudit.open(config)
    run_id, app_hash = run_identity(grid, config)
    audit.run_start(config, run_id=run_id, app_hash=app_hash)

    def on_round_end(server_round: int, record: ArrayRecord) -> MetricRecord | None:
        """Checkpoint after each complete round (flwr calls this once per round, and at 0)."""
        if server_round == 0:
            return None
        rnd = strategy.run_round(server_round)
        previous, final["arrays"] = final["arrays"], _from_record(record)
        record_round_end(
            config, history, rnd, arrays=final["arrays"], previous=previous,
            strategy_state=strategy.state_dict(), ckpt_path=ckpt_path, key=key, audit=audit,
            secure_aggregation=secure, on_round=on_round,
        )
        return None

    remaining = config.num_rounds - done
    started = time.perf_counter()
    status = "completed"
    try:
        if remaining > 0:
            strategy.start(
                grid=responsive_grid(grid),  # replies pulled every 0.2 s, not 3 s (grid_poll)
                initial_arrays=_to_record(arrays),
                num_rounds=remaining,
                timeout=config.round_timeout_s,
                train_config=train_config(config),
                evaluate_config=ConfigRecord({wire.STUDY: config.study, **_model_fields(config)}),
                evaluate_fn=on_round_end,
            )
        else:
            logger.info("checkpoint already holds all %d rounds; writing the final outputs", done)
    except TooFewSitesError:
        status = "stopped"  # write what the complete rounds produced, then report the stop
        for rec in history.rounds:
            if not rec.complete:
                audit.refusals(rec)
        raise
    finally:
        try:
            if status == "stopped" or sys.exc_info()[0] is None:
                logger.info("study %s %s after %.1f s", config.study, status, time.perf_counter() - started)
                _write_outputs(config, final["arrays"], history, status, key=key, audit=audit,
                               secure_aggregation=secure, run_id=run_id)
        finally:
            audit.close()
    return history


def _refuse_other_format(folder: Path, key: ArtefactKey | None) -> None:
    """Refuse a checkpoint folder holding the other format: plaintext where the run encrypts, or the reverse."""
    plain, encrypted = folder / CHECKPOINT_FILE, folder / f"{CHECKPOINT_FILE}{ENCRYPTED_SUFFIX}"
    if key is not None and plain.exists():
        raise CheckpointKeyError(
            f"{plain} is a plaintext checkpoint but this run encrypts (artefact-key is set): a plaintext "
            "file must not stand in for an encrypted one. Use another checkpoint-dir, or remove the "
            "plaintext checkpoint if you know where it came from"
        )
    if key is None and encrypted.exists():
        raise CheckpointKeyError(
            f"{encrypted} is an encrypted checkpoint but no artefact-key is configured: set artefact-key "
            "to the key file it was written with (or \"env\" with FEDCARE_ARTEFACT_KEY set)"
        )


def record_round_end(
    config: RunConfig,
    history: MetricsHistory,
    rnd: int,
    *,
    arrays: OrderedDict[str, np.ndarray],
    previous: OrderedDict[str, np.ndarray],
    strategy_state: dict[str, Any],
    ckpt_path: Path | None,
    key: Any,
    audit: RunAudit,
    secure_aggregation: bool,
    on_round: RoundCallback | None,
) -> None:
    """Close round ``rnd``: mark it complete, checkpoint it, audit it, then report it.

    Shared by the plain and the secure (SecAgg+) paths. The server sees the new global model in
    both, so the aggregate update's norm (new minus ``previous``) is known to it.
    """
    rec = history.round(rnd)
    rec.complete = True
    if ckpt_path is not None:
        save_checkpoint(
            ckpt_path,
            Checkpoint(
                round=rnd,
                arrays=arrays,
                strategy_state=strategy_state,
                history=history.state_dict(),
                run_config=config.to_run_config(),
                rng_state=_rng_to_json(random.getstate()),
            ),
            key=key,
            metadata=artefact_metadata(config, "checkpoint", rnd) if key is not None else None,
        )
    audit.round(rec, aggregate_update_norm=update_norm(previous, arrays), secure_aggregation=secure_aggregation)
    audit.refusals(rec)
    if ckpt_path is not None:
        audit.checkpoint(rnd, ckpt_path, key)
    if on_round is not None:
        on_round(rec)


def _write_outputs(
    config: RunConfig,
    arrays: OrderedDict[str, np.ndarray],
    history: MetricsHistory,
    status: str,
    *,
    key: ArtefactKey | None = None,
    audit: RunAudit | None = None,
    secure_aggregation: bool = False,
    run_id: str | None = None,
    client_level: ClientLevelPrivacy | None = None,
    reason: str | None = None,
) -> None:
    """Write the final model, the metrics history and (completed runs) the privacy report.

    ``secure_aggregation`` and ``client_level`` (client-level DP: mechanism, ε, δ, σ, C) are what
    the aggregation path used; the report states them. ``reason`` (why a run stopped) goes into
    ``history.json`` when given.
    """
    if config.checkpoint_dir is None:
        return
    model_path = artefact_path(config.checkpoint_dir, FINAL_MODEL_FILE, key)
    round_ = history.last_complete
    save_model_file(model_path, arrays, model_meta(config), key=key,
                    metadata=artefact_metadata(config, "model", round_) if key is not None else None)
    if audit is not None:
        audit.checkpoint(round_, model_path, key)
    payload: dict[str, Any] = {"status": status, "run_config": config.to_run_config(), **history.state_dict()}
    if reason is not None:
        payload["reason"] = reason
    write_json_atomic(config.checkpoint_dir / HISTORY_FILE, payload)
    if status == "completed":
        report = build_privacy_report(config, history, model_sha256=sha256_file(model_path),
                                      secure_aggregation=secure_aggregation, client_level=client_level,
                                      audit=audit, run_id=run_id)
        if report is not None:
            write_report(report, config.checkpoint_dir, overwrite=True)


def _rng_to_json(state: tuple[Any, ...]) -> list[Any]:
    """Return ``random.getstate()`` as JSON-ready lists."""
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _rng_from_json(state: list[Any]) -> tuple[Any, ...]:
    """Return the tuple ``random.setstate`` takes from :func:`_rng_to_json` output."""
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


def make_server_app(
    config: RunConfig | None = None, *, on_round: RoundCallback | None = None
) -> ServerApp:
    """Return a ServerApp that runs ``config`` (or, when None, parses ``context.run_config``).

    Parameters
    ----------
    config : RunConfig, optional
        The run, given in-process (simulation); when None the app reads the run config Flower
        passes, exactly once per run.
    on_round : callable, optional
        Called with each complete round's :class:`RoundRecord` (e.g. a live progress table).
    """
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        """Parse the run config once and run the study."""
        run = config if config is not None else RunConfig.from_run_config(context.run_config)
        if config is None:  # a deployment: its models should not sit unencrypted on the coordinator
            warn_plaintext(run)
        run_server(grid, run, on_round=on_round)

    return server_app


app = make_server_app()
"""The ServerApp deployments load (``fedcare.server.app:app``)."""
