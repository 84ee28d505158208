"""What a simulation prints: round progress, the final table, log lines that fit the terminal.

- :class:`RoundProgress`: finished rounds as they come. On a terminal, a live table that fits
  80 columns (round, seconds that round took, the headline metric, the worst site, the largest
  ε spent, refusals; a training-loss column only when some round reports one: SecAgg+ rounds
  release none). When the output is not a terminal (a pipe, a log file, CI), one plain line per
  round instead, printed as the round finishes.
- :func:`summary_renderables`: the final table (federated, pooled, local-only, as released)
  and the lines under it.
- :class:`WrappedFormatter`: log records wrapped to the terminal's width (``COLUMNS``, else 80
  when not a terminal), continuation lines indented.
- :func:`quiet_simulation_notices`: the in-memory ledger notice of the baselines' own
  throw-away ledgers (``baseline-pooled``, ``baseline-local``) is not repeated on the console;
  every other ``fedcare.privacy.ledger`` record still shows.
- :func:`default_out_dir`: a new, timestamped run folder per run (``runs/<time>-<scenario>``).
"""

from __future__ import annotations

import logging
import shutil
import textwrap
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, Final

from rich import box
from rich.console import Console, RenderableType
from rich.live import Live
from rich.table import Table

__all__ = [
    "BASELINE_STUDIES",
    "RUNS_DIR",
    "RoundProgress",
    "WrappedFormatter",
    "default_out_dir",
    "quiet_simulation_notices",
    "summary_renderables",
]

#: the studies of the baselines' in-memory ledgers (simulations.baselines)
BASELINE_STUDIES: Final = frozenset({"baseline-pooled", "baseline-local"})
#: where runs go when no --out is given
RUNS_DIR: Final = Path("runs")
_HEADLINE: Final = ("auroc", "accuracy", "rmse", "mae")
_LEDGER_NOTICE: Final = "in-memory privacy ledger for site %r, study %r"


def _fmt(value: object, digits: int = 4) -> str:
    """Format a number ("-" when missing or NaN)."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _finite(value: object) -> bool:
    """Return whether ``value`` is a number other than NaN."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


def _headline(metrics: Mapping[str, Any]) -> str | None:
    """Return the metric shown first: AUROC, accuracy, RMSE or MAE."""
    return next((k for k in _HEADLINE if k in metrics), None)


class RoundProgress:
    """Finished rounds on ``console``: a live table on a terminal, one plain line per round otherwise.

    Parameters
    ----------
    title : str
        Table title (scenario, strategy, rounds).
    rounds : int
        Rounds planned.
    console : rich.console.Console or None
        Where to print; None prints nothing.
    clock : callable
        Seconds (monotonic); the time of a round is the time since the previous one finished
        (the first: since :meth:`start`).
    """

    def __init__(
        self, title: str, rounds: int, console: Console | None, *, clock: Callable[[], float] = time.perf_counter
    ) -> None:
        self.title = title
        self.rounds = rounds
        self.console = console
        self.clock = clock
        self.rows: list[tuple[Any, float]] = []
        self._last = clock()
        self.live: Live | None = None
        if console is not None and console.is_terminal:
            self.live = Live(self.table(), console=console, refresh_per_second=4, transient=False)

    def start(self) -> None:
        """Start the clock (and the live table on a terminal)."""
        self._last = self.clock()
        if self.live is not None:
            self.live.start()

    def stop(self) -> None:
        """Stop the live table (it stays on screen)."""
        if self.live is not None:
            self.live.stop()

    def __call__(self, record: Any) -> None:
        """Add a finished round (a ``server.checkpoint.RoundRecord``)."""
        now = self.clock()
        seconds, self._last = now - self._last, now
        self.rows.append((record, seconds))
        if self.live is not None:
            self.live.update(self.table(), refresh=True)
        elif self.console is not None:
            self.console.print(self.line(record, seconds), markup=False, highlight=False, soft_wrap=False)

    def line(self, record: Any, seconds: float) -> str:
        """Return the plain progress line of one finished round."""
        metric = _headline(record.evaluate)
        parts = [f"round {record.round}/{self.rounds}", f"{seconds:.1f} s"]
        if metric is not None:
            parts.append(f"{metric} {_fmt(record.evaluate.get(metric))}")
        worst = record.worst_site
        if worst:
            parts.append(f"worst {worst['site']} {_fmt(worst.get('value'))}")
        if _finite(record.train.get("train-loss")):
            parts.append(f"loss {_fmt(record.train.get('train-loss'))}")
        parts.append(f"max ε {_fmt(record.train.get('epsilon'), 3)}")
        parts.append(f"refused {len(record.refusals)}")
        return ", ".join(parts)

    def table(self) -> Table:
        """Return the table of the rounds so far (fits 80 columns with site names up to ~12 characters)."""
        records = [r for r, _ in self.rows]
        metric = next((m for m in (_headline(r.evaluate) for r in records) if m), None) or "global"
        with_loss = any(_finite(r.train.get("train-loss")) for r in records)  # SecAgg+ rounds release none
        table = Table(title=self.title, box=box.SIMPLE_HEAD, pad_edge=False)
        table.add_column("round", justify="right", no_wrap=True)
        table.add_column("s", justify="right", no_wrap=True)
        if with_loss:
            table.add_column("loss", justify="right", no_wrap=True)
        table.add_column(metric, justify="right", no_wrap=True)
        table.add_column("worst site", overflow="ellipsis", no_wrap=True)
        table.add_column("max ε", justify="right", no_wrap=True)
        table.add_column("refused", justify="right", no_wrap=True)
        for record, seconds in self.rows:
            worst = record.worst_site
            row = [f"{record.round}/{self.rounds}", f"{seconds:.1f}"]
            if with_loss:
                row.append(_fmt(record.train.get("train-loss")))
            row += [
                _fmt(record.evaluate.get(metric)),
                f"{worst['site']} {_fmt(worst.get('value'))}" if worst else "-",
                _fmt(record.train.get("epsilon"), 3),
                str(len(record.refusals)),
            ]
            table.add_row(*row)
        return table


