"""Run flwr's SuperLink with the Fleet API on its own port and Control on loopback.

In flwr 1.41 and 1.42 ``flower-superlink`` serves the Fleet (``/v1/fleet/...``), Control
(``/v1/control/...``: submit runs, register nodes) and Runtime (``/v1/runtime/...``: the
ServerApp's API) HTTP APIs on one uvicorn port; ``--control-api-address`` and
``--fleet-api-address`` are deprecated and only used by the internal legacy gRPC servers
(``FLWR_INTERNAL_GRPC_*``), so the HTTP Control API cannot be moved off the Fleet port with a
flag, and the open-source Control API has no authentication.

``fedcare server start`` always runs the SuperLink through this module. It runs the *same*
SuperLink (flwr's own argument parsing, FastAPI app and lifespan, obtained through
:func:`fedcare.flower_bridge.superlink_app`) in one uvicorn server listening on two sockets:

- the **control socket** (``--host``/``--port`` of the flower-superlink arguments; must be a
  loopback address): every API, as in plain ``flower-superlink``, except that each Control
  API request (``/v1/control/...``) must carry ``Authorization: Bearer TOKEN`` with the token
  in ``--control-token-file`` (HTTP 401 otherwise, before flwr sees it); the SuperLink's own
  SuperExec / ServerApp connect here (Runtime API, flwr's own task tokens);
- the **fleet socket** (``--fleet-address``, e.g. ``0.0.0.0:9300``): only the exact Fleet
  routes flwr registers (:func:`fedcare.flower_bridge.fleet_route_paths`) and ``/health``;
  every other request gets HTTP 403 before it reaches flwr.

TLS is still terminated by uvicorn with the SuperLink's certificate (same ``--ssl-*`` files),
so the filter sees decrypted paths; which socket a request came in on is read from the ASGI
``server`` entry (the accepting socket's local address), never from a request header.

Both reach into flwr's private parts; the bridge's guard for them is a security guard: on a
flwr whose version or code it does not recognise the front refuses to start
(:class:`~fedcare.flower_bridge.UnsupportedFlowerError`, exit status 2) rather than serve the
Control API unfiltered.

flwr's open-source SuperLink (1.41, 1.42) has no Control API credential of its own (account
authentication is OIDC in Flower Enterprise only: ``FLWR_OIDC_ENABLED``); its CLI, though,
sends a stored access token as a bearer header, which is how ``fedcare`` passes the token
(:class:`fedcare.server.deploy.FlowerConnection`).

Usage (what ``fedcare server start`` runs)::

    python -m fedcare.server.superlink_front --fleet-address 0.0.0.0:9300 \
        --control-token-file STATE/control.token -- \
        --ssl-ca-certfile ... --host 127.0.0.1 --port 9301 ...
"""

from __future__ import annotations

import argparse
import hmac
import ipaddress
import json
import socket
import sys
from collections.abc import Awaitable, Callable, Iterable, MutableMapping, Sequence
from logging import ERROR, INFO
from typing import Any

from ..flower_bridge import UnsupportedFlowerError, fleet_route_paths, flower_logger, superlink_app

__all__ = [
    "CONTROL_PREFIX",
    "FLEET_ONLY_EXTRA_PATHS",
    "READY_MESSAGE",
    "RUNTIME_PREFIX",
    "FleetOnlyGate",
    "fleet_paths",
    "is_loopback",
    "main",
]

