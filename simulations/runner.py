"""Run a scenario on Flower's simulation engine (Ray) and write its results.

:func:`run_scenario` builds the virtual hospitals, writes each one (data + privacy policy) to
``out_dir/.sites/``, starts ``flwr.simulation.run_simulation`` in-process with the ServerApp
and ClientApp of :func:`~fedcare.server.app.run_server` (round 1 once every virtual node registered) /
:func:`~fedcare.client.app.make_client_app` (a provider maps each node's ``partition-id`` to its
hospital; Ray workers load a hospital once per process), shows finished rounds in a live table,
and writes to ``out_dir``:

- ``summary.json``: final global metrics, per-site metrics per round, each site's ε and δ,
  baselines (pooled, local-only) and the federated-versus-pooled gap, wall times;
- ``metrics.csv``: one row per (round, stage, site, metric), ``site = "global"`` for aggregates;
- ``final_model.npz``, ``history.json`` and ``checkpoint.npz`` (in ``checkpoints/``; ``.npz.enc``
  with the scenario's ``[artefacts]`` key, plus ``audit.jsonl`` with its ``[audit]`` key);
- ``final_model.npz`` (the exported, unencrypted model: only when the ``[release]`` gate passes
  or none is set) and ``privacy_report.json`` / ``.md`` (``simulations.release``: the run's one
  privacy report, with the gate's verdict; the ServerApp writes none into ``checkpoints/``);
- ``ledgers/``: every virtual hospital's privacy ledger;
- PNG plots.
"""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import socket
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from pydantic import BaseModel, ConfigDict
from rich.console import Console

from ..client.app import LocalSite, make_client_app
from ..client.dataset import SiteData
from ..client.loaders import load_site_file
from ..models import build_for_data
from ..privacy.policy import SitePolicy, node_default_policy
from ..server.app import CheckpointExistsError, run_server
from ..server.checkpoint import (
    CHECKPOINT_FILE,
    ENCRYPTED_SUFFIX,
    HISTORY_FILE,
    MetricsHistory,
    RoundRecord,
    build_saved_model,
    load_model_file,
    write_json_atomic,
)
from ..server.config import RunConfig
from ..server.lifecycle import read_outcome
from ..server.safekeeping import final_model_file
from ..server.secagg import SecureAggregationError
from ..server.strategy import TooFewSitesError
from ..server.tracking import Tracker, TrackingSettings
from ..supervise import quiet_flower
from .baselines import CentralEvaluation, evaluate_centrally, run_baselines
from .builtin import load_builtin
from .external import evaluate_model_file  # re-exported (__all__): `fedcare simulate`'s CLI imports it here
from .external import store_operating_point, training_data_of
from .console import RoundProgress, quiet_simulation_notices
from .inprocess import InProcessGrid
from .partition import partition
from .secure import secure_summary
from .plots import plot_summary
from .provenance import Provenance, collect_provenance
from .report_html import REPORT_FILE, write_report
from .tracking import open_simulation_tracker, track_summary
from .release import ReleaseOutcome, release_model, security_fields
from .scenario import (
    InvalidScenarioError,
    ManifestSource,
    ManifestsSource,
    PartitionSpec,
    Scenario,
    SimulationSettings,
    SklearnSource,
)

__all__ = [
    "InProcessGrid",
    "PartitionProvider",
    "Summary",
    "build_hospitals",
    "evaluate_model_file",
    "ray_backend_config",
    "run_config_for",
    "run_scenario",
]

logger = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"
METRICS_FILE = "metrics.csv"
CHECKPOINT_DIR = "checkpoints"
LEDGER_DIR = "ledgers"
_SITES_DIR = ".sites"


