"""``report.html``: one self-contained page per run (no external file, script or font).

:func:`render_report` turns a run's ``summary.json`` content into HTML; :func:`write_report` writes
it beside the summary. The page holds the run's status, global metrics of the federated model and
of the baselines (pooled, local-only) with 95 % intervals where the summary carries them, the
per-site metrics and ε, the rounds, the privacy report and the release decision, the plots (the
matplotlib PNGs the run drew, embedded as base64 ``data:`` URIs), the configuration and the
provenance (scenario file and digest, seed, versions, git commit).

Every text taken from the summary is HTML-escaped (``html.escape``). The page shows only what
``summary.json`` and the privacy report already hold: metrics, ε, names, settings; no patient value.

Intervals are read, for a metrics table, from ``<metric>_low`` / ``<metric>_high`` keys beside the
metric, or a nested ``"intervals": {metric: [low, high]}``, or a summary-level
``"<section>_intervals"`` (``final_global_intervals``…).
"""

from __future__ import annotations

import base64
import html
import json
import logging
import math
from collections.abc import Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Final

from ..files import atomic_write
from ..server.tracking import flatten_params

__all__ = ["REPORT_FILE", "render_report", "write_report"]

logger = logging.getLogger(__name__)

REPORT_FILE: Final = "report.html"
_HIDDEN_METRICS: Final = frozenset({"num-examples", "num_examples", "threshold"})
_PNG_MAGIC: Final = b"\x89PNG\r\n\x1a\n"
_STYLE: Final = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1100px;
color:#222;padding:0 1em}h1{font-size:1.6em}h2{font-size:1.25em;border-bottom:1px solid #ccc;margin-top:1.8em}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}th,td{border:1px solid #ddd;padding:.25em .6em;
text-align:right;vertical-align:top}th:first-child,td:first-child{text-align:left}th{background:#f4f4f4}
.status-completed{color:#1a7f37}.status-blocked,.status-stopped{color:#9a6700}.status-failed{color:#cf222e}
pre{background:#f6f8fa;padding:.8em;overflow:auto;font-size:.85em}img{max-width:100%;height:auto;margin:.5em 0}
.note{color:#555;font-size:.9em}
"""


def _esc(value: Any) -> str:
    """Return ``value`` as escaped HTML text."""
    return html.escape(str(value), quote=True)


def _num(value: Any) -> float | None:
    """Return a finite float, else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _fmt(value: Any) -> str:
    """Format a metric ("-" when missing or NaN)."""
    number = _num(value)
    if number is None:
        return "-" if value is None or isinstance(value, float) else str(value)
    return str(value) if isinstance(value, int) else f"{number:.4f}"


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Return an HTML table; cells are escaped unless given as :class:`_Raw`."""
    head = "".join(f"<th>{_esc(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{c if isinstance(c, _Raw) else _esc(c)}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


class _Raw(str):
    """HTML already escaped."""


def _intervals(metrics: Mapping[str, Any], extra: Mapping[str, Any] | None = None) -> dict[str, tuple[float, float]]:
    """Return ``{metric: (low, high)}`` from ``<m>_low`` / ``<m>_high`` keys, a nested ``intervals``, or ``extra``."""
    out: dict[str, tuple[float, float]] = {}
    sources: list[Mapping[str, Any]] = [extra or {}]
    nested = metrics.get("intervals")
    if isinstance(nested, Mapping):
        sources.append(nested)
    for source in sources:
        for name, bounds in source.items():
            if isinstance(bounds, (list, tuple)) and len(bounds) == 2:
                low, high = _num(bounds[0]), _num(bounds[1])
                if low is not None and high is not None:
                    out[name] = (low, high)
    for key in metrics:
        if key.endswith("_low") and f"{key[:-4]}_high" in metrics:
            low, high = _num(metrics[key]), _num(metrics[f"{key[:-4]}_high"])
            if low is not None and high is not None:
                out[key[:-4]] = (low, high)
    return out


def _metric_names(*tables: Mapping[str, Any]) -> list[str]:
    """Return the scalar metrics of ``tables`` (no interval bounds, counts or nested tables), headline first."""
    names: set[str] = set()
    for table in tables:
        for key, value in table.items():
            if isinstance(value, (Mapping, list)) or key in _HIDDEN_METRICS:
                continue
            if key.endswith(("_low", "_high")) and key.rsplit("_", 1)[0] in table:
                continue
            names.add(key)
    first = [m for m in ("auroc", "accuracy", "balanced_accuracy", "rmse", "mae", "r2", "loss") if m in names]
    return first + sorted(names - set(first))


def _cell(metrics: Mapping[str, Any], name: str, intervals: Mapping[str, tuple[float, float]]) -> str:
    """Return a metric with its interval, e.g. ``0.9120 [0.8800, 0.9400]``."""
    text = _fmt(metrics.get(name))
    if name in intervals and text != "-":
        low, high = intervals[name]
        text += f" [{low:.4f}, {high:.4f}]"
    return text


def _results(summary: Mapping[str, Any]) -> str:
    """Return the global results: the federated model and every baseline arm, one row each."""
    arms: list[tuple[str, Mapping[str, Any], dict[str, tuple[float, float]]]] = []

    def add(label: str, key: str) -> None:
        metrics = summary.get(key) or {}
        if metrics:
            arms.append((label, metrics, _intervals(metrics, summary.get(f"{key}_intervals"))))

    add("federated (scored on every site's evaluation split)", "final_global")
    add("federated, pooled test split", "final_pooled_test")
    if summary.get("final_federated_evaluation") != summary.get("final_global"):
        add("federated, as the sites released it", "final_federated_evaluation")
    for arm, result in (summary.get("baselines") or {}).items():
        if isinstance(result, Mapping):
            arms.append((f"{arm} baseline", result, _intervals(result)))
            pooled_test = result.get("pooled_test")
            if isinstance(pooled_test, Mapping) and pooled_test:
                arms.append((f"{arm} baseline, pooled test split", pooled_test, _intervals(pooled_test)))
    if not arms:
        return "<p>No global metrics: no round finished.</p>"
    names = _metric_names(*(m for _, m, _ in arms))
    rows = [[label, *(_cell(m, n, iv) for n in names)] for label, m, iv in arms]
    text = _table(["model", *names], rows)
    gap = summary.get("gap_vs_pooled") or {}
    if gap:
        text += "<p>federated − pooled: " + _esc(", ".join(f"{k} {v:+.4f}" for k, v in sorted(gap.items()))) + "</p>"
    if any(iv for _, _, iv in arms):
        text += '<p class="note">[low, high]: 95 % confidence interval, where the run computed one.</p>'
    return text


def _sites(summary: Mapping[str, Any]) -> str:
    """Return the per-site table: the final model's metrics at each site, its ε and δ, local-only metrics."""
    sites_metrics: Mapping[str, Mapping[str, Any]] = summary.get("final_sites") or {}
    privacy: Mapping[str, Mapping[str, Any]] = summary.get("privacy") or {}
    local = (summary.get("baselines") or {}).get("local")
    local_sites: Mapping[str, Mapping[str, Any]] = local.get("sites", {}) if isinstance(local, Mapping) else {}
    sizes = {h.get("name"): h for h in summary.get("hospitals") or [] if isinstance(h, Mapping)}
    names = sorted(set(sites_metrics) | set(privacy) | set(local_sites) | {n for n in sizes if n})
    if not names:
        return "<p>No per-site results.</p>"
    metrics = _metric_names(*sites_metrics.values())
    local_metric = next((m for m in metrics if m in {k for s in local_sites.values() for k in s}), None)
    headers = ["site", "train / val / test", *metrics, "ε spent", "δ"]
    if local_metric:
        headers.append(f"local-only {local_metric}")
    rows = []
    for name in names:
        size = sizes.get(name, {})
        own = sites_metrics.get(name, {})
        spent = privacy.get(name, {})
        row = [name, f"{size.get('train', '-')} / {size.get('val', '-')} / {size.get('test', '-')}",
               *(_cell(own, m, _intervals(own)) for m in metrics), _fmt(spent.get("epsilon")),
               "-" if spent.get("delta") is None else f"{spent['delta']:g}"]  # fmt: skip
        if local_metric:
            row.append(_fmt(local_sites.get(name, {}).get(local_metric)))
        rows.append(row)
    note = ('<p class="note">Per-site metrics: what each site released about the final global model '
            "(its policy may add DP noise); ε: spent by the site in this study (its ledger).</p>")  # fmt: skip
    return _table(headers, rows) + note


def _rounds(summary: Mapping[str, Any]) -> str:
    """Return one row per finished round: train loss, the global metrics released, max ε, refusals."""
    rounds = [r for r in summary.get("rounds") or [] if isinstance(r, Mapping)]
    if not rounds:
        return "<p>No finished round.</p>"
    names = _metric_names(*(r.get("evaluate") or {} for r in rounds))
    rows = []
    for r in rounds:
        train, evaluate = r.get("train") or {}, r.get("evaluate") or {}
        epsilons = [_num(m.get("epsilon")) for m in (r.get("site_train") or {}).values()]
        epsilons = [e for e in epsilons if e is not None]
        rows.append([r.get("round"), _fmt(train.get("train-loss")), *(_fmt(evaluate.get(n)) for n in names),
                     _fmt(max(epsilons)) if epsilons else "-", len(r.get("refusals") or [])])  # fmt: skip
    return _table(["round", "train loss", *names, "max ε", "refusals"], rows)


def _plots(summary: Mapping[str, Any]) -> str:
    """Return every PNG plot the run wrote, embedded as a base64 ``data:`` URI."""
    parts = []
    for key, value in sorted((summary.get("files") or {}).items()):
        path = Path(str(value))
        if not key.startswith("plot") or path.suffix.lower() != ".png" or not path.is_file():
            continue
        data = path.read_bytes()
        if not data.startswith(_PNG_MAGIC):
            logger.warning("report: %s is not a PNG; left out", path)
            continue
        encoded = base64.b64encode(data).decode("ascii")
        parts.append(f'<figure><img alt="{_esc(path.stem)}" src="data:image/png;base64,{encoded}">'
                     f"<figcaption>{_esc(path.name)}</figcaption></figure>")  # fmt: skip
    return "".join(parts) or "<p>No plots (no finished round, or nothing to draw).</p>"


def _privacy(summary: Mapping[str, Any]) -> str:
    """Return the release decision, secure aggregation and the privacy report (its Markdown, verbatim)."""
    parts = []
    release = summary.get("release")
    if isinstance(release, Mapping):
        verdict = "released" if release.get("released") else "NOT released"
        parts.append(f"<p>Final model: <b>{_esc(verdict)}</b>"
                     + (f": {_esc(release['reason'])}" if release.get("reason") else "") + "</p>")  # fmt: skip
        if release.get("gate"):
            parts.append("<pre>" + _esc(json.dumps(release["gate"], indent=1, default=str)) + "</pre>")
    secure = summary.get("secure_aggregation")
    if secure:
        parts.append("<h3>Secure aggregation</h3><pre>" + _esc(json.dumps(secure, indent=1, default=str)) + "</pre>")
    report = (release or {}).get("report") if isinstance(release, Mapping) else None
    if report:
        markdown = Path(str(report)).with_suffix(".md")
        if markdown.is_file():
            parts.append(f"<h3>Privacy report ({_esc(markdown.name)})</h3><pre>"
                         + _esc(markdown.read_text(encoding="utf-8")) + "</pre>")  # fmt: skip
    return "".join(parts) or "<p>No release step ran (the run did not complete).</p>"


def _key_values(mapping: Mapping[str, Any]) -> str:
    """Return a two-column table of a flat mapping."""
    return _table(["key", "value"], [[k, v] for k, v in mapping.items()])


def _provenance(summary: Mapping[str, Any]) -> str:
    """Return the provenance table (scenario file and digest, seed, overrides, versions, git, platform)."""
    provenance = summary.get("provenance")
    if not isinstance(provenance, Mapping):
        return "<p>This summary carries no provenance (written by an older fedcare).</p>"
    flat = {k: v for k, v in provenance.items() if k != "versions"}
    flat["overrides"] = " ".join(provenance.get("overrides") or []) or "(none)"
    flat.update({f"{name} version": v for name, v in (provenance.get("versions") or {}).items()})
    return _key_values(flat)


def render_report(summary: Mapping[str, Any]) -> str:
    """Return ``report.html`` for a run's ``summary.json`` content (self-contained HTML)."""
    status = str(summary.get("status", "unknown"))
    reason = summary.get("reason")
    title = f"fedcare run: {summary.get('scenario', '?')}"
    try:
        generator = f"fedcare {version('fedcare')}"
    except PackageNotFoundError:
        generator = "fedcare"
    head = (f"<p>Status: <b class=\"status-{_esc(status)}\">{_esc(status)}</b>"
            + (f" ({_esc(reason)})" if reason else "")
            + f"; strategy {_esc(summary.get('strategy', '?'))}; rounds {_esc(summary.get('rounds_completed', '?'))}"
            f"/{_esc(summary.get('rounds_planned', '?'))}; wall time {_fmt(summary.get('wall_time_s'))} s "
            f"(federated {_fmt(summary.get('federated_time_s'))} s); results in {_esc(summary.get('out_dir', '?'))}</p>")  # fmt: skip
    configuration = summary.get("configuration")
    config_html = (_key_values(flatten_params(configuration)) if isinstance(configuration, Mapping)
                   else "<p>This summary carries no configuration (written by an older fedcare).</p>")  # fmt: skip
    sections = [
        ("Global results", _results(summary)),
        ("Per site", _sites(summary)),
        ("Privacy", _privacy(summary)),
        ("Rounds", _rounds(summary)),
        ("Plots", _plots(summary)),
        ("Configuration", config_html),
        ("Provenance", _provenance(summary)),
    ]
    body = "".join(f"<h2>{_esc(name)}</h2>{content}" for name, content in sections)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<meta name=\"generator\" content=\"{_esc(generator)}\"><title>{_esc(title)}</title>"
        f"<style>{_STYLE}</style></head><body><h1>{_esc(title)}</h1>{head}{body}</body></html>\n"
    )


def write_report(summary: Mapping[str, Any], out_dir: Path | str) -> Path:
    """Write ``report.html`` for ``summary`` into ``out_dir`` (atomically, mode 0644); return its path."""
    path = Path(out_dir) / REPORT_FILE
    atomic_write(path, render_report(summary).encode("utf-8"), mode=0o644)
    return path
