"""The Flower ServerApp: parse the run config once, run the wrapped strategy, one study lifecycle.

``app`` (``fedcare.server.app:app``) reads ``context.run_config``; the simulation runner passes a
:class:`RunConfig` in-process with :func:`make_server_app` (flwr's ``run_simulation`` passes an
empty run config).

This module is the plain driver: each round is flwr's message-API ``Strategy.start`` loop of the
wrapped strategy (``server.strategy``). Opening or resuming the study, closing each round
(checkpoint, audit) and its final outputs are :class:`~fedcare.server.lifecycle.Study`'s, shared
with the SecAgg+ driver (``server.secagg``), which :func:`run_server` hands secure runs to.
"""

from __future__ import annotations

import logging

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from ..supervise import quiet_flower
from .checkpoint import MetricsHistory
from .config import RunConfig
from .grid_poll import responsive_grid
from .lifecycle import (
    CheckpointExistsError,
    ResumeMismatchError,
    RoundCallback,
    Study,
    initial_arrays,
    model_meta,
)
from .messages import arrays_from_record, arrays_to_record, evaluate_config, train_config
from .safekeeping import warn_plaintext
from .secagg import run_secure
from .strategy import TooFewSitesError, build_strategy
from .tracking import open_run_tracker, split_tracking

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

_to_record = arrays_to_record  # the name tests and older callers import


def _quiet_flower() -> None:
    """Keep Flower's telemetry and update check off (docs/architecture.md)."""
    quiet_flower()


def run_server(
    grid: Grid,
    config: RunConfig,
    *,
    on_round: RoundCallback | None = None,
    write_report: bool = True,
    operating_point: bool = False,
) -> MetricsHistory:
    """Run the study ``config`` describes on ``grid``; return the metrics history.

    Writes ``checkpoint.npz`` after every round, and ``final_model.npz`` and ``history.json``
    (with ``status`` "completed", or "stopped" when too few sites trained) at the end, to
    ``config.checkpoint_dir`` (when set); with ``artefact-key`` the checkpoint and the model are
    AES-GCM artefacts ``checkpoint.npz.enc`` / ``final_model.npz.enc`` bound to the study, kind,
    round and configuration hash. A completed run also writes ``privacy_report.json`` / ``.md``
    (unless ``write_report`` is false: a simulation writes its one report at release).
    With ``audit-key`` every step is appended to the signed audit log (``server.safekeeping``).
    A secure run (``secure-aggregation``) runs :func:`~fedcare.server.secagg.run_secure`.
    ``operating_point`` (the deployed ServerApp sets it): after the last round of a binary study
    every site is asked, through its evaluation policy, for the final model's validation
    histograms, and the threshold chosen on their sum is stored in ``final_model.npz``
    (``server.operating_point``; a simulation chooses it centrally instead).

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
    _quiet_flower()
    if config.secure_aggregation:  # SecAgg+ (+ client-level DP): flwr's legacy workflow path
        return run_secure(grid, config, on_round=on_round, write_report=write_report, operating_point=operating_point)
    study = Study.open(config, on_round=on_round, write_report=write_report)
    if operating_point:
        study.ask_operating_point()
    strategy = build_strategy(config, history=study.history, round_offset=study.done)
    strategy.on_stage = study.progress.stage  # the status page's current stage
    if study.strategy_state is not None:
        strategy.load_state_dict(study.strategy_state)

    def on_round_end(server_round: int, record: ArrayRecord) -> MetricRecord | None:
        """Close each complete round (flwr calls this once per round, and at 0)."""
        if server_round > 0:
            study.close_round(strategy.run_round(server_round), arrays_from_record(record),
                              strategy_state=strategy.state_dict())
        return None

    def play_rounds(remaining: int) -> None:
        """Run flwr's round loop for the rounds left."""
        strategy.start(
            grid=responsive_grid(grid),  # replies pulled every 0.2 s, not 3 s (grid_poll)
            initial_arrays=arrays_to_record(study.arrays),
            num_rounds=remaining,
            timeout=config.round_timeout_s,
            train_config=train_config(config),
            evaluate_config=evaluate_config(config),
            evaluate_fn=on_round_end,
        )

    return study.run(grid, play_rounds)


def make_server_app(
    config: RunConfig | None = None, *, on_round: RoundCallback | None = None, write_report: bool = True
) -> ServerApp:
    """Return a ServerApp that runs ``config`` (or, when None, parses ``context.run_config``).

    Parameters
    ----------
    config : RunConfig, optional
        The run, given in-process (simulation); when None the app reads the run config Flower
        passes, exactly once per run.
    on_round : callable, optional
        Called with each complete round's :class:`RoundRecord` (e.g. a live progress table).
    write_report : bool
        False: a completed run writes no privacy report into its checkpoint-dir (a simulation
        writes its one report at release, with the gate's verdict).
    """
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        """Parse the run config once and run the study (logged to MLflow / TensorBoard when asked)."""
        tracking, rest = split_tracking(context.run_config)  # server.tracking: `fedcare run --mlflow-uri`
        run = config if config is not None else RunConfig.from_run_config(rest)
        if config is None:  # a deployment: its models should not sit unencrypted on the coordinator
            warn_plaintext(run)
        tracker = open_run_tracker(tracking, experiment=run.study, params=run.to_run_config())
        try:
            run_server(grid, run, on_round=tracker.round_callback(on_round), write_report=write_report,
                       operating_point=True)  # the deployed model carries its threshold
        except TooFewSitesError:
            tracker.close("stopped")
            raise
        except BaseException:
            tracker.close("failed")
            raise
        tracker.close("completed")

    return server_app


app = make_server_app()
"""The ServerApp deployments load (``fedcare.server.app:app``)."""