#: paths besides the Fleet router's that the fleet socket serves
FLEET_ONLY_EXTRA_PATHS = frozenset({"/health"})
#: the Control API's paths: on the control socket they need the token
CONTROL_PREFIX = "/v1/control/"
#: the Runtime API's paths (flwr authenticates them with its own task tokens)
RUNTIME_PREFIX = "/v1/runtime/"
#: logged once both sockets listen (``server/deploy.py`` waits for ``/health`` on both instead)
READY_MESSAGE = "fedcare SuperLink front ready"

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def is_loopback(host: str) -> bool:
    """Return whether ``host`` is a loopback address (``localhost`` counts)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def fleet_paths() -> frozenset[str]:
    """Return the exact paths of flwr's Fleet HTTP router plus ``/health``.

    Raises
    ------
    fedcare.flower_bridge.UnsupportedFlowerError
        When the installed flwr is not one the front knows, or its Fleet routes are not all
        under ``/v1/fleet/``.
    """
    paths = fleet_route_paths()
    if not paths or not all(p.startswith("/v1/fleet/") for p in paths):
        raise UnsupportedFlowerError(
            f"unexpected Fleet routes in this flwr ({sorted(paths)}): fedcare's SuperLink front "
            "refuses to start; install flwr 1.41.x or 1.42.x"
        )
    return frozenset(paths) | FLEET_ONLY_EXTRA_PATHS


class FleetOnlyGate:
    """ASGI wrapper: on any port but ``control_port`` only ``allowed_paths`` pass (HTTP 403
    otherwise); on ``control_port`` every path but the Runtime API and ``allowed_paths`` (the
    Control API first) needs ``Authorization: Bearer control_token`` (HTTP 401 otherwise);
    refused requests never reach the wrapped app."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        control_port: int,
        allowed_paths: Iterable[str],
        control_token: str | None = None,
    ) -> None:
        self.app = app
        self.control_port = control_port
        self.allowed_paths = frozenset(allowed_paths)
        self._expected = None if control_token is None else f"Bearer {control_token}".encode()

    def _authorised(self, scope: Scope) -> bool:
        path = str(scope.get("path", ""))
        # without the token: the Runtime API (the SuperLink's own SuperExec and ServerApp,
        # authenticated by flwr's task tokens), the Fleet routes and /health; anything else,
        # the Control API first, needs it
        if path.startswith(RUNTIME_PREFIX) or path in self.allowed_paths:
            return True
        if self._expected is None:
            return False  # fail closed: a front without a token serves no Control API
        headers = [v for k, v in scope.get("headers", []) if k.lower() == b"authorization"]
        return len(headers) == 1 and hmac.compare_digest(headers[0], self._expected)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Forward or refuse one ASGI connection."""
        if scope["type"] == "lifespan":
            await self.app(scope, receive, send)
            return
        server = scope.get("server")
        if server is not None and len(server) >= 2 and server[1] == self.control_port:
            if scope.get("root_path") or not self._authorised(scope):
                await _refuse(scope, send, status=401)
                return
            await self.app(scope, receive, send)
            return
        if (
            scope["type"] == "http"
            and not scope.get("root_path")
            and scope.get("path") in self.allowed_paths
        ):
            await self.app(scope, receive, send)
            return
        await _refuse(scope, send)


async def _refuse(scope: Scope, send: Send, *, status: int = 403) -> None:
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008})
        return
    if status == 401:
        detail = (
            f"{scope.get('path', '')} needs the coordinator's Control API token: pass "
            "--control-token STATE/control.token (written by `fedcare server start`)"
        )
    else:
        detail = (
            f"{scope.get('path', '')} is not served on the Fleet port: the Control and "
            "Runtime APIs listen on the coordinator's loopback control address only"
        )
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        # not flwr's bare "Bearer" challenge: flwr's CLI would then try an OIDC token refresh
        headers.append((b"www-authenticate", b'Bearer realm="fedcare-control"'))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _bind(host: str, port: int) -> socket.socket:
    bind_host = "" if host in ("0.0.0.0", "") else host.strip("[]")
    family = socket.AF_INET6 if ":" in bind_host else socket.AF_INET
    if host == "::":
        bind_host, family = "::", socket.AF_INET6
    infos = socket.getaddrinfo(bind_host or None, port, family, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    fam, kind, proto, _, addr = infos[0]
    sock = socket.socket(fam, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(addr)
    sock.set_inheritable(False)
    return sock


def _parse(argv: Sequence[str]) -> tuple[str, int, str, list[str]]:
    parser = argparse.ArgumentParser(prog="python -m fedcare.server.superlink_front")
    parser.add_argument("--fleet-address", required=True, help="HOST:PORT for the Fleet API only")
    parser.add_argument(
        "--control-token-file", required=True, help="file holding the Control API bearer token"
    )
    parser.add_argument("superlink_args", nargs=argparse.REMAINDER, help="-- flower-superlink arguments")
    args = parser.parse_args(list(argv))
    rest = list(args.superlink_args)
    if rest and rest[0] == "--":
        rest = rest[1:]
    host, sep, port_s = args.fleet_address.rpartition(":")
    if not sep or not host or not port_s.isdigit():
        parser.error(f"--fleet-address {args.fleet_address!r} must be HOST:PORT")
    return host.strip("[]"), int(port_s), args.control_token_file, rest


def main(argv: Sequence[str] | None = None) -> int:
    """Run the SuperLink with a fleet-only socket and a loopback control socket; blocks."""
    fleet_host, fleet_port, token_file, superlink_args = _parse(sys.argv[1:] if argv is None else argv)
    try:
        with open(token_file, encoding="utf-8") as fh:
            control_token = fh.read().strip()
    except OSError as err:
        sys.stderr.write(f"fedcare SuperLink front: cannot read {token_file}: {err.strerror}\n")
        return 2
    if len(control_token) < 32:
        sys.stderr.write(f"fedcare SuperLink front: {token_file} holds no usable token\n")
        return 2

    import uvicorn  # noqa: PLC0415 - heavy imports after argument checks

    log = flower_logger().log  # flwr's processes print flwr's logger with flwr's handler
    try:
        config = superlink_app(superlink_args)
        allowed = fleet_paths()
    except UnsupportedFlowerError as err:  # fail closed: no SuperLink without the front
        sys.stderr.write(f"fedcare SuperLink front: {err}\n")
        return 2
    if not is_loopback(config.host):
        log(ERROR, "the control address %s:%s must be a loopback address", config.host, config.port)
        return 2
    if config.port == fleet_port:
        log(ERROR, "the control port and the fleet port must differ (both %d)", fleet_port)
        return 2

    gate = FleetOnlyGate(
        config.app, control_port=config.port, allowed_paths=allowed, control_token=control_token
    )
    scheme = "https" if config.ssl_certfile else "http"

    class _Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets=sockets)
            if self.started:
                log(
                    INFO,
                    "%s: Fleet API only on %s://%s:%d; Control (token required), Runtime and "
                    "Fleet APIs on %s://%s:%d (loopback)",
                    READY_MESSAGE, scheme, fleet_host, fleet_port, scheme, config.host, config.port,
                )  # fmt: skip

    uv_config = uvicorn.Config(
        app=gate,
        host=config.host,
        port=config.port,
        reload=False,
        access_log=True,
        proxy_headers=False,
        log_config=config.log_config,
        ssl_keyfile=config.ssl_keyfile,
        ssl_certfile=config.ssl_certfile,
        workers=1,
    )
    sockets = [_bind(config.host, config.port), _bind(fleet_host, fleet_port)]
    log(INFO, "Starting the SuperLink (fedcare front): control %s:%d, fleet %s:%d",
        config.host, config.port, fleet_host, fleet_port)  # fmt: skip
    _Server(uv_config).run(sockets=sockets)
    return 0


if __name__ == "__main__":
    sys.exit(main())
