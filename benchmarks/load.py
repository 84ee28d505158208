"""Load: one SuperLink with 5, 20 and 50 hospital nodes on one machine (issue 13 item 9).

One TLS + node-authentication SuperLink (``fedcare.server.deploy.start_superlink``) on
127.0.0.1; hospital nodes started with ``fedcare.client.deploy.start_node`` (the design's
defaults: warm SuperExec with torch and the site's data loaded, tasks forked from it, idle
poll 0.5 s), each with its own key registered by its public half. The nodes are the UCI
heart-disease sites Cleveland, Hungarian and VA (``simulations/sites/heart_*.toml``) cycled, each
node with its own site name, ledger and state folder. The same SuperLink runs one study per
node count (``--counts``, default 5 20 50): nodes are added until that many are up, then a
plain FedAvg study of a logistic regression with ``min-sites`` = that count runs ``--rounds``
rounds (all sites sampled, federated evaluation on; with ``--sample N``, N sites sampled per
round and ``min-sites`` = N, so that what grows with the count is the registered, polling nodes). Every node's policy accepts plain rounds
and pins the studies' app hashes.

Measured (printed, and written as JSON with ``--out``):

- node start: wall time of ``start_node`` per node (nodes are started ``--parallel`` at a time);
- round latency: wall time between flwr's ``[ROUND k/N]`` log lines as ``flwr run --stream``
  delivers them (flwr streams every 0.5 s, so single rounds carry about +-0.5 s), the last round
  ending at "Strategy execution finished";
- memory: proportional set size (PSS, ``/proc/PID/smaps_rollup``) of each node's process tree
  (SuperNode + warm SuperExec + running tasks), sampled every ``--sample-s`` seconds during the
  study; per node its largest sample, then the median and largest over nodes; the SuperLink's
  tree (SuperLink + ServerApp) likewise. PSS divides shared pages (torch's libraries, the
  forked tasks' copy-on-write pages) among the processes that map them, so the sum over
  processes is the machine's real memory use; a node's PSS therefore falls as nodes are added.

Every process is stopped by PID in ``finally`` blocks; every wait is bounded.

Usage::

    python benchmarks/load.py --counts 5 20 50 --rounds 3 --out benchmarks/results/load.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fedcare.client.deploy import NODE_PID, NodeSettings, NodeStarted, pin_app_in_policy, start_node
from fedcare.privacy.certs import generate_node_key
from fedcare.server.deploy import register_node, start_superlink, submit_run
from fedcare.server.flower_app import app_hash, build_flower_app, load_study
from fedcare.supervise import NotRunningError, ProcessHandle, stop_pid_file, stop_process

from deploy_harness import children, free_port, prepare_coordinator, write_heart_study

REPO = Path(__file__).resolve().parents[1]
SITE_FILES = [REPO / "simulations" / "sites" / f"heart_{s}.toml" for s in ("cleveland", "hungarian", "va")]
_ROUND = re.compile(r"\[ROUND (\d+)/(\d+)\]")
_FINISHED = re.compile(r"Strategy execution finished")


def tree_pss_kib(pid: int) -> int:
    """Return the summed PSS (KiB) of ``pid`` and all its descendants (0 when gone)."""
    total, todo, seen = 0, [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
                    break
        except OSError:
            continue
        todo += children(p)
    return total


def mem_available_gib() -> float:
    """Return the machine's MemAvailable (GiB, /proc/meminfo)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024**2
    return 0.0


class Sampler:
    """Samples the PSS of process trees in a thread; keeps each tree's largest value."""

    def __init__(self, pids: dict[str, int], every_s: float) -> None:
        self.pids, self.every_s = pids, every_s
        self.peak: dict[str, int] = dict.fromkeys(pids, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            for name, pid in self.pids.items():
                self.peak[name] = max(self.peak[name], tree_pss_kib(pid))
            self._stop.wait(self.every_s)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)


