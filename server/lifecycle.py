"""One study's life on the coordinator: open or resume it, close each round, finish it.

Both drivers use it: the plain path (:func:`fedcare.server.app.run_server`, flwr's message-API
strategy) and the SecAgg+ path (:func:`fedcare.server.secagg.run_secure`, flwr's legacy
workflow). A driver only exchanges and aggregates a round's messages; everything a study writes
to its ``checkpoint-dir`` or its audit log is written here, once:

- :meth:`Study.open`: seeds ``random``, builds the model; on resume loads the checkpoint
  (authenticated by ``server.checkpoint``) and refuses one of another study, model, strategy,
  file format or aggregation path. Writes nothing.
- :meth:`Study.run`: audit ``run_start``; the driver's rounds; then finish, stop or fail; the
  audit log is closed whatever happens.
- :meth:`Study.close_round`: ``checkpoint.npz[.enc]``; audit ``round``, ``refusal``,
  ``checkpoint``; the round callback.
- :meth:`Study.finish`: ``final_model.npz[.enc]``, audit ``checkpoint``, ``history.json``
  (``completed``), ``privacy_report.json`` / ``.md`` (unless the caller writes the report). A
  deployed study (:meth:`Study.ask_operating_point`) first asks the sites for the final model's
  validation histograms (``server.operating_point``): the threshold goes into the model file's
  meta, how it was chosen into ``history.json`` (``operating_point``).
- :meth:`Study.stop` (too few sites): audit refusals of the unfinished round, then the final model
  and ``history.json`` (``stopped``, the reason); no privacy report.
- :meth:`Study.fail` (a failed secure round): audit refusals of the failing sites and
  ``round_failed``; ``history.json`` (``failed``, the reason); no final model.
- :func:`read_outcome`: ``history.json`` read back, typed (the simulation runner's view).

Resume: flwr counts rounds from 1, so a resumed run starts its driver with the checkpointed model,
the rounds left (:attr:`Study.remaining`), the restored RNG state flwr samples sites with, the
strategy's restored state (:attr:`Study.strategy_state`, FedAdam moments) and a round offset
(:attr:`Study.done`) so that round numbers (in messages, in FedAdam's bias correction, in the
history) continue where they stopped. Nothing the server sends can rewind a site's privacy
ledger: sites account every round they train, including a round redone after a crash.

A resumed run is asked for with ``fedcare run STUDY --resume`` (a run-config override: the app and
its hash stay those the hospitals pinned). flwr's own ``[ROUND k/n]`` log lines count the rounds of
this run; while a resumed study runs they are rewritten to the study's round numbers
(:class:`RealRoundNumbers`). Each site's train reply says what its ledger holds for the study
(rounds charged, voided, retried, and its retry reserve: ``privacy.ledger``); the round close logs a
site whose ledger voided or retried a round, and ``history.json`` keeps the last such figures per
site under ``site_ledgers``.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np
import torch

from ..models import build_for_data, get_weights, wire
from ..privacy.artefacts import ArtefactKey, sha256_file
from ..privacy.report import write_report as save_report
from .checkpoint import (
    CHECKPOINT_FILE,
    ENCRYPTED_SUFFIX,
    FINAL_MODEL_FILE,
    HISTORY_FILE,
    Checkpoint,
    CheckpointError,
    CheckpointKeyError,
    MetricsHistory,
    RoundRecord,
    load_checkpoint,
    save_checkpoint,
    save_model_file,
    write_json_atomic,
)
from .client_dp import client_level_privacy
from .config import RunConfig
from .operating_point import OperatingPoint, report_sites, validation_operating_point, warn_if_no_query_left
from .progress import ProgressWriter
from .safekeeping import (
    RunAudit,
    artefact_metadata,
    artefact_path,
    build_privacy_report,
    load_artefact_key,
    run_identity,
    safe_name,
    site_privacy,
    update_norm,
)
from .strategy import TooFewSitesError

__all__ = [
    "CheckpointExistsError",
    "RealRoundNumbers",
    "ResumeMismatchError",
    "RoundCallback",
    "RoundFailedError",
    "SiteError",
    "Study",
    "StudyOutcome",
    "initial_arrays",
    "model_meta",
    "read_outcome",
    "site_ledgers",
]

logger = logging.getLogger(__name__)

RoundCallback = Callable[[RoundRecord], None]
Status = Literal["completed", "stopped", "failed"]

SiteError = tuple[int | None, int, str]
"""A site's error reply in a failed round: (node id or None where unknown, error code, reason)."""

