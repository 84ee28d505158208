"""Shared fixtures: the real data folder beside the project, skipped (or failed under CI) when absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("FEDCARE_SHARED_DATA", REPO.parent / "shared" / "data"))
# the example manifests (simulations/sites) read their data under ${FEDCARE_DATA_ROOT}; set before
# any test starts, so the nodes, ServerApps and Ray workers the tests start inherit it
os.environ.setdefault("FEDCARE_DATA_ROOT", str(SHARED_DATA.resolve()))


def _need(path: Path) -> Path:
    if path.exists():
        return path
    reason = (
        f"real data not found at {path}: tests that read ../shared/data need that folder "
        "beside the project (set FEDCARE_SHARED_DATA to point elsewhere)"
    )
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Return ``../shared/data``; skip the test when absent, fail it under ``CI=true``."""
    return _need(SHARED_DATA)


@pytest.fixture(autouse=True)
def _no_flower_phone_home(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep Flower's telemetry and update check off in every test."""
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    monkeypatch.setenv("FLWR_DISABLE_UPDATE_CHECK", "1")
