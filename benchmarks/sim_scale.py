"""Simulation at scale: 100 virtual hospitals on Flower's simulation engine (Ray).

Runs ``simulations/scenarios/scale_pneumonia_100.toml`` (PneumoniaMNIST, 100 hospitals,
Dirichlet alpha = 0.5, small CNN, FedAvg, 10% of hospitals sampled per round) through
:func:`fedcare.simulations.runner.run_scenario` and records:

- wall time (whole ``run_scenario``: partitioning, writing the hospitals, Ray start-up, rounds,
  plots) and the federated part, and the time of each round (from the ``on_round`` callback:
  round 1 includes Ray start-up);
- peak memory of the whole process tree (this process + Ray's GCS, raylet, workers...): every
  0.5 s, the sum over the tree of RSS (``/proc/<pid>/status`` VmRSS; counts shared pages once
  per process, e.g. torch libraries and Ray's object store, so it over-states) and of PSS
  (``/proc/<pid>/smaps_rollup``, shared pages divided among the processes sharing them);
- the final global model evaluated on the whole PneumoniaMNIST test split (624 images).

psutil is not installed here, so /proc is read directly. Prints a table and writes JSON.

Usage::

    python benchmarks/sim_scale.py --out benchmarks/results/sim_scale.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import threading
import time
import tomllib
from pathlib import Path
from typing import Any

import torch

from fedcare.client.loaders import load_site_file
from fedcare.client.manifest import load_manifest
from fedcare.client.metrics import evaluate
from fedcare.server.checkpoint import build_saved_model, load_model_file
from fedcare.simulations.runner import run_scenario
from fedcare.simulations.scenario import Scenario

ROOT = Path(__file__).resolve().parents[1]
SCENARIO = ROOT / "simulations" / "scenarios" / "scale_pneumonia_100.toml"


def _children() -> dict[int, list[int]]:
    """Return {ppid: [pid, ...]} for every process (from /proc/<pid>/stat)."""
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def tree_pids(root: int) -> list[int]:
    """Return ``root`` and all its descendants."""
    tree, out, todo = _children(), [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(tree.get(pid, []))
    return out


def _kb(path: str, key: str) -> int:
    """Return the kB value of ``key`` in a /proc status-like file (0 when unreadable)."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


class TreeMemorySampler(threading.Thread):
    """Sample the process tree's summed RSS and PSS every ``interval`` seconds; keep the peaks."""

    def __init__(self, root: int, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.root, self.interval = root, interval
        self.peak_rss_kb = self.peak_pss_kb = self.peak_procs = 0
        self.samples: list[tuple[float, int, int, int]] = []
        self._halt = threading.Event()
        self._t0 = time.perf_counter()

    def sample(self) -> None:
        """Take one sample."""
        pids = tree_pids(self.root)
        rss = sum(_kb(f"/proc/{p}/status", "VmRSS:") for p in pids)
        pss = sum(_kb(f"/proc/{p}/smaps_rollup", "Pss:") for p in pids)
        self.peak_rss_kb, self.peak_pss_kb = max(self.peak_rss_kb, rss), max(self.peak_pss_kb, pss)
        self.peak_procs = max(self.peak_procs, len(pids))
        self.samples.append((round(time.perf_counter() - self._t0, 2), len(pids), rss, pss))

    def run(self) -> None:
        """Sample until stopped."""
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.interval)

    def stop(self) -> None:
        """Stop sampling (after one last sample)."""
        self._halt.set()
        self.join(timeout=5)
        self.sample()


def scenario_with(
    path: Path, *, hospitals: int | None = None, rounds: int | None = None, min_per_site: int | None = None,
    evaluate_with_train: bool = False,
) -> Scenario:
    """Return the scenario at ``path`` with the given overrides (``None`` keeps the file's value)."""
    raw = tomllib.loads(path.read_text())
    if hospitals is not None:
        raw["partition"]["hospitals"] = hospitals
        raw["name"] = f"{raw['name'].rsplit('-', 1)[0]}-{hospitals}"
    if rounds is not None:
        raw["rounds"] = rounds
    if min_per_site is not None:
        raw["partition"]["min_per_site"] = min_per_site
        raw.setdefault("policy", {})["min_cohort_size"] = min_per_site
    if evaluate_with_train:
        raw.setdefault("simulation", {})["evaluate_with_train"] = True
    return Scenario.model_validate(raw, context={"base_dir": path.resolve().parent})


def _tiled(scenario: Scenario, times: int, folder: Path) -> Scenario:
    """Return ``scenario`` reading its images_npz with every split repeated ``times`` times (written to ``folder``)."""
    import numpy as np  # noqa: PLC0415

    source = scenario.data
    manifest = tomllib.loads(Path(source.path).read_text())  # type: ignore[union-attr]
    npz = load_manifest(source.path).data.path  # type: ignore[union-attr]  # ${FEDCARE_DATA_ROOT} resolved
    with np.load(npz) as data:
        arrays = {k: np.concatenate([data[k]] * times) for k in data.files}
    np.savez(folder / "tiled.npz", **arrays)
    manifest["data"]["path"] = str(folder / "tiled.npz")
    lines = [f"{k} = {json.dumps(v)}" for k, v in manifest.items() if not isinstance(v, dict)]
    for table, values in manifest.items():
        if isinstance(values, dict):
            lines += [f"[{table}]", *(f"{k} = {json.dumps(v)}" for k, v in values.items())]
    (folder / "site.toml").write_text("\n".join(lines) + "\n")
    raw = scenario.model_dump(mode="json", exclude_unset=True)
    raw["data"] = {"kind": "manifest", "path": str(folder / "site.toml")}
    return Scenario.model_validate(raw)


