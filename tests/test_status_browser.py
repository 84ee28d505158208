"""The status page in a real headless browser against a real loopback deployment.

A TLS + node-auth SuperLink, three UCI heart-disease hospitals (Cleveland, Hungarian, VA)
registered by name with ``fedcare server register-node --state``, the status page served by
``fedcare server status-page`` (uvicorn, loopback), and a 3-round study submitted with
``fedcare run``. The system's Chromium (``/usr/bin/chromium``, Debian's package; never a
browser a tool downloads) renders the page with its own headless mode (``--dump-dom``,
``--virtual-time-budget`` lets the page's script fetch ``/api/status`` and draw): the page
must name the three hospitals, online, and show the round advancing between two observations.
A screenshot is taken mid-run (copied to ``$FEDCARE_STATUS_SCREENSHOT`` when set: that is how
``docs/status.png`` is made). Every process is stopped by PID in ``finally``. A few minutes on
2 CPU cores.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))

from deploy_support import federation, free_port, heart_manifest, write_heart_study  # noqa: E402

from fedcare.client.deploy import pin_app_in_policy  # noqa: E402
from fedcare.server.cli import server_app  # noqa: E402
from fedcare.server.deploy import read_control_token  # noqa: E402
from fedcare.server.flower_app import app_hash, build_flower_app, load_study  # noqa: E402
from fedcare.server.progress import read_progress  # noqa: E402
from fedcare.supervise import stop_popen  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
SITES = ["cleveland", "hungarian", "va"]
ROUNDS = 3
#: the whole test's bound (the federation's own start and stop are bounded separately)
DEADLINE_S = 420.0

_ROW = re.compile(r'<tr data-hospital="([^"]+)">.*?<td class="(online|offline)">([^<]*)</td>', re.S)
_STUDY = re.compile(r'<h3 class="study" data-round="(\d+)" data-stage="(\w*)">([^<]*)</h3>')


def _chromium() -> Path:
    if CHROMIUM.is_file():
        return CHROMIUM
    if os.environ.get("CI") == "true":
        pytest.fail("CI=true but /usr/bin/chromium is missing: .ci/run installs Debian's chromium package")
    pytest.skip("no /usr/bin/chromium (Debian: apt-get install chromium); the status page browser test needs it")


def _browser(chromium: Path, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run headless Chromium once (bounded) with its own profile folder."""
    return subprocess.run(  # noqa: S603 - fixed argv
        [str(chromium), "--headless", "--no-sandbox", "--disable-gpu", "--disable-extensions",
         "--no-first-run", f"--user-data-dir={profile}", "--virtual-time-budget=6000", *args],
        capture_output=True, text=True, timeout=90, check=False, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def _observe(chromium: Path, profile: Path, url: str) -> tuple[dict[str, str], list[tuple[int, str, str]]]:
    """Return (hospital -> status, [(round, stage, heading)]) as the page shows them."""
    dom = _browser(chromium, profile, "--dump-dom", url).stdout
    hospitals = {name: status for name, _, status in _ROW.findall(dom)}
    studies = [(int(rnd), stage, text) for rnd, stage, text in _STUDY.findall(dom)]
    return hospitals, studies


@pytest.mark.integration
@pytest.mark.slow
def test_status_page_shows_three_hospitals_and_the_round_advancing(tmp_path: Path, shared_data: Path) -> None:
    # Prepare
    chromium = _chromium()
    started = time.monotonic()
    model_dir = tmp_path / "model"
    study = tmp_path / "study.toml"
    write_heart_study(study, name="heart-status-test", rounds=ROUNDS, checkpoint_dir=model_dir,
                      description="three UCI heart-disease hospitals, status page test")
    policy = tmp_path / "policy.toml"
    policy.write_text("require_secure_aggregation = false\n", encoding="utf-8")
    assert pin_app_in_policy(policy, app_hash(build_flower_app(load_study(study), tmp_path / "app")))
    fedcare = Path(sys.executable).with_name("fedcare")
    cli = typer.Typer()
    cli.add_typer(server_app, name="server")
    page_port = free_port()
    processes: list[subprocess.Popen[bytes]] = []
    observations: list[tuple[dict[str, str], list[tuple[int, str, str]]]] = []
    screenshot = tmp_path / "status.png"

    with federation(tmp_path / "fed", nodes=SITES, register=[]) as fed:
        state = fed.state_dir
        assert state is not None
        common = ["--superlink", fed.coordinator_address, "--certs", str(fed.certs.root)]
        for site in SITES:  # the coordinator registers each hospital's key under its name
            registered = CliRunner().invoke(
                cli, ["server", "register-node", str(fed.node_keys[site].public_key), *common, "--state", str(state),
                      "--flwr-home", str(tmp_path / "flwr-home")],
            )  # fmt: skip
            assert registered.exit_code == 0, registered.output
        for site in SITES:
            fed.start_node(site, heart_manifest(shared_data, site, tmp_path / "manifests"),
                           extra_node_config={"policy": str(policy)})
        url = f"http://127.0.0.1:{page_port}/#token={read_control_token(fed.control_token)}"
        try:
            with (tmp_path / "page.log").open("wb") as page_log, (tmp_path / "run.log").open("wb") as run_log:
                processes.append(subprocess.Popen(  # noqa: S603 - fixed argv
                    [str(fedcare), "server", "status-page", "--state", str(state), *common, "--study-dir",
                     str(model_dir), "--listen", f"127.0.0.1:{page_port}", "--refresh", "2"],
                    stdout=page_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                ))  # fmt: skip
                processes.append(subprocess.Popen(  # noqa: S603 - fixed argv
                    [str(fedcare), "run", str(study), *common, "--control-token", str(fed.control_token),
                     "--timeout", "360"],
                    stdout=run_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                ))  # fmt: skip
            run = processes[-1]

            # Execute: look at the page until two observations show different rounds (bounded)
            while time.monotonic() - started < DEADLINE_S:
                hospitals, studies = _observe(chromium, tmp_path / "profile", url)
                if studies and studies[0][0] >= 1:
                    observations.append((hospitals, studies))
                    if not screenshot.exists() and (studies[0][0] >= 2 or run.poll() is not None):
                        # mid-run, a round with ε on record: docs/status.png
                        _browser(chromium, tmp_path / "profile", f"--screenshot={screenshot}",
                                 "--window-size=1100,820", "--hide-scrollbars", url)
                rounds = [o[1][0][0] for o in observations]
                if rounds and max(rounds) > min(rounds) and run.poll() is not None:
                    break
                if run.poll() is not None and len(observations) >= 2:
                    break
                time.sleep(1.0)
            run.wait(timeout=max(1.0, DEADLINE_S - (time.monotonic() - started)))
            # the page serves a snapshot refreshed every 2 s: the run's end shows within a refresh or two
            settle = time.monotonic() + 30.0
            final_hospitals, final_studies = _observe(chromium, tmp_path / "profile", url)
            while not (final_studies and "completed" in final_studies[0][2]) and time.monotonic() < settle:
                time.sleep(1.0)
                final_hospitals, final_studies = _observe(chromium, tmp_path / "profile", url)
        finally:
            for proc in processes:
                stop_popen(proc, timeout=10.0)

    # Assert
    run_output = (tmp_path / "run.log").read_text(errors="replace")
    assert run.returncode == 0, run_output[-3000:]
    assert observations, (tmp_path / "page.log").read_text(errors="replace")[-3000:]
    first_hospitals, first_studies = observations[0]
    assert first_hospitals == {site: "online" for site in SITES}, first_hospitals
    rounds = [studies[0][0] for _, studies in observations]
    assert max(rounds) > min(rounds), observations  # the round advanced between two observations
    assert rounds == sorted(rounds)
    assert final_studies[0][0] == ROUNDS and "completed" in final_studies[0][2], final_studies
    assert set(final_hospitals) == set(SITES)
    progress = read_progress(model_dir)
    assert progress is not None and progress["status"] == "completed"
    # the names the sites report (their manifests': heart-cleveland, ...)
    assert sorted(next((s for s in SITES if s in name), name) for name in progress["sites"]) == SITES
    assert all(s["epsilon"] > 0 and s["epsilon_budget"] is not None for s in progress["sites"].values())
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("FEDCARE_STATUS_SCREENSHOT"):
        shutil.copyfile(screenshot, os.environ["FEDCARE_STATUS_SCREENSHOT"])
    for proc in processes:
        assert proc.poll() is not None
    print(f"\nobserved rounds {rounds}; test {time.monotonic() - started:.1f} s")
