"""PNG plots of a simulation: a metric per round, ε per round, and pooled / local / federated arms.

Figures are drawn with matplotlib's object API on the Agg canvas (no pyplot, no display, no
global backend switch), so plotting is safe in headless runs and worker threads.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .history import RoundRecord, history_from_rounds

__all__ = [
    "HEADLINE_METRICS",
    "PlotInputError",
    "headline_metric",
    "plot_arms",
    "plot_epsilon_per_round",
    "plot_metric_per_round",
    "plot_summary",
]

logger = logging.getLogger(__name__)

#: the metric a summary plots first, in order of preference
HEADLINE_METRICS: Final = ("auroc", "accuracy", "rmse", "mae", "loss")
_MAX_SITE_LEGEND: Final = 10  # beyond this many sites, one legend entry stands for them all
_DPI: Final = 120


class PlotInputError(ValueError):
    """A plot was asked for with nothing to draw (empty history, unknown metric, no values)."""


def plot_metric_per_round(history: Sequence[RoundRecord], metric: str, out_path: Path | str) -> Path:
    """Plot the global ``metric`` per round (thick) and each site's (thin) to a PNG.

    Parameters
    ----------
    history : sequence of RoundRecord
        The finished rounds, in any order.
    metric : str
        A metric present in the rounds' global or site metrics.
    out_path : path
        Where the PNG goes (folders are created).

    Returns
    -------
    pathlib.Path
        ``out_path``.
    """
    records = _sorted(history, "plot_metric_per_round")
    rounds = [r.round for r in records]
    global_values = [r.global_metrics.get(metric, math.nan) for r in records]
    sites = sorted({s for r in records for s, m in r.site_metrics.items() if metric in m})
    if all(math.isnan(v) for v in global_values) and not sites:
        known = sorted({k for r in records for k in r.global_metrics} | {k for r in records for m in r.site_metrics.values() for k in m})
        raise PlotInputError(
            f"no round reports metric {metric!r}; pick one of: {', '.join(known) or '(none)'}"
        )
    fig, ax = _figure()
    _site_lines(
        ax, rounds, sites, lambda s: [r.site_metrics.get(s, {}).get(metric, math.nan) for r in records]
    )
    if not all(math.isnan(v) for v in global_values):
        ax.plot(rounds, global_values, color="black", linewidth=2.5, marker="o", label="global (weighted)", zorder=3)
    ax.set_title(f"{metric} per round")
    ax.set_xlabel("round")
    ax.set_ylabel(metric)
    _round_ticks(ax, rounds)
    return _save(fig, ax, out_path)


def plot_epsilon_per_round(history: Sequence[RoundRecord], out_path: Path | str) -> Path:
    """Plot each site's cumulative ε per round (and the maximum over sites) to a PNG."""
    records = _sorted(history, "plot_epsilon_per_round")
    rounds = [r.round for r in records]
    sites = sorted({s for r in records for s in r.site_epsilon})
    if not sites:
        raise PlotInputError("no round reports a site's ε: was privacy disabled, or no site trained?")
    fig, ax = _figure()
    _site_lines(ax, rounds, sites, lambda s: [r.site_epsilon.get(s, math.nan) for r in records])
    worst = [max((v for v in r.site_epsilon.values() if not math.isnan(v)), default=math.nan) for r in records]
    ax.plot(rounds, worst, color="black", linewidth=2.0, linestyle="--", marker="o", markersize=4, label="max over sites", zorder=3)
    ax.set_title("privacy spent per round (cumulative ε)")
    ax.set_xlabel("round")
    ax.set_ylabel("ε")
    ax.set_ylim(bottom=0)
    _round_ticks(ax, rounds)
    return _save(fig, ax, out_path)


def plot_arms(results: Mapping[str, Any], metric: str, out_path: Path | str) -> Path:
    """Plot ``metric`` of each arm (pooled, local, federated…) as bars, with per-site dots.

    Parameters
    ----------
    results : mapping of arm name to result
        Each value is a :class:`~fedcare.simulations.baselines.BaselineResult`, or a mapping
        holding ``metric`` at its top level (optionally ``"sites"``: site → metrics, drawn as
        dots over the bar).
    metric : str
        The metric to compare.
    out_path : path
        Where the PNG goes.
    """
    if not results:
        raise PlotInputError("plot_arms got no arms; pass e.g. {'pooled': ..., 'federated': ...}")
    arms, heights, dots = [], [], []
    for arm, result in results.items():
        values = _arm_values(result)
        value = values["metrics"].get(metric)
        if value is None or math.isnan(float(value)):
            raise PlotInputError(
                f"arm {arm!r} has no value for {metric!r}; it reports: "
                f"{', '.join(sorted(values['metrics'])) or '(nothing)'}"
            )
        arms.append(str(arm))
        heights.append(float(value))
        dots.append([float(m[metric]) for m in values["sites"].values() if m.get(metric) is not None])
    fig, ax = _figure(width=max(4.5, 1.4 * len(arms) + 2))
    x = np.arange(len(arms))
    colors = [_ARM_COLORS.get(a, f"C{i}") for i, a in enumerate(arms)]
    bars = ax.bar(x, heights, color=colors, width=0.6, label="overall (example-weighted)")
    ax.bar_label(bars, fmt="%.3f", label_type="center", color="white", fontweight="bold")
    ax.set_axisbelow(True)
    rng = np.random.default_rng(0)  # fixed jitter: the same input draws the same figure
    shown = False
    for i, values in enumerate(dots):
        if values:
            ax.scatter(
                i + rng.uniform(-0.18, 0.18, len(values)), values, s=14, color="black", alpha=0.6,
                zorder=3, label=None if shown else "one site",
            )
            shown = True
    ax.set_xticks(x, arms)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric}: {' vs '.join(arms)}")  # the arms drawn, no more
    everything = [*heights, *(v for d in dots for v in d)]
    top = max(everything)
    ax.set_ylim(min(0.0, min(everything)), top * 1.25 if top > 0 else 1.0)  # room for the legend
    return _save(fig, ax, out_path, legend={"loc": "upper center", "ncols": 2})


