"""The coordinator's view of a running federation: ``fedcare server status`` and its web page.

One snapshot (:func:`collect_status`) feeds both the terminal table and the page:

- **hospitals**: flwr's node list (``flwr supernode ls``, through
  :func:`fedcare.server.deploy.list_nodes`: the Control API with its token), each node named by
  the name recorded when it was registered (``fedcare server register-node --state STATE``,
  ``STATE/nodes.json``), else by the site name it reported in a study, else ``node-<id>``;
  online / offline and since when;
- **runs**: flwr's run list (``flwr ls``): app, status, details, times;
- **studies**: each ``--study-dir``'s ``progress.json`` (:mod:`fedcare.server.progress`, written
  by the ServerApp): the run, round and stage, each site's ε against the budget it reported,
  refusals and failures with their reasons.

:func:`build_app` serves it with FastAPI (uvicorn, :func:`serve`): ``GET /`` is a static page (no
data) whose script polls ``GET /api/status`` every few seconds; the JSON needs
``Authorization: Bearer TOKEN`` with the Control API token (``STATE/control.token``), the same
credential as ``flwr run`` / ``register-node``. The page reads the token from its URL fragment
(``http://127.0.0.1:9400/#token=...``: a fragment never reaches the server or its log), keeps it
in the tab's session storage and removes it from the address bar. The page listens on a loopback
address only (as the Control API does): reach it from elsewhere through SSH port forwarding.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse

from ..config_base import FrozenModel
from ..files import atomic_write
from .deploy import (
    DeployError,
    FlowerConnection,
    UnsafeControlAddressError,
    is_loopback,
    list_nodes,
    list_runs,
    parse_address,
    read_control_token,
)
from .progress import read_progress

__all__ = [
    "NODE_NAMES_FILE",
    "StatusSource",
    "build_app",
    "collect_status",
    "format_rows",
    "node_names",
    "record_node_name",
    "serve",
]

logger = logging.getLogger(__name__)

NODE_NAMES_FILE: Final = "nodes.json"
_KIND: Final = "fedcare-node-names/1"


def record_node_name(state_dir: Path, node_id: int, name: str, *, public_key: Path | None = None) -> Path:
    """Record that node ``node_id`` is hospital ``name`` in ``state_dir/nodes.json`` (0600, atomic)."""
    path = Path(state_dir) / NODE_NAMES_FILE
    names = node_names(state_dir)
    names[int(node_id)] = name
    doc = {"kind": _KIND, "nodes": {str(k): {"name": v} for k, v in sorted(names.items())}}
    if public_key is not None:
        doc["nodes"][str(node_id)]["public_key_file"] = Path(public_key).name
    atomic_write(path, json.dumps(doc, indent=2).encode(), make_parents=True)
    return path


def node_names(state_dir: Path) -> dict[int, str]:
    """Return the hospital name of each registered node id recorded in ``state_dir/nodes.json``."""
    try:
        doc = json.loads((Path(state_dir) / NODE_NAMES_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    if not isinstance(doc, dict) or doc.get("kind") != _KIND:
        return {}
    return {int(k): str(v["name"]) for k, v in dict(doc.get("nodes", {})).items() if str(k).isdigit()}


class StatusSource(FrozenModel):
    """Where the status comes from.

    Attributes
    ----------
    state_dir : pathlib.Path
        The SuperLink's state folder (``nodes.json``, ``control.token``).
    connection : FlowerConnection
        The Control API (address, CA certificate, token).
    study_dirs : tuple of pathlib.Path
        Studies' checkpoint folders (their ``progress.json``).
    """

    state_dir: Path
    connection: FlowerConnection
    study_dirs: tuple[Path, ...] = ()


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def _when(text: Any) -> str | None:
    value = str(text or "").strip()
    return None if value in ("", "N/A") else value


def _hospitals(nodes: list[dict[str, Any]], names: dict[int, str], reported: dict[int, str]) -> list[dict[str, Any]]:
    rows = []
    for node in nodes:
        node_id = int(str(node.get("node-id", "0")))
        status = str(node.get("status", "unknown"))
        if status == "unregistered":
            continue
        online_at, offline_at = _when(node.get("online-at")), _when(node.get("offline-at"))
        rows.append({
            "name": names.get(node_id) or reported.get(node_id) or f"node-{node_id}",
            "node_id": str(node_id),  # a 64-bit id: a string, or a browser rounds it
            "status": status,
            "online": status == "online",
            "online_since": online_at if status == "online" else None,
            "last_seen": "now" if status == "online" else offline_at,
            "registered_at": _when(node.get("created-at")),
        })
    return sorted(rows, key=lambda r: (r["name"], int(r["node_id"])))


def _seconds(value: Any) -> str:
    try:
        seconds = int(float(value))
    except (TypeError, ValueError):
        return str(value or "")
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _runs(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = [{
        "run_id": str(r.get("run-id", "")),
        "app": str(r.get("fab-name") or r.get("fab-id") or ""),
        "status": str(r.get("status", "")),
        "details": _when(r.get("status-details")) or "",
        "elapsed": _seconds(r.get("elapsed")),
        "running_at": _when(r.get("running-at")),
        "finished_at": _when(r.get("finished-at")),
    } for r in runs]
    return sorted(rows, key=lambda r: r["running_at"] or "", reverse=True)


def _study(folder: Path) -> dict[str, Any]:
    progress = read_progress(folder)
    if progress is None:
        return {"folder": str(folder), "study": folder.name, "status": "waiting", "round": 0,
                "num_rounds": None, "stage": None, "sites": {}, "refusals": [], "reason": None,
                "run_id": None, "updated_at": None, "node_sites": {}}
    view = {k: progress.get(k) for k in ("study", "run_id", "status", "reason", "num_rounds", "round", "stage",
                                          "rounds_complete", "sites", "refusals", "node_sites")}
    view["folder"] = str(folder)
    view["updated_at"] = _iso(progress.get("updated_at"))
    for site in dict(view["sites"] or {}).values():
        spent, budget = site.get("epsilon"), site.get("epsilon_budget")
        site["remaining"] = None if spent is None or budget is None else max(0.0, budget - spent)
    return view


def collect_status(source: StatusSource, *, flwr_home: Path | None = None, timeout: float = 60.0) -> dict[str, Any]:
    """Return one snapshot of the federation (hospitals, runs, studies); JSON-ready.

    A SuperLink that cannot be reached is reported in ``superlink.error`` (the studies' files
    are still read), never raised.
    """
    studies = [_study(Path(d)) for d in source.study_dirs]
    reported = {int(k): v for s in studies for k, v in dict(s.get("node_sites") or {}).items() if str(k).isdigit()}
    snapshot: dict[str, Any] = {
        "generated_at": _iso(time.time()),
        "superlink": {"address": source.connection.address, "reachable": True, "error": None},
        "hospitals": [],
        "runs": [],
        "studies": studies,
    }
    try:
        nodes = list_nodes(source.connection, flwr_home=flwr_home, timeout=timeout)
        runs = list_runs(source.connection, flwr_home=flwr_home, timeout=timeout)
    except DeployError as err:
        snapshot["superlink"].update(reachable=False, error=str(err))
        return snapshot
    snapshot["hospitals"] = _hospitals(nodes, node_names(source.state_dir), reported)
    snapshot["runs"] = _runs(runs)
    return snapshot


class _Snapshots:
    """The latest snapshot, refreshed by one background thread every ``refresh_s`` seconds."""

    def __init__(self, source: StatusSource, *, refresh_s: float, flwr_home: Path | None) -> None:
        self.source = source
        self.refresh_s = refresh_s
        self.flwr_home = flwr_home
        self.latest: dict[str, Any] = {"generated_at": None, "hospitals": [], "runs": [], "studies": [],
                                       "superlink": {"address": source.connection.address, "reachable": None,
                                                     "error": "collecting the first snapshot"}}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="fedcare-status", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)  # a daemon thread: a running `flwr` call is not waited for

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.latest = collect_status(self.source, flwr_home=self.flwr_home)
            except (OSError, ValueError) as err:  # keep serving the last snapshot, say why it is old
                logger.warning("status snapshot failed: %s", err)
                self.latest = {**self.latest, "superlink": {**self.latest["superlink"], "error": str(err)}}
            self._stop.wait(self.refresh_s)


def build_app(source: StatusSource, *, token: str, refresh_s: float = 5.0, flwr_home: Path | None = None) -> FastAPI:
    """Return the status page's FastAPI app: ``GET /`` (the page), ``GET /api/status`` (JSON, bearer token)."""
    if len(token) < 32:
        raise ValueError("the status page needs the Control API token (32+ characters): pass STATE/control.token")
    expected = f"Bearer {token}".encode()
    snapshots = _Snapshots(source, refresh_s=refresh_s, flwr_home=flwr_home)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        snapshots.start()
        try:
            yield
        finally:
            await asyncio.to_thread(snapshots.stop)

    app = FastAPI(title="fedcare status", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)

    @app.get("/", response_class=HTMLResponse)
    def page() -> HTMLResponse:
        """Return the page (static: it holds no data; its script fetches /api/status)."""
        return HTMLResponse(_PAGE.replace("__REFRESH_MS__", str(int(refresh_s * 1000))),
                            headers={"cache-control": "no-store", "x-frame-options": "DENY",
                                     "content-security-policy": _CSP, "referrer-policy": "no-referrer"})

    @app.get("/api/status")
    def status(request: Request) -> JSONResponse:
        """Return the latest snapshot; 401 without the Control API token."""
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            return JSONResponse(
                {"detail": "the status needs the coordinator's Control API token: open the page as "
                           "http://HOST:PORT/#token=TOKEN with the token in STATE/control.token"},
                status_code=401, headers={"www-authenticate": 'Bearer realm="fedcare-status"'},
            )
        return JSONResponse(snapshots.latest, headers={"cache-control": "no-store"})

    return app


