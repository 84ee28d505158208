"""Stage triggers of benchmarks/chaos.py: the fault spec parser and the progress-file poller (issue 13 item 7).

No deployment: the progress file is one the real writer (``server.progress.ProgressWriter``) wrote
into a temporary folder, read back as the harness reads it (``read_progress``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))

from benchmark_scripts import import_benchmark  # noqa: E402

from fedcare.server.progress import ProgressWriter, read_progress  # noqa: E402

chaos = import_benchmark("chaos")


def test_a_trigger_names_kind_site_round_and_stage() -> None:
    # Execute
    node = chaos.parse_trigger("node=va@2:collect-masked-vectors", study=3)
    app = chaos.parse_trigger("serverapp@3:train")

    # Assert
    assert (node.kind, node.target, node.round, node.stage, node.study) == ("node", "va", 2, "collect-masked-vectors", 3)
    assert (app.kind, app.target, app.round, app.stage, app.study) == ("serverapp", None, 3, "train", 0)
    assert node.label == "node=va@2:collect-masked-vectors"


@pytest.mark.parametrize("spec", ["node@0:train", "node@2", "disk@2:train", "node@2:masked", "superlink=va@2:train",
                                  "node=nowhere@2:train", "node@two:train"])
def test_a_malformed_trigger_is_refused_with_the_syntax_to_use(spec: str) -> None:
    with pytest.raises(chaos.TriggerSyntaxError, match=r"fault trigger"):
        chaos.parse_trigger(spec)


def _writer(folder: Path) -> ProgressWriter:
    writer = ProgressWriter(folder, study="s", num_rounds=3)
    writer.start(run_id="1", rounds_complete=0)
    return writer


def test_a_trigger_is_due_at_its_round_and_stage_or_a_later_stage_of_that_round(tmp_path: Path) -> None:
    # Prepare
    event = chaos.parse_trigger("node@2:collect-masked-vectors")
    writer = _writer(tmp_path)
    states = []

    # Execute: walk the file through round 1, then round 2's SecAgg+ stages
    for rnd, stage in [(1, "setup"), (1, "collect-masked-vectors"), (2, "setup"), (2, "share-keys"),
                       (2, "collect-masked-vectors"), (2, "unmask")]:
        writer.stage(rnd, stage)
        states.append(chaos.trigger_state(event, read_progress(tmp_path), since=0.0))

    # Assert
    assert states == ["waiting", "waiting", "waiting", "waiting", "due", "due"]


def test_a_trigger_whose_round_went_by_unseen_is_passed_and_an_ended_run_keeps_it_waiting(tmp_path: Path) -> None:
    # Prepare
    event = chaos.parse_trigger("serverapp@2:train")
    writer = _writer(tmp_path)

    # Execute / Assert: round 3 already -> passed; a failed run in round 1 -> waiting (the resume may reach it)
    writer.stage(3, "train")
    assert chaos.trigger_state(event, read_progress(tmp_path), since=0.0) == "passed"
    writer.stage(1, "train")
    writer.end("failed", reason="a site died")
    assert chaos.trigger_state(event, read_progress(tmp_path), since=0.0) == "waiting"


def test_an_earlier_attempts_progress_file_never_fires_a_trigger(tmp_path: Path) -> None:
    # Prepare: a killed ServerApp left "running, round 3, train" behind; the resume starts later
    event = chaos.parse_trigger("serverapp@3:train")
    _writer(tmp_path).stage(3, "train")
    progress = read_progress(tmp_path)
    assert progress is not None

    # Execute
    stale = chaos.trigger_state(event, progress, since=float(progress["updated_at"]) + 1.0)
    fresh = chaos.trigger_state(event, progress, since=float(progress["updated_at"]))

    # Assert
    assert (stale, fresh) == ("waiting", "due")
    assert chaos.trigger_state(event, None, since=0.0) == "waiting"  # no file yet
