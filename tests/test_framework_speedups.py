"""The deployment speed-ups within flwr: warm SuperExec, short SuperNode poll, ServerApp reply polling.

End to end they run in tests/test_deploy_integration.py (warm nodes are the default) and are
measured by benchmarks/framework_overhead.py; here their pieces, without processes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from fedcare import flower_bridge
from fedcare.client import supernode_main
from fedcare.client.deploy import NodeSettings, supernode_command, write_warm_bin
from fedcare.server.grid_poll import PULL_INTERVAL_ENV, PollingGrid, responsive_grid


class _FakeGrid:
    """Replies to a pushed message only on the third pull."""

    def __init__(self) -> None:
        self.pulls = 0

    def push_messages(self, messages: Iterable[Any]) -> list[str]:
        return [m for m in messages]

    def pull_messages(self, ids: Iterable[str]) -> list[Any]:
        self.pulls += 1
        if self.pulls < 3:
            return []
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i)) for i in ids]


def test_polling_grid_pulls_replies_at_its_interval() -> None:
    # Prepare
    inner = _FakeGrid()
    grid = PollingGrid(inner, interval=0.01)  # type: ignore[arg-type]

    # Execute
    started = time.monotonic()
    replies = list(grid.send_and_receive(["a", "b"], timeout=5.0))  # type: ignore[list-item]

    # Assert
    assert {r.metadata.reply_to_message_id for r in replies} == {"a", "b"}
    assert inner.pulls == 3
    assert time.monotonic() - started < 2.0  # flwr's own Grid would wait 3 s per empty pull


def test_polling_grid_stops_at_the_timeout() -> None:
    # Prepare
    class Silent(_FakeGrid):
        def pull_messages(self, ids: Iterable[str]) -> list[Any]:
            return []

    grid = PollingGrid(Silent(), interval=0.01)  # type: ignore[arg-type]

    # Execute
    replies = list(grid.send_and_receive(["a"], timeout=0.1))  # type: ignore[list-item]

    # Assert
    assert replies == []


def test_responsive_grid_leaves_other_grids_and_honours_off(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    other = object()

    # Execute / Assert: only flwr's deployment (HTTP) Grid is wrapped
    assert responsive_grid(other) is other  # type: ignore[arg-type]
    monkeypatch.setenv(PULL_INTERVAL_ENV, "off")
    assert responsive_grid(other) is other  # type: ignore[arg-type]


def test_supernode_poll_patch_shortens_only_flwr_waits() -> None:
    # Prepare
    import flwr.supernode.start_client_internal as loop

    original = loop.time
    try:
        # Execute
        patched = supernode_main.patch_poll_interval(0.05)

        # Assert
        assert patched
        started = time.monotonic()
        loop.time.sleep(3)  # flwr's idle wait
        loop.time.sleep(0.5)  # flwr's wait for a local reply
        assert time.monotonic() - started < 1.0
        assert loop.time.monotonic() > 0  # everything else is the time module
    finally:
        loop.time = original


def test_pull_backoff_starts_short_and_keeps_flwrs_patience() -> None:
    # Prepare
    from flwr.supercore.inflatable import inflatable_utils

    functions = (inflatable_utils.pull_objects,
                 inflatable_utils.pull_and_inflate_object_from_tree)  # fmt: skip
    saved = [dict(fn.__kwdefaults__) for fn in functions]
    try:
        # Execute
        patched = flower_bridge.shorten_pull_backoff(0.05, 0.5)
        again = flower_bridge.shorten_pull_backoff(0.05, 0.5)

        # Assert: retries after 0.05 s (flwr: 1 s), capped at 0.5 s (flwr: 10 s), same total wait
        assert patched and again
        for fn, before in zip(functions, saved, strict=True):
            now = fn.__kwdefaults__
            assert (now["initial_backoff"], now["backoff_cap"]) == (0.05, 0.5)
            patience = before["max_tries_per_object"] * before["backoff_cap"]
            assert now["max_tries_per_object"] * now["backoff_cap"] >= patience
            assert now["max_time"] == before["max_time"]
        with pytest.raises(ValueError):
            flower_bridge.shorten_pull_backoff(0.5, 0.05)
    finally:
        for fn, before in zip(functions, saved, strict=True):
            fn.__kwdefaults__.clear()
            fn.__kwdefaults__.update(before)


def test_node_command_runs_the_tuned_loop_only_below_flwrs_poll(tmp_path: Path) -> None:
    # Prepare
    (tmp_path / "ca.crt").write_text("x", encoding="utf-8")
    key = tmp_path / "node.key"
    key.write_text("x", encoding="utf-8")
    manifest = Path(__file__).resolve().parents[1] / "simulations" / "sites" / "heart_va.toml"

    def command(**kwargs: Any) -> list[str]:
        settings = NodeSettings(site_manifest=manifest, superlink="127.0.0.1:9300", port=9401,
                                state_dir=tmp_path, ca_cert=tmp_path / "ca.crt", auth_key=key, **kwargs)  # fmt: skip
        return supernode_command(settings, site_name="va")

    # Execute
    tuned = command()
    flwr_default = command(poll_interval_s=3.0)

    # Assert
    assert tuned[1:6] == ["-m", "fedcare.client.supernode_main", "--fedcare-poll-interval", "0.5", "--"]
    assert Path(flwr_default[0]).name == "flower-supernode"
    assert tuned[6:] == flwr_default[1:]
    with pytest.raises(ValueError):
        command(poll_interval_s=10.0)


def test_warm_bin_and_task_arguments(tmp_path: Path) -> None:
    # Prepare
    spec = SimpleNamespace(runtime_api_address="127.0.0.1:9094", token="t0k", insecure=True,
                           root_certificates_path=None, parent_pid=42, runtime_dependency_install=False)  # fmt: skip

    # Execute
    folder = write_warm_bin(tmp_path / "bin", python="/usr/bin/python3")
    argv = flower_bridge.clientapp_argv(spec)

    # Assert: the same flwr-clientapp arguments flwr's SubprocessExecutor passes
    shim = folder / "flower-superexec"
    assert os.access(shim, os.X_OK)
    assert "-m fedcare.client.warm_exec" in shim.read_text(encoding="utf-8")
    assert argv == ["--runtime-api-address", "127.0.0.1:9094", "--token", "t0k", "--insecure",
                    "--parent-pid", "42"]  # fmt: skip