#: run-config keys that must match between a checkpoint and the run resuming from it
_MUST_MATCH: Final = (
    "study", "strategy", "model-family", "hidden-size", "num-layers", "bidirectional", "width",
    "task", "num-classes", "input-shape", "has-mask", "proximal-mu", "eta", "eta-l", "beta-1",
    "beta-2", "tau", "trim-beta", "num-malicious-nodes", "server-momentum", "server-learning-rate",
)  # fmt: skip


#: flwr's round headers (message API strategy; legacy workflow), rewritten in a resumed run
_ROUND_HEADERS: Final = ("[ROUND %s/%s]", "[ROUND %s]")
_FLOWER_LOGGER: Final = "flwr"
#: what a site's train reply says of its ledger (``client.app``), and the names ``history.json`` uses
_LEDGER_FIELDS: Final = (
    (wire.ROUNDS_CHARGED, "rounds_charged"), (wire.ROUNDS_VOIDED, "rounds_voided"),
    (wire.ROUND_RETRIES, "retries"), (wire.RETRY_RESERVE, "retry_reserve"),
)


class RealRoundNumbers(logging.Filter):
    """Rewrite flwr's ``[ROUND k/n]`` (and ``[ROUND k]``) lines of a resumed run to the study's numbers.

    flwr counts the rounds of each run from 1; a run resumed after round ``offset`` plays the study's
    rounds ``offset + 1`` … so its headers become ``[ROUND offset+k/offset+n]``. Other records pass
    unchanged. Install on flwr's logger for the length of the run (:meth:`Study.run` does).
    """

    def __init__(self, offset: int) -> None:
        super().__init__()
        self.offset = int(offset)

    def filter(self, record: logging.LogRecord) -> bool:
        """Shift the round numbers of a round header; always let the record through."""
        args = record.args
        if (record.msg in _ROUND_HEADERS and isinstance(args, tuple) and args
                and all(isinstance(a, int) for a in args) and not getattr(record, "fedcare_round_offset", False)):
            record.args = tuple(a + self.offset for a in args)
            record.fedcare_round_offset = True
        return True


class CheckpointExistsError(FileExistsError):
    """A checkpoint exists where a new (not resumed) run would overwrite it."""


class ResumeMismatchError(ValueError):
    """The checkpoint was written by a run with another model, strategy or study."""


class RoundFailedError(RuntimeError):
    """A round failed (a stage halted, a site dropped or refused): the run stops, failed.

    Parameters
    ----------
    message : str
        What failed and what to do next.
    stage : str
        Where it failed (e.g. a SecAgg+ stage such as ``collect-masked-vectors``, or ``aggregate``).
    site_errors : sequence of (node id or None, code, reason)
        The sites' error replies in that stage.
    """

    def __init__(self, message: str, *, stage: str = "aggregate", site_errors: tuple[SiteError, ...] = ()) -> None:
        super().__init__(message)
        self.stage = stage
        self.site_errors = tuple(site_errors)


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


class Study:
    """One study on the coordinator, from its first (or resumed) round to its final outputs.

    Build it with :meth:`open`; a driver then calls :meth:`run` with a function that plays the
    remaining rounds and calls :meth:`close_round` after each.

    Attributes
    ----------
    config : RunConfig
        The run.
    history : MetricsHistory
        The per-round record (restored on resume); the driver's strategy fills it.
    arrays : OrderedDict of str to numpy.ndarray
        The current global model (the checkpointed one after a resume).
    done : int
        Rounds complete when the study was opened (the round offset of a resumed run).
    strategy_state : dict or None
        The checkpointed strategy state (None for a new run).
    """

    def __init__(
        self,
        config: RunConfig,
        *,
        arrays: OrderedDict[str, np.ndarray],
        key: ArtefactKey | None,
        on_round: RoundCallback | None,
        write_report: bool,
    ) -> None:
        self.config = config
        self.history = MetricsHistory()
        self.arrays = arrays
        self.done = 0
        self.strategy_state: dict[str, Any] | None = None
        self.key = key
        folder = config.checkpoint_dir
        self.checkpoint_path = artefact_path(folder, CHECKPOINT_FILE, key) if folder is not None else None
        self.on_round = on_round
        self.write_report = write_report
        self.audit = RunAudit(None)
        self.run_id: str | None = None
        self.progress = ProgressWriter(folder, study=config.study, num_rounds=config.num_rounds)  # status page
        self.asks_operating_point = False  # a deployment: ask the sites' validation histograms at the end
        self.operating_point: OperatingPoint | None = None

    def ask_operating_point(self) -> None:
        """Ask the sites for the final model's validation histograms before finishing (``server.operating_point``)."""
        self.asks_operating_point = True
        warn_if_no_query_left(self.config)

    # ------------------------------------------------------------------ open / resume

    @classmethod
    def open(cls, config: RunConfig, *, on_round: RoundCallback | None = None, write_report: bool = True) -> Study:
        """Start the study ``config`` describes, or resume it from its checkpoint; nothing is written yet.

        Parameters
        ----------
        config : RunConfig
            The run.
        on_round : callable, optional
            Called with each complete round's :class:`RoundRecord`.
        write_report : bool
            False: a completed run writes no privacy report (its caller writes the only one, as a
            simulation's release step does, with the gate's verdict).

        Raises
        ------
        CheckpointExistsError
            When a checkpoint exists and ``resume`` is false.
        ResumeMismatchError
            When the checkpoint is of another study, model or strategy, or of a plain run where
            this one is secure.
        CheckpointTamperedError
            When the checkpoint fails authentication or is another run's file.
        CheckpointKeyError
            When the checkpoint is encrypted and no key is configured, or the reverse.
        """
        random.seed(config.seed)  # flwr samples sites with the random module
        key = load_artefact_key(config.artefact_key)
        study = cls(config, arrays=initial_arrays(config), key=key, on_round=on_round, write_report=write_report)
        if config.checkpoint_dir is not None:
            _refuse_other_format(config.checkpoint_dir, key)
        if study.checkpoint_path is not None and study.checkpoint_path.exists():
            study._resume(study.checkpoint_path)
        elif config.resume:
            logger.warning("resume requested but no checkpoint in %s: starting from round 1", config.checkpoint_dir)
        return study

    def _resume(self, path: Path) -> None:
        """Restore the model, history, strategy state and RNG state of the checkpoint at ``path``."""
        config = self.config
        if not config.resume:
            raise CheckpointExistsError(
                f"a checkpoint exists at {path}; continue that run with `fedcare run STUDY --resume` "
                "(in process: set resume = true in the run config), or use another checkpoint-dir"
            )
        ckpt = load_checkpoint(path, key=self.key, expected={"study": safe_name(config.study), "kind": "checkpoint"})
        _check_resumable(ckpt, config, path)
        if config.secure_aggregation and ckpt.run_config.get("secure-aggregation") is not True:
            raise ResumeMismatchError(
                f"{path} was written by a run without secure aggregation; resume it without "
                "secure-aggregation, or start the secure run in another checkpoint-dir"
            )
        if list(ckpt.arrays) != list(self.arrays) or any(
            ckpt.arrays[k].shape != self.arrays[k].shape for k in self.arrays
        ):
            raise ResumeMismatchError(f"the model in {path} does not fit the configured model")
        self.arrays = ckpt.arrays
        self.history.load_state_dict(ckpt.history)
        self.history.drop_incomplete()
        self.strategy_state = ckpt.strategy_state
        if ckpt.rng_state is not None:
            random.setstate(_rng_from_json(ckpt.rng_state))
        self.done = ckpt.round
        logger.info("resuming %s from %s after round %d of %d", config.study, path, self.done, config.num_rounds)
        if self.done < config.num_rounds:
            logger.warning(
                "study %s: round %d is played again from the checkpoint; a site whose update for it had "
                "already left charges it again (its retry reserve), a site that never sent it charges it once",
                config.study, self.done + 1,
            )

    @property
    def remaining(self) -> int:
        """Return the rounds left to play."""
        return self.config.num_rounds - self.done

    # ------------------------------------------------------------------ run

    def run(self, grid: Any, play_rounds: Callable[[int], None]) -> MetricsHistory:
        """Record the start, play the remaining rounds, then finish, stop or fail; return the history.

        ``play_rounds(remaining)`` exchanges and aggregates the rounds and calls
        :meth:`close_round` after each; it is not called when the checkpoint holds every round.
        :class:`~fedcare.server.strategy.TooFewSitesError` stops the study (:meth:`stop`),
        :class:`RoundFailedError` fails it (:meth:`fail`); both are raised again. Any other error
        leaves the last checkpoint as the study's state. The audit log is closed in every case.
        """
        self.audit = RunAudit.open(self.config)
        renumber = RealRoundNumbers(self.done) if self.done else None
        if renumber is not None:
            logging.getLogger(_FLOWER_LOGGER).addFilter(renumber)
        try:
            self.run_id, app_hash = run_identity(grid, self.config)
            self.audit.run_start(self.config, run_id=self.run_id, app_hash=app_hash)
            self.progress.start(run_id=self.run_id, rounds_complete=self.done)
            started = time.perf_counter()
            try:
                if self.remaining > 0:
                    play_rounds(self.remaining)
                else:
                    logger.info("checkpoint already holds all %d rounds; writing the final outputs", self.done)
            except TooFewSitesError as exc:
                self.stop(exc)
                raise
            except RoundFailedError as exc:
                self.fail(exc)
                raise
            logger.info("study %s completed after %.1f s", self.config.study, time.perf_counter() - started)
            if self.asks_operating_point:  # the threshold goes into the final model file and history.json
                self.operating_point = validation_operating_point(grid, self.config, self.arrays,
                                                                  node_sites=self.history.node_sites)
            self.finish()
        finally:
            if renumber is not None:
                logging.getLogger(_FLOWER_LOGGER).removeFilter(renumber)
            self.audit.close()
        return self.history

    # ------------------------------------------------------------------ rounds

    def close_round(self, rnd: int, arrays: OrderedDict[str, np.ndarray], *, strategy_state: dict[str, Any]) -> RoundRecord:
        """Close round ``rnd`` with the new global model: mark it complete, checkpoint it, audit it, report it.

        The server sees the new global model on both paths, so the aggregate update's norm (new
        minus the previous model) is known to it and goes into the audit log.
        """
        previous, self.arrays = self.arrays, arrays
        record = self.history.round(rnd)
        record.complete = True
        path = self.checkpoint_path
        if path is not None:
            save_checkpoint(
                path,
                Checkpoint(
                    round=rnd,
                    arrays=arrays,
                    strategy_state=strategy_state,
                    history=self.history.state_dict(),
                    run_config=self.config.to_run_config(),
                    rng_state=_rng_to_json(random.getstate()),
                ),
                key=self.key,
                metadata=artefact_metadata(self.config, "checkpoint", rnd) if self.key is not None else None,
            )
        self.audit.round(record, aggregate_update_norm=update_norm(previous, arrays),
                         secure_aggregation=self.config.secure_aggregation)
        for site, ledger in site_ledgers(record).items():
            if ledger.get("rounds_voided") or ledger.get("retries"):
                logger.warning("round %d/%d: site %s's ledger: %d round(s) charged, %d voided (never left the "
                               "site), %d retried, of a retry reserve of %d", rnd, self.config.num_rounds, site,
                               ledger.get("rounds_charged", 0), ledger.get("rounds_voided", 0),
                               ledger.get("retries", 0), ledger.get("retry_reserve", 0))
        self.audit.refusals(record)
        if path is not None:
            self.audit.checkpoint(rnd, path, self.key)
        self.progress.close_round(record, node_sites=self.history.node_sites)
        if self.on_round is not None:
            self.on_round(record)
        return record

    # ------------------------------------------------------------------ endings

    def finish(self) -> None:
        """Write the final model, ``history.json`` (completed) and, unless deferred, the privacy report."""
        model_path = self._write_outputs("completed")
        self.progress.end("completed")
        if model_path is None or not self.write_report:
            return
        report = build_privacy_report(
            self.config, self.history, model_sha256=sha256_file(model_path),
            secure_aggregation=self.config.secure_aggregation,
            client_level=client_level_privacy(self.config, self.history), audit=self.audit, run_id=self.run_id,
            sites=report_sites(site_privacy(self.history), self.operating_point) if self.operating_point else None,
        )  # fmt: skip
        if report is not None:
            save_report(report, model_path.parent, overwrite=True)

    def stop(self, exc: TooFewSitesError) -> None:
        """Record why the study stopped; write what its complete rounds produced (no privacy report)."""
        logger.error("study %s stopped: %s", self.config.study, exc)
        for record in self.history.rounds:
            if not record.complete:
                self.audit.refusals(record)
        self._write_outputs("stopped", reason=str(exc))
        unfinished = [r for r in self.history.rounds if not r.complete]
        self.progress.end("stopped", reason=str(exc), rnd=unfinished[-1].round if unfinished else None,
                          refusals=[x for r in unfinished for x in r.refusals])

    def fail(self, exc: RoundFailedError) -> None:
        """Record the failed round (each failing site, then the failure) and ``history.json``; no final model."""
        logger.error("study %s FAILED in round %d (%d site failure(s), as the audit log records them): %s",
                     self.config.study, self.history.last_complete + 1, len(exc.site_errors), exc)
        self.audit.round_failed(
            self.history.last_complete + 1, stage=exc.stage, secure_aggregation=self.config.secure_aggregation,
            failures=[(self._site_name(node), code, reason) for node, code, reason in exc.site_errors],
        )  # fmt: skip
        self._write_history("failed", str(exc))
        self.progress.end("failed", reason=str(exc), rnd=self.history.last_complete + 1, refusals=[
            {"stage": exc.stage, "node_id": node, "site": self._site_name(node), "code": code, "reason": reason}
            for node, code, reason in exc.site_errors])

    def _write_outputs(self, status: Status, *, reason: str | None = None) -> Path | None:
        """Write the final model (audited) and ``history.json``; return the model's path (None without a folder)."""
        folder = self.config.checkpoint_dir
        if folder is None:
            return None
        model_path = artefact_path(folder, FINAL_MODEL_FILE, self.key)
        round_ = self.history.last_complete
        metadata = artefact_metadata(self.config, "model", round_) if self.key is not None else None
        meta = model_meta(self.config) | (self.operating_point.model_meta() if self.operating_point else {})
        save_model_file(model_path, self.arrays, meta, key=self.key, metadata=metadata)
        self.audit.checkpoint(round_, model_path, self.key)
        self._write_history(status, reason)
        return model_path

    def _write_history(self, status: Status, reason: str | None) -> None:
        """Write ``history.json``: the status, why it did not complete, the run config and every round."""
        if self.config.checkpoint_dir is None:
            return
        payload: dict[str, Any] = {"status": status}
        if reason is not None:
            payload["reason"] = reason
        payload |= {"run_config": self.config.to_run_config(), **self.history.state_dict()}
        ledgers: dict[str, dict[str, int]] = {}
        for record in self.history.rounds:  # the last figures each site reported
            ledgers.update(site_ledgers(record))
        if ledgers:
            payload["site_ledgers"] = dict(sorted(ledgers.items()))
        if self.operating_point is not None:  # how the final model's threshold was chosen, or why not
            payload["operating_point"] = self.operating_point.to_history()
        write_json_atomic(self.config.checkpoint_dir / HISTORY_FILE, payload)

    def _site_name(self, node_id: int | None) -> str:
        """Return the site name a node reported (``node-<id>`` before it reported one; ``unknown``)."""
        if node_id is None:
            return "unknown"
        return self.history.node_sites.get(node_id) or f"node-{node_id}"


