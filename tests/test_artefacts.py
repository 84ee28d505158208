"""Encrypted artefacts: round trip, any flipped byte, swapped metadata, wrong key, key files, rotation."""

from __future__ import annotations

import base64
import json
import os
import stat
import struct
from pathlib import Path

import pytest

from fedcare.privacy.artefacts import (
    MAGIC,
    ArtefactError,
    ArtefactKey,
    ArtefactMetadata,
    ArtefactMismatch,
    ArtefactTampered,
    KeyFileError,
    WrongKey,
    decrypt_bytes,
    encrypt_bytes,
    generate_key,
    read_encrypted,
    rotate,
    write_encrypted,
)

CONFIG = "0f" * 32
DATA = b"model weights \x00\x01\x02" * 20


def _meta(round_: int = 3, **changes: object) -> ArtefactMetadata:
    values: dict[str, object] = {"study": "heart-disease", "kind": "checkpoint", "round": round_,
                                 "config_sha256": CONFIG, "run_id": "run-1"}  # fmt: skip
    values.update(changes)
    return ArtefactMetadata(**values)


@pytest.fixture()
def key() -> ArtefactKey:
    """A fixed test key."""
    return ArtefactKey(bytes(range(32)))


def _header_end(blob: bytes) -> int:
    return 9 + struct.unpack_from(">I", blob, 5)[0]


def test_round_trip_returns_data_and_metadata(key: ArtefactKey) -> None:
    # Prepare
    meta = _meta()

    # Execute
    blob = encrypt_bytes(DATA, key=key, metadata=meta)
    data, back = decrypt_bytes(blob, key=key, expected={"study": "heart-disease", "round": 3})

    # Assert
    assert data == DATA and back == meta
    assert blob.startswith(MAGIC) and DATA not in blob
    header = json.loads(blob[9 : _header_end(blob)])
    assert header["key_id"] == key.key_id and header["alg"] == "AES-256-GCM"
    assert header["metadata"]["config_sha256"] == CONFIG


def test_each_write_uses_a_fresh_nonce(key: ArtefactKey) -> None:
    # Prepare
    meta = _meta()

    # Execute
    first, second = (encrypt_bytes(DATA, key=key, metadata=meta) for _ in range(2))

    # Assert: same header, different nonce and ciphertext
    end = _header_end(first)
    assert first[:end] == second[:end]
    assert first[end : end + 12] != second[end : end + 12]
    assert first[end + 12 :] != second[end + 12 :]


def test_flipping_any_byte_is_detected(key: ArtefactKey) -> None:
    # Prepare
    blob = encrypt_bytes(b"x" * 40, key=key, metadata=_meta())
    end = _header_end(blob)
    key_id_at = blob.index(key.key_id.encode())
    key_id_span = range(key_id_at, key_id_at + 16)

    # Execute / Assert: every position (magic, version, length, header, nonce, ciphertext, tag)
    for position in range(len(blob)):
        tampered = bytearray(blob)
        tampered[position] ^= 0x01
        expected = WrongKey if position in key_id_span else ArtefactTampered
        with pytest.raises(expected):
            decrypt_bytes(bytes(tampered), key=key)
    assert end + 12 + 40 + 16 == len(blob)


def test_truncated_and_extended_blobs_are_detected(key: ArtefactKey) -> None:
    blob = encrypt_bytes(DATA, key=key, metadata=_meta())
    for bad in (blob[:-1], blob[:20], blob[:4], blob + b"\x00"):
        with pytest.raises(ArtefactTampered):
            decrypt_bytes(bad, key=key)


def test_swapped_metadata_is_detected(key: ArtefactKey) -> None:
    # Prepare: two artefacts under the same key; re-encode round 3's header as round 1's
    round3 = encrypt_bytes(DATA, key=key, metadata=_meta(3))
    round1 = encrypt_bytes(b"older weights", key=key, metadata=_meta(1))
    end3, end1 = _header_end(round3), _header_end(round1)
    header = json.loads(round3[9:end3])
    header["metadata"]["round"] = 1
    forged_header = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    forged = round3[:5] + struct.pack(">I", len(forged_header)) + forged_header + round3[end3:]

    # Execute / Assert: edited header, and one file's header on another file's ciphertext
    with pytest.raises(ArtefactTampered, match="failed authentication"):
        decrypt_bytes(forged, key=key)
    with pytest.raises(ArtefactTampered, match="failed authentication"):
        decrypt_bytes(round1[:end1] + round3[end3:], key=key)


def test_authentic_artefact_of_the_wrong_round_is_refused(key: ArtefactKey, tmp_path: Path) -> None:
    # Prepare: the round-3 checkpoint file replaced by an authentic round-1 file
    path = tmp_path / "round3.bin"
    write_encrypted(path, DATA, key=key, metadata=_meta(1))

    # Execute / Assert
    with pytest.raises(ArtefactMismatch, match="round: expected 3, found 1"):
        read_encrypted(path, key=key, expected_metadata={"round": 3})


def test_wrong_key_is_reported_as_wrong_key(key: ArtefactKey) -> None:
    # Prepare
    other = ArtefactKey(bytes(range(1, 33)))
    blob = encrypt_bytes(DATA, key=key, metadata=_meta())

    # Execute / Assert
    with pytest.raises(WrongKey, match=f"key id {key.key_id}, not {other.key_id}"):
        decrypt_bytes(blob, key=other)


