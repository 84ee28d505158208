"""A warm SuperExec for a hospital's SuperNode: each ClientApp task forks from a pre-loaded process.

flwr runs every message a node receives in a fresh ``flwr-clientapp`` process, started by
the SuperNode's SuperExec (``flower-superexec``, itself started by name from ``PATH``). On a
busy hospital machine that process spends seconds importing torch, flwr and fedcare and reading
the site's data before it trains, twice per round (train and evaluate).

``fedcare node start`` (``NodeSettings.warm``, on by default) puts a ``flower-superexec`` of its
own first on the SuperNode's ``PATH``; it runs :func:`main`:

- import torch, flwr's ClientApp runtime and :mod:`fedcare.client.app` once, and read the
  site's data into the ClientApp's cache (``FEDCARE_WARM_MANIFEST``; no torch computation
  happens before a fork);
- then run flwr's own SuperExec loop (same arguments, same Runtime API, same task polling)
  with one change: a ClientApp task is started with ``os.fork()`` instead of ``Popen``. The
  child runs flwr's ``flwr-clientapp`` code unchanged, behind the hospital's app gate
  (:mod:`fedcare.client.app_gate`), and exits when the task is done. So every task
  still gets its own process (a crash or a leak ends with it) and nothing a task does reaches
  the next one; only the imports and the read-only data are shared. Random generator states are
  NOT shared: :mod:`fedcare.privacy.randomness` (imported first by :func:`preload`) reseeds
  torch's, NumPy's and ``random``'s global generators from OS entropy in every forked child, and
  a site without a seed draws its DP noise from fresh OS entropy anyway (``client.training``),
  so two tasks never add the same noise.

A task forks within ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL`` of the message's arrival, usually
before the SuperNode has pulled the message's objects from the SuperLink; its pulls from the
SuperNode retry after 0.05 s, not flwr's 1 s, 2 s, ... (:func:`fedcare.flower_bridge.shorten_pull_backoff`).

Both changes to flwr are guarded speed patches (:mod:`fedcare.flower_bridge`, ``warm-executor``
and ``pull-backoff``): on a flwr they do not recognise, the SuperExec runs every task as flwr
does, a fresh process started by name from ``PATH``, which for a ClientApp is the app gate's
``flwr-clientapp`` (:func:`fedcare.client.app_gate.write_gate_bin`); so the gate checks every
task either way, and the gate itself fails closed on a flwr it does not recognise.

Any other task type goes through flwr's subprocess executor as before (and the app gate
refuses it on a pinned node). The SuperExec polls for tasks every
``FLWR_SUPEREXEC_TASK_POLL_INTERVAL`` seconds (flwr's default 1 s; ``node start`` sets 0.1).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

from .. import flower_bridge

__all__ = ["WARM_MANIFEST_ENV", "ForkingExecutor", "main", "preload"]

logger = logging.getLogger(__name__)

#: absolute path of the site manifest whose data the warm process reads before forking
WARM_MANIFEST_ENV = "FEDCARE_WARM_MANIFEST"


def preload(manifest: str | None) -> float:
    """Import what every ClientApp task needs and cache the site's data; return seconds spent."""
    started = time.perf_counter()
    from ..privacy import randomness  # noqa: F401, PLC0415 - every forked task reseeds its generators
    import torch  # noqa: F401, PLC0415 - the point is to import it once

    flower_bridge.preload_clientapp_runtime()

    from . import app as client_app  # noqa: PLC0415
    from . import app_gate  # noqa: F401, PLC0415

    try:
        import opacus  # noqa: F401, PLC0415 - DP rounds
    except ImportError:  # pragma: no cover - opacus is a dependency
        pass
    if manifest:
        try:
            path = client_app.Path(manifest)
            client_app._load_data(client_app._stat_key(path))  # noqa: SLF001 - warm the cache
        except Exception as err:  # noqa: BLE001 - the task itself reports a bad manifest
            logger.warning("warm SuperExec: site data not preloaded (%s): tasks read it", err)
    return time.perf_counter() - started


def _run_child(argv: list[str]) -> int:
    """In the forked child: run ``flwr-clientapp`` behind the app gate; return the code."""
    from . import app_gate  # noqa: PLC0415 - already imported by preload

    # always exactly what the gate runs: no pin (and no allow_unpinned_apps) refuses every app
    return app_gate.main([flower_bridge.clientapp_command(), *argv])


class ForkingExecutor:
    """flwr's executor interface: ClientApp tasks forked from this warm process, others delegated."""

    def __init__(self, fallback: Any) -> None:
        self._fallback = fallback
        self._children: set[int] = set()

    def get_eligible_capacity(self, *args: Any, **kwargs: Any) -> Any:
        """Delegate (no capacity gate)."""
        return self._fallback.get_eligible_capacity(*args, **kwargs)

    def wait_for_capacity(self, *args: Any, **kwargs: Any) -> Any:
        """Delegate (no capacity gate)."""
        return self._fallback.wait_for_capacity(*args, **kwargs)

    def launch(self, spec: Any) -> Any:
        """Fork a ClientApp task; hand every other task type to flwr's subprocess executor."""
        if not flower_bridge.is_clientapp_task(spec):
            return self._fallback.launch(spec)
        argv = flower_bridge.clientapp_argv(spec)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # child: never return into the SuperExec loop
            code = 1
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                if spec.suppress_output:
                    devnull = os.open(os.devnull, os.O_WRONLY)
                    os.dup2(devnull, 1)
                    os.dup2(devnull, 2)
                code = _run_child(argv)
            except SystemExit as exc:  # flwr_exit ends every task with sys.exit
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except BaseException:  # noqa: BLE001 - report, then leave without the parent's handlers
                import traceback  # noqa: PLC0415

                traceback.print_exc()
            finally:
                try:
                    sys.stdout.flush()
                    sys.stderr.flush()
                finally:
                    os._exit(code)
        self._children.add(pid)
        return flower_bridge.launch_accepted()

    def reconcile(self) -> None:
        """Reap finished task processes."""
        for pid in list(self._children):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                self._children.discard(pid)
        self._fallback.reconcile()

    def close(self) -> None:
        """Ask running task processes to stop, then close the fallback executor."""
        for pid in list(self._children):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        self._fallback.close()


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the warm ``flower-superexec``: same arguments as flwr's."""
    args = list(sys.argv[1:] if argv is None else argv)
    if flower_bridge.wrap_superexec_executor(ForkingExecutor):
        seconds = preload(os.environ.get(WARM_MANIFEST_ENV))
        sys.stderr.write(f"fedcare warm SuperExec ready (PID {os.getpid()}, preload {seconds:.1f} s)\n")
        flower_bridge.shorten_pull_backoff()  # tasks fork before their SuperNode holds the objects
    flower_bridge.run_flower_superexec(args)


if __name__ == "__main__":
    main()
