"""Figures of a benchmark run once per seed: mean and standard deviation, and the JSON file they go to.

Imported by the scripts in this folder (``sys.path[0]`` when they run).
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any


def seeded_arguments(doc: str | None, out: Path) -> argparse.Namespace:
    """Parse ``--seeds`` (default 0 to 4) and ``--out`` (default ``out``) for a script documented by ``doc``."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--out", type=Path, default=out)
    return parser.parse_args()


def mean_std(values: Iterable[float]) -> list[float]:
    """Return ``[mean, sample standard deviation]`` of ``values`` (the deviation is 0.0 for one value)."""
    vals = list(values)
    return [statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0]


def write_seeded_results(
    out: Path, script: str, seeds: Sequence[int], runs: list[dict[str, Any]], table: dict[str, Any]
) -> None:
    """Write ``{"command", "runs", "mean_std": table}`` to ``out`` as JSON and print ``table``."""
    command = f"python benchmarks/{script} --seeds " + " ".join(map(str, seeds))
    out.write_text(json.dumps({"command": command, "runs": runs, "mean_std": table}, indent=2))
    print(json.dumps(table, indent=2))