class Summary(BaseModel):
    """What a scenario run produced (also written as ``summary.json``)."""

    model_config = ConfigDict(frozen=True)

    scenario: str
    status: str  # "completed", "stopped", or "blocked" (the [release] gate refused the model)
    reason: str | None = None
    hospitals: list[dict[str, Any]]
    strategy: str
    rounds_planned: int
    rounds_completed: int
    final_global: dict[str, float | None]
    final_pooled_test: dict[str, float | None] = {}  # = final_global when every site evaluates on its test split
    final_global_intervals: dict[str, list[float | None]] = {}  # 95 % intervals of final_global (issue 14)
    final_global_binned: dict[str, float | None] = {}  # binary: AUROC from summed 10-bin histograms
    final_threshold: float | None = None  # the operating threshold stored in the model file
    final_site_weighted_mean: dict[str, float | None] = {}  # example-weighted mean of per-site metrics
    final_federated_evaluation: dict[str, float | None] = {}
    final_train: dict[str, float | None]
    final_sites: dict[str, dict[str, float | None]]
    worst_site: dict[str, Any] | None
    privacy: dict[str, dict[str, float | None]]
    rounds: list[dict[str, Any]]
    baselines: dict[str, Any]
    gap_vs_pooled: dict[str, float]
    wall_time_s: float
    federated_time_s: float
    out_dir: str
    files: dict[str, str]
    secure_aggregation: dict[str, Any] | None = None  # simulations.secure.secure_summary
    release: dict[str, Any] | None = None
    configuration: dict[str, Any] | None = None  # the scenario as it ran (after --set overrides)
    provenance: dict[str, Any] | None = None  # simulations.provenance.Provenance


@dataclass(frozen=True)
class PartitionProvider:
    """Map a simulated node's ``partition-id`` to its hospital, written to ``folder`` by the runner.

    Picklable (Ray ships it to its workers); each worker process loads a hospital once and keeps
    up to ``num_sites`` hospitals (every hospital of the run: a worker never reloads one it has
    seen; the workers' memory holds at most the run's data once each).
    """

    folder: Path
    num_sites: int = 128

    def __call__(self, context: Context) -> LocalSite:
        """Return the LocalSite of this node's partition."""
        pid = int(context.node_config["partition-id"])  # type: ignore[arg-type]
        return _load_local_site(str(self.folder / f"site-{pid}.pkl"), capacity=self.num_sites)

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickle (in a Ray worker, before its first message): restore the fields, quiet flwr.

        flwr's ``secaggplus_mod`` logs every SecAgg+ stage of every node at DEBUG, and Ray echoes
        the workers' output to the simulation's console: the workers' ``flwr`` logger is kept at
        INFO and above (warnings and errors still show).
        """
        flower = logging.getLogger("flwr")
        flower.setLevel(max(flower.getEffectiveLevel(), logging.INFO))
        for key, value in state.items():
            object.__setattr__(self, key, value)


_SITE_CACHE: OrderedDict[tuple[str, int, int], LocalSite] = OrderedDict()
"""Hospitals this process loaded, by (path, mtime, size), least recently used first."""


def _load_local_site(path: str, *, capacity: int = 128) -> LocalSite:
    """Load one hospital written by the runner (once per process and file version; keeps ``capacity``)."""
    st = os.stat(path)
    key = (path, st.st_mtime_ns, st.st_size)  # a rewritten file (another run, same folder) is reloaded
    site = _SITE_CACHE.get(key)
    if site is not None:
        _SITE_CACHE.move_to_end(key)
        return site
    with open(path, "rb") as fh:
        site = pickle.load(fh)  # noqa: S301 - the runner wrote this file moments ago
    if not isinstance(site, LocalSite):
        raise TypeError(f"{path} does not hold a LocalSite")
    _SITE_CACHE[key] = site
    while len(_SITE_CACHE) > max(capacity, 1):
        _SITE_CACHE.popitem(last=False)
    return site


def build_hospitals(scenario: Scenario) -> list[SiteData]:
    """Return the scenario's hospitals: natural sites, or one dataset partitioned."""
    source = scenario.data
    if isinstance(source, ManifestsSource):
        return [load_site_file(p) for p in source.paths]
    if isinstance(source, SklearnSource):
        data = load_builtin(source.name, val=source.val, test=source.test, seed=scenario.seed)
    else:
        assert isinstance(source, ManifestSource)
        data = load_site_file(source.path)
    spec = scenario.partition or PartitionSpec()
    return partition(data, scheme=spec.scheme(), num_sites=spec.hospitals, seed=scenario.seed)