@dataclass(frozen=True)
class StudyOutcome:
    """What a study's ``history.json`` says: its status, why it did not complete, and its rounds.

    Attributes
    ----------
    status : str
        ``completed``, ``stopped`` or ``failed``.
    reason : str or None
        Why it stopped or failed.
    history : MetricsHistory
        Every round, as the coordinator recorded it.
    """

    status: str
    reason: str | None
    history: MetricsHistory


def read_outcome(folder: Path) -> StudyOutcome | None:
    """Return the outcome a study wrote to ``folder/history.json`` (None when there is none).

    Raises
    ------
    CheckpointError
        When the file is not a study's history.
    """
    path = folder / HISTORY_FILE
    if not path.is_file():
        return None
    raw = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(raw, dict) or "status" not in raw:
        raise CheckpointError(f"{path} is not a fedcare history (no status); remove it or choose another folder")
    history = MetricsHistory()
    history.load_state_dict({k: v for k, v in raw.items() if k in ("kind", "rounds", "node_sites")})
    reason = raw.get("reason")
    return StudyOutcome(str(raw["status"]), None if reason is None else str(reason), history)


def site_ledgers(record: RoundRecord) -> dict[str, dict[str, int]]:
    """Return, per training site of ``record``, what its reply said of its ledger (rounds charged,
    voided, retried; retry reserve); sites that said nothing are left out."""
    out: dict[str, dict[str, int]] = {}
    for site, metrics in record.site_train.items():
        values = {name: int(metrics[key]) for key, name in _LEDGER_FIELDS
                  if isinstance(metrics.get(key), (int, float)) and metrics[key] == metrics[key]}
        if values:
            out[site] = values
    return out


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


def _rng_to_json(state: tuple[Any, ...]) -> list[Any]:
    """Return ``random.getstate()`` as JSON-ready lists."""
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _rng_from_json(state: list[Any]) -> tuple[Any, ...]:
    """Return the tuple ``random.setstate`` takes from :func:`_rng_to_json` output."""
    version, internal, gauss = state
    return (version, tuple(internal), gauss)
