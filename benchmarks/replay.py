"""Replay the scenarios at the top of issue 13 on a real loopback deployment, with stage-triggered faults.

One deployment as ``benchmarks/chaos.py`` builds it (TLS, SuperNode authentication, five heart-
disease hospitals, each with its own key, policy, state folder and ledger; ``min-sites = 4``),
and one study of three rounds per scenario, run one after the other, each submitted with
``fedcare run`` and resumed with ``fedcare run --resume`` while it does not complete. SecAgg+
studies deal 5 shares with a reconstruction threshold of 4, so that SecAgg+ tolerates one lost
site. Faults are ``kill -9`` fired on the study's real progress (``progress.json``; chaos.py's
stage triggers), restarts as docs/deployment.md says:

- ``node-secagg``: one node killed in round 2 of a SecAgg+ study while the masked vectors are
  collected (``node=hungarian@2:collect-masked-vectors``);
- ``serverapp``: the ServerApp killed in round 3 of a plain study once the sites' round-3
  updates are in (``serverapp@3:evaluate``: round 3 is already charged at every site, the
  resume redoes it);
- ``superlink``: the SuperLink killed in round 2 of a plain study while the sites train
  (``superlink@2:train``), restarted from its state folder;
- ``double-node-secagg``: two nodes killed in the same SecAgg+ round
  (``node=va@2:collect-masked-vectors`` and ``node=cleveland-b@2:collect-masked-vectors``):
  three remain, fewer than the threshold and min-sites, so the round must fail with a named
  reason and the resume (both nodes back) complete.

Also available (``--scenarios``): ``serverapp-train`` (``serverapp@3:train``), ``superlink-secagg``
(``superlink@3:collect-masked-vectors``) and ``node-and-serverapp-secagg`` (a node and the
ServerApp killed together in round 2's masked stage).

chaos.py's invariants are checked after every kill, restart and end of a ``fedcare run`` (no site
above its budget, no ledger's ε lower than before, each study completed or failed with a named
reason, final model equal to the last checkpoint). Every hospital's policy allows
``max_epsilon_total = 15`` (four studies of at most 3.0 each; the default 6.0 would refuse the
third study, which is not what is being replayed).

Usage::

    python benchmarks/replay.py --out benchmarks/results/replay.json
    python benchmarks/replay.py --scenarios node-secagg double-node-secagg
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import chaos  # noqa: E402

#: scenario -> (study kind, stage triggers)
SCENARIOS: dict[str, tuple[str, tuple[str, ...]]] = {
    "node-secagg": ("secagg", ("node=hungarian@2:collect-masked-vectors",)),
    "serverapp": ("plain", ("serverapp@3:evaluate",)),
    "superlink": ("plain", ("superlink@2:train",)),
    "double-node-secagg": ("secagg", ("node=va@2:collect-masked-vectors", "node=cleveland-b@2:collect-masked-vectors")),
    # more of the same kinds (not in the default run)
    "serverapp-train": ("plain", ("serverapp@3:train",)),
    "superlink-secagg": ("secagg", ("superlink@3:collect-masked-vectors",)),
    "node-and-serverapp-secagg": ("secagg", ("node=va@2:collect-masked-vectors", "serverapp@2:collect-masked-vectors")),
}
DEFAULT = ["node-secagg", "serverapp", "superlink", "double-node-secagg"]
SECURE_EXTRA = "secure-aggregation = true\nsecagg-num-shares = 5\nsecagg-reconstruction-threshold = 4\n"
POLICY_EXTRA = "max_epsilon_total = 15.0\n"


def scenario_rows(report: chaos.Report, names: list[str]) -> list[dict[str, Any]]:
    """Return one table row per scenario (study ``i`` of the run is scenario ``names[i]``)."""
    rows = []
    for i, (name, study) in enumerate(zip(names, report.studies)):
        ledgers = {k: v for k, v in report.ledgers.items() if k.split("/", 1)[1].startswith(study["name"])}
        kills = [e["event"] for e in report.events if f"(study {i}" in e["event"] and not e.get("missed")]
        missed = [e["event"] for e in report.events if f"(study {i}" in e["event"] and e.get("missed")]
        ratios = [v["epsilon"] / float(v["budget"]) for v in ledgers.values() if v.get("budget")]
        worst = max(ledgers.values(), key=lambda v: v["epsilon"] / float(v["budget"] or 1.0), default=None)
        rows.append({
            "scenario": name,
            "study": study["name"],
            "kills": kills,
            "kills_missed": missed,
            "outcome": "completed" if study["completed"] else "failed",
            "attempts": study["attempts"],
            "attempt_reasons": study["reasons"],
            "rounds_retried_site_rounds": sum(v.get("retries", 0) for v in ledgers.values()),
            "rounds_voided_site_rounds": sum(v.get("rounds_voided", 0) for v in ledgers.values()),
            "reserve_used_max": max((v.get("retries", 0) for v in ledgers.values()), default=0),
            "reserve": max((v.get("retry_reserve", 0) for v in ledgers.values()), default=0),
            "max_epsilon": None if worst is None else worst["epsilon"],
            "budget": None if worst is None else worst["budget"],
            "max_epsilon_over_budget": round(max(ratios), 4) if ratios else None,
            "overruns": sum(1 for v in report.violations
                            if v["invariant"] == "budget" and study["name"] in v["detail"]),
            "violations": [v for v in report.violations if study["name"] in v["detail"] or f"(study {i}" in v["after"]],
            "ledger_rounds": {k.split("/", 1)[0]: v["rounds"] for k, v in ledgers.items()},
        })  # fmt: skip
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """Return the rows as a Markdown table."""
    lines = ["| scenario | kills | outcome | attempts | rounds retried / voided (site-rounds) | reserve used "
             "(max per site, of) | max ε / budget | overruns |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        kills = "; ".join(k.removeprefix("kill -9 ") for k in r["kills"]) or "none"
        eps = "-" if r["max_epsilon"] is None else f"{r['max_epsilon']:.4f} / {float(r['budget']):.4f}"
        lines.append(f"| {r['scenario']} | {kills} | {r['outcome']} | {r['attempts']} | "
                     f"{r['rounds_retried_site_rounds']} / {r['rounds_voided_site_rounds']} | "
                     f"{r['reserve_used_max']} of {r['reserve']} | {eps} | {r['overruns']} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    """Command line: replay the scenarios, print the table and the JSON report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenarios", nargs="+", choices=list(SCENARIOS), default=DEFAULT)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-resumes", type=int, default=2)
    parser.add_argument("--attempt-timeout", type=float, default=900.0, help="bound of one `fedcare run` (s)")
    parser.add_argument("--keep", action="store_true", help="keep the run folder (logs, ledgers)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    triggers = [chaos.parse_trigger(spec, study=i) for i, name in enumerate(args.scenarios)
                for spec in SCENARIOS[name][1]]  # fmt: skip
    root = Path(tempfile.mkdtemp(prefix="fedcare-replay-"))
    try:
        report = chaos.run_chaos(
            root, seed=0, kinds=[SCENARIOS[n][0] for n in args.scenarios], rounds=args.rounds, faults=0,
            max_resumes=args.max_resumes, attempt_timeout=args.attempt_timeout, triggers=triggers,
            policy_extra=POLICY_EXTRA, secure_extra=SECURE_EXTRA,
        )  # fmt: skip
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    rows = scenario_rows(report, args.scenarios)
    full = {"summary": report.summary(), "scenarios": rows, "studies": report.studies,
            "violations": report.violations, "events": report.events, "ledgers": report.ledgers,
            "root": str(root) if args.keep else None}  # fmt: skip
    print(json.dumps(full, indent=1, default=str))
    print(table(rows))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(full, indent=1, default=str) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
