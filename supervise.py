"""Start, watch and stop the Flower processes a deployment runs (SuperLink, SuperNodes).

Shared by ``server.deploy`` and ``client.deploy`` (which may not import each other). Linux
only: process trees are read from ``/proc``. Every wait is bounded; every stop is by PID,
checked against the process start time recorded in the PID file so that a reused PID is
never signalled.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from .notices import install_notice_filters

__all__ = [
    "AlreadyRunningError",
    "ExecutableNotFoundError",
    "NotRunningError",
    "ProcessExitedError",
    "ProcessHandle",
    "ReadyTimeoutError",
    "SuperviseError",
    "find_executable",
    "flower_env",
    "is_running",
    "process_age_s",
    "quiet_flower",
    "read_pid_file",
    "spawn",
    "stop_pid",
    "stop_pid_file",
    "stop_popen",
    "stop_process",
    "stop_signals_raise",
    "supervise_foreground",
    "TerminationRequested",
    "exit_status",
    "wait_for_log",
    "wait_for_port",
]

logger = logging.getLogger(__name__)

#: environment every Flower process runs with (docs/architecture.md)
FLOWER_QUIET_ENV: Mapping[str, str] = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
}
_POLL_S = 0.2
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class SuperviseError(Exception):
    """Base class of process supervision errors."""


class ExecutableNotFoundError(SuperviseError):
    """Raised when a Flower command (``flower-superlink``, ``flwr``…) is not installed."""


class AlreadyRunningError(SuperviseError):
    """Raised when a PID file names a process that is still running."""


class NotRunningError(SuperviseError):
    """Raised when asked to stop a process that a PID file does not name (or is gone)."""


class ProcessExitedError(SuperviseError):
    """Raised when a process exits before it became ready.

    Attributes
    ----------
    returncode : int or None
        Its exit status when known.
    log_tail : str
        The last lines of its log.
    """

    def __init__(self, message: str, *, returncode: int | None, log_tail: str) -> None:
        super().__init__(message)
        self.returncode = returncode
        self.log_tail = log_tail


class ReadyTimeoutError(SuperviseError):
    """Raised when a process did not become ready in time (it has been stopped)."""

    def __init__(self, message: str, *, log_tail: str) -> None:
        super().__init__(message)
        self.log_tail = log_tail


@dataclass
class ProcessHandle:
    """A started process: its PID, the start time that identifies it, and its log.

    Attributes
    ----------
    pid : int
        Process id.
    start_ticks : int
        ``/proc/PID/stat`` start time, to tell this process from a later one with the same PID.
    log_path : pathlib.Path
        File receiving its stdout and stderr.
    log_offset : int
        Size of the log before this start (older runs' lines are ignored when waiting).
    pid_file : pathlib.Path or None
        The PID file written for it.
    argv : list of str
        Its command line.
    popen : subprocess.Popen or None
        Set in the process that started it (lets it collect the exit status).
    """

    pid: int
    start_ticks: int
    log_path: Path
    log_offset: int = 0
    pid_file: Path | None = None
    argv: list[str] = field(default_factory=list)
    popen: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def returncode(self) -> int | None:
        """Return the exit status if the process has exited and is our child, else None."""
        return None if self.popen is None else self.popen.poll()

    def running(self) -> bool:
        """Return whether the process is still running."""
        if self.popen is not None:
            # not /proc: a leader thread that has exited shows "Z" while other threads run
            return self.popen.poll() is None
        return is_running(self.pid, self.start_ticks)

    def wait_exit_status(self, timeout: float = 5.0) -> int | None:
        """Return the exit status, waiting up to ``timeout`` s for an exiting child; else None."""
        if self.popen is None:
            return None
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def log_text(self) -> str:
        """Return what the process logged since this start."""
        try:
            with self.log_path.open("rb") as fh:
                fh.seek(self.log_offset)
                return fh.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        """Return the last ``lines`` lines logged since this start, colour codes removed."""
        return "\n".join(_ANSI.sub("", self.log_text()).splitlines()[-lines:])


def process_age_s(pid: int | None = None) -> float:
    """Return seconds since process ``pid`` (default: this one) started, from ``/proc``."""
    fields = _stat_fields(os.getpid() if pid is None else pid)
    if fields is None:
        raise NotRunningError(f"process {pid} is not running")
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    return uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK")


def find_executable(name: str) -> str:
    """Return the path of a console script, preferring the running interpreter's ``bin``."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise ExecutableNotFoundError(
            f"`{name}` not found beside {sys.executable} nor on PATH: install fedcare's "
            "dependencies (pip install -e .) in the environment that runs fedcare"
        )
    return found


def quiet_flower(environ: MutableMapping[str, str] | None = None) -> MutableMapping[str, str]:
    """Turn Flower's telemetry and update check off in ``environ`` (default: this process's environment).

    The one place fedcare sets :data:`FLOWER_QUIET_ENV`: every entry point that runs Flower in
    its own process (the ``fedcare`` command, the ServerApp and ClientApp modules, the
    simulation runner) calls it with no argument, and every child environment fedcare builds
    (:func:`flower_env`, :func:`spawn`) goes through it. The values are forced, not defaulted:
    a hospital's processes never phone home, whatever the surrounding environment says.
    Called with no argument (this process), it also installs the filters of the known
    third-party notices (:func:`fedcare.notices.install_notice_filters`). Returns ``environ``.
    """
    if environ is None:
        install_notice_filters()
    env = os.environ if environ is None else environ
    env.update(FLOWER_QUIET_ENV)
    return env


def flower_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Return the environment for a Flower process: telemetry and update check off.

    The interpreter's ``bin`` folder is put first on ``PATH`` because Flower starts
    ``flower-superexec``, ``flwr-serverapp`` and ``flwr-clientapp`` by name.
    """
    env = dict(os.environ)
    env.update(extra or {})
    quiet_flower(env)
    bindir = str(Path(sys.executable).parent)
    parts = [p for p in env.get("PATH", "").split(os.pathsep) if p and p != bindir]
    env["PATH"] = os.pathsep.join([bindir, *parts])
    return env


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # field 2 (comm) is parenthesised and may hold spaces: split after the last ')'
    return raw[raw.rfind(")") + 2 :].split()


def _start_ticks(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return None if fields is None else int(fields[19])


def is_running(pid: int, start_ticks: int | None = None) -> bool:
    """Return whether ``pid`` runs (not a zombie) and, if given, started at ``start_ticks``."""
    fields = _stat_fields(pid)
    if fields is None or fields[0] == "X":
        return False
    if start_ticks is not None and int(fields[19]) != start_ticks:
        return False
    # "Z" is also shown while the main thread has exited and other threads still run
    return fields[0] != "Z" or _threads(pid) > 1


def _threads(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Threads:"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


def _process_tree(root: int, start_ticks: int) -> list[tuple[int, int]]:
    """Return ``(pid, start_ticks)`` of the descendants of ``root`` and of the members of the
    process group ``root`` leads (children orphaned by an exited parent stay in it)."""
    children: dict[int, list[int]] = {}
    group: list[tuple[int, int]] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        fields = _stat_fields(pid)
        if fields is None or pid == root:
            continue
        children.setdefault(int(fields[1]), []).append(pid)
        if int(fields[2]) == root and int(fields[19]) >= start_ticks:
            group.append((pid, int(fields[19])))
    out: list[tuple[int, int]] = []
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            ticks = _start_ticks(child)
            if ticks is not None:
                out.append((child, ticks))
            todo.append(child)
    seen = {p for p, _ in out}
    return out + [(p, t) for p, t in group if p not in seen]


def write_pid_file(path: Path, pid: int, start_ticks: int) -> None:
    """Write ``pid`` and its start time to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{pid} {start_ticks}\n")


def read_pid_file(path: Path) -> tuple[int, int]:
    """Return ``(pid, start_ticks)`` from a PID file written by :func:`spawn`."""
    try:
        pid_s, ticks_s = path.read_text().split()
        return int(pid_s), int(ticks_s)
    except FileNotFoundError:
        raise NotRunningError(
            f"no PID file at {path}: nothing was started with this state folder (or it was "
            "stopped already)"
        ) from None
    except ValueError:
        raise NotRunningError(
            f"PID file {path} is not one fedcare wrote; remove it and check with `ps` what runs"
        ) from None


def spawn(
    argv: Sequence[str],
    *,
    log_path: Path,
    pid_file: Path | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> ProcessHandle:
    """Start ``argv`` in its own session, output appended to ``log_path``; write the PID file.

    The child gets ``env`` (default: this process's environment) with Flower's telemetry and
    update check off (:func:`quiet_flower`).

    Raises
    ------
    AlreadyRunningError
        When ``pid_file`` names a process that still runs.
    """
    if pid_file is not None and pid_file.exists():
        try:
            pid, ticks = read_pid_file(pid_file)
        except NotRunningError:
            pid, ticks = -1, -1
        if pid > 0 and is_running(pid, ticks):
            raise AlreadyRunningError(
                f"process {pid} from {pid_file} is still running: stop it first"
            )
        pid_file.unlink()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    offset = log_path.stat().st_size if log_path.exists() else 0
    with log_path.open("ab") as log_fh:
        popen = subprocess.Popen(  # noqa: S603 - argv is built by fedcare, no shell
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log_fh,
            stderr=subprocess.STDOUT,
            env=quiet_flower(dict(os.environ if env is None else env)),
            cwd=cwd,
            start_new_session=True,
            close_fds=True,
        )
    ticks = _start_ticks(popen.pid)
    if ticks is None:  # exited at once; keep a handle that reports it
        ticks = -1
    handle = ProcessHandle(
        pid=popen.pid,
        start_ticks=ticks,
        log_path=log_path,
        log_offset=offset,
        pid_file=pid_file,
        argv=list(argv),
        popen=popen,
    )
    if pid_file is not None:
        write_pid_file(pid_file, popen.pid, ticks)
    logger.info("started %s as PID %d (log %s)", Path(argv[0]).name, popen.pid, log_path)
    return handle


def wait_for_log(
    handle: ProcessHandle,
    pattern: str,
    *,
    timeout: float,
    what: str,
) -> re.Match[str]:
    """Wait until the process logs a line matching ``pattern``; bounded by ``timeout``.

    Raises
    ------
    ProcessExitedError
        When the process exits first.
    ReadyTimeoutError
        When ``timeout`` seconds pass first (the process is left running: stop it).
    """
    regex = re.compile(pattern)
    deadline = time.monotonic() + timeout
    while True:
        match = regex.search(handle.log_text())
        if match:
            return match
        if not handle.running():
            match = regex.search(handle.log_text())
            if match:
                return match
            status = handle.wait_exit_status()
            raise ProcessExitedError(
                f"{what} exited (status {status}) before it was ready; its log "
                f"{handle.log_path} ends with:\n{handle.log_tail()}",
                returncode=status,
                log_tail=handle.log_tail(),
            )
        if time.monotonic() > deadline:
            raise ReadyTimeoutError(
                f"{what} was not ready after {timeout:.0f} s; its log {handle.log_path} ends "
                f"with:\n{handle.log_tail()}",
                log_tail=handle.log_tail(),
            )
        time.sleep(_POLL_S)


def wait_for_port(handle: ProcessHandle, host: str, port: int, *, timeout: float, what: str) -> None:
    """Wait until ``host:port`` accepts TCP connections while the process runs; bounded."""
    deadline = time.monotonic() + timeout
    while True:
        if not handle.running():
            status = handle.wait_exit_status()
            raise ProcessExitedError(
                f"{what} exited (status {status}) before listening on "
                f"{host}:{port}; its log {handle.log_path} ends with:\n{handle.log_tail()}",
                returncode=status,
                log_tail=handle.log_tail(),
            )
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise ReadyTimeoutError(
                f"{what} did not listen on {host}:{port} within {timeout:.0f} s; its log "
                f"{handle.log_path} ends with:\n{handle.log_tail()}",
                log_tail=handle.log_tail(),
            )
        time.sleep(_POLL_S)


def _wait_gone(
    pids: Sequence[tuple[int, int]], timeout: float, popen: subprocess.Popen[Any] | None
) -> list[tuple[int, int]]:
    deadline = time.monotonic() + timeout
    while True:
        if popen is not None:
            popen.poll()  # reap our own child so it does not linger as a zombie
        alive = [(p, t) for p, t in pids if is_running(p, t)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


def _signal(pid: int, ticks: int, sig: signal.Signals) -> None:
    if is_running(pid, ticks):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def stop_pid(
    pid: int,
    start_ticks: int,
    *,
    timeout: float = 15.0,
    popen: subprocess.Popen[Any] | None = None,
) -> bool:
    """Stop process ``pid`` and the processes it started: SIGTERM, then SIGKILL after ``timeout``.

    Returns
    -------
    bool
        True when the process was running and has been stopped; False when it was gone.
    """
    alive = popen.poll() is None if popen is not None else is_running(pid, start_ticks)
    tree = [(pid, start_ticks), *_process_tree(pid, start_ticks)]
    if not alive:
        # the process is gone; stop what it left behind in its process group
        left = [(p, t) for p, t in tree[1:] if is_running(p, t)]
        for p, t in left:
            _signal(p, t, signal.SIGTERM)
        for p, t in _wait_gone(left, 5.0, None):
            _signal(p, t, signal.SIGKILL)
        return False
    _signal(pid, start_ticks, signal.SIGTERM)
    left = _wait_gone(tree[:1], timeout, popen)
    # children (SuperExec, flwr-serverapp / flwr-clientapp) normally leave with their parent
    left = _wait_gone(tree, 3.0, popen)
    for p, t in left:
        _signal(p, t, signal.SIGTERM)
    left = _wait_gone(left, 5.0, popen)
    for p, t in left:
        logger.warning("process %d did not stop on SIGTERM; sending SIGKILL", p)
        _signal(p, t, signal.SIGKILL)
    left = _wait_gone(left, 5.0, popen)
    if left:
        logger.error("processes still running after SIGKILL: %s", [p for p, _ in left])
    if popen is not None:
        try:
            popen.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            pass
    return True


def stop_pid_file(pid_file: Path, what: str, *, timeout: float = 15.0) -> bool:
    """Stop the process ``pid_file`` names (and its children), remove the file; False if it was gone.

    Raises
    ------
    NotRunningError
        When ``pid_file`` does not exist or holds no PID.
    """
    pid, ticks = read_pid_file(pid_file)
    stopped = stop_pid(pid, ticks, timeout=timeout)
    pid_file.unlink(missing_ok=True)
    logger.info("%s PID %d %s", what, pid, "stopped" if stopped else "was not running")
    return stopped


def stop_popen(popen: subprocess.Popen[Any], *, timeout: float = 15.0) -> bool:
    """Stop a child started with ``subprocess.Popen`` (and its children); reap it."""
    ticks = _start_ticks(popen.pid)
    if ticks is None:
        popen.poll()
        return False
    return stop_pid(popen.pid, ticks, timeout=timeout, popen=popen)


def stop_process(handle: ProcessHandle, *, timeout: float = 15.0) -> bool:
    """Stop a process started by :func:`spawn` (and its children); remove its PID file."""
    stopped = stop_pid(handle.pid, handle.start_ticks, timeout=timeout, popen=handle.popen)
    if handle.pid_file is not None and handle.pid_file.exists():
        try:
            if read_pid_file(handle.pid_file)[0] == handle.pid:
                handle.pid_file.unlink()
        except NotRunningError:
            pass
    return stopped


# --------------------------------------------------------------------------- foreground (systemd, containers)

#: the signals a foreground supervisor turns into an orderly stop of its children
STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class TerminationRequested(BaseException):  # noqa: N818 - a request, not an error; BaseException: never swallowed
    """A stop signal (SIGTERM, SIGINT, SIGHUP) reached a foreground supervisor (:func:`stop_signals_raise`)."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"received {signal.Signals(signum).name}")


@contextlib.contextmanager
def stop_signals_raise() -> Iterator[None]:
    """Raise :class:`TerminationRequested` in the main thread on SIGTERM, SIGINT or SIGHUP while inside.

    A process that is PID 1 in a container ignores SIGTERM unless it installs a handler; under
    systemd the main process gets SIGTERM on ``systemctl stop``. The previous handlers are
    restored on exit. Main thread only (Python's rule for signal handlers).
    """

    def _raise(signum: int, _frame: object) -> None:
        raise TerminationRequested(signum)

    previous = {sig: signal.signal(sig, _raise) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def exit_status(returncode: int | None) -> int:
    """Return a child's status as a shell reports it: its exit code, 128 + N when signal N ended it, 1 if unknown."""
    if returncode is None:
        return 1
    return 128 - returncode if returncode < 0 else returncode


def supervise_foreground(
    handle: ProcessHandle,
    *,
    timeout: float = 15.0,
    poll_s: float = 0.5,
    echo: IO[str] | None = None,
) -> int:
    """Wait on a process started by :func:`spawn` until it exits or a stop signal arrives; return its status.

    Call inside :func:`stop_signals_raise`. On SIGTERM, SIGINT or SIGHUP the process and
    everything it started are stopped (SIGTERM, SIGKILL after ``timeout``; further stop signals
    are ignored meanwhile); when it exits by itself, whatever it left in its process group is
    stopped. Its PID file is removed either way. ``echo`` receives the process's log as it grows
    (stdout for a container's or journald's log). Returns :func:`exit_status` of the process.
    """
    offset = handle.log_offset
    try:
        while handle.running():
            offset = _echo_log(handle, offset, echo)
            time.sleep(poll_s)
    except TerminationRequested as request:
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)  # one orderly stop; a second signal must not cut it short
        logger.info("%s: stopping PID %d and its children", request, handle.pid)
    stop_process(handle, timeout=timeout)  # a running node, or what an exited one left behind
    _echo_log(handle, offset, echo)
    return exit_status(handle.wait_exit_status(timeout=5.0))


def _echo_log(handle: ProcessHandle, offset: int, echo: IO[str] | None) -> int:
    """Write the log's new bytes from ``offset`` to ``echo``; return the new offset."""
    if echo is None:
        return offset
    try:
        with handle.log_path.open("rb") as fh:
            fh.seek(offset)
            data = fh.read()
    except FileNotFoundError:
        return offset
    if data:
        echo.write(data.decode("utf-8", errors="replace"))
        echo.flush()
    return offset + len(data)