def serve(source: StatusSource, *, listen: str, refresh_s: float = 5.0, flwr_home: Path | None = None) -> None:
    """Serve the status page on the loopback address ``listen`` until interrupted; blocks.

    Raises
    ------
    UnsafeControlAddressError
        When ``listen`` is not a loopback address.
    ControlTokenError
        When the Control API token file is missing, empty or readable by others.
    """
    import uvicorn  # noqa: PLC0415 - web stack only where the page is served

    host, port = parse_address(listen)
    if not is_loopback(host):
        raise UnsafeControlAddressError(
            f"--listen {listen!r} is not a loopback address: the status page shows the federation "
            "to whoever holds the Control API token, so it listens on 127.0.0.1 only; reach it from "
            "elsewhere with `ssh -L PORT:127.0.0.1:PORT coordinator`"
        )
    token_file = source.connection.control_token_file or source.state_dir / "control.token"
    app = build_app(source, token=read_control_token(Path(token_file)), refresh_s=refresh_s, flwr_home=flwr_home)
    logger.info("status page on http://%s:%d/ (open it with #token=<the token in %s>)", host, port, token_file)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False, proxy_headers=False)


def format_rows(snapshot: dict[str, Any]) -> dict[str, list[list[str]]]:
    """Return the snapshot as text rows per table (hospitals, runs, sites, refusals) for the terminal."""
    hospitals = [[h["name"], h["node_id"], h["status"], h["last_seen"] or "-"] for h in snapshot["hospitals"]]
    runs = [[r["run_id"], r["app"], r["status"], r["elapsed"], r["details"]] for r in snapshot["runs"]]
    sites, refusals = [], []
    for study in snapshot["studies"]:
        rnd = f"{study['round']}/{study['num_rounds'] or '?'}"
        sites += [[study["study"], study["status"] or "-", rnd, study["stage"] or "-", name,
                   _num(s.get("epsilon")), _num(s.get("epsilon_budget")), _num(s.get("remaining"))]
                  for name, s in sorted(dict(study["sites"] or {}).items())] or [
                     [study["study"], study["status"] or "-", rnd, study["stage"] or "-", "-", "-", "-", "-"]]
        refusals += [[study["study"], str(r.get("round")), str(r.get("stage")), str(r.get("site")), r.get("reason", "")]
                     for r in study["refusals"] or []]
        if study.get("reason"):
            refusals.append([study["study"], str(study["round"]), str(study["status"]), "-", study["reason"]])
    return {"hospitals": hospitals, "runs": runs, "sites": sites, "refusals": refusals}


