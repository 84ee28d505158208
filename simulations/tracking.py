"""What a simulation logs to MLflow / TensorBoard, on top of the rounds (``server.tracking``).

The sinks are in :mod:`fedcare.server.tracking` (the ServerApp of a deployment logs through
them too, and ``server/`` may not import ``simulations/``). A simulation adds:

- parameters: the scenario as it ran (``summary.json``'s ``configuration``, flattened to dotted
  keys: ``training.lr``, ``privacy.target_epsilon``…) and the seed;
- tags: the provenance (``fedcare.version``, ``flwr.version``…, ``git.commit``, scenario digest);
- per round: :func:`~fedcare.server.tracking.round_metrics` (global, per site, ε per site);
- at the end: ``final/<metric>`` (the final model scored as the baselines are) and
  ``baseline/<arm>/<metric>`` at step = the last round; the files ``summary.json``,
  ``metrics.csv``, ``report.html``, the plots and the privacy report (never the model).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..server.tracking import Tracker, TrackingSettings, final_metrics, flatten_params

__all__ = ["open_simulation_tracker", "provenance_tags", "scenario_params", "track_summary"]

_ARTEFACT_KEYS = ("summary", "metrics", "report", "report_html")


def scenario_params(configuration: Mapping[str, Any]) -> dict[str, str]:
    """Return the parameters a simulation logs: its configuration, flattened to dotted keys."""
    return flatten_params(configuration)


def provenance_tags(provenance: Mapping[str, Any]) -> dict[str, str]:
    """Return the provenance as MLflow tags (``<package>.version``, ``git.commit``, ``scenario.sha256``…)."""
    tags = {f"{name}.version": str(v) for name, v in (provenance.get("versions") or {}).items()}
    for key, tag in (("git_commit", "git.commit"), ("scenario_sha256", "scenario.sha256"),
                     ("scenario_file", "scenario.file"), ("python", "python"), ("platform", "platform")):  # fmt: skip
        if provenance.get(key) is not None:
            tags[tag] = str(provenance[key])
    if provenance.get("overrides"):
        tags["overrides"] = " ".join(provenance["overrides"])
    return tags


def open_simulation_tracker(
    settings: TrackingSettings | None,
    *,
    scenario_name: str,
    configuration: Mapping[str, Any],
    provenance: Mapping[str, Any],
) -> Tracker:
    """Open the sinks ``settings`` asks for (experiment: the scenario's name) and log the parameters.

    Raises
    ------
    TrackingError
        When a library is missing or a backend cannot be opened (before the simulation starts).
    """
    if settings is None or not settings.enabled:
        return Tracker()
    if "experiment" not in settings.model_fields_set:
        settings = settings.model_copy(update={"experiment": scenario_name})
    tracker = Tracker.open(settings, tags=provenance_tags(provenance))
    tracker.log_params(scenario_params(configuration))
    return tracker


def track_summary(tracker: Tracker, summary: Mapping[str, Any], out_dir: Path) -> None:
    """Log a finished simulation's final metrics, baselines and files, and end the tracking run."""
    step = max(int(summary.get("rounds_completed") or 0), 1)
    tracker.log_metrics(final_metrics(summary), step)
    files = summary.get("files") or {}
    paths = [Path(v) for k, v in files.items() if k in _ARTEFACT_KEYS or k.startswith("plot")]
    paths += [p.with_suffix(".md") for p in paths if p.name.startswith("privacy_report") and p.suffix == ".json"]
    tracker.log_artifacts([p for p in paths if p.resolve().is_relative_to(out_dir.resolve())])
    tracker.close(str(summary.get("status", "failed")))