def test_write_is_atomic_and_private(key: ArtefactKey, tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "ckpt.enc"

    # Execute
    write_encrypted(path, DATA, key=key, metadata=_meta())
    write_encrypted(path, b"second", key=key, metadata=_meta(4))

    # Assert
    assert read_encrypted(path, key=key)[0] == b"second"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.enc"]  # no temp files left


def test_generated_key_file_is_0600_and_loads(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "artefact.key"

    # Execute
    key = generate_key(path)

    # Assert
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert ArtefactKey.from_file(path) == key
    assert len(base64.b64decode(path.read_bytes().strip())) == 32
    assert key.key_id not in repr(path.read_bytes()) and "ArtefactKey(key_id=" in repr(key)
    with pytest.raises(KeyFileError, match="refusing to overwrite"):
        generate_key(path)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_key_file_readable_by_others_is_refused_with_the_fix(tmp_path: Path, mode: int) -> None:
    # Prepare
    path = tmp_path / "artefact.key"
    generate_key(path)
    os.chmod(path, mode)

    # Execute / Assert
    with pytest.raises(KeyFileError, match=rf"mode 0{mode:o}.*chmod 600 {path}"):
        ArtefactKey.from_file(path)


def test_key_file_of_the_wrong_length_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "short.key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, base64.b64encode(b"k" * 16))
    os.close(fd)
    with pytest.raises(KeyFileError, match="holds no 32-byte key"):
        ArtefactKey.from_file(path)


def test_key_from_environment_hex_and_base64(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    raw = bytes(range(32))

    # Execute / Assert
    monkeypatch.setenv("FEDCARE_ARTEFACT_KEY", raw.hex())
    assert ArtefactKey.from_env() == ArtefactKey(raw)
    monkeypatch.setenv("FEDCARE_ARTEFACT_KEY", base64.b64encode(raw).decode())
    assert ArtefactKey.from_env() == ArtefactKey(raw)
    monkeypatch.setenv("FEDCARE_ARTEFACT_KEY", base64.b64encode(raw[:31]).decode())
    with pytest.raises(KeyFileError, match="FEDCARE_ARTEFACT_KEY.*32 bytes"):
        ArtefactKey.from_env()
    monkeypatch.delenv("FEDCARE_ARTEFACT_KEY")
    with pytest.raises(KeyFileError, match="not set"):
        ArtefactKey.from_env()


def test_rotation_re_encrypts_everything_and_can_be_rerun(key: ArtefactKey, tmp_path: Path) -> None:
    # Prepare
    new = ArtefactKey(bytes(range(100, 132)))
    paths = [tmp_path / f"r{i}.enc" for i in range(3)]
    for i, path in enumerate(paths):
        write_encrypted(path, DATA + bytes([i]), key=key, metadata=_meta(i))

    # Execute
    first = rotate(paths, key, new)
    second = rotate(paths, key, new)

    # Assert
    assert first == paths and second == []
    for i, path in enumerate(paths):
        data, meta = read_encrypted(path, key=new, expected_metadata={"round": i})
        assert data == DATA + bytes([i])
        with pytest.raises(WrongKey):
            read_encrypted(path, key=key)


def test_rotation_writes_nothing_when_one_artefact_is_tampered(key: ArtefactKey, tmp_path: Path) -> None:
    # Prepare
    new = ArtefactKey(bytes(range(100, 132)))
    good, bad = tmp_path / "good.enc", tmp_path / "bad.enc"
    write_encrypted(good, DATA, key=key, metadata=_meta())
    write_encrypted(bad, DATA, key=key, metadata=_meta())
    blob = bytearray(bad.read_bytes())
    blob[-1] ^= 0xFF
    bad.write_bytes(bytes(blob))
    before = good.read_bytes()

    # Execute / Assert
    with pytest.raises(ArtefactTampered, match="bad.enc"):
        rotate([good, bad], key, new)
    assert good.read_bytes() == before


def test_errors_share_one_base_class() -> None:
    assert all(issubclass(e, ArtefactError) for e in (ArtefactTampered, WrongKey, ArtefactMismatch, KeyFileError))


def test_cli_creates_keys_and_rotates(tmp_path: Path, key: ArtefactKey) -> None:
    # Prepare
    from typer.testing import CliRunner

    from fedcare.privacy.cli import audit_app

    runner = CliRunner()
    old_path, new_path, artefact = tmp_path / "old.key", tmp_path / "new.key", tmp_path / "a.enc"

    # Execute
    made_old = runner.invoke(audit_app, ["artefact-key", str(old_path)])
    made_new = runner.invoke(audit_app, ["artefact-key", str(new_path)])
    old, new = ArtefactKey.from_file(old_path), ArtefactKey.from_file(new_path)
    write_encrypted(artefact, DATA, key=old, metadata=_meta())
    rotated = runner.invoke(audit_app, ["rotate", str(artefact), "--old-key", str(old_path), "--new-key", str(new_path)])
    os.chmod(new_path, 0o644)
    refused = runner.invoke(audit_app, ["rotate", str(artefact), "--old-key", str(old_path), "--new-key", str(new_path)])

    # Assert
    assert made_old.exit_code == made_new.exit_code == 0 and old.key_id in made_old.output
    assert rotated.exit_code == 0, rotated.output
    assert f"re-encrypted 1 of 1 artefacts under key id {new.key_id}" in rotated.output
    assert read_encrypted(artefact, key=new)[0] == DATA
    assert refused.exit_code == 1 and "chmod 600" in refused.output