def main() -> None:  # noqa: PLR0915 - one linear script
    """Run the load benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[5, 20, 50])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--parallel", type=int, default=4, help="nodes started at a time")
    parser.add_argument("--sample-s", type=float, default=1.0)
    parser.add_argument("--run-timeout", type=float, default=1800.0)
    parser.add_argument("--reserve-gib", type=float, default=4.0,
                        help="memory left to the machine's other users; a node count that would not leave it is skipped")
    parser.add_argument("--sample", type=int, default=0,
                        help="sites sampled per round (fraction-train = fraction-evaluate = N / nodes, "
                             "min-sites = N); 0: every node trains every round")
    parser.add_argument("--cold", action="store_true",
                        help="nodes as light as the design allows: no warm SuperExec (flwr starts a fresh "
                             "process per message; `fedcare node start --cold`)")
    parser.add_argument("--poll-interval", type=float, default=None,
                        help="idle task polling of each node in seconds (default: start_node's)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    counts = sorted(args.counts)
    root = Path(tempfile.mkdtemp(prefix="fedcare-load-"))
    coordinator = prepare_coordinator(root)
    bundle, fleet, conn = coordinator.bundle_ca, coordinator.address, coordinator.connection
    policy = root / "policy.toml"
    policy.write_text("require_secure_aggregation = false\n", encoding="utf-8")
    studies = {}
    for count in counts:
        sampled = min(args.sample, count) if args.sample else count
        fraction = (f"fraction-train = {sampled / count!r}\nfraction-evaluate = {sampled / count!r}\n"
                    if sampled < count else "")
        path = write_heart_study(
            root / f"study-{count}.toml", name=f"load-{count}", description=f"load benchmark, {count} nodes",
            rounds=args.rounds, min_sites=sampled, round_timeout_s=600.0, checkpoint_dir=root / f"model-{count}",
            extra=fraction,
        )  # fmt: skip
        studies[count] = path
        pin_app_in_policy(policy, app_hash(build_flower_app(load_study(path), root / f"app-{count}")))
    superlink: ProcessHandle | None = None
    nodes: list[NodeStarted] = []
    results: list[dict[str, Any]] = []
    started_at = time.monotonic()
    try:
        superlink = start_superlink(coordinator.superlink_settings)

        def add_node(i: int) -> NodeStarted:
            name = f"site{i:03d}"
            keys = generate_node_key(root / "hospitals" / name, name)
            register_node(keys.public_key, conn, flwr_home=root / "flwr-home" / name, timeout=300.0)
            return start_node(
                NodeSettings(
                    site_manifest=SITE_FILES[i % len(SITE_FILES)],
                    site_name=name,
                    superlink=fleet,
                    port=free_port(),
                    state_dir=root / "nodes" / name,
                    ca_cert=bundle,
                    auth_key=keys.private_key,
                    ledger_dir=root / "ledgers" / name,
                    extra_node_config={"policy": str(policy)},
                    warm=not args.cold,
                    **({"poll_interval_s": args.poll_interval} if args.poll_interval is not None else {}),
                ),
                ready_timeout=600.0,
            )

        node_ready: list[float] = []
        skipped: list[dict[str, Any]] = []
        for count in counts:
            if nodes:  # refuse to exhaust a shared machine's memory: measured size x nodes to add
                per_node = statistics.median(tree_pss_kib(n.handle.pid) for n in nodes) / 1024
                need = per_node * (count - len(nodes)) * 1.2 / 1024 + args.reserve_gib
                if need > mem_available_gib():
                    skipped.append({"nodes": count, "reason": f"needs {need:.1f} GiB ({per_node:.0f} MiB "
                                    f"per node x {count - len(nodes)} more + {args.reserve_gib} GiB reserve), "
                                    f"{mem_available_gib():.1f} GiB available"})  # fmt: skip
                    print(json.dumps(skipped[-1]), flush=True)
                    break
            t0 = time.monotonic()
            with ThreadPoolExecutor(max_workers=args.parallel) as pool:
                futures = [pool.submit(add_node, i) for i in range(len(nodes), count)]
                for future in futures:  # each bounded by start_node's ready_timeout
                    started = future.result()
                    nodes.append(started)
                    node_ready.append(started.ready_s)
            add_s = time.monotonic() - t0
            idle = {n.site_name: tree_pss_kib(n.handle.pid) for n in nodes}
            pids = {n.site_name: n.handle.pid for n in nodes}
            pids["superlink"] = superlink.pid
            stamps: dict[int, float] = {}
            finished: list[float] = []

            def on_line(line: str, stamps: dict[int, float] = stamps, finished: list[float] = finished) -> None:
                now = time.monotonic()
                if (m := _ROUND.search(line)) and int(m.group(1)) not in stamps:
                    stamps[int(m.group(1))] = now
                elif _FINISHED.search(line) and not finished:
                    finished.append(now)

            # pinned again just before submitting: the hash covers every run-config default
            folder = build_flower_app(load_study(studies[count]), root / f"app-{count}")
            pin_app_in_policy(policy, app_hash(folder))
            with Sampler(pids, args.sample_s) as sampler:
                outcome = submit_run(
                    folder,
                    conn,
                    timeout=args.run_timeout,
                    on_line=on_line,
                    flwr_home=root / "flwr-home" / "coordinator",
                )
            ends = [stamps[k] for k in sorted(stamps)] + finished[:1]
            rounds_s = [round(b - a, 2) for a, b in zip(ends, ends[1:])]
            history_file = root / f"model-{count}" / "history.json"
            history = json.loads(history_file.read_text()) if history_file.is_file() else {}
            node_peaks = [sampler.peak[n.site_name] / 1024 for n in nodes]
            row = {
                "nodes": count,
                "status": outcome.status,
                "history_status": history.get("status"),
                "rounds_recorded": len(history.get("rounds", [])),
                "sites_trained_last_round": len((history.get("rounds") or [{}])[-1].get("site_train", [])),
                "run_s": round(outcome.elapsed_s, 1),
                "round_s": rounds_s,
                "round_s_median": round(statistics.median(rounds_s), 2) if rounds_s else None,
                "nodes_added_s": round(add_s, 1),
                "node_idle_pss_mib_median": round(statistics.median(idle.values()) / 1024, 1),
                "node_peak_pss_mib_median": round(statistics.median(node_peaks), 1),
                "node_peak_pss_mib_max": round(max(node_peaks), 1),
                "nodes_peak_pss_mib_sum": round(sum(node_peaks), 1),
                "superlink_peak_pss_mib": round(sampler.peak["superlink"] / 1024, 1),
            }
            results.append(row)
            print(json.dumps(row), flush=True)
        summary = {
            "skipped": skipped,
            "node_ready_s_median": round(statistics.median(node_ready), 1),
            "node_ready_s_max": round(max(node_ready), 1),
        }
    finally:
        for node in nodes:
            stop_process(node.handle, timeout=10.0)
        for pid_file in sorted((root / "nodes").glob(f"*/{NODE_PID}")):  # started, never reported
            try:
                stop_pid_file(pid_file, "SuperNode", timeout=10.0)
            except NotRunningError:
                pass
        if superlink is not None:
            stop_process(superlink, timeout=10.0)
        shutil.rmtree(root, ignore_errors=True)
    report = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "loadavg_at_end": os.getloadavg()},  # fmt: skip
        "command": " ".join(["python", *sys.argv]),
        "nodes": "cold (no warm SuperExec)" if args.cold else "warm (the default)",
        "poll_interval_s": args.poll_interval,
        "rounds": args.rounds,
        "sampled_per_round": args.sample or "all",
        "results": results,
        **summary,
        "total_s": round(time.monotonic() - started_at, 1),
    }
    print(json.dumps(report, indent=1))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