def _num(value: Any) -> str:
    return "-" if value is None else f"{float(value):.3f}"


_CSP: Final = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self'"

_PAGE: Final = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>fedcare federation status</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font:14px system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:20px;margin:0 0 .2em}h2{font-size:16px;margin:1.4em 0 .4em}
table{border-collapse:collapse;background:#fff;min-width:40em}
th,td{border:1px solid #ddd;padding:.3em .7em;text-align:left;vertical-align:top}
th{background:#eef}.online{color:#080;font-weight:bold}.offline{color:#b60}.err{color:#b00}
.bar{display:inline-block;width:8em;height:.7em;background:#eee;margin-right:.4em}
.bar i{display:block;height:100%;background:#36c}#meta{color:#666}
</style></head><body>
<h1>fedcare federation status</h1>
<div id="meta">loading…</div>
<h2>Hospitals</h2><table id="hospitals"><thead><tr><th>hospital</th><th>node</th><th>status</th>
<th>last seen</th></tr></thead><tbody></tbody></table>
<h2>Studies</h2><div id="studies"></div>
<h2>Runs</h2><table id="runs"><thead><tr><th>run</th><th>app</th><th>status</th><th>elapsed</th>
<th>details</th></tr></thead><tbody></tbody></table>
<script>
"use strict";
(function () {
  const m = /(?:^#|&)token=([^&]+)/.exec(location.hash);
  if (m) { sessionStorage.setItem("fedcare-token", decodeURIComponent(m[1]));
           history.replaceState(null, "", location.pathname); }
  const token = sessionStorage.getItem("fedcare-token");
  function cell(row, text, cls) { const td = document.createElement("td"); td.textContent = text == null ? "-" : String(text);
    if (cls) td.className = cls; row.appendChild(td); return td; }
  function fill(id, rows) { const body = document.querySelector("#" + id + " tbody"); body.replaceChildren();
    rows.forEach(function (r) { const tr = document.createElement("tr"); r(tr); body.appendChild(tr); }); }
  function num(v) { return v == null ? "-" : Number(v).toFixed(3); }
  function render(s) {
    const meta = document.getElementById("meta");
    meta.textContent = "updated " + (s.generated_at || "-") + " · SuperLink " + s.superlink.address +
      (s.superlink.error ? " · " + s.superlink.error : "");
    meta.className = s.superlink.error ? "err" : "";
    fill("hospitals", s.hospitals.map(function (h) { return function (tr) {
      tr.dataset.hospital = h.name; cell(tr, h.name, "hospital-name"); cell(tr, h.node_id);
      cell(tr, h.status, h.online ? "online" : "offline"); cell(tr, h.last_seen); }; }));
    fill("runs", s.runs.map(function (r) { return function (tr) {
      cell(tr, r.run_id); cell(tr, r.app); cell(tr, r.status); cell(tr, r.elapsed); cell(tr, r.details); }; }));
    const box = document.getElementById("studies"); box.replaceChildren();
    s.studies.forEach(function (st) {
      const h = document.createElement("h3"); h.className = "study";
      h.textContent = st.study + ": " + (st.status || "-") + " · round " + st.round + " of " + (st.num_rounds || "?") +
        " · stage " + (st.stage || "-") + (st.run_id ? " · run " + st.run_id : "");
      h.dataset.round = String(st.round); h.dataset.stage = st.stage || ""; box.appendChild(h);
      if (st.reason) { const p = document.createElement("p"); p.className = "err"; p.textContent = st.reason; box.appendChild(p); }
      const t = document.createElement("table"); t.className = "sites";
      t.innerHTML = "<thead><tr><th>site</th><th>last round</th><th>ε spent</th><th>ε budget</th><th>remaining</th><th></th></tr></thead><tbody></tbody>";
      Object.keys(st.sites || {}).sort().forEach(function (name) { const x = st.sites[name];
        const tr = document.createElement("tr"); cell(tr, name); cell(tr, x.last_round); cell(tr, num(x.epsilon));
        cell(tr, num(x.epsilon_budget)); cell(tr, num(x.remaining)); const td = cell(tr, "");
        if (x.epsilon != null && x.epsilon_budget) { const b = document.createElement("span"); b.className = "bar";
          const i = document.createElement("i"); i.style.width = Math.min(100, 100 * x.epsilon / x.epsilon_budget) + "%";
          b.appendChild(i); td.appendChild(b); }
        t.tBodies[0].appendChild(tr); });
      box.appendChild(t);
      if ((st.refusals || []).length) { const r = document.createElement("table"); r.className = "refusals";
        r.innerHTML = "<thead><tr><th>round</th><th>stage</th><th>site</th><th>reason</th></tr></thead><tbody></tbody>";
        st.refusals.slice(-20).forEach(function (x) { const tr = document.createElement("tr"); cell(tr, x.round);
          cell(tr, x.stage); cell(tr, x.site); cell(tr, x.reason, "err"); r.tBodies[0].appendChild(tr); });
        box.appendChild(r); }
    });
  }
  function poll() {
    if (!token) { document.getElementById("meta").textContent =
      "open this page as /#token=TOKEN (the Control API token, STATE/control.token)"; return; }
    fetch("/api/status", {headers: {"Authorization": "Bearer " + token}, cache: "no-store"})
      .then(function (r) { if (!r.ok) throw new Error("HTTP " + r.status + ": check the token"); return r.json(); })
      .then(render)
      .catch(function (e) { const meta = document.getElementById("meta"); meta.textContent = String(e); meta.className = "err"; })
      .finally(function () { setTimeout(poll, __REFRESH_MS__); });
  }
  poll();
})();
</script></body></html>
"""