def summary_renderables(summary: Any) -> list[RenderableType]:
    """Return the final table and the lines under it for a run's ``Summary``.

    One row per metric (any number of metrics fits 80 columns), one column per arm: the
    federated model (scored centrally when the run wrote a model), the pooled and local-only
    baselines the scenario ran, what the sites' policies released when that differs, and
    federated − pooled. ε per site is listed once per distinct value.
    """
    metrics = sorted(summary.final_global)
    arms: list[tuple[str, Mapping[str, Any]]] = [("federated", summary.final_global)]
    arms += [(arm, summary.baselines[arm]) for arm in ("pooled", "local") if isinstance(summary.baselines.get(arm), Mapping)]
    released = summary.final_federated_evaluation
    shown_released = bool(released) and released != summary.final_global
    if shown_released:
        arms.append(("as released", released))
    gap = summary.gap_vs_pooled or {}
    table = Table(
        title=f"{summary.scenario}: {summary.status}, {summary.rounds_completed}/{summary.rounds_planned} rounds",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    table.add_column("metric", no_wrap=True)
    for name, _ in arms:
        table.add_column(name, justify="right", no_wrap=True)
    if gap:
        table.add_column("fed − pooled", justify="right", no_wrap=True)
    for metric in metrics:
        row = [metric, *(_fmt(values.get(metric)) for _, values in arms)]
        if gap:
            row.append(f"{gap[metric]:+.4f}" if _finite(gap.get(metric)) else "-")
        table.add_row(*row)
    out: list[RenderableType] = [table]
    if shown_released:
        out.append("federated, pooled and local: scored by the researcher on every site's evaluation "
                   "split; 'as released': what the sites' policies released (DP-noised by default)")
    if any(name == "local" for name, _ in arms):
        out.append("local: each hospital alone, on its own evaluation split (example-weighted mean)")
    if summary.privacy:
        out.append("privacy spent: " + _privacy_line(summary.privacy))
    out.append(f"wall time {summary.wall_time_s:.1f} s (federated part {summary.federated_time_s:.1f} s); "
               f"results in {summary.out_dir}")
    return out


def _privacy_line(privacy: Mapping[str, Mapping[str, Any]]) -> str:
    """Return every site's ε (and δ), sites with the same values listed together."""
    groups: dict[str, list[str]] = {}
    for site, spent in sorted(privacy.items()):
        delta = spent.get("delta")
        value = f"ε={_fmt(spent.get('epsilon'))}" + (f" δ={delta:g}" if isinstance(delta, (int, float)) else "")
        groups.setdefault(value, []).append(site)
    return "; ".join(f"{value} at {', '.join(sites)}" for value, sites in groups.items())


class WrappedFormatter(logging.Formatter):
    """``LEVEL logger: message``, wrapped to the terminal's width, continuation lines indented.

    The width is read at each record (``COLUMNS``, else the terminal's, else 80: what rich uses
    for the tables), so a log line never runs past the tables around it.
    """

    def __init__(self) -> None:
        super().__init__("%(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        """Return the record's text wrapped to the terminal width."""
        text = super().format(record)
        width = max(40, shutil.get_terminal_size((80, 24)).columns)
        return "\n".join(
            textwrap.fill(line, width=width, subsequent_indent="  ", break_long_words=True, break_on_hyphens=False)
            if len(line) > width else line
            for line in text.splitlines() or [""]
        )


class _BaselineLedgerNotice(logging.Filter):
    """Drop the in-memory ledger notice of the baselines' own ledgers (and nothing else)."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Return False for the notice about a ``baseline-*`` study, True otherwise."""
        args = record.args if isinstance(record.args, tuple) else ()
        return not (str(record.msg).startswith(_LEDGER_NOTICE) and len(args) >= 2 and args[1] in BASELINE_STUDIES)


def quiet_simulation_notices() -> None:
    """Filter the baselines' in-memory ledger notice on ``fedcare.privacy.ledger`` (once per process)."""
    ledger_logger = logging.getLogger("fedcare.privacy.ledger")
    if not any(isinstance(f, _BaselineLedgerNotice) for f in ledger_logger.filters):
        ledger_logger.addFilter(_BaselineLedgerNotice())


def default_out_dir(scenario: str, *, now: datetime | None = None, root: Path = RUNS_DIR) -> Path:
    """Return a new run folder ``root/<YYYYmmdd-HHMMSS>-<scenario>`` (``-2``, ``-3``… when taken)."""
    stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M%S")
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in scenario) or "run"
    base = root / f"{stamp}-{safe}"
    candidate, n = base, 1
    while candidate.exists():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate
