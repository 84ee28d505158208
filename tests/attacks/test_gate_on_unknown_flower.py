"""Attack: run an unpinned app on a hospital node whose flwr installs apps by another path.

Issue 12: the app gate wrapped flwr's ``install_from_fab`` inside ``flwr-clientapp`` with no
check that the installed flwr still installs a FAB through it. On a flwr whose ClientApp
runtime unpacks the FAB some other way (an upgrade, or a changed install), the wrap is a no-op:
the gate "runs" and the coordinator's unpinned app is unpacked and loaded at the hospital.
The attacker is whoever can submit a run; the flwr change is simulated by replacing
``run_clientapp`` with one that unpacks the FAB without ``install_from_fab``.

The gate must refuse to run anything (fail closed) on a flwr whose ClientApp runtime it does
not recognise: :class:`fedcare.flower_bridge.UnsupportedFlowerError`, nothing unpacked.
"""

from __future__ import annotations

import importlib
from typing import Any

import pytest

from fedcare.client.app_gate import clientapp_main
from fedcare.flower_bridge import UnsupportedFlowerError

EVIL_FAB = b"PK\x03\x04 the coordinator's own, unpinned app"


def test_unpinned_app_is_not_unpacked_by_a_changed_flwr_runtime(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: a flwr-clientapp whose runtime unpacks the FAB without install_from_fab
    import flwr.supernode.runtime.run_clientapp as runtime

    unpacked: list[bytes] = []

    def run_clientapp(*args: Any, **kwargs: Any) -> None:
        unpacked.append(EVIL_FAB)  # the app's code would be loaded from here on

    cli = importlib.import_module("flwr.supernode.cli.flwr_clientapp")
    monkeypatch.setattr(runtime, "run_clientapp", run_clientapp)
    monkeypatch.setattr(cli, "flwr_clientapp", lambda: runtime.run_clientapp())

    # Execute: the node pinned nothing; the gate is asked to run the task
    with pytest.raises(UnsupportedFlowerError) as err:
        clientapp_main(["--token", "x"], trusted=frozenset(), policy_path=None)

    # Assert: refused before flwr's runtime ran, and the message says what to install
    assert unpacked == []
    assert "1.41.x or 1.42.x" in str(err.value)
