"""``fedcare compare RUN_DIR...``: runs side by side, one column per run, from their ``summary.json``.

Rows: what the run was (scenario, status, rounds, strategy, seed), every configuration value that
differs between the runs (``training.lr``, ``privacy.target_epsilon``…: the values a sweep
changed), the final global metrics of the federated model and of each baseline (with 95 %
intervals where the summary has them), the largest ε any site spent, the wall time, and the
fedcare version and git commit. Printed as a rich table, or as CSV (``--csv``) for scripts.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Final

import typer

from ..server.tracking import flatten_params

__all__ = ["CompareError", "compare_command", "compare_rows", "load_summary"]

_SUMMARY: Final = "summary.json"
_HIDDEN: Final = frozenset({"num-examples", "num_examples", "threshold", "intervals"})


class CompareError(ValueError):
    """A folder to compare holds no readable ``summary.json``."""


def load_summary(run: Path | str) -> dict[str, Any]:
    """Return the ``summary.json`` of a run folder (or the file itself).

    Raises
    ------
    CompareError
        When the file is missing or not JSON.
    """
    path = Path(run).expanduser()
    path = path / _SUMMARY if path.is_dir() else path
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CompareError(f"{path} not found; pass run folders written by `fedcare simulate` (they hold {_SUMMARY})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CompareError(f"{path} is not a readable {_SUMMARY} ({type(exc).__name__}); rerun that scenario") from None
    if not isinstance(data, dict):
        raise CompareError(f"{path} is not a {_SUMMARY} of fedcare; pass run folders written by `fedcare simulate`")
    return data


def _fmt(value: Any) -> str:
    """Format a value ("-" when missing or NaN)."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _with_interval(metrics: Mapping[str, Any], name: str, intervals: Mapping[str, Any] | None) -> str:
    """Return ``metrics[name]`` and its interval when one is given (``x [low, high]``)."""
    text = _fmt(metrics.get(name))
    bounds = (intervals or {}).get(name)
    if bounds is None and f"{name}_low" in metrics and f"{name}_high" in metrics:
        bounds = (metrics[f"{name}_low"], metrics[f"{name}_high"])
    if bounds is None and isinstance(metrics.get("intervals"), Mapping):
        bounds = metrics["intervals"].get(name)
    if text != "-" and isinstance(bounds, (list, tuple)) and len(bounds) == 2 and None not in bounds:
        text += f" [{float(bounds[0]):.4f}, {float(bounds[1]):.4f}]"
    return text


def _scalar_names(*tables: Mapping[str, Any]) -> list[str]:
    """Return the scalar metric names of ``tables`` (no counts, nested tables or interval bounds), sorted."""
    names = {
        k for t in tables for k, v in t.items()
        if k not in _HIDDEN and not isinstance(v, (Mapping, list)) and not k.endswith(("_low", "_high"))
    }  # fmt: skip
    return sorted(names)


def _max_epsilon(summary: Mapping[str, Any]) -> float | None:
    """Return the largest ε any site spent (None without DP)."""
    values = [p.get("epsilon") for p in (summary.get("privacy") or {}).values() if isinstance(p, Mapping)]
    numbers = [float(v) for v in values if isinstance(v, (int, float))]
    return max(numbers) if numbers else None


def compare_rows(runs: Sequence[Path | str]) -> tuple[list[str], list[list[str]]]:
    """Return the header (``"", run1, run2…``) and the rows of the comparison of ``runs``.

    Raises
    ------
    CompareError
        When a run folder holds no readable ``summary.json``.
    """
    summaries = [load_summary(r) for r in runs]
    headers = ["", *(Path(r).expanduser().resolve().name for r in runs)]
    rows: list[list[str]] = []

    def row(label: str, values: Sequence[Any]) -> None:
        rows.append([label, *(v if isinstance(v, str) else _fmt(v) for v in values)])

    row("scenario", [s.get("scenario") for s in summaries])
    row("status", [s.get("status") for s in summaries])
    row("rounds", [f"{s.get('rounds_completed', '-')}/{s.get('rounds_planned', '-')}" for s in summaries])
    row("strategy", [s.get("strategy") for s in summaries])
    row("seed", [(s.get("provenance") or {}).get("seed", (s.get("configuration") or {}).get("seed")) for s in summaries])
    configs = [flatten_params(s.get("configuration") or {}) for s in summaries]
    if len(summaries) > 1:
        for key in sorted(set().union(*configs)):
            values = [c.get(key, "-") for c in configs]
            if len(set(values)) > 1:
                row(key, values)
    finals = [s.get("final_global") or {} for s in summaries]
    for name in _scalar_names(*finals):
        row(f"federated {name}", [_with_interval(f, name, s.get("final_global_intervals"))
                                  for f, s in zip(finals, summaries, strict=True)])  # fmt: skip
    arms = sorted({a for s in summaries for a, r in (s.get("baselines") or {}).items() if isinstance(r, Mapping)})
    for arm in arms:
        results = [(s.get("baselines") or {}).get(arm) or {} for s in summaries]
        for name in _scalar_names(*results):
            row(f"{arm} {name}", [_with_interval(r, name, None) for r in results])
    row("max ε (sites)", [_max_epsilon(s) for s in summaries])
    row("wall time s", [s.get("wall_time_s") for s in summaries])
    row("fedcare", [((s.get("provenance") or {}).get("versions") or {}).get("fedcare") for s in summaries])
    row("git commit", [((s.get("provenance") or {}).get("git_commit") or "-")[:12] for s in summaries])
    return headers, rows


def compare_command(
    runs: Annotated[list[Path], typer.Argument(help="Run folders written by `fedcare simulate` (or their summary.json).")],
    as_csv: Annotated[bool, typer.Option("--csv", help="Print CSV instead of a table (for scripts and spreadsheets).")] = False,
) -> None:
    """Compare runs side by side: what differs in their configuration, their metrics, ε and time."""
    from rich.console import Console  # noqa: PLC0415 - keep --help fast
    from rich.table import Table  # noqa: PLC0415
    from rich.text import Text  # noqa: PLC0415

    try:
        headers, rows = compare_rows(runs)
    except CompareError as exc:
        Console(stderr=True, soft_wrap=True).print("[red]error:[/red] " + " ".join(str(exc).split()), highlight=False)
        raise typer.Exit(2) from None
    if as_csv:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["key", *headers[1:]])
        writer.writerows(rows)
        typer.echo(buffer.getvalue(), nl=False)
        return
    table = Table(title=f"{len(runs)} run(s) side by side")
    for i, name in enumerate(headers):
        table.add_column(name, justify="left" if i == 0 else "right", overflow="fold")
    for values in rows:
        table.add_row(*(Text(v) for v in values))  # plain text: a value is never read as markup
    Console().print(table)