def run_config_for(
    scenario: Scenario, hospitals: list[SiteData], out_dir: Path, *, resume: bool = False
) -> RunConfig:
    """Return the RunConfig the ServerApp runs for ``scenario``."""
    first = hospitals[0]
    for site in hospitals[1:]:
        if (site.task, site.num_classes, tuple(site.input_shape), site.has_mask) != (
            first.task, first.num_classes, tuple(first.input_shape), first.has_mask
        ):
            raise ValueError(
                f"hospitals disagree on the data: {first.name} has {first.task}/{first.num_classes} "
                f"classes/{first.input_shape}, {site.name} has {site.task}/{site.num_classes} "
                f"classes/{site.input_shape}; every hospital of a federation needs the same features"
            )
    sim = scenario.simulation
    return RunConfig(
        study=scenario.name,
        num_rounds=scenario.rounds,
        **scenario.run_config_fields(),
        fraction_train=sim.fraction_train,
        fraction_evaluate=sim.fraction_evaluate,
        evaluate_with_train=sim.evaluate_with_train,
        min_sites=sim.min_sites or len(hospitals),
        round_timeout_s=sim.round_timeout_s,
        local_epochs=scenario.training.local_epochs,
        batch_size=scenario.training.batch_size,
        lr=scenario.training.lr,
        clip_grad_norm=scenario.training.clip_grad_norm,
        model=scenario.model,
        task=first.task,
        num_classes=first.num_classes if first.task != "regression" else 1,
        input_shape=tuple(first.input_shape),
        has_mask=first.has_mask,
        checkpoint_dir=out_dir / CHECKPOINT_DIR,
        resume=resume,
        seed=scenario.seed,
        **security_fields(scenario.artefacts, scenario.audit),
    )


def _site_policy(scenario: Scenario) -> SitePolicy:
    """Return every virtual hospital's policy: the node default, with the scenario's [policy] keys."""
    base = node_default_policy()
    if scenario.policy is None:
        return base
    given = {k: getattr(scenario.policy, k) for k in scenario.policy.model_fields_set}
    return SitePolicy.model_validate({**base.model_dump(), **given})


def _refuse_plain_rounds_the_sites_refuse(scenario: Scenario) -> None:
    """Raise ``InvalidScenarioError`` (before Ray starts) when every virtual hospital would refuse every round.

    The node default policy requires SecAgg+, so a scenario without ``[secure_aggregation]`` must
    say in its ``[policy]`` table that its hospitals accept plain rounds. Logs a PRIVACY WARNING
    for every setting of that table weaker than the strict default.
    """
    policy = _site_policy(scenario)
    for note in policy.weakening_settings():  # the scenario's [policy] table, every virtual hospital
        logger.warning("PRIVACY WARNING: scenario %r, every virtual hospital's policy: %s", scenario.name, note)
    _refuse_privacy_the_sites_refuse(scenario, policy)
    if scenario.secure_aggregation.enabled or not policy.require_secure_aggregation:
        return
    raise InvalidScenarioError(
        f"scenario {scenario.name!r} runs plain rounds (no [secure_aggregation]) but its virtual hospitals "
        "require secure aggregation (the node default policy, or [policy] require_secure_aggregation = true), "
        "so every hospital would refuse every round: add [secure_aggregation] enabled = true, or, if the "
        "hospitals may show the server their individual updates, [policy] require_secure_aggregation = false"
    )


def _refuse_privacy_the_sites_refuse(scenario: Scenario, policy: SitePolicy) -> None:
    """Raise ``InvalidScenarioError`` (before Ray starts) for settings every virtual hospital's policy refuses.

    The same rules the node's ``check_round`` applies each round, on what the scenario states up
    front: DP on when required, target ε / budget against the per-study and total ceilings, δ, the
    clipping norm, a fixed σ, and the model family.
    """
    privacy = scenario.privacy
    where = f"scenario {scenario.name!r}: every virtual hospital's policy"
    problems: list[str] = []
    if scenario.model.family not in policy.allowed_model_families:
        problems.append(f"model family {scenario.model.family!r} is not allowed (allowed: "
                        f"{', '.join(policy.allowed_model_families)}): change [model] family")
    if not privacy.enabled:
        if policy.require_dp:
            problems.append("requires DP-SGD but [privacy] enabled = false: enable privacy, or set "
                            "[policy] require_dp = false for a non-DP reference arm")
    else:
        epsilon = privacy.budget
        if epsilon > policy.max_epsilon_per_study:
            problems.append(f"allows ε ≤ {policy.max_epsilon_per_study:g} per study but [privacy] asks for "
                            f"ε = {epsilon:g} (target_epsilon / epsilon_budget): lower it, or raise [policy] "
                            "max_epsilon_per_study")
        if epsilon > policy.max_epsilon_total:
            problems.append(f"allows ε ≤ {policy.max_epsilon_total:g} in total but [privacy] asks for ε = "
                            f"{epsilon:g}: lower it, or raise [policy] max_epsilon_total")
        if privacy.delta > policy.max_delta:
            problems.append(f"allows δ ≤ {policy.max_delta:.3g} but [privacy] delta = {privacy.delta:.3g}: lower it")
        if privacy.max_grad_norm > policy.max_grad_norm:
            problems.append(f"allows a clipping norm ≤ {policy.max_grad_norm:g} but [privacy] max_grad_norm = "
                            f"{privacy.max_grad_norm:g}: lower it")
        if privacy.noise_multiplier is not None and privacy.noise_multiplier < policy.min_noise_multiplier:
            problems.append(f"requires σ ≥ {policy.min_noise_multiplier:g} but [privacy] noise_multiplier = "
                            f"{privacy.noise_multiplier:g}: raise it")
    if problems:
        raise InvalidScenarioError(f"{where} would refuse every round: " + "; ".join(problems))


def _refuse_data_the_model_or_sites_refuse(scenario: Scenario, hospitals: list[SiteData]) -> None:
    """Raise ``InvalidScenarioError`` (before Ray starts) when the model cannot be built for the data."""
    first = hospitals[0]
    try:
        build_for_data(scenario.model, task=first.task, num_classes=first.num_classes,
                       input_shape=tuple(first.input_shape), has_mask=first.has_mask)
    except ValueError as exc:  # models/ messages name the family, task and shape, never values
        raise InvalidScenarioError(f"scenario {scenario.name!r}: [model] does not fit the data: {exc}") from None


def _policy_label(scenario: Scenario) -> str:
    """Return how the report names the virtual hospitals' policy."""
    if scenario.policy is None:
        return "node default policy (the strict default, SecAgg+ required), every virtual hospital"
    return "node default policy with the scenario's [policy] keys, every virtual hospital"


def _write_hospitals(scenario: Scenario, hospitals: list[SiteData], folder: Path, ledgers: Path) -> None:
    """Write each hospital (data + the scenario's privacy policy) for the Ray workers to load."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, data in enumerate(hospitals):
        site = LocalSite(
            data=data,
            privacy=scenario.privacy,
            ledger_dir=ledgers,
            name=data.name,
            seed=scenario.seed * 1000 + i,
            policy=_site_policy(scenario),
        )
        with open(folder / f"site-{i}.pkl", "wb") as fh:
            pickle.dump(site, fh, protocol=pickle.HIGHEST_PROTOCOL)


def _metrics_rows(rounds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Return one row per (round, stage, site, metric) for metrics.csv."""
    rows = []
    for rec in rounds:
        for stage in ("train", "evaluate"):
            for metric, value in rec.get(stage, {}).items():
                rows.append({"round": rec["round"], "stage": stage, "site": "global", "metric": metric, "value": value})
            for site, metrics in rec.get(f"site_{stage}", {}).items():
                for metric, value in metrics.items():
                    rows.append({"round": rec["round"], "stage": stage, "site": site, "metric": metric, "value": value})
    return rows