def main(argv: list[str] | None = None) -> int:
    """Run the scale scenario once; print the table; write JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", type=Path, default=SCENARIO)
    parser.add_argument("--hospitals", type=int, help="override [partition] hospitals")
    parser.add_argument("--rounds", type=int, help="override rounds")
    parser.add_argument("--min-per-site", type=int, help="override [partition] min_per_site (and the policy's cohort)")
    parser.add_argument("--evaluate-with-train", action="store_true",
                        help="evaluation rides in the next round's train messages (one exchange per round)")
    parser.add_argument("--fraction", type=float, help="override the fraction of hospitals sampled per round "
                        "(training and evaluation)")
    parser.add_argument("--tile", type=int, default=1,
                        help="repeat every split of the scenario's images_npz this many times (10,000 hospitals "
                             "need more than PneumoniaMNIST's 3,882 training images; an infrastructure test)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "sim_scale.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    scenario = scenario_with(args.scenario, hospitals=args.hospitals, rounds=args.rounds,
                             min_per_site=args.min_per_site, evaluate_with_train=args.evaluate_with_train)
    tiled = tempfile.TemporaryDirectory(prefix="fedcare-tiled-")
    if args.tile > 1:
        scenario = _tiled(scenario, args.tile, Path(tiled.name))
    if args.fraction is not None:
        sim = scenario.simulation.model_copy(update={"fraction_train": args.fraction, "fraction_evaluate": args.fraction})
        scenario = scenario.model_copy(update={"simulation": sim})
    round_times: list[float] = []
    load_before = os.getloadavg()
    sampler = TreeMemorySampler(os.getpid())
    sampler.start()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fedcare-scale-") as tmp:
        summary = run_scenario(scenario, Path(tmp) / "run", on_round=lambda rec: round_times.append(time.perf_counter() - t0))
        wall = time.perf_counter() - t0
        sampler.stop()
        arrays, meta = load_model_file(summary.files["model"])
        model = build_saved_model(arrays, meta)
        assert scenario.data.kind == "manifest"
        full = load_site_file(scenario.data.path)  # type: ignore[union-attr]
        full_test = {k: float(v) for k, v in evaluate(model, full.test, full.task).items()}
    per_round = [b - a for a, b in zip([0.0, *round_times], round_times)]
    result: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": f"{platform.platform()}, {os.cpu_count()} CPUs",
        "scenario": str(args.scenario),
        "overrides": {"hospitals": args.hospitals, "rounds": args.rounds, "min_per_site": args.min_per_site,
                      "evaluate_with_train": args.evaluate_with_train, "tile": args.tile,
                      "fraction": args.fraction},
        "hospitals": len(summary.hospitals),
        "train_sizes": {"min": min(h["train"] for h in summary.hospitals),
                        "max": max(h["train"] for h in summary.hospitals),
                        "total": sum(h["train"] for h in summary.hospitals)},
        "status": summary.status,
        "rounds_completed": summary.rounds_completed,
        "rounds_planned": summary.rounds_planned,
        "sites_trained_per_round": [len(r.get("site_train", {})) for r in summary.rounds],
        "sites_evaluated_per_round": [len(r.get("site_evaluate", {})) for r in summary.rounds],
        "wall_time_s": wall,
        "federated_time_s": summary.federated_time_s,
        "round_end_s": round_times,
        "round_s": per_round,
        "peak_tree_rss_mb": sampler.peak_rss_kb / 1024,
        "peak_tree_pss_mb": sampler.peak_pss_kb / 1024,
        "peak_processes": sampler.peak_procs,
        "final_global_federated_eval": summary.final_global,
        "final_model_full_test": full_test,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "memory_samples": sampler.samples,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print("| quantity | value |\n|---|---|")
    print(f"| hospitals (train sizes) | {result['hospitals']} ({result['train_sizes']['min']}–"
          f"{result['train_sizes']['max']}, total {result['train_sizes']['total']}) |")
    print(f"| rounds completed | {summary.rounds_completed}/{summary.rounds_planned} ({summary.status}) |")
    print(f"| sites trained / evaluated per round | {result['sites_trained_per_round']} / "
          f"{result['sites_evaluated_per_round']} |")
    print(f"| wall time (run_scenario) | {wall:.1f} s |")
    print(f"| federated part (run_simulation) | {summary.federated_time_s:.1f} s |")
    print(f"| per round (round 1 incl. Ray start-up) | {', '.join(f'{t:.1f}' for t in per_round)} s |")
    print(f"| peak memory, process tree | RSS sum {result['peak_tree_rss_mb']:.0f} MB; "
          f"PSS sum {result['peak_tree_pss_mb']:.0f} MB; {sampler.peak_procs} processes |")
    fg = summary.final_global
    print(f"| final model, federated eval (sampled sites) | acc {fg.get('accuracy', float('nan')):.3f}, "
          f"AUROC {fg.get('auroc', float('nan')):.3f} |")
    print(f"| final model, full test ({len(full.test)}) | acc {full_test['accuracy']:.3f}, "
          f"AUROC {full_test['auroc']:.3f} |")
    print(f"| load average before / after | {load_before} / {result['loadavg_after']} |")
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    raise SystemExit(main())
