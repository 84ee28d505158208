"""``fedcare node start --foreground``: the started process stays, supervises the SuperNode, and on
SIGTERM stops it and everything it started, then exits with its status (systemd, containers).

One real TLS SuperLink with node authentication on 127.0.0.1 (tests/fixtures/deploy_support.py);
every process is stopped by PID in ``finally`` blocks.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))

from deploy_support import NO_APP_PIN, federation, free_port, heart_manifest  # noqa: E402

from fedcare.supervise import flower_env, is_running, read_pid_file, stop_pid  # noqa: E402

SITE = "cleveland"
READY_S = 180.0
STOP_S = 60.0


def _descendants(root: int) -> list[tuple[int, int]]:
    """Return ``(pid, start ticks)`` of every process below ``root`` (from /proc)."""
    parent_of: dict[int, int] = {}
    ticks: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "stat").read_text()
        except OSError:
            continue
        fields = raw[raw.rfind(")") + 2 :].split()
        parent_of[int(entry.name)] = int(fields[1])
        ticks[int(entry.name)] = int(fields[19])
    out, todo = [], [root]
    while todo:
        parent = todo.pop()
        for pid, ppid in parent_of.items():
            if ppid == parent:
                out.append((pid, ticks[pid]))
                todo.append(pid)
    return out


def _reader(stream: object, lines: queue.Queue[str]) -> None:
    """Copy a pipe's lines into ``lines`` (a thread, so that waiting on it is bounded)."""
    for line in iter(stream.readline, ""):  # type: ignore[attr-defined]
        lines.put(line)


@pytest.mark.integration
@pytest.mark.slow
def test_foreground_node_stays_attached_and_sigterm_stops_it_and_its_children(
    tmp_path: Path, shared_data: Path
) -> None:
    # Prepare: a federation with this hospital's key registered
    with federation(tmp_path, nodes=[SITE]) as fed:
        manifest = heart_manifest(shared_data, SITE, tmp_path / "manifests")
        state = tmp_path / "node"
        argv = [
            sys.executable, "-c", "from fedcare.cli import main; main()", "node", "start", "--foreground",
            "--site", str(manifest), "--superlink", fed.address, "--port", str(free_port()),
            "--ca", str(fed.bundle_ca), "--key", str(fed.node_keys[SITE].private_key),
            "--state", str(state), "--trust-app", NO_APP_PIN, "--ready-timeout", str(READY_S),
        ]  # fmt: skip
        proc = subprocess.Popen(  # noqa: S603
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=flower_env(),
            start_new_session=True,
        )
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=_reader, args=(proc.stdout, lines), daemon=True).start()
        seen: list[str] = []
        tree: list[tuple[int, int]] = []
        try:
            deadline = time.monotonic() + READY_S + 30
            while not any("ready: node" in line for line in seen) and time.monotonic() < deadline:
                try:
                    seen.append(lines.get(timeout=1.0))
                except queue.Empty:
                    assert proc.poll() is None, "".join(seen)
            assert any("ready: node" in line for line in seen), "".join(seen)
            time.sleep(2.0)  # it keeps running: it did not detach
            node_pid, node_ticks = read_pid_file(state / "supernode.pid")
            tree = _descendants(proc.pid)

            # Execute
            os.kill(proc.pid, signal.SIGTERM)
            code = proc.wait(timeout=STOP_S)

            # Assert: it was in the foreground, the node its child; everything it started is gone
            assert proc.returncode is not None
            assert (node_pid, node_ticks) in tree  # the SuperNode was this process's child
            assert code in (0, 128 + signal.SIGTERM), "".join(seen)
            left = [p for p, t in tree if is_running(p, t)]
            assert left == []
            assert not (state / "supernode.pid").exists()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
            for pid, ticks in tree:
                if is_running(pid, ticks):
                    stop_pid(pid, ticks, timeout=5.0)
