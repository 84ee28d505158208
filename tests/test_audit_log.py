"""Signed audit log: intact logs verify; every kind of tampering is named at the right entry."""

from __future__ import annotations

import datetime as dt
import json
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from typer.testing import CliRunner

from fedcare.privacy.artefacts import KeyFileError
from fedcare.privacy.audit_log import (
    GENESIS_HASH,
    AuditFieldError,
    AuditLog,
    AuditLogBusy,
    AuditLogCorrupt,
    generate_signing_key,
    load_signing_key,
    load_verify_key,
    verify_log,
)
from fedcare.privacy.cli import audit_app

H = "ab" * 32


def _clock() -> dt.datetime:
    return dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)


def _site(name: str, eps: float) -> dict[str, object]:
    return {"site": name, "manifest_sha256": H, "epsilon_spent": eps, "delta": 1e-5}


def _fill(log: AuditLog) -> None:
    """Six entries: seq 0..5 on lines 1..6."""
    log.append("run_start", run_id="run-1", study="heart-disease", config_sha256=H, app_hash=H)
    log.append("round", round=1, sites=[_site("a", 0.4), _site("b", 0.5)], secure_aggregation=True,
               aggregate_update_norm=0.8)  # fmt: skip
    log.append("refusal", site="c", round=1, rule="epsilon_study", reason="would reach ε = 4, above 3")
    log.append("round", round=2, sites=[_site("a", 0.7), _site("b", 0.9)], secure_aggregation=True,
               aggregate_update_norm=0.5)  # fmt: skip
    log.append("checkpoint", round=2, path="runs/ckpt-2.enc", sha256=H, key_id="0123456789abcdef")
    log.append("release", round=2, model_sha256=H, report_sha256=H, membership_auc=0.52, gate_passed=True)


@pytest.fixture()
def signing_key() -> Ed25519PrivateKey:
    """A fresh Ed25519 key."""
    return Ed25519PrivateKey.generate()


@pytest.fixture()
def log_path(tmp_path: Path, signing_key: Ed25519PrivateKey) -> Path:
    """A log of six entries."""
    path = tmp_path / "audit.jsonl"
    with AuditLog(path, signing_key, clock=_clock) as log:
        _fill(log)
    return path


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def test_intact_log_verifies(log_path: Path, signing_key: Ed25519PrivateKey) -> None:
    # Execute
    report = verify_log(log_path, signing_key.public_key())

    # Assert
    assert report.ok and report.entries == 6 and report.first_bad_line is None
    first = json.loads(_lines(log_path)[0])
    assert first["seq"] == 0 and first["prev_hash"] == GENESIS_HASH and first["kind"] == "run_start"
    assert first["time"] == "2026-01-02T03:04:05+00:00"


def test_reopening_continues_the_chain(log_path: Path, signing_key: Ed25519PrivateKey) -> None:
    # Execute
    with AuditLog(log_path, signing_key) as log:
        assert log.entries == 6
        head = log.append("refusal", site="d", rule="cohort_size", reason="cohort of 3 patients")

    # Assert
    report = verify_log(log_path, signing_key.public_key())
    assert report.ok and report.entries == 7 and report.head_hash == head


def test_edited_entry_is_named(log_path: Path, signing_key: Ed25519PrivateKey) -> None:
    # Prepare: lower the ε reported for site a in round 2 (line 4)
    lines = _lines(log_path)
    lines[3] = lines[3].replace(b'"epsilon_spent":0.7', b'"epsilon_spent":0.1')
    log_path.write_bytes(b"".join(lines))

    # Execute
    report = verify_log(log_path, signing_key.public_key())

    # Assert
    assert (report.ok, report.first_bad_line, report.problem, report.entries) == (False, 4, "bad_signature", 3)


def test_deleted_entry_is_named(log_path: Path, signing_key: Ed25519PrivateKey) -> None:
    # Prepare: remove the refusal (line 3)
    lines = _lines(log_path)
    del lines[2]
    log_path.write_bytes(b"".join(lines))

    # Execute
    report = verify_log(log_path, signing_key.public_key())

    # Assert
    assert (report.first_bad_line, report.problem) == (3, "seq_gap")
    assert "expected seq 2, found 3" in report.reason


def test_reordered_entries_are_named(log_path: Path, signing_key: Ed25519PrivateKey) -> None:
    # Prepare: swap lines 4 and 5
    lines = _lines(log_path)
    lines[3], lines[4] = lines[4], lines[3]
    log_path.write_bytes(b"".join(lines))

    # Execute
    report = verify_log(log_path, signing_key.public_key())

    # Assert
    assert (report.first_bad_line, report.problem) == (4, "seq_gap")


def test_truncated_last_line_is_named(log_path: Path, signing_key: Ed25519PrivateKey) -> None:
    # Prepare: cut the last entry in the middle (an interrupted write)
    data = log_path.read_bytes()
    log_path.write_bytes(data[: len(data) - 40])

    # Execute
    report = verify_log(log_path, signing_key.public_key())

    # Assert
    assert (report.first_bad_line, report.problem, report.entries) == (6, "truncated", 5)