def headline_metric(metrics: Mapping[str, Any]) -> str | None:
    """Return the first of :data:`HEADLINE_METRICS` that ``metrics`` reports, else None."""
    return next((m for m in HEADLINE_METRICS if metrics.get(m) is not None), None)


def plot_summary(summary: Mapping[str, Any], out_dir: Path | str) -> dict[str, Path]:
    """Draw every plot a run summary supports into ``out_dir``; return ``{name: file}``.

    Reads ``rounds`` (the runner's round dicts), ``final_global``, ``final_sites`` and
    ``baselines`` (``{"pooled": ..., "local": ...}`` from :func:`~.baselines.run_baselines`).
    A plot with nothing to draw (no finished round, privacy off, no baseline) is skipped.
    """
    out = Path(out_dir)
    files: dict[str, Path] = {}
    history = history_from_rounds(summary.get("rounds", []))
    final = dict(summary.get("final_global") or {})
    # the rounds hold what the sites released (none where every site's policy refused evaluation)
    per_round = next(
        (headline_metric(r.global_metrics) for r in reversed(history) if headline_metric(r.global_metrics)), None
    )
    metric = headline_metric(final) or per_round
    if history and per_round is not None:
        files["plot_metric"] = plot_metric_per_round(history, per_round, out / f"{per_round}_per_round.png")
    if any(r.site_epsilon for r in history):
        files["plot_epsilon"] = plot_epsilon_per_round(history, out / "epsilon_per_round.png")
    baselines = summary.get("baselines") or {}
    if metric is not None and baselines:
        arms: dict[str, Any] = {
            name: result for name, result in baselines.items() if _has(_arm_values(result)["metrics"], metric)
        }
        if final.get(metric) is not None:
            arms["federated"] = {**final, "sites": summary.get("final_sites") or {}}
        if arms:
            files["plot_arms"] = plot_arms(arms, metric, out / f"arms_{metric}.png")
    logger.info("wrote %d plots to %s", len(files), out)
    return files


# --------------------------------------------------------------------------- helpers

_ARM_COLORS: Final = {"pooled": "#4C72B0", "local": "#DD8452", "federated": "#55A868"}


def _has(metrics: Mapping[str, Any], metric: str) -> bool:
    """Return whether ``metrics[metric]`` is a number."""
    value = metrics.get(metric)
    return isinstance(value, (int, float)) and not math.isnan(float(value))


def _arm_values(result: Any) -> dict[str, Any]:
    """Return ``{"metrics": top-level numbers, "sites": site -> metrics}`` of one arm's result."""
    if hasattr(result, "metrics") and hasattr(result, "sites"):  # a BaselineResult
        return {"metrics": dict(result.metrics), "sites": dict(result.sites)}
    if not isinstance(result, Mapping):
        raise PlotInputError(f"an arm's result must be a BaselineResult or a mapping, not {type(result).__name__}")
    metrics = {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    sites = result.get("sites") or {}
    return {"metrics": metrics, "sites": {s: m for s, m in sites.items() if isinstance(m, Mapping)}}


def _sorted(history: Sequence[RoundRecord], what: str) -> list[RoundRecord]:
    """Return the records by round, refusing an empty history or foreign items."""
    if not history:
        raise PlotInputError(f"{what} got an empty history: no round finished, so there is nothing to plot")
    for r in history:
        if not isinstance(r, RoundRecord):
            raise PlotInputError(
                f"{what} takes RoundRecord items (simulations.history), not {type(r).__name__}; "
                "convert round dicts with history_from_rounds"
            )
    return sorted(history, key=lambda r: r.round)


def _figure(width: float = 7.0) -> tuple[Figure, Any]:
    """Return a new Agg-backed figure and its axes."""
    fig = Figure(figsize=(width, 4.5), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.grid(True, alpha=0.3)
    return fig, ax


def _site_lines(ax: Any, rounds: list[int], sites: list[str], values_of: Any) -> None:
    """Draw one thin line per site; label each when few, else one legend entry for them all."""
    few = len(sites) <= _MAX_SITE_LEGEND
    alpha = 0.8 if few else max(0.08, min(0.5, 20 / len(sites)))
    for i, site in enumerate(sites):
        label = site if few else (f"each site (n = {len(sites)})" if i == 0 else None)
        ax.plot(
            rounds, values_of(site), linewidth=1.0, alpha=alpha, marker="." if few else None,
            color=f"C{i % 10}" if few else "tab:blue", label=label,
        )


def _round_ticks(ax: Any, rounds: list[int]) -> None:
    """Put integer ticks on the round axis."""
    ax.xaxis.get_major_locator().set_params(integer=True)
    if len(rounds) == 1:
        ax.set_xlim(rounds[0] - 0.5, rounds[0] + 0.5)


def _save(fig: Figure, ax: Any, out_path: Path | str, legend: dict[str, Any] | None = None) -> Path:
    """Add the legend, write the PNG (creating folders) and return its path."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**{"loc": "best", "fontsize": "small", "framealpha": 0.85, **(legend or {})})
    path = Path(out_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    logger.debug("wrote %s", path)
    return path
