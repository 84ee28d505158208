"""Chaos run: a real deployment under random ``kill -9``, restarted and resumed (issue 13 item 7).

A loopback deployment as docs/deployment.md lays it out: ``fedcare certs init``, a TLS SuperLink
with SuperNode authentication (``server.deploy.start_superlink``), five hospital nodes each with
its own key, policy, state folder and privacy ledger (``client.deploy.start_node``; the heart-
disease sites Cleveland, Hungarian and VA, and Cleveland and Hungarian once more under other
site names), and a sequence of studies, alternately plain and SecAgg+, each submitted with
``fedcare run`` as the coordinator would. A seeded random schedule (``--seed``) gives each study
``--faults`` faults, each a ``kill -9`` (SIGKILL) at a random time after the study's submission of

- ``node``: one hospital's SuperNode (chosen at random); restarted after a random pause as the
  docs say: ``fedcare node stop --state`` (stops what the dead node left behind) then
  ``fedcare node start`` with the same state folder and ledger;
- ``serverapp``: the study's ServerApp process (``flwr-serverapp`` under the SuperLink); nothing
  to restart, the study is resumed;
- ``superlink``: the SuperLink; restarted after a random pause: ``fedcare server stop --state``
  then ``fedcare server start`` with the same state folder (its database keeps the nodes'
  registrations; the nodes reconnect by themselves).

Stage triggers (``--fault``, repeatable; :func:`parse_trigger`) fire on the study's real progress
instead of a time offset: ``KIND[=TARGET]@ROUND:STAGE``, e.g. ``node@2:collect-masked-vectors``,
``node=va@2:collect-masked-vectors``, ``serverapp@3:train``, ``superlink@2:train``. The harness
polls the study's live ``progress.json`` (``server.progress``, what ``fedcare server status`` and
the status page read; every 0.2 s, bounded by the attempt's deadline) and kills the target the
first time the running study is in that round at that stage or a later one of the same round
(:data:`STAGE_ORDER`: plain rounds ``train``, ``aggregate``, ``evaluate``; SecAgg+ rounds
``setup``, ``share-keys``, ``collect-masked-vectors``, ``unmask``, then ``evaluate``); the stage it
saw is reported. Triggers due at the same poll are all killed before any restart (a double
fault). A trigger not fired in an attempt carries over to the resume; one whose round the study
passed without it being seen is reported as missed. A ``node`` trigger without a target picks one
hospital at random (seeded).

A study whose ``fedcare run`` ends without ``finished:completed`` is resumed (``fedcare run
--resume`` where the CLI has it, else the study file with ``resume = true`` in ``[run]``, whose
app hash every hospital pinned in advance), at most ``--max-resumes`` times.

Invariants, checked after every event (kill, restart, end of a ``fedcare run``):

- ``budget``: no site's ε in any study above that study's budget in its ledger, and no site's
  total above its policy's ``max_epsilon_total``;
- ``monotone``: no ledger's ε lower than at the previous check;
- ``outcome`` (at the end of each study): it completed all its planned rounds, or failed with a
  named reason (``history.json`` ``reason``, or the run's status details);
- ``checkpoint`` (each completed study): the final model equals the model of the last
  checkpoint, which is of the last planned round.

Ledgers are read, never opened for writing: the JSON file is loaded into an in-memory ledger
(``PrivacyLedger.in_memory`` + ``load_state_dict``) to compute ε.

Reported (printed, JSON with ``--out``): kills injected by kind (a kill whose target was not
running, e.g. a ServerApp between studies, is reported as missed), studies completed and
attempts, rounds voided and retried and the retry reserve used (from the ledgers' round
entries), overruns, ε decreases, lost studies, and every invariant violation with the event
that preceded it.

Every process is started by this script and stopped by PID in ``finally`` blocks; every wait is
bounded (``--attempt-timeout`` per ``fedcare run``).

Usage::

    python benchmarks/chaos.py --seed 1 --studies plain secagg plain secagg --rounds 3 \
        --out benchmarks/results/chaos.json
    python benchmarks/chaos.py --studies secagg --rounds 3 --fault node@2:collect-masked-vectors

``benchmarks/replay.py`` replays the issue's scenarios with stage triggers.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedcare.client.deploy import NodeSettings, pin_app_in_policy, start_node, stop_node
from fedcare.privacy.certs import generate_node_key
from fedcare.privacy.ledger import PrivacyLedger
from fedcare.privacy.policy import load_policy
from fedcare.server.checkpoint import (
    CHECKPOINT_FILE,
    FINAL_MODEL_FILE,
    HISTORY_FILE,
    load_checkpoint,
    load_model_file,
)
from fedcare.server.deploy import register_node, start_superlink, stop_superlink
from fedcare.server.flower_app import app_hash, build_flower_app, load_study
from fedcare.server.progress import read_progress
from fedcare.supervise import (
    NotRunningError,
    ProcessExitedError,
    ProcessHandle,
    find_executable,
    spawn,
    stop_process,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))  # deploy_harness, also when loaded by a test

from deploy_harness import cmdline, descendants, free_port, heart_study_text, prepare_coordinator  # noqa: E402

logger = logging.getLogger("fedcare.benchmarks.chaos")

REPO = Path(__file__).resolve().parents[1]
SITE_DIR = REPO / "simulations" / "sites"
#: site name -> manifest (two sites reuse a file under another name: five hospitals, three files)
SITES = {
    "cleveland": SITE_DIR / "heart_cleveland.toml",
    "hungarian": SITE_DIR / "heart_hungarian.toml",
    "va": SITE_DIR / "heart_va.toml",
    "cleveland-b": SITE_DIR / "heart_cleveland.toml",
    "hungarian-b": SITE_DIR / "heart_hungarian.toml",
}
FAULTS = ("node", "serverapp", "superlink")
#: a round's stages in the order the ServerApp enters them (``server.progress``); a plain round
#: has train, aggregate, evaluate; a SecAgg+ round's training is setup .. unmask
STAGE_ORDER = ("starting", "train", "setup", "share-keys", "collect-masked-vectors", "unmask", "aggregate",
               "evaluate", "closed")
_TRIGGER = re.compile(r"^(?P<kind>node|serverapp|superlink)(?:=(?P<target>[A-Za-z0-9_-]+))?"
                      r"@(?P<round>[1-9][0-9]*):(?P<stage>[a-z-]+)$")
#: how often a stage trigger reads the study's progress file
POLL_S = 0.2
#: how long a node restart is retried, and how often (flwr refuses it while the dead node is online)
RESTART_PATIENCE_S = 180.0
RESTART_RETRY_S = 15.0

SECURE_EXTRA = "secure-aggregation = true\n"
_COMPLETED = re.compile(r"run (\d+) finished:completed")
_ENDED = re.compile(r"run (\d+) ended (\S+?):?\s+(.*)")


@dataclass
class Event:
    """One scheduled fault: at ``offset_s`` after submission, or (a stage trigger) at ``round``/``stage``."""

    study: int
    offset_s: float
    kind: str
    target: str | None = None
    pause_s: float = 0.0
    round: int | None = None
    stage: str | None = None
    seen: str = ""  # what the trigger saw when it fired ("round 2 collect-masked-vectors")

    @property
    def label(self) -> str:
        """Return the fault as written (``node=va@2:collect-masked-vectors``, ``superlink@+5.7s``)."""
        who = self.kind + ("" if self.target is None else f"={self.target}")
        return f"{who}@{self.round}:{self.stage}" if self.round is not None else f"{who}@+{self.offset_s}s"


class TriggerSyntaxError(ValueError):
    """A ``--fault`` trigger is not ``KIND[=TARGET]@ROUND:STAGE``."""


def parse_trigger(spec: str, *, study: int = 0, pause_s: float = 2.0) -> Event:
    """Return the stage-triggered fault ``spec`` (``KIND[=TARGET]@ROUND:STAGE``) for study ``study``.

    Raises
    ------
    TriggerSyntaxError
        When the kind, target, round or stage is not one this harness knows.
    """
    match = _TRIGGER.match(spec.strip())
    if match is None:
        raise TriggerSyntaxError(
            f"fault trigger {spec!r} is not KIND[=TARGET]@ROUND:STAGE; write e.g. node@2:collect-masked-vectors, "
            f"node=va@2:unmask, serverapp@3:train or superlink@2:train (KIND one of {', '.join(FAULTS)})"
        )
    stage, target = match["stage"], match["target"]
    if stage not in STAGE_ORDER:
        raise TriggerSyntaxError(f"fault trigger {spec!r}: unknown stage {stage!r}; use one of {', '.join(STAGE_ORDER)}")
    if target is not None and match["kind"] != "node":
        raise TriggerSyntaxError(f"fault trigger {spec!r}: only a node trigger names a target (=SITE); drop it")
    if target is not None and target not in SITES:
        raise TriggerSyntaxError(f"fault trigger {spec!r}: unknown site {target!r}; use one of {', '.join(SITES)}")
    return Event(study=study, offset_s=0.0, kind=match["kind"], target=target, pause_s=pause_s,
                 round=int(match["round"]), stage=stage)  # fmt: skip


def trigger_state(event: Event, progress: dict[str, Any] | None, *, since: float) -> str:
    """Return whether the stage trigger ``event`` is ``due``, still ``waiting``, or ``passed`` (missed).

    ``progress`` is the study's ``progress.json`` (``server.progress.read_progress``); a file not
    rewritten since ``since`` (epoch seconds: an earlier attempt's, e.g. of a killed ServerApp)
    is ignored. Due: the running study is in the trigger's round at its stage or a later one of
    that round. Passed: the study is in a later round, or ended, without the trigger having fired.
    """
    if event.round is None or event.stage is None:
        raise ValueError(f"{event.label} is not a stage trigger")
    if progress is None or float(progress.get("updated_at") or 0.0) < since:
        return "waiting"
    rnd, stage = int(progress.get("round") or 0), str(progress.get("stage") or "")
    if progress.get("status") != "running":
        return "waiting"  # ended: the next attempt (a resume) may still reach the round
    if rnd > event.round:
        return "passed"
    if rnd == event.round and stage in STAGE_ORDER and STAGE_ORDER.index(stage) >= STAGE_ORDER.index(event.stage):
        return "due"
    return "waiting"


@dataclass
class Report:
    """What the chaos run saw."""

    seed: int
    kills: Counter[str] = field(default_factory=Counter)
    triggers_passed: list[str] = field(default_factory=list)
    missed: Counter[str] = field(default_factory=Counter)
    restart_refusals: Counter[str] = field(default_factory=Counter)
    studies: list[dict[str, Any]] = field(default_factory=list)
    violations: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    ledgers: dict[str, dict[str, Any]] = field(default_factory=dict)
    resume_mode: str = ""
    elapsed_s: float = 0.0

    def summary(self) -> dict[str, Any]:
        """Return the figures recorded in BENCHMARKS.md "Reliability"."""
        by = Counter(v["invariant"] for v in self.violations)
        retried = sum(v.get("retries", 0) for v in self.ledgers.values())
        voided = sum(v.get("rounds_voided", 0) for v in self.ledgers.values())
        reserve = [v.get("retries", 0) for v in self.ledgers.values()]
        return {
            "seed": self.seed,
            "kills_injected": dict(self.kills),
            "kills_missed": dict(self.missed),
            "triggers_passed": list(self.triggers_passed),
            "node_restarts_refused": sum(self.restart_refusals.values()),
            "studies": len(self.studies),
            "studies_completed": sum(1 for s in self.studies if s["completed"]),
            "studies_failed_named": sum(1 for s in self.studies if not s["completed"] and s["reason"]),
            "lost_studies": sum(1 for s in self.studies if not s["completed"]),
            "attempts": sum(s["attempts"] for s in self.studies),
            "rounds_retried_site_rounds": retried,
            "rounds_voided_site_rounds": voided,
            "reserve_used_max_per_site_study": max(reserve, default=0),
            "overruns": by.get("budget", 0),
            "epsilon_decreases": by.get("monotone", 0),
            "outcome_violations": by.get("outcome", 0),
            "checkpoint_mismatches": by.get("checkpoint", 0),
            "resume_mode": self.resume_mode,
            "elapsed_s": round(self.elapsed_s, 1),
        }


def _ledger_view(state: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    """Return the ε a ledger file's state has spent and its retry summary (an in-memory copy)."""
    ledger = PrivacyLedger.in_memory(site=str(state["site"]), study=str(state["study"]))
    ledger.load_state_dict(state)
    summary = ledger.retry_summary() if hasattr(ledger, "retry_summary") else {}
    return float(ledger.spent_epsilon()), dict(summary)


class Chaos:
    """One chaos run: the deployment, the schedule, the checks."""

    def __init__(self, root: Path, *, seed: int, kinds: list[str], rounds: int, faults: int,
                 fault_kinds: tuple[str, ...], max_resumes: int, attempt_timeout: float,
                 offset_range: tuple[float, float], min_sites: int, triggers: list[Event] | None = None,
                 policy_extra: str = "", secure_extra: str = SECURE_EXTRA) -> None:  # fmt: skip
        self.root, self.rounds, self.max_resumes = root, rounds, max_resumes
        self.policy_extra, self.secure_extra = policy_extra, secure_extra
        self.attempt_timeout, self.min_sites = attempt_timeout, min_sites
        self.rng = random.Random(seed)
        self.report = Report(seed=seed)
        self.kinds = kinds
        self.schedule = [
            Event(study=i, offset_s=round(self.rng.uniform(*offset_range), 1),
                  kind=self.rng.choice(fault_kinds), pause_s=round(self.rng.uniform(1.0, 5.0), 1))
            for i in range(len(kinds)) for _ in range(faults)
        ]  # fmt: skip
        self.schedule += list(triggers or [])
        for event in self.schedule:
            if event.kind == "node" and event.target is None:
                event.target = self.rng.choice(sorted(SITES))
        self.superlink: ProcessHandle | None = None
        self.nodes: dict[str, ProcessHandle] = {}
        self.node_settings: dict[str, NodeSettings] = {}
        self.run_handle: ProcessHandle | None = None
        self.seen_eps: dict[str, float] = {}
        self.last_event = "start"
        self.fedcare = str(Path(sys.executable).parent / "fedcare")
        if not Path(self.fedcare).is_file():
            self.fedcare = find_executable("fedcare")
        help_text = subprocess.run([self.fedcare, "run", "--help"], capture_output=True, text=True,
                                   timeout=120, check=False).stdout  # fmt: skip
        self.resume_flag = "--resume" in help_text
        self.report.resume_mode = "fedcare run --resume" if self.resume_flag else "resume = true in [run]"

    # ------------------------------------------------------------------ deployment
    def setup(self) -> None:
        """Certificates, keys, policies, studies (pinned), the SuperLink and the five nodes."""
        root = self.root
        coordinator = prepare_coordinator(root)
        self.certs, self.bundle = coordinator.certs, coordinator.bundle_ca
        self.fleet, self.control = coordinator.address, coordinator.control_address
        self.state, self.token = coordinator.state_dir, coordinator.control_token
        self.superlink_settings = coordinator.superlink_settings
        self.studies: list[dict[str, Any]] = []
        hashes = []
        for i, kind in enumerate(self.kinds):
            name = f"chaos-{i}-{kind}"
            extra = self.secure_extra if kind == "secagg" else ""
            text = heart_study_text(name=name, description=f"chaos run: {kind} study", rounds=self.rounds,
                                    min_sites=self.min_sites, round_timeout_s=120.0,
                                    checkpoint_dir=root / "models" / name, extra=extra)  # fmt: skip
            path, resume_path = root / f"{name}.toml", root / f"{name}-resume.toml"
            path.write_text(text, encoding="utf-8")
            resume_path.write_text(text + "resume = true\n", encoding="utf-8")
            for p in (path, resume_path):
                hashes.append(app_hash(build_flower_app(load_study(p), root / "apps" / p.stem)))
            self.studies.append({"name": name, "kind": kind, "file": path, "resume_file": resume_path,
                                 "dir": root / "models" / name})  # fmt: skip
        self.superlink = start_superlink(self.superlink_settings, ready_timeout=300.0)
        conn = coordinator.connection
        for site, manifest in SITES.items():
            keys = generate_node_key(root / "hospitals" / site, site.replace("-", ""))
            register_node(keys.public_key, conn, flwr_home=root / "flwr-home", timeout=300.0)
            policy = root / "policies" / f"{site}.toml"
            policy.parent.mkdir(parents=True, exist_ok=True)
            policy.write_text("require_secure_aggregation = false\n" + self.policy_extra, encoding="utf-8")
            for digest in hashes:
                pin_app_in_policy(policy, digest)
            self.node_settings[site] = NodeSettings(
                site_manifest=manifest, site_name=site, superlink=self.fleet, port=free_port(),
                state_dir=root / "nodes" / site, ca_cert=self.bundle, auth_key=keys.private_key,
                ledger_dir=root / "ledgers" / site, extra_node_config={"policy": str(policy)},
            )  # fmt: skip
        with ThreadPoolExecutor(max_workers=2) as pool:
            started = dict(zip(SITES, pool.map(lambda s: start_node(self.node_settings[s], ready_timeout=300.0), SITES)))
        self.nodes = {site: s.handle for site, s in started.items()}
        self.check("setup")

    def pin(self, study_file: Path) -> None:
        """Pin the app ``fedcare run`` will submit for ``study_file`` in every hospital's policy.

        Done again before every submission: the hash covers every run-config default, so a
        fedcare changed in between (a shared development tree) would otherwise be refused.
        """
        digest = app_hash(build_flower_app(load_study(study_file), self.root / "apps" / study_file.stem))
        for settings in self.node_settings.values():
            pin_app_in_policy(Path(str(settings.extra_node_config["policy"])), digest)

    def restart_node(self, site: str) -> None:
        """Restart a node as the docs say: ``node stop --state`` (leftovers), then ``node start``."""
        settings = self.node_settings[site]
        try:
            stop_node(settings.state_dir, timeout=10.0)
        except NotRunningError:
            pass
        # flwr keeps a killed node "online" until it misses its heartbeats (30 s interval,
        # patience 2): until then the SuperLink refuses to activate the same key again (HTTP
        # 412, exit 305). The operator retries; bounded, and every refusal is reported.
        deadline = time.monotonic() + RESTART_PATIENCE_S
        while True:
            try:
                self.nodes[site] = start_node(settings, ready_timeout=300.0).handle
                return
            except ProcessExitedError as exc:
                if time.monotonic() > deadline:
                    raise
                self.report.restart_refusals[site] += 1
                logger.warning("chaos: node %s restart refused (exit %s); retrying in %g s",
                               site, exc.returncode, RESTART_RETRY_S)
                time.sleep(RESTART_RETRY_S)

    def restart_superlink(self) -> None:
        """Restart the SuperLink as the docs say: ``server stop --state``, then ``server start``."""
        try:
            stop_superlink(self.state, timeout=10.0)
        except NotRunningError:
            pass
        self.superlink = start_superlink(self.superlink_settings, ready_timeout=300.0)

    def stop_all(self) -> None:
        """Stop every process this run started, by PID."""
        if self.run_handle is not None:
            stop_process(self.run_handle, timeout=5.0)
        for handle in self.nodes.values():
            stop_process(handle, timeout=10.0)
        for settings in self.node_settings.values():  # restarted nodes, leftovers
            try:
                stop_node(settings.state_dir, timeout=10.0)
            except NotRunningError:
                pass
        if self.superlink is not None:
            stop_process(self.superlink, timeout=10.0)
        try:
            stop_superlink(self.state, timeout=10.0)
        except (NotRunningError, AttributeError):
            pass

    # ------------------------------------------------------------------ invariants
    def _violate(self, invariant: str, detail: str) -> None:
        entry = {"invariant": invariant, "after": self.last_event, "detail": detail}
        self.report.violations.append(entry)
        logger.error("INVARIANT %s broken after %s: %s", invariant, self.last_event, detail)

    def check(self, event: str) -> None:
        """Check the ledger invariants after ``event``."""
        self.last_event = event
        for site, settings in self.node_settings.items():
            policy = load_policy(str(settings.extra_node_config["policy"]))
            total = 0.0
            for path in sorted(Path(settings.ledger_dir or "").glob("*.json")):
                try:
                    state = json.loads(path.read_text(encoding="utf-8"))
                    if state.get("site") != site:
                        continue
                    eps, retry = _ledger_view(state)
                except (OSError, ValueError, KeyError) as exc:
                    self._violate("readable", f"{path.name}: {type(exc).__name__}: {exc}")
                    continue
                key = f"{site}/{state['study']}"
                total += eps
                budget = state.get("epsilon_budget")
                if budget is not None and eps > float(budget) + 1e-9:
                    self._violate("budget", f"{key}: ε {eps:.4f} > study budget {float(budget):.4f}")
                if eps < self.seen_eps.get(key, 0.0) - 1e-12:
                    self._violate("monotone", f"{key}: ε {eps:.4f} < {self.seen_eps[key]:.4f} before")
                self.seen_eps[key] = max(eps, self.seen_eps.get(key, 0.0))
                rounds = state.get("rounds") or []
                self.report.ledgers[key] = {
                    "epsilon": round(eps, 4),
                    "budget": budget,
                    "rounds": [(int(r["round"]), str(r.get("status"))) for r in rounds],
                    **retry,
                }
            if total > policy.max_epsilon_total + 1e-9:
                self._violate("budget", f"{site}: total ε {total:.4f} > policy {policy.max_epsilon_total}")

    def check_study(self, study: dict[str, Any], completed: bool, reason: str) -> None:
        """Check the outcome and, for a completed study, that its final model is its last checkpoint."""
        folder = study["dir"]
        history = json.loads((folder / HISTORY_FILE).read_text()) if (folder / HISTORY_FILE).is_file() else {}
        rounds = len(history.get("rounds", []))
        if completed and (history.get("status") != "completed" or rounds != self.rounds):
            self._violate("outcome", f"{study['name']}: run completed but history says "
                                     f"{history.get('status')!r} with {rounds}/{self.rounds} rounds")  # fmt: skip
        if not completed and not reason:
            self._violate("outcome", f"{study['name']}: ended without completing and without a named reason")
        if completed:
            try:
                ckpt = load_checkpoint(folder / CHECKPOINT_FILE)
                final, _ = load_model_file(folder / FINAL_MODEL_FILE)
            except Exception as exc:  # noqa: BLE001 - reported as a violation, never swallowed
                self._violate("checkpoint", f"{study['name']}: {type(exc).__name__}: {exc}")
                return
            same = list(final) == list(ckpt.arrays) and all(
                np.array_equal(final[k], ckpt.arrays[k]) for k in final
            )
            if ckpt.round != self.rounds or not same:
                self._violate("checkpoint", f"{study['name']}: checkpoint of round {ckpt.round}, "
                                            f"final model {'equal' if same else 'DIFFERENT'}")  # fmt: skip

    # ------------------------------------------------------------------ faults
    def inject(self, event: Event) -> None:
        """Kill the event's target with SIGKILL, check, pause, restart (as the docs say), check."""
        self.inject_all([event])

    def _target_pid(self, event: Event) -> int | None:
        """Return the PID the event kills now (None when its target is not running)."""
        if event.kind == "node":
            handle = self.nodes[event.target or ""]
            return handle.pid if handle.running() else None
        if self.superlink is None:
            return None
        if event.kind == "superlink":
            return self.superlink.pid if self.superlink.running() else None
        return next((p for p in descendants(self.superlink.pid) if "flwr-serverapp" in cmdline(p)), None)

    def inject_all(self, events: list[Event]) -> None:
        """Kill every event's target with SIGKILL (all before any restart), check, pause, restart, check."""
        killed: list[Event] = []
        for event in events:
            name = f"kill -9 {event.label} (study {event.study}{', at ' + event.seen if event.seen else ''})"
            pid = self._target_pid(event)
            if pid is None:
                self.report.missed[event.kind] += 1
                self.report.events.append({"event": name, "missed": True, "t": self._t()})
                continue
            os.kill(pid, signal.SIGKILL)
            self.report.kills[event.kind] += 1
            self.report.events.append({"event": name, "pid": pid, "t": self._t()})
            logger.warning("chaos: %s (PID %d)", name, pid)
            killed.append(event)
        if not killed:
            return
        time.sleep(0.5)
        label = " + ".join(e.label for e in killed)
        self.check(f"kill -9 {label}")
        restart = [e for e in killed if e.kind != "serverapp"]  # a killed ServerApp: nothing to restart, resume
        if not restart:
            return
        time.sleep(max(e.pause_s for e in restart))
        if any(e.kind == "superlink" for e in restart):
            self.restart_superlink()
            self.report.events.append({"event": "restart superlink", "t": self._t()})
        for event in restart:
            if event.kind == "node":
                self.restart_node(event.target or "")
                self.report.events.append({"event": f"restart node {event.target}", "t": self._t()})
        self.check(f"restart after kill -9 {label}")

    def _t(self) -> float:
        return round(time.monotonic() - self.t0, 1)

    def ensure_up(self) -> None:
        """Before a (re)submission: restart the SuperLink or any node that is not running."""
        if self.superlink is None or not self.superlink.running():
            self.restart_superlink()
        for site, handle in self.nodes.items():
            if not handle.running():
                self.restart_node(site)

    # ------------------------------------------------------------------ studies
    def fire_due(self, study: dict[str, Any], staged: list[Event], since: float) -> None:
        """Fire the stage triggers the study's progress file says are due (removed from ``staged``)."""
        progress = read_progress(study["dir"])
        due = []
        for event in list(staged):
            state = trigger_state(event, progress, since=since)
            if state == "waiting":
                continue
            staged.remove(event)
            assert progress is not None  # due or passed: a fresh progress file was read
            seen = f"round {progress.get('round')} {progress.get('stage')}"
            if state == "passed":
                self.report.triggers_passed.append(f"{event.label} (study {event.study}; saw {seen})")
                logger.warning("chaos: trigger %s passed unseen (the study is at %s)", event.label, seen)
                continue
            event.seen = seen
            due.append(event)
        if due:
            self.inject_all(due)

    def attempt(self, study: dict[str, Any], n: int, events: list[Event]) -> tuple[bool, str, str]:
        """Submit (n = 0) or resume the study with ``fedcare run``; fire ``events`` on time or stage.

        Stage triggers that did not fire stay in ``events`` (the caller carries them to the resume).
        """
        resume = n > 0
        file = study["resume_file"] if resume and not self.resume_flag else study["file"]
        argv = [self.fedcare, "run", str(file), "--superlink", self.control, "--certs", str(self.certs.root),
                "--control-token", str(self.token), "--timeout", str(self.attempt_timeout)]  # fmt: skip
        if resume and self.resume_flag:
            argv.append("--resume")
        self.pin(file)
        log = self.root / "runs" / f"{study['name']}-{n}.log"
        started = time.monotonic()
        since = time.time()  # a progress file older than this is an earlier attempt's
        self.run_handle = spawn(argv, log_path=log)
        pending = sorted((e for e in events if e.round is None), key=lambda e: e.offset_s)
        events[:] = [e for e in events if e.round is not None]  # stage triggers; the unfired carry over
        deadline = started + self.attempt_timeout + 180.0
        try:
            while self.run_handle.running() and time.monotonic() < deadline:
                if pending and time.monotonic() - started >= pending[0].offset_s:
                    self.inject(pending.pop(0))
                if events:
                    self.fire_due(study, events, since)
                time.sleep(POLL_S)
        finally:
            stop_process(self.run_handle, timeout=5.0)
        output = log.read_text(errors="replace")
        completed = _COMPLETED.search(output) is not None
        self.check(f"end of `fedcare run` attempt {n} of {study['name']}")
        history_file = study["dir"] / HISTORY_FILE
        reason = ""
        if not completed:
            history = json.loads(history_file.read_text()) if history_file.is_file() else {}
            ended = _ENDED.search(output)
            reason = str(history.get("reason") or (ended.group(3) if ended else "") or "").strip()
        tail = "\n".join(output.strip().splitlines()[-3:])
        return completed, reason, tail

    def run(self) -> Report:
        """Run every study under the schedule; return the report."""
        self.t0 = time.monotonic()
        try:
            self.setup()
            for i, study in enumerate(self.studies):
                events = [e for e in self.schedule if e.study == i]
                carried = list(events)  # stage triggers not yet fired carry over to the resumes
                attempts, completed, reason, reasons = 0, False, "", []
                for n in range(self.max_resumes + 1):
                    self.ensure_up()
                    attempts += 1
                    completed, reason, tail = self.attempt(study, n, carried)  # leaves the unfired triggers
                    if completed:
                        break
                    reasons.append(reason or tail)
                    logger.warning("chaos: %s attempt %d failed: %s", study["name"], n, reason or tail)
                self.check_study(study, completed, reason)
                self.report.studies.append({
                    "name": study["name"], "kind": study["kind"], "completed": completed,
                    "attempts": attempts, "reason": reason, "reasons": reasons,
                    "faults": [e.label + (f" (at {e.seen})" if e.seen else "") for e in events],
                    "triggers_unfired": [e.label for e in carried],
                })  # fmt: skip
        finally:
            self.stop_all()
            self.report.elapsed_s = time.monotonic() - self.t0
        return self.report


def run_chaos(root: Path, *, seed: int, kinds: list[str], rounds: int = 3, faults: int = 1,
              fault_kinds: tuple[str, ...] = FAULTS, max_resumes: int = 2, attempt_timeout: float = 420.0,
              offset_range: tuple[float, float] = (5.0, 45.0), min_sites: int = 4,
              triggers: list[Event] | None = None, policy_extra: str = "",
              secure_extra: str = SECURE_EXTRA) -> Report:  # fmt: skip
    """Run one seeded chaos run in ``root``; return its report (every process stopped).

    ``triggers`` are stage-triggered faults (:func:`parse_trigger`; their ``study`` index says
    which study), in addition to ``faults`` random ones per study; ``policy_extra`` is appended
    to every hospital's policy file, ``secure_extra`` to a SecAgg+ study's ``[run]`` table.
    """
    return Chaos(root, seed=seed, kinds=kinds, rounds=rounds, faults=faults, fault_kinds=fault_kinds,
                 max_resumes=max_resumes, attempt_timeout=attempt_timeout, offset_range=offset_range,
                 min_sites=min_sites, triggers=triggers, policy_extra=policy_extra,
                 secure_extra=secure_extra).run()  # fmt: skip


def main() -> None:
    """Command line: run, print the summary, write the JSON report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--studies", nargs="+", choices=["plain", "secagg"], default=["plain", "secagg"] * 3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--faults", type=int, default=1, help="random faults per study (1: single faults)")
    parser.add_argument("--fault", action="append", default=[], metavar="KIND[=SITE]@ROUND:STAGE",
                        help="a stage-triggered fault in every study (repeatable), e.g. node@2:collect-masked-vectors")
    parser.add_argument("--kinds", nargs="+", choices=FAULTS, default=list(FAULTS))
    parser.add_argument("--max-resumes", type=int, default=2)
    parser.add_argument("--attempt-timeout", type=float, default=420.0)
    parser.add_argument("--offset", type=float, nargs=2, default=[5.0, 45.0], help="fault times after submission (s)")
    parser.add_argument("--min-sites", type=int, default=4)
    parser.add_argument("--keep", action="store_true", help="keep the run folder (logs, ledgers)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    try:
        triggers = [parse_trigger(spec, study=i) for i in range(len(args.studies)) for spec in args.fault]
    except TriggerSyntaxError as exc:
        parser.error(str(exc))
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    root = Path(tempfile.mkdtemp(prefix="fedcare-chaos-"))
    try:
        report = run_chaos(root, seed=args.seed, kinds=args.studies, rounds=args.rounds, faults=args.faults,
                           fault_kinds=tuple(args.kinds), max_resumes=args.max_resumes,
                           attempt_timeout=args.attempt_timeout, offset_range=tuple(args.offset),
                           min_sites=args.min_sites, triggers=triggers)  # fmt: skip
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    full = {"summary": report.summary(), "studies": report.studies, "violations": report.violations,
            "events": report.events, "ledgers": report.ledgers, "root": str(root) if args.keep else None}  # fmt: skip
    print(json.dumps(full, indent=1, default=str))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(full, indent=1, default=str) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