def _privacy_by_site(rounds: list[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Return each site's ε and δ as last reported (ledgers only grow, so the last is the total)."""
    out: dict[str, dict[str, float | None]] = {}
    for rec in rounds:
        for site, metrics in rec.get("site_train", {}).items():
            out[site] = {"epsilon": metrics.get("epsilon"), "delta": metrics.get("delta")}
    return out


def _run_baselines(scenario: Scenario, hospitals: list[SiteData], out: Path | None = None) -> dict[str, Any]:
    """Train the pooled and local-only baselines the scenario asks for (simulations.baselines); save them under ``out``."""
    if not scenario.baselines:
        return {}
    return run_baselines(scenario, hospitals, which=list(scenario.baselines), out_dir=out,
                         training_data=training_data_of(scenario, hospitals))  # fmt: skip


def _gap(final: dict[str, float | None], baselines: dict[str, Any]) -> dict[str, float]:
    """Return federated minus pooled for every metric both report."""
    pooled = baselines.get("pooled") or {}
    return {
        k: float(final[k]) - float(v)  # type: ignore[arg-type]
        for k, v in pooled.items()
        if isinstance(v, (int, float)) and final.get(k) is not None
    }


def _plots(summary: dict[str, Any], out_dir: Path) -> dict[str, str]:
    """Draw the run's plots (simulations.plots) and return {name: file}."""
    return {k: str(v) for k, v in plot_summary(summary, out_dir).items()}


def _quiet_environment() -> None:
    """Set the environment every Flower process (and Ray worker) inherits."""
    quiet_flower()  # also the known third-party notices (fedcare.notices)
    quiet_simulation_notices()
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


def ray_backend_config(sim: SimulationSettings) -> dict[str, Any]:
    """Return Flower's Ray backend config for ``sim``; refuse GPUs this machine does not have.

    With ``sim.ray_address`` the backend connects to that running Ray cluster (flwr's Ray
    backend passes ``init_args`` to ``ray.init``; Ray refuses ``num_cpus`` / ``num_gpus`` /
    ``object_store_memory`` when connecting, so they are left to the cluster), and the actor
    pool is sized from the cluster's nodes. flwr's backend ends with ``ray.shutdown()``, which
    on a connected driver only disconnects: the cluster keeps running.

    Raises
    ------
    InvalidScenarioError
        ``num_gpus`` is above the CUDA devices torch sees here (a private local Ray only).
    """
    client_resources = {"num_cpus": sim.client_num_cpus, "num_gpus": sim.client_num_gpus}
    if sim.ray_address is not None:
        return {
            "client_resources": client_resources,
            "init_args": {"address": sim.ray_address, "logging_level": "ERROR"},
        }
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if sim.num_gpus > available:
        raise InvalidScenarioError(
            f"[simulation] num_gpus = {sim.num_gpus} but this machine has {available} CUDA device(s); "
            f"set num_gpus to at most {available} (and client_num_gpus = 0 when it is 0)"
        )
    return {
        "client_resources": client_resources,
        "init_args": {
            "num_cpus": sim.num_cpus,
            "num_gpus": sim.num_gpus,
            "object_store_memory": sim.object_store_mb * 1024 * 1024,
            "include_dashboard": False,
            "logging_level": "ERROR",
        },
    }


def run_scenario(
    scenario: Scenario,
    out_dir: Path | str,
    *,
    resume: bool = False,
    console: Console | None = None,
    on_round: Callable[[RoundRecord], None] | None = None,
    tracking: TrackingSettings | None = None,
    provenance: Provenance | None = None,
) -> Summary:
    """Run ``scenario`` on Flower's simulation engine and write its results to ``out_dir``.

    Parameters
    ----------
    scenario : Scenario
        What to simulate.
    out_dir : path
        Output folder; a folder holding a checkpoint is refused unless ``resume``.
    resume : bool
        Continue an interrupted run from ``out_dir/checkpoints/checkpoint.npz``.
    console : rich.console.Console, optional
        Where the live progress table goes (none when omitted).
    on_round : callable, optional
        Also called with each finished round's record.
    tracking : TrackingSettings, optional
        MLflow / TensorBoard to log the run to (``simulations.tracking``; off when omitted).
    provenance : Provenance, optional
        The run's provenance (``simulations.provenance``; default: collected here, no scenario file).
    """
    _quiet_environment()
    started = time.perf_counter()
    _refuse_plain_rounds_the_sites_refuse(scenario)
    backend_config = ray_backend_config(scenario.simulation)  # before any file is written
    _refuse_an_unreachable_cluster(scenario.simulation)
    out = Path(out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    hospitals = build_hospitals(scenario)
    _refuse_data_the_model_or_sites_refuse(scenario, hospitals)
    config = run_config_for(scenario, hospitals, out, resume=resume)
    _refuse_an_earlier_run(config, out, resume=resume)
    provenance = provenance or collect_provenance(None, seed=scenario.seed)
    configuration = scenario.model_dump(mode="json")
    tracker = open_simulation_tracker(tracking, scenario_name=scenario.name, configuration=configuration,
                                      provenance=provenance.model_dump(mode="json"))  # fmt: skip
    try:
        summary = _run_tracked(scenario, hospitals, config, out, backend_config, tracker=tracker, console=console,
                               on_round=on_round, started=started, configuration=configuration,
                               provenance=provenance)  # fmt: skip
    except BaseException:
        tracker.close("failed")
        raise
    track_summary(tracker, summary.model_dump(mode="json"), out)
    if summary.status == "failed":  # a failed secure round fails the run loudly (summary.json says why)
        raise SecureAggregationError(f"{summary.reason} (summary: {out / SUMMARY_FILE})")
    return summary


def _run_tracked(
    scenario: Scenario,
    hospitals: list[SiteData],
    config: RunConfig,
    out: Path,
    backend_config: dict[str, Any],
    *,
    tracker: Tracker,
    console: Console | None,
    on_round: Callable[[RoundRecord], None] | None,
    started: float,
    configuration: dict[str, Any],
    provenance: Provenance,
) -> Summary:
    """Simulate, release and write the results (``run_scenario`` after its checks); log each round to ``tracker``."""

    def round_done(record: RoundRecord) -> None:
        tracker.log_round(record.to_dict())
        if on_round is not None:
            on_round(record)

    fed_started = time.perf_counter()
    status, reason = _simulate(scenario, hospitals, config, out, backend_config, console=console, on_round=round_done)
    federated_time = time.perf_counter() - fed_started
    history = _read_history(config, status)
    if status == "completed":  # threshold (validation histograms), preprocessing, data digests: in the model file
        store_operating_point(config, scenario, hospitals)
    baselines = _run_baselines(scenario, hospitals, out)
    release = None
    if status == "completed":
        release = release_model(scenario, hospitals, config, history, out, ledger_dir=out / LEDGER_DIR,
                                policy=_site_policy(scenario), policy_label=_policy_label(scenario))  # fmt: skip
        if not release.released:
            status, reason = "blocked", release.reason
    central = _central_evaluation(config, hospitals) if history.completed else None
    return _write_summary(
        scenario, hospitals, history, out, status=status, reason=reason, baselines=baselines, release=release,
        central=central, federated_time=federated_time, started=started, configuration=configuration,
        provenance=provenance,
    )  # fmt: skip


def _central_evaluation(config: RunConfig, hospitals: list[SiteData]) -> CentralEvaluation | None:
    """Score the run's final global model as the baselines are scored (None when no final model was written).

    The federated evaluation the sites sent is what their policies released (DP-noised statistics
    by default: on a few dozen test patients per site mostly noise); the researcher of a simulation
    holds every virtual hospital's data and compares the federation with the pooled and local arms
    on the same footing here.
    """
    source, key, expected = final_model_file(config)
    if not source.is_file():
        return None
    arrays, meta = load_model_file(source, key=key, expected=expected)
    return evaluate_centrally(build_saved_model(arrays, meta), hospitals, threshold=meta.get("threshold"),
                              seed=config.seed)  # fmt: skip


def _refuse_an_earlier_run(config: RunConfig, out: Path, *, resume: bool) -> None:
    """Raise ``CheckpointExistsError`` (before Ray starts, as the ServerApp would) when ``out`` holds a checkpoint."""
    existing = config.checkpoint_dir / CHECKPOINT_FILE  # type: ignore[operator]
    if not existing.exists():
        existing = existing.with_name(CHECKPOINT_FILE + ENCRYPTED_SUFFIX)
    if existing.exists() and not resume:
        raise CheckpointExistsError(
            f"{out} holds a checkpoint of an earlier run ({existing}); pass --resume to continue "
            "it, or choose another --out"
        )


def _simulate(
    scenario: Scenario,
    hospitals: list[SiteData],
    config: RunConfig,
    out: Path,
    backend_config: dict[str, Any],
    *,
    console: Console | None,
    on_round: Callable[[RoundRecord], None] | None,
) -> tuple[str, str | None]:
    """Run the federation on Flower's simulation engine; return its status and why it did not complete.

    The ServerApp writes no privacy report: the release step writes the simulation's one report.
    """
    from flwr.simulation import run_simulation  # noqa: PLC0415 - heavy; only when simulating

    sites_dir = out / _SITES_DIR
    _write_hospitals(scenario, hospitals, sites_dir, out / LEDGER_DIR)
    progress = RoundProgress(f"{scenario.name}: {scenario.strategy.name}, {scenario.rounds} rounds",
                             scenario.rounds, console)  # simulations.console: live table or a line per round

    def round_done(record: RoundRecord) -> None:
        progress(record)
        logger.info("round %d finished: %s", record.round, record.evaluate)
        if on_round is not None:
            on_round(record)

    server_app = _server_app_after_registration(config, len(hospitals), on_round=round_done)
    client_app = make_client_app(PartitionProvider(sites_dir, num_sites=len(hospitals)))
    try:
        progress.start()
        try:
            run_simulation(
                server_app=server_app,
                client_app=client_app,
                num_supernodes=len(hospitals),
                backend_config=backend_config,  # type: ignore[arg-type]
            )
        finally:
            progress.stop()
    except SecureAggregationError as exc:  # history.json says failed; no model is released
        logger.error("secure aggregation FAILED: %s", exc)
        return "failed", str(exc)
    except TooFewSitesError as exc:
        logger.error("%s", exc)
        return "stopped", str(exc)
    finally:
        shutil.rmtree(sites_dir, ignore_errors=True)
    return "completed", None


def _server_app_after_registration(
    config: RunConfig, num_nodes: int, *, on_round: Callable[[RoundRecord], None]
) -> ServerApp:
    """Return the ServerApp of ``config`` that starts round 1 only once all ``num_nodes`` virtual nodes registered.

    flwr's simulation starts the ServerApp thread and then registers the virtual nodes one by
    one; a strategy that samples at once draws round 1 from the nodes registered so far (10 of
    100 sampled in one run of 1,000 hospitals). The wait is bounded by the round timeout: past
    it, the run goes on with the nodes there are (and says so).
    """
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        """Wait for every virtual node, then run the study."""
        _wait_for_nodes(grid, num_nodes, timeout_s=config.round_timeout_s)
        run_server(grid, config, on_round=on_round, write_report=False)

    return server_app


def _wait_for_nodes(grid: Grid, expected: int, *, timeout_s: float, poll_s: float = 0.05) -> int:
    """Return the number of nodes ``grid`` reports once it reaches ``expected``, or at ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while (found := len(list(grid.get_node_ids()))) < expected and time.monotonic() < deadline:
        time.sleep(poll_s)
    if found < expected:
        logger.warning(
            "only %d of %d virtual nodes registered within %g s; round 1 samples from those "
            "(raise [simulation] round_timeout_s on a slow machine)", found, expected, timeout_s,
        )
    return found


def _refuse_an_unreachable_cluster(sim: SimulationSettings) -> None:
    """Raise ``InvalidScenarioError`` (before any file is written) when no Ray cluster answers at ``ray_address``.

    A bounded TCP connection to the cluster's GCS port; ``"auto"`` and ``ray://`` addresses are
    left to Ray. fedcare never starts a cluster in place of the one named.
    """
    address = sim.ray_address
    if address is None or address == "auto" or "://" in address:
        return
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise InvalidScenarioError(
            f"[simulation] ray_address = {address!r} is not host:port; give the head node's address as "
            "printed by `ray start --head` (e.g. 10.0.0.5:6379), or \"auto\""
        )
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5.0).close()
    except OSError as exc:
        raise InvalidScenarioError(
            f"no Ray cluster answers at [simulation] ray_address = {address!r} ({type(exc).__name__}); "
            "start it first (`ray start --head --port=...` on the head node), fix the address, or remove "
            "ray_address to run on a private local Ray instance"
        ) from None


def _read_history(config: RunConfig, status: str) -> MetricsHistory:
    """Return the rounds the ServerApp recorded (``history.json``); none when a stopped run wrote none."""
    assert config.checkpoint_dir is not None
    outcome = read_outcome(config.checkpoint_dir)
    if outcome is not None:
        return outcome.history
    if status == "completed":
        raise RuntimeError(
            f"the simulation ended without writing {config.checkpoint_dir / HISTORY_FILE}; see the log above "
            "(a ClientApp or ServerApp error ends the simulation)"
        )
    return MetricsHistory()


def _write_summary(
    scenario: Scenario,
    hospitals: list[SiteData],
    history: MetricsHistory,
    out: Path,
    *,
    status: str,
    reason: str | None,
    baselines: dict[str, Any],
    release: ReleaseOutcome | None,
    central: CentralEvaluation | None,
    federated_time: float,
    started: float,
    configuration: dict[str, Any] | None = None,
    provenance: Provenance | None = None,
) -> Summary:
    """Write ``metrics.csv``, the plots, ``report.html`` and ``summary.json``; return the summary."""
    rounds = [r.to_dict() for r in history.completed]
    last = rounds[-1] if rounds else {}
    federated_evaluation = last.get("evaluate", {})
    final_global = dict(central.metrics) if central is not None else federated_evaluation
    files = {"summary": str(out / SUMMARY_FILE), "metrics": str(out / METRICS_FILE)}
    if release is not None:
        files.update({k: v for k, v in (("model", release.model), ("report", release.report)) if v})
    pd.DataFrame(_metrics_rows(rounds), columns=["round", "stage", "site", "metric", "value"]).to_csv(
        out / METRICS_FILE, index=False
    )
    data: dict[str, Any] = {
        "scenario": scenario.name,
        "status": status,
        "reason": reason,
        "hospitals": [
            {"name": h.name, "train": len(h.train), "val": len(h.val), "test": len(h.test)} for h in hospitals
        ],
        "strategy": scenario.strategy.name,
        "rounds_planned": scenario.rounds,
        "rounds_completed": len(rounds),
        "final_global": final_global,
        "final_pooled_test": dict(central.pooled_test) if central is not None else {},
        "final_global_intervals": dict(central.intervals) if central is not None else {},
        "final_global_binned": dict(central.binned) if central is not None else {},
        "final_threshold": central.threshold if central is not None else None,
        "final_site_weighted_mean": dict(central.site_weighted_mean) if central is not None else {},
        "final_federated_evaluation": federated_evaluation,
        "final_train": last.get("train", {}),
        "final_sites": last.get("site_evaluate", {}),
        "worst_site": last.get("worst_site"),
        "privacy": _privacy_by_site(rounds),
        "rounds": rounds,
        "baselines": baselines,
        "gap_vs_pooled": _gap(final_global, baselines),
        "wall_time_s": 0.0,
        "federated_time_s": federated_time,
        "out_dir": str(out),
        "files": files,
        "secure_aggregation": secure_summary(scenario.secure_aggregation, scenario.client_dp, rounds),
        "release": None if release is None else release.model_dump(mode="json"),
        "configuration": configuration,
        "provenance": None if provenance is None else provenance.model_dump(mode="json"),
    }
    files.update(_plots(data, out))
    files["report_html"] = str(out / REPORT_FILE)
    data["wall_time_s"] = time.perf_counter() - started
    write_report(data, out)  # simulations.report_html: the same content as summary.json, with the plots
    summary = Summary.model_validate(data)
    write_json_atomic(out / SUMMARY_FILE, summary.model_dump(mode="json"))
    return summary
