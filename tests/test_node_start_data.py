"""`fedcare node start` checks the site's data first, and a started node notices data that changed.

A node whose manifest points at a corrupt table used to start and join, then fail round 1 of a
SecAgg+ study (costing the good sites ε). ``node start`` now runs `node check`'s full check and
refuses with one line; the ClientApp refuses every task once the files differ from those checked.
No test here starts a SuperNode: ``fedcare.client.deploy.spawn`` is replaced by a recorder.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from sklearn.datasets import load_breast_cancer
from typer.testing import CliRunner

from fedcare.client import deploy
from fedcare.client.app import app
from fedcare.client.cli import node_app
from fedcare.client.data_digest import data_digest
from fedcare.models import ModelSpec, build_for_data, get_weights, wire
from fedcare.server.app import train_config
from fedcare.server.config import RunConfig
from fedcare.supervise import SuperviseError

SECRET = "731.4159"  # a "patient value" that must never appear in any output
TEXT_VALUE = "HIGHBP77"  # text where a number belongs

_HEADER = "age,chol,target\n"
_GOOD_ROWS = [f"{40 + i % 30},{180 + (i * 7) % 90},{i % 2}\n" for i in range(60)]


def _manifest(folder: Path, csv_name: str = "site.csv") -> Path:
    """Write a table site manifest naming ``csv_name`` (relative) and return its path."""
    manifest = folder / "site.toml"
    manifest.write_text(
        'site = "unit"\ntask = "binary"\nclasses = [0, 1]\nmin_cohort_size = 10\n'
        "[split]\nval = 0.2\ntest = 0.2\nseed = 0\n"
        f'[data]\nkind = "table"\npath = "{csv_name}"\ntarget = "target"\n',
        encoding="utf-8",
    )
    return manifest


def _write_rows(folder: Path, rows: list[str]) -> None:
    (folder / "site.csv").write_text(_HEADER + "".join(rows), encoding="utf-8")


class _SpawnRecorder:
    """Stands in for ``deploy.spawn``: records the command, then fails as a SuperNode that exited."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(self, argv: list[str], **_: Any) -> None:
        self.calls.append(list(argv))
        raise SuperviseError("stopped by the test before any SuperNode ran")


def _start(site: Path, state: Path) -> Any:
    """Invoke `fedcare node start` (plaintext test node, one pinned app, cold) through typer."""
    return CliRunner().invoke(node_app, [
        "start", "--site", str(site), "--superlink", "127.0.0.1:9", "--port", "9401",
        "--insecure", "--cold", "--state", str(state), "--trust-app", "a" * 64,
    ])  # fmt: skip


def _corrupt_text_in_numeric(folder: Path) -> Path:
    rows = list(_GOOD_ROWS)
    rows[2] = f"{TEXT_VALUE},{SECRET},1\n"  # line 4 of the file
    _write_rows(folder, rows)
    return _manifest(folder)


def _corrupt_empty_label(folder: Path) -> Path:
    rows = list(_GOOD_ROWS)
    rows[2] = f"55,{SECRET},\n"  # line 4: no label
    _write_rows(folder, rows)
    return _manifest(folder)


def _corrupt_missing_file(folder: Path) -> Path:
    return _manifest(folder, csv_name="gone.csv")


@pytest.mark.parametrize(
    ("corrupt", "named", "where"),
    [
        (_corrupt_text_in_numeric, "site.csv", "line 4"),
        (_corrupt_empty_label, "site.csv", "line 4"),
        (_corrupt_missing_file, "gone.csv", "data.path"),
    ],
    ids=["text-in-numeric-column", "empty-label", "missing-file"],
)
def test_node_start_refuses_bad_data_in_one_line_before_anything_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, corrupt: Any, named: str, where: str
) -> None:
    # Prepare
    spawned = _SpawnRecorder()
    monkeypatch.setattr(deploy, "spawn", spawned)
    site = corrupt(tmp_path)
    state = tmp_path / "state"

    # Execute
    result = _start(site, state)

    # Assert
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1
    assert len(lines) == 1, result.output
    assert named in lines[0] and where in lines[0] and "node was not started" in lines[0]
    assert SECRET not in result.output and TEXT_VALUE not in result.output
    assert spawned.calls == []
    assert not state.exists()  # no PID file, log, gate or ledger folder was made


def test_node_start_without_drop_rows_names_the_empty_label_as_a_label_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    monkeypatch.setattr(deploy, "spawn", _SpawnRecorder())
    site = _corrupt_empty_label(tmp_path)

    # Execute
    result = _start(site, tmp_path / "state")

    # Assert
    assert result.exit_code == 1
    assert "LabelError" in result.output and "'target'" in result.output
    assert "data.missing = 'drop_rows'" in result.output  # the explicit opt-in, named as the fix