def test_removed_tail_is_caught_only_with_an_anchor(log_path: Path, signing_key: Ed25519PrivateKey) -> None:
    # Prepare: the head after 5 entries was recorded (privacy report); then the 6th is appended
    with_five = b"".join(_lines(log_path)[:5])
    anchor_path = log_path.with_name("five.jsonl")
    anchor_path.write_bytes(with_five)
    anchor = verify_log(anchor_path, signing_key.public_key()).head_hash

    # Execute
    full = verify_log(log_path, signing_key.public_key(), anchor=anchor)
    log_path.write_bytes(b"".join(_lines(log_path)[:4]))  # entries 5 and 6 removed
    without = verify_log(log_path, signing_key.public_key())
    with_anchor = verify_log(log_path, signing_key.public_key(), anchor=anchor)

    # Assert
    assert full.ok and full.entries == 6
    assert without.ok and without.entries == 4
    assert (with_anchor.ok, with_anchor.problem, with_anchor.first_bad_line) == (False, "anchor_missing", 5)


def test_spliced_log_breaks_the_chain(tmp_path: Path, log_path: Path, signing_key: Ed25519PrivateKey) -> None:
    # Prepare: another run's log by the same key, its line 4 put in place of ours
    other = tmp_path / "other.jsonl"
    with AuditLog(other, signing_key, clock=_clock) as log:
        log.append("run_start", run_id="run-2", study="heart-disease", config_sha256=H, app_hash=H)
        _fill(log)
    lines = _lines(log_path)
    lines[3] = _lines(other)[3]
    log_path.write_bytes(b"".join(lines))

    # Execute
    report = verify_log(log_path, signing_key.public_key())

    # Assert
    assert (report.first_bad_line, report.problem) == (4, "broken_chain")


def test_wrong_key_fails_at_the_first_entry(log_path: Path) -> None:
    report = verify_log(log_path, Ed25519PrivateKey.generate().public_key())
    assert (report.first_bad_line, report.problem) == (1, "bad_signature")


def test_garbage_and_reformatted_lines_are_named(log_path: Path, signing_key: Ed25519PrivateKey) -> None:
    # Prepare
    lines = _lines(log_path)
    pretty = json.dumps(json.loads(lines[1])).encode() + b"\n"  # same content, spaces added
    garbage = [*lines[:2], b"not json\n", *lines[3:]]

    # Execute
    log_path.write_bytes(b"".join([lines[0], pretty, *lines[2:]]))
    reformatted = verify_log(log_path, signing_key.public_key())
    log_path.write_bytes(b"".join(garbage))
    bad_json = verify_log(log_path, signing_key.public_key())

    # Assert
    assert (reformatted.first_bad_line, reformatted.problem) == (2, "bad_entry")
    assert (bad_json.first_bad_line, bad_json.problem) == (3, "bad_json")


def test_opening_a_tampered_log_refuses_to_append(log_path: Path, signing_key: Ed25519PrivateKey) -> None:
    # Prepare
    log_path.write_bytes(b"".join(_lines(log_path)[1:]))
    before = log_path.read_bytes()

    # Execute / Assert
    with pytest.raises(AuditLogCorrupt, match="line 1: seq_gap") as info:
        AuditLog(log_path, signing_key)
    assert info.value.report.first_bad_line == 1
    assert log_path.read_bytes() == before


def test_only_known_kinds_and_fields_are_logged(tmp_path: Path, signing_key: Ed25519PrivateKey) -> None:
    with AuditLog(tmp_path / "a.jsonl", signing_key) as log:
        with pytest.raises(AuditFieldError, match="unknown audit entry kind 'note'"):
            log.append("note", text="anything")
        with pytest.raises(AuditFieldError, match="patient_name.*Extra inputs"):
            log.append("refusal", site="a", rule="cohort_size", reason="small", patient_name="Jane Doe")
        with pytest.raises(AuditFieldError, match="site"):
            log.append("refusal", site="Jane Doe, born 1950", rule="x", reason="r")
        with pytest.raises(AuditFieldError, match="reason"):
            log.append("refusal", site="a", rule="x", reason="line one\nline two")
        assert log.entries == 0


def test_second_writer_is_refused(tmp_path: Path, signing_key: Ed25519PrivateKey) -> None:
    with AuditLog(tmp_path / "a.jsonl", signing_key):
        with pytest.raises(AuditLogBusy, match="another process"):
            AuditLog(tmp_path / "a.jsonl", signing_key)


def test_signing_key_files(tmp_path: Path) -> None:
    # Execute
    private, public = generate_signing_key(tmp_path / "audit.key")

    # Assert
    assert stat.S_IMODE(private.stat().st_mode) == 0o600 and public.name == "audit.pub"
    key = load_signing_key(private)
    assert key.public_key() == load_verify_key(public)
    private.chmod(0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_signing_key(private)


def test_cli_verify_exit_codes_and_messages(tmp_path: Path, log_path: Path) -> None:
    # Prepare: the fixture's key is not on disk; re-sign a log with a key file
    private, public = generate_signing_key(tmp_path / "audit.key")
    path = tmp_path / "cli.jsonl"
    with AuditLog(path, load_signing_key(private)) as log:
        _fill(log)
    runner = CliRunner()

    # Execute
    head = verify_log(path, load_verify_key(public)).head_hash
    good = runner.invoke(audit_app, ["verify", str(path), "--key", str(public), "--anchor", head])
    lines = _lines(path)
    del lines[1]
    path.write_bytes(b"".join(lines))
    bad = runner.invoke(audit_app, ["verify", str(path), "--key", str(public)])

    # Assert
    assert good.exit_code == 0, good.output
    assert "ok: 6 entries" in good.output
    assert bad.exit_code == 1
    assert "line 2: seq_gap" in bad.output