def test_node_start_passes_the_checked_data_digest_to_the_supernode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    spawned = _SpawnRecorder()
    monkeypatch.setattr(deploy, "spawn", spawned)
    _write_rows(tmp_path, _GOOD_ROWS)
    site = _manifest(tmp_path)

    # Execute
    result = _start(site, tmp_path / "state")

    # Assert: the check passed, the (recorder) SuperNode got the digest in its node config
    assert result.exit_code == 1 and "stopped by the test" in result.output
    assert len(spawned.calls) == 1
    node_config = spawned.calls[0][spawned.calls[0].index("--node-config") + 1]
    assert f"data-digest='{data_digest(site)}'" in node_config


# --- the running node ----------------------------------------------------------------------


def _wdbc_site(folder: Path) -> tuple[Path, Path]:
    """A breast-cancer table site and a policy allowing plain rounds; return (manifest, policy)."""
    load_breast_cancer(as_frame=True).frame.to_csv(folder / "wdbc.csv", index=False)
    manifest = folder / "site.toml"
    manifest.write_text(
        'site = "wdbc"\ntask = "binary"\nclasses = [0, 1]\n[split]\nval = 0.1\ntest = 0.3\nseed = 0\n'
        '[data]\nkind = "table"\npath = "wdbc.csv"\ntarget = "target"\n',
        encoding="utf-8",
    )
    policy = folder / "policy.toml"
    policy.write_text("require_secure_aggregation = false\n", encoding="utf-8")
    return manifest, policy


def _train_message() -> Message:
    """A coordinator's round-1 train message for a logistic model on 30 features."""
    config = RunConfig(input_shape=(30,), num_rounds=3, min_sites=1, checkpoint_dir=Path("/nonexistent"),
                       batch_size=32, lr=0.5, study="data-digest", seed=0)
    record = train_config(config)
    record[wire.MODEL_SPEC] = ModelSpec(family="logistic").model_dump_json()
    record[wire.SERVER_ROUND] = 1
    torch.manual_seed(0)
    model = build_for_data(ModelSpec(family="logistic"), task="binary", num_classes=2, input_shape=(30,), has_mask=False)
    content = RecordDict({
        wire.ARRAYS: ArrayRecord(OrderedDict((k, Array(np.ascontiguousarray(v))) for k, v in get_weights(model).items())),
        wire.CONFIG: record,
    })
    if TaskIdentity._run_id is None:  # noqa: SLF001 - what flwr sets in a running app (as InProcessGrid does)
        TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    msg = Message(content, dst_node_id=1, message_type="train")
    msg.metadata.__dict__["_message_id"] = "msg-1"
    return msg


def _node_context(manifest: Path, policy: Path, ledger: Path, digest: str) -> Context:
    node = {"site-manifest": str(manifest), "ledger-dir": str(ledger), "policy": str(policy),
            "data-digest": digest}  # fmt: skip
    return Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={})


def test_client_app_refuses_to_train_after_the_data_file_is_replaced(tmp_path: Path) -> None:
    # Prepare: a node started on the checked data; it trains round 1
    manifest, policy = _wdbc_site(tmp_path)
    context = _node_context(manifest, policy, tmp_path / "ledger", data_digest(manifest))
    first = app(_train_message(), context)
    assert not first.has_error(), first.error.reason
    csv = tmp_path / "wdbc.csv"
    lines = csv.read_text(encoding="utf-8").splitlines(keepends=True)
    csv.write_text("".join(lines[:-40]), encoding="utf-8")  # 40 patients removed

    # Execute
    reply = app(_train_message(), context)

    # Assert
    assert reply.has_error()
    assert reply.error.code == wire.ERROR_DATA_INVALID
    assert "the site's data changed since the node started" in reply.error.reason
    assert "fedcare node check" in reply.error.reason


def test_client_app_notices_a_same_size_edit_with_the_old_mtime(tmp_path: Path) -> None:
    # Prepare: one value changed in place, size and mtime put back as they were
    manifest, policy = _wdbc_site(tmp_path)
    digest = data_digest(manifest)
    csv = tmp_path / "wdbc.csv"
    before = csv.stat()
    text = csv.read_text(encoding="utf-8")
    last = text.rstrip("\n").rsplit(",", 1)
    flipped = "0" if last[1] == "1" else "1"
    csv.write_text(f"{last[0]},{flipped}\n", encoding="utf-8")
    os.utime(csv, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert csv.stat().st_size == before.st_size and csv.stat().st_mtime_ns == before.st_mtime_ns
    context = _node_context(manifest, policy, tmp_path / "ledger", digest)

    # Execute
    reply = app(_train_message(), context)

    # Assert
    assert reply.has_error()
    assert reply.error.code == wire.ERROR_DATA_INVALID
    assert "changed since the node started" in reply.error.reason
