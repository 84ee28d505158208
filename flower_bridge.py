"""Everything fedcare takes from flwr's private parts, in one place, each use behind a guard.

flwr's public API is what fedcare's apps are written against (``flwr.app``, ``flwr.clientapp``,
``flwr.serverapp``, ``flwr.server.workflow``/``strategy``, ``flwr.client.mod``,
``flwr.simulation``, the CLIs and the SuperLink's ``/health`` endpoint). A deployment needs a
few things flwr does not expose; they all live here, and ``client/`` and ``server/`` call this
module instead of importing flwr internals. Each is a :class:`Patch` with a guard that checks

1. the installed flwr version against the minor versions fedcare knows
   (:data:`SUPPORTED_FLWR`: 1.41.x and 1.42.x), and
2. a fingerprint: the SHA-256 of ``inspect.getsource`` of every function or class the patch
   replaces, wraps, copies or relies on (for a table or a constant: of its ``repr``), compared
   with the digest recorded for that minor version (:data:`FINGERPRINTS`, recorded on 1.41.0
   and 1.42.0 with ``python -m fedcare.flower_bridge``).

A **security** patch (the app gate, the Control-API front and its token) that does not
recognise the installed flwr raises :class:`UnsupportedFlowerError`: the process refuses to
start (fails closed). A **speed** patch (pull backoff, SuperNode poll, ServerApp reply polling,
warm executor) leaves flwr's stock behaviour in place and logs one line (falls back).
See ``docs/flower.md`` for the table of patches and what changed between 1.41 and 1.42.

The private names ``client/``, ``server/`` and ``simulations/`` import from flwr unchanged (no
patch) are also taken from here (section "private names fedcare imports"), resolved from flwr on
first use so that importing this module imports no flwr internals: flwr's SecAgg+ constants
(:func:`secaggplus_names`, fingerprinted like a security patch: the site's secure-cohort check
reads them) and the names of :data:`PRIVATE_NAMES` (``from fedcare.flower_bridge import Run``),
checked against :data:`SUPPORTED_FLWR` only.

This module imports nothing from ``client/``, ``server/`` or ``simulations/``.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import logging
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

if TYPE_CHECKING:  # the names __getattr__ resolves at run time, for type checkers only
    from flwr.app.message_type import MessageType
    from flwr.cli.build import build_fab_from_disk
    from flwr.cli.config_utils import load_and_validate
    from flwr.clientapp.typing import ClientAppCallable
    from flwr.common.constant import ErrorCode
    from flwr.compat.common import recorddict_compat
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
    from flwr.server.workflow.constant import Key as WorkflowKey
    from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM
    from flwr.supercore.run import Run, RunNotRunningException
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.supercore.utils import is_valid_name

__all__ = [
    "FINGERPRINTS",
    "FLWR_IDLE_POLL_S",
    "GUARDED_IMPORTS",
    "PATCHES",
    "PRIVATE_NAMES",
    "PULL_BACKOFF_CAP_S",
    "PULL_INITIAL_BACKOFF_S",
    "SUPERNODE_ID_LOG",
    "SUPPORTED_FLWR",
    "Patch",
    "SecAggPlusNames",
    "SuperLinkServing",
    "UnsupportedFlowerError",
    "clientapp_argv",
    "fingerprint",
    "fleet_route_paths",
    "flower_logger",
    "gated_task_commands",
    "installed_flwr_version",
    "is_clientapp_task",
    "launch_accepted",
    "patch_enabled",
    "polls_deployment_grid",
    "preload_clientapp_runtime",
    "private_name",
    "require",
    "run_flower_superexec",
    "run_flower_supernode",
    "run_gated_clientapp",
    "secaggplus_names",
    "shorten_pull_backoff",
    "shorten_supernode_poll",
    "store_control_token",
    "superlink_app",
    "unrecognised",
    "wrap_superexec_executor",
]

logger = logging.getLogger(__name__)

#: flwr minor versions whose internals fedcare knows (``flwr[simulation,dp]>=1.41,<1.43``)
SUPPORTED_FLWR = ("1.41", "1.42")

GuardKind = Literal["fail closed", "fall back"]


class UnsupportedFlowerError(RuntimeError):
    """Raised when a security patch does not recognise the installed flwr (fails closed)."""


@dataclass(frozen=True)
class Patch:
    """One use of flwr internals: what it touches, why, and what happens when unrecognised.

    Attributes
    ----------
    name : str
        Key in :data:`PATCHES` and :data:`FINGERPRINTS`.
    kind : {"fail closed", "fall back"}
        Security patches fail closed; speed patches fall back to flwr's own behaviour.
    what : str
        What fedcare does to flwr.
    why : str
        What it is for.
    targets : tuple of str
        ``module:qualname`` of each fingerprinted object.
    """

    name: str
    kind: GuardKind
    what: str
    why: str
    targets: tuple[str, ...]


PATCHES: dict[str, Patch] = {
    p.name: p
    for p in (
        Patch(
            "app-gate",
            "fail closed",
            "wraps install_from_fab inside flwr-clientapp; gates every task command of "
            "TASK_TYPE_TO_COMMAND",
            "a hospital node runs only ClientApps whose FAB hash it pinned, checked before the "
            "app's code is unpacked",
            (
                "flwr.supercore.constant:TASK_TYPE_TO_COMMAND",
                "flwr.cli.install:install_from_fab",
                "flwr.supernode.runtime.run_clientapp:run_clientapp",
                "flwr.supernode.cli.flwr_clientapp:flwr_clientapp",
            ),
        ),
        Patch(
            "superlink-front",
            "fail closed",
            "serves flwr's own SuperLink ASGI app (its argument parser, create_app, lifespan) "
            "on a fleet-only socket and a token-checked loopback control socket",
            "the Control API (submit runs, register nodes) is not reachable from the fleet port "
            "and needs the coordinator's token",
            (
                "flwr.superlink.cli.flower_superlink:_parse_superlink_lifespan_config",
                "flwr.superlink.cli.flower_superlink:SuperLinkLifespan",
                "flwr.superlink.main:create_app",
                "flwr.superlink.routers.fleet.router:router.routes",
                "flwr.supercore.http_logging:get_uvicorn_log_config",
            ),
        ),
        Patch(
            "control-token",
            "fail closed",
            "stores the Control API token where flwr's CLI keeps OIDC credentials",
            "`flwr run`/`flwr supernode register` send the token as a bearer header the front "
            "checks",
            (
                "flwr.cli.constant:AUTHN_TYPE_STORE_KEY",
                "flwr.cli.constant:ACCESS_TOKEN_STORE_KEY",
                "flwr.cli.constant:REFRESH_TOKEN_STORE_KEY",
                "flwr.common.constant:AuthnType",
                "flwr.supercore.credential_store:FileCredentialStore",
                "flwr.supercore.credential_store:get_credential_store",
                "flwr.cli.utils:get_authn_type",
                "flwr.cli.auth_plugin.oidc_cli_plugin:OidcCliPlugin",
            ),
        ),
        Patch(
            "pull-backoff",
            "fall back",
            "changes the default backoff arguments of pull_objects and "
            "pull_and_inflate_object_from_tree (1 s..10 s -> 0.05 s..0.5 s, same patience)",
            "an object pulled before its sender pushed it is retried promptly (about 1 s per "
            "hop saved)",
            (
                "flwr.supercore.inflatable.inflatable_utils:pull_objects",
                "flwr.supercore.inflatable.inflatable_utils:pull_and_inflate_object_from_tree",
            ),
        ),
        Patch(
            "supernode-poll",
            "fall back",
            "gives the SuperNode loop's module a `time` whose sleep(3) waits the node's poll "
            "interval and whose 0.5 s reply wait is 0.1 s",
            "a message is picked up within the poll interval instead of up to 3 s",
            ("flwr.supernode.start_client_internal:start_client_internal",),
        ),
        Patch(
            "warm-executor",
            "fall back",
            "wraps the SuperExec's get_executor so that ClientApp tasks fork from a warm "
            "process (running flwr-clientapp behind the app gate) instead of Popen",
            "no torch/flwr/fedcare import and no data read per task",
            (
                "flwr.supercore.superexec.run_superexec:run_superexec",
                "flwr.supercore.superexec.executor.factory:get_executor",
                "flwr.supercore.superexec.executor.subprocess_executor:SubprocessExecutor",
                "flwr.supercore.superexec.executor.types:ExecutionSpec",
                "flwr.supercore.superexec.executor.types:LaunchResult",
                "flwr.supercore.cli.flower_superexec:flower_superexec",
            ),
        ),
        Patch(
            "serverapp-poll",
            "fall back",
            "recognises flwr's deployment Grid (HttpGrid) so the ServerApp wraps it in a Grid "
            "whose send_and_receive pulls every 0.2 s (flwr: 3 s)",
            "a site's reply is collected within 0.2 s instead of up to 3 s, twice per round",
            (
                "flwr.superlink.grid.http_grid:HttpGrid.send_and_receive",
                "flwr.superlink.grid.http_grid:HttpGrid.push_messages",
                "flwr.superlink.grid.http_grid:HttpGrid.pull_messages",
            ),
        ),
    )
}

#: groups of flwr's private names fedcare imports unchanged (no patch) but guards like a patch:
#: fingerprinted, and failing closed (:func:`require`) when flwr changed them
GUARDED_IMPORTS: dict[str, Patch] = {
    "secaggplus-constants": Patch(
        "secaggplus-constants",
        "fail closed",
        "imports flwr's SecAgg+ record keys and its Key/Stage names unchanged (no patch; see "
        "secaggplus_names)",
        "a site's secure-cohort check (SitePolicy.min_secure_cohort) recognises flwr's SecAgg+ "
        "setup and unmask messages by these names",
        (
            "flwr.common.secure_aggregation.secaggplus_constants:RECORD_KEY_CONFIGS",
            "flwr.common.secure_aggregation.secaggplus_constants:RECORD_KEY_STATE",
            "flwr.common.secure_aggregation.secaggplus_constants:Key",
            "flwr.common.secure_aggregation.secaggplus_constants:Stage",
        ),
    ),
}

#: SHA-256 of each target's source (or ``repr``), per supported flwr minor version, recorded on
#: flwr 1.41.0 and 1.42.0 with ``python -m fedcare.flower_bridge`` (see :func:`fingerprint`)
FINGERPRINTS: dict[str, dict[str, dict[str, str]]] = {
    "app-gate": {
        "1.41": {
            "flwr.cli.install:install_from_fab":
                "481bd04cde5823220658a8a3e84e827a5ef38254223972e4e14c4cb3968e917e",
            "flwr.supercore.constant:TASK_TYPE_TO_COMMAND":
                "4b0edd172e42ab1a25b05070470fc11ce6b648a04a16964e246ab7fcf2b36991",
            "flwr.supernode.cli.flwr_clientapp:flwr_clientapp":
                "9e02b412fb895b05a772a3b7d27af623d88819c21159264da48a9dd8117c1da0",
            "flwr.supernode.runtime.run_clientapp:run_clientapp":
                "6ce09559f3a2f5dcafb7d08f4b443585d76b9b53b9cb29ba1ec06a6982163443",
        },
        "1.42": {
            "flwr.cli.install:install_from_fab":
                "481bd04cde5823220658a8a3e84e827a5ef38254223972e4e14c4cb3968e917e",
            "flwr.supercore.constant:TASK_TYPE_TO_COMMAND":
                "4b0edd172e42ab1a25b05070470fc11ce6b648a04a16964e246ab7fcf2b36991",
            "flwr.supernode.cli.flwr_clientapp:flwr_clientapp":
                "9e02b412fb895b05a772a3b7d27af623d88819c21159264da48a9dd8117c1da0",
            "flwr.supernode.runtime.run_clientapp:run_clientapp":
                "6ce09559f3a2f5dcafb7d08f4b443585d76b9b53b9cb29ba1ec06a6982163443",
        },
    },
    "control-token": {
        "1.41": {
            "flwr.cli.auth_plugin.oidc_cli_plugin:OidcCliPlugin":
                "09409516ba9b2d50b37e8897dfa38b8692a599e072df54cdb4aad73b71d609da",
            "flwr.cli.constant:ACCESS_TOKEN_STORE_KEY":
                "a29909c72cd11d58c9f25c8ec6d29b1c25b6e2bbc8225a69a1bce90c6a1c0865",
            "flwr.cli.constant:AUTHN_TYPE_STORE_KEY":
                "a5c07574a5f7fbf7c716841841ddda3c2fa469d14b35d2c0be18bacb6ed9f605",
            "flwr.cli.constant:REFRESH_TOKEN_STORE_KEY":
                "53ae5e5473792fba540e0cb10bc4000199316220a2a907e943a2aea69fb63bd4",
            "flwr.cli.utils:get_authn_type":
                "9de3b4286dac036a437aa7e832525371250c384076a4e20fdce666a849da2fc0",
            "flwr.common.constant:AuthnType":
                "824c4b2ac8f6a0745564a68aa65ff22859b0d4b56abb81bb2041c6d5e0ad8bf8",
            "flwr.supercore.credential_store:FileCredentialStore":
                "29106e4af1333ac65b02aae388f9be4da6dae810a3683a473a92881f68781eca",
            "flwr.supercore.credential_store:get_credential_store":
                "27a22ea937a9c1267d84368f2aa959bc4f96a093b7c287b24a647b5cde8c292b",
        },
        "1.42": {
            "flwr.cli.auth_plugin.oidc_cli_plugin:OidcCliPlugin":
                "09409516ba9b2d50b37e8897dfa38b8692a599e072df54cdb4aad73b71d609da",
            "flwr.cli.constant:ACCESS_TOKEN_STORE_KEY":
                "a29909c72cd11d58c9f25c8ec6d29b1c25b6e2bbc8225a69a1bce90c6a1c0865",
            "flwr.cli.constant:AUTHN_TYPE_STORE_KEY":
                "a5c07574a5f7fbf7c716841841ddda3c2fa469d14b35d2c0be18bacb6ed9f605",
            "flwr.cli.constant:REFRESH_TOKEN_STORE_KEY":
                "53ae5e5473792fba540e0cb10bc4000199316220a2a907e943a2aea69fb63bd4",
            "flwr.cli.utils:get_authn_type":
                "9de3b4286dac036a437aa7e832525371250c384076a4e20fdce666a849da2fc0",
            "flwr.common.constant:AuthnType":
                "824c4b2ac8f6a0745564a68aa65ff22859b0d4b56abb81bb2041c6d5e0ad8bf8",
            "flwr.supercore.credential_store:FileCredentialStore":
                "29106e4af1333ac65b02aae388f9be4da6dae810a3683a473a92881f68781eca",
            "flwr.supercore.credential_store:get_credential_store":
                "27a22ea937a9c1267d84368f2aa959bc4f96a093b7c287b24a647b5cde8c292b",
        },
    },
    "pull-backoff": {
        "1.41": {
            "flwr.supercore.inflatable.inflatable_utils:pull_and_inflate_object_from_tree":
                "139811483a15e4a6c1f8523614c12f28dd3049194e5713816be0931387adb1cf",
            "flwr.supercore.inflatable.inflatable_utils:pull_objects":
                "31bb2de46b450e6acfadb7a8bb15e3f2074bb112199826a40a5eaa648bad5b2b",
        },
        "1.42": {
            "flwr.supercore.inflatable.inflatable_utils:pull_and_inflate_object_from_tree":
                "139811483a15e4a6c1f8523614c12f28dd3049194e5713816be0931387adb1cf",
            "flwr.supercore.inflatable.inflatable_utils:pull_objects":
                "31bb2de46b450e6acfadb7a8bb15e3f2074bb112199826a40a5eaa648bad5b2b",
        },
    },
    "secaggplus-constants": {  # secaggplus_constants.py is identical in flwr 1.41.0 and 1.42.0
        "1.41": {
            "flwr.common.secure_aggregation.secaggplus_constants:Key":
                "7261587d19e1ddb62fa81f4fdb9d8ce6f9a9211a6ba0fe8e9851389996719064",
            "flwr.common.secure_aggregation.secaggplus_constants:RECORD_KEY_CONFIGS":
                "e1280f683955e6ff92d7bd71f89b6bc6552fbae3beab253042e417d1e4790efb",
            "flwr.common.secure_aggregation.secaggplus_constants:RECORD_KEY_STATE":
                "024e58994dd1bbc18e43e30e09f56d4db3106633bfcc212da4119c3f437dcd82",
            "flwr.common.secure_aggregation.secaggplus_constants:Stage":
                "3b55deff90eba0db7a22b29644de4c5571e6283165d341a9f66612a64b7778f5",
        },
        "1.42": {
            "flwr.common.secure_aggregation.secaggplus_constants:Key":
                "7261587d19e1ddb62fa81f4fdb9d8ce6f9a9211a6ba0fe8e9851389996719064",
            "flwr.common.secure_aggregation.secaggplus_constants:RECORD_KEY_CONFIGS":
                "e1280f683955e6ff92d7bd71f89b6bc6552fbae3beab253042e417d1e4790efb",
            "flwr.common.secure_aggregation.secaggplus_constants:RECORD_KEY_STATE":
                "024e58994dd1bbc18e43e30e09f56d4db3106633bfcc212da4119c3f437dcd82",
            "flwr.common.secure_aggregation.secaggplus_constants:Stage":
                "3b55deff90eba0db7a22b29644de4c5571e6283165d341a9f66612a64b7778f5",
        },
    },
    "serverapp-poll": {
        "1.41": {
            "flwr.superlink.grid.http_grid:HttpGrid.pull_messages":
                "67a5266a5a2ed51557437a15ef4c8844f46576bc5bb6b0753d2a2f6230a3aa83",
            "flwr.superlink.grid.http_grid:HttpGrid.push_messages":
                "9aa5938ad18d36f91fc788748303da90b37905fe20b8cb89448d86a05d3c53fa",
            "flwr.superlink.grid.http_grid:HttpGrid.send_and_receive":
                "699c9f048f3cff746bf5f743771c17dcbb60cd45b6b778adb5600ffc81ee37b2",
        },
        "1.42": {
            "flwr.superlink.grid.http_grid:HttpGrid.pull_messages":
                "67a5266a5a2ed51557437a15ef4c8844f46576bc5bb6b0753d2a2f6230a3aa83",
            "flwr.superlink.grid.http_grid:HttpGrid.push_messages":
                "9aa5938ad18d36f91fc788748303da90b37905fe20b8cb89448d86a05d3c53fa",
            "flwr.superlink.grid.http_grid:HttpGrid.send_and_receive":
                "699c9f048f3cff746bf5f743771c17dcbb60cd45b6b778adb5600ffc81ee37b2",
        },
    },
    "superlink-front": {
        "1.41": {
            "flwr.supercore.http_logging:get_uvicorn_log_config":
                "3633a4dbbef5a4b1ee2be8451479fafe62cc30d5aa3c74f12b1c63abb78c7dee",
            "flwr.superlink.cli.flower_superlink:SuperLinkLifespan":
                "a2c1f2f11725c17f4eeacaa1b6080cfc6019cc261a0dd1702d9c0a42dc471d90",
            "flwr.superlink.cli.flower_superlink:_parse_superlink_lifespan_config":
                "ef9b8a405905038efdba0d68129ded71a8d9a1629d1410d927db797de41bd475",
            "flwr.superlink.main:create_app":
                "ee966b630c8ba8b56315e8db3296df6c2ae6d9bd3a9826e28be63c85e321dbe1",
            "flwr.superlink.routers.fleet.router:router.routes":
                "1800c86c8dd4c091d63f3f93022bac26dfebbe31eb672f102f3dfc7ab3b91589",
        },
        "1.42": {
            "flwr.supercore.http_logging:get_uvicorn_log_config":
                "3633a4dbbef5a4b1ee2be8451479fafe62cc30d5aa3c74f12b1c63abb78c7dee",
            "flwr.superlink.cli.flower_superlink:SuperLinkLifespan":
                "a2c1f2f11725c17f4eeacaa1b6080cfc6019cc261a0dd1702d9c0a42dc471d90",
            "flwr.superlink.cli.flower_superlink:_parse_superlink_lifespan_config":
                "ef9b8a405905038efdba0d68129ded71a8d9a1629d1410d927db797de41bd475",
            "flwr.superlink.main:create_app":
                "ee966b630c8ba8b56315e8db3296df6c2ae6d9bd3a9826e28be63c85e321dbe1",
            "flwr.superlink.routers.fleet.router:router.routes":
                "1800c86c8dd4c091d63f3f93022bac26dfebbe31eb672f102f3dfc7ab3b91589",
        },
    },
    "supernode-poll": {
        "1.41": {
            "flwr.supernode.start_client_internal:start_client_internal":
                "9e89a6eb68fbec6821e817cd2c09f7894fc7b0f5725c2365b19a7122307f11f3",
        },
        "1.42": {
            "flwr.supernode.start_client_internal:start_client_internal":
                "9e89a6eb68fbec6821e817cd2c09f7894fc7b0f5725c2365b19a7122307f11f3",
        },
    },
    "warm-executor": {
        "1.41": {
            "flwr.supercore.cli.flower_superexec:flower_superexec":
                "f0e2725c92a57597bb82da9dab66e0591f4e19a635632c8825b6cecb7168c953",
            "flwr.supercore.superexec.executor.factory:get_executor":
                "891abfc53747803dd68ebd6e2f544b61b3aebc284391734178d0fc2561704d4a",
            "flwr.supercore.superexec.executor.subprocess_executor:SubprocessExecutor":
                "9c58435eb28cd78957a58a6db6a051c5718406cef70353bca2037015424d47e9",
            "flwr.supercore.superexec.executor.types:ExecutionSpec":
                "a52aad6399c9a5ec1e3b316148832232119eb26b56b18a38d3c74b3ef353a538",
            "flwr.supercore.superexec.executor.types:LaunchResult":
                "52068f09cea4222e23bb7e77ce58c6d8ddb265595b760c34ef0d015968a6c7bd",
            "flwr.supercore.superexec.run_superexec:run_superexec":
                "d11f4e7fbc8f0b121804772495484fae8987b2b52af8b2baa70baf40d5929e26",
        },
        "1.42": {
            "flwr.supercore.cli.flower_superexec:flower_superexec":
                "f0e2725c92a57597bb82da9dab66e0591f4e19a635632c8825b6cecb7168c953",
            "flwr.supercore.superexec.executor.factory:get_executor":
                "891abfc53747803dd68ebd6e2f544b61b3aebc284391734178d0fc2561704d4a",
            "flwr.supercore.superexec.executor.subprocess_executor:SubprocessExecutor":
                "9c58435eb28cd78957a58a6db6a051c5718406cef70353bca2037015424d47e9",
            "flwr.supercore.superexec.executor.types:ExecutionSpec":
                "a52aad6399c9a5ec1e3b316148832232119eb26b56b18a38d3c74b3ef353a538",
            "flwr.supercore.superexec.executor.types:LaunchResult":
                "52068f09cea4222e23bb7e77ce58c6d8ddb265595b760c34ef0d015968a6c7bd",
            "flwr.supercore.superexec.run_superexec:run_superexec":
                "91e7a33c5b898f33249c29d2058c57637ca7668a14c27296d2506dc98ac84f9b",
        },
    },
}

#: the SuperNode's log line that carries its node id once the SuperLink accepted it (flwr logs
#: it in ``start_client_internal``, fingerprinted by ``supernode-poll``); flwr has no other way
#: to tell the node's operator its id
SUPERNODE_ID_LOG = r"SuperNode ID: (\d+)"
#: the SuperNode loop's fixed wait when no message was pulled
FLWR_IDLE_POLL_S = 3.0
#: first retry of an unavailable object (flwr: 1 s)
PULL_INITIAL_BACKOFF_S = 0.05
#: longest wait between retries (flwr: 10 s)
PULL_BACKOFF_CAP_S = 0.5
_FLWR_BACKOFF = {"initial_backoff": 1, "backoff_cap": 10}  # flwr's PULL_* constants
_REPLY_WAIT_S = 0.1


# --- guards ---------------------------------------------------------------------------------


def installed_flwr_version() -> str:
    """Return the installed flwr's version string (``""`` when it has none)."""
    import flwr  # noqa: PLC0415

    return str(getattr(flwr, "__version__", ""))


def _minor(version: str) -> str:
    return ".".join(version.split(".")[:2])


def _resolve(target: str) -> Any:
    module_name, _, qualname = target.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in filter(None, qualname.split(".")):  # no qualname: the module itself
        obj = getattr(obj, part)
    return obj


def _digest_of(obj: Any) -> str:
    if inspect.isfunction(obj) or inspect.isclass(obj) or inspect.ismethod(obj):
        text = inspect.getsource(obj)
    elif isinstance(obj, dict):
        # keys by their value (an enum's str() differs between Python versions)
        text = repr(sorted((str(getattr(k, "value", k)), repr(v)) for k, v in obj.items()))
    elif isinstance(obj, (list, tuple)) and obj and hasattr(obj[0], "path"):
        text = repr(sorted(str(getattr(r, "path", "")) for r in obj))  # a router's routes
    else:
        text = repr(obj)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _guarded(name: str) -> Patch:
    """Return the patch, or the fingerprinted group of private names, called ``name``."""
    return PATCHES[name] if name in PATCHES else GUARDED_IMPORTS[name]


def fingerprint(patch: str) -> dict[str, str]:
    """Return the SHA-256 digest of each of ``patch``'s targets in the installed flwr.

    A target that cannot be imported or found gets ``"missing: <error>"``.
    """
    digests: dict[str, str] = {}
    for target in _guarded(patch).targets:
        try:
            digests[target] = _digest_of(_resolve(target))
        except (ImportError, AttributeError, OSError, TypeError) as err:
            digests[target] = f"missing: {type(err).__name__}: {err}"
    return digests


def unrecognised(patch: str) -> str | None:
    """Return why ``patch`` does not recognise the installed flwr, or None when it does."""
    version = installed_flwr_version()
    minor = _minor(version)
    if minor not in SUPPORTED_FLWR:
        return f"flwr {version or '?'} is not a version fedcare supports"
    known = FINGERPRINTS.get(patch, {}).get(minor)
    if known is None:
        return f"no fingerprint of {patch!r} is recorded for flwr {minor}"
    changed = sorted(t for t, d in fingerprint(patch).items() if known.get(t) != d)
    if changed:
        return f"flwr {version} differs from the flwr {minor} fedcare knows in {', '.join(changed)}"
    return None


def _supported_text() -> str:
    return " or ".join(f"{v}.x" for v in SUPPORTED_FLWR)


def require(patch: str) -> None:
    """Raise :class:`UnsupportedFlowerError` unless security patch ``patch`` recognises flwr."""
    reason = unrecognised(patch)
    if reason is not None:
        raise UnsupportedFlowerError(
            f"fedcare refuses to start: {reason}, and {_guarded(patch).why} depends on it "
            f"({patch}). Install a supported flwr (flwr {_supported_text()}: "
            f"pip install 'flwr[simulation,dp]>=1.41,<1.43')"
        )


def patch_enabled(patch: str) -> bool:
    """Return whether speed patch ``patch`` recognises flwr; log one line when it does not."""
    reason = unrecognised(patch)
    if reason is None:
        return True
    logger.warning(
        "fedcare: %s; flwr's own behaviour is kept instead of %s (%s; supported: flwr %s)",
        reason, PATCHES[patch].what.split(";")[0], patch, _supported_text(),
    )  # fmt: skip
    return False


def flower_logger() -> logging.Logger:
    """Return flwr's logger (``"flwr"``), which flwr's processes print with their handler."""
    return logging.getLogger("flwr")


# --- app gate (fail closed) -----------------------------------------------------------------


def gated_task_commands() -> tuple[str, ...]:
    """Return every command flwr's SuperExec starts a task with (``TASK_TYPE_TO_COMMAND``).

    Raises
    ------
    UnsupportedFlowerError
        When the app gate does not recognise the installed flwr.
    """
    require("app-gate")
    from flwr.supercore.constant import TASK_TYPE_TO_COMMAND  # noqa: PLC0415

    return tuple(sorted(set(TASK_TYPE_TO_COMMAND.values())))


def clientapp_command() -> str:
    """Return the command of a ClientApp task (``flwr-clientapp``)."""
    from flwr.supercore.constant import TASK_TYPE_TO_COMMAND, TaskType  # noqa: PLC0415

    return TASK_TYPE_TO_COMMAND[TaskType.CLIENT_APP]


def run_gated_clientapp(argv: Sequence[str], check_fab: Callable[[bytes], None]) -> None:
    """Run flwr's ``flwr-clientapp`` with ``argv``; ``check_fab`` sees every FAB before it is unpacked.

    ``check_fab`` receives the FAB's bytes as the SuperNode sent them and raises to refuse it
    (flwr then replies to the ServerApp with an error); nothing of the app is installed or
    imported before it returns.

    Raises
    ------
    UnsupportedFlowerError
        When the app gate does not recognise the installed flwr (nothing is run).
    """
    require("app-gate")
    import flwr.supernode.runtime.run_clientapp as runtime  # noqa: PLC0415 - heavy import
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp  # noqa: PLC0415

    install = runtime.install_from_fab

    def checked_install(fab_file: Path | bytes, *args: Any, **kwargs: Any) -> Any:
        content = fab_file if isinstance(fab_file, bytes) else Path(fab_file).read_bytes()
        check_fab(content)
        return install(fab_file, *args, **kwargs)

    runtime.install_from_fab = checked_install
    sys.argv = [clientapp_command(), *argv]
    flwr_clientapp()


# --- SuperLink front and Control API token (fail closed) -----------------------------------


@dataclass(frozen=True)
class SuperLinkServing:
    """flwr's SuperLink as an ASGI app, and where flwr's own parser says it listens.

    Attributes
    ----------
    app : callable
        flwr's FastAPI app with the SuperLink's lifespan (state, SuperExec, ...).
    host, port : str, int
        ``--host``/``--port`` of the flower-superlink arguments.
    ssl_keyfile, ssl_certfile : str or None
        The TLS key and certificate (None: plaintext).
    log_config : dict
        flwr's uvicorn logging configuration.
    """

    app: Any
    host: str
    port: int
    ssl_keyfile: str | None
    ssl_certfile: str | None
    log_config: dict[str, Any]


def fleet_route_paths() -> frozenset[str]:
    """Return the exact paths of flwr's Fleet HTTP router.

    Raises
    ------
    UnsupportedFlowerError
        When the SuperLink front does not recognise the installed flwr.
    """
    require("superlink-front")
    from flwr.superlink.routers.fleet.router import router  # noqa: PLC0415 - heavy import

    paths = {str(getattr(route, "path", "")) for route in router.routes}
    paths.discard("")
    return frozenset(paths)


def superlink_app(superlink_args: Sequence[str]) -> SuperLinkServing:
    """Parse ``flower-superlink`` arguments with flwr's own parser; return flwr's SuperLink app.

    Raises
    ------
    UnsupportedFlowerError
        When the SuperLink front does not recognise the installed flwr.
    """
    require("superlink-front")
    from flwr.supercore.http_logging import get_uvicorn_log_config  # noqa: PLC0415
    from flwr.supercore.logger import console_handler  # noqa: PLC0415
    from flwr.superlink.main import create_app  # noqa: PLC0415

    # the module, not the `flower_superlink` function its package re-exports under that name
    fs = importlib.import_module("flwr.superlink.cli.flower_superlink")
    sys.argv = ["flower-superlink", *superlink_args]
    config = fs._parse_superlink_lifespan_config()  # noqa: SLF001 - fingerprinted above
    return SuperLinkServing(
        app=create_app(config, fs.SuperLinkLifespan),
        host=str(config.host),
        port=int(config.port),
        ssl_keyfile=config.ssl_keyfile,
        ssl_certfile=config.ssl_certfile,
        log_config=get_uvicorn_log_config(console_handler.level),
    )


def store_control_token(flwr_home: Path, address: str, token: str) -> Path:
    """Store ``token`` where flwr's CLI reads account credentials for ``address``; return the file.

    flwr's CLI sends the stored access token as ``Authorization: Bearer`` to that address
    (fedcare's SuperLink front checks it); the refresh entry only completes the pair flwr loads.

    Raises
    ------
    UnsupportedFlowerError
        When the credential layout is not the one fedcare knows (the CLI might not send it).
    """
    require("control-token")
    from flwr.cli.constant import (  # noqa: PLC0415 - fingerprinted above
        ACCESS_TOKEN_STORE_KEY,
        AUTHN_TYPE_STORE_KEY,
        REFRESH_TOKEN_STORE_KEY,
    )
    from flwr.common.constant import AuthnType  # noqa: PLC0415
    from flwr.supercore.credential_store import FileCredentialStore  # noqa: PLC0415

    path = Path(flwr_home) / "credentials.yaml"
    store = FileCredentialStore(path)
    store.set(AUTHN_TYPE_STORE_KEY % address, AuthnType.OIDC.encode())
    store.set(ACCESS_TOKEN_STORE_KEY % address, token.encode())
    store.set(REFRESH_TOKEN_STORE_KEY % address, b"unused")
    return path


# --- object pulls (fall back) ---------------------------------------------------------------


def shorten_pull_backoff(
    initial_s: float = PULL_INITIAL_BACKOFF_S, cap_s: float = PULL_BACKOFF_CAP_S
) -> bool:
    """Make flwr's object pulls in this process retry after ``initial_s`` .. ``cap_s`` seconds.

    flwr sends a message in two steps (register it, then push its objects one request each);
    the receiver pulls the objects with ``pull_objects`` / ``pull_and_inflate_object_from_tree``
    and retries one that has not arrived after 1 s, 2, 4, 8, 10 s. This changes only those two
    functions' defaults, with proportionally more tries so that the time a pull may wait before
    it fails stays what flwr allows.

    Parameters
    ----------
    initial_s : float
        First wait after an unavailable object; doubles per retry.
    cap_s : float
        Longest wait between retries, at least ``initial_s``.

    Returns
    -------
    bool
        True when the defaults were changed (or already were); False when the patch does not
        recognise flwr (flwr's own backoff stays, one log line says so).

    Raises
    ------
    ValueError
        When ``initial_s`` is not positive or ``cap_s`` is below it.
    """
    if not 0 < initial_s <= cap_s:
        raise ValueError(f"need 0 < initial_s <= cap_s, got {initial_s}, {cap_s}")
    from flwr.supercore.inflatable import inflatable_utils  # noqa: PLC0415

    functions = (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree)
    defaults = [getattr(fn, "__kwdefaults__", None) or {} for fn in functions]
    if all(d.get("initial_backoff") == initial_s and d.get("backoff_cap") == cap_s for d in defaults):
        return True
    if not patch_enabled("pull-backoff"):
        return False
    untouched = all(
        all(d.get(k) == v for k, v in _FLWR_BACKOFF.items()) and "max_tries_per_object" in d for d in defaults
    )
    if not untouched:
        logger.warning("fedcare: flwr's pull defaults were changed by someone else: left as they are")
        return False
    for kwdefaults in defaults:
        tries = kwdefaults["max_tries_per_object"]
        if tries is not None:  # keep the time a pull may wait: same tries x cap
            kwdefaults["max_tries_per_object"] = math.ceil(tries * _FLWR_BACKOFF["backoff_cap"] / cap_s)
        kwdefaults["initial_backoff"] = initial_s
        kwdefaults["backoff_cap"] = cap_s
    return True


# --- SuperNode (fall back) ------------------------------------------------------------------


class _ShortSleeps:
    """Stands in for the ``time`` module inside flwr's SuperNode loop."""

    def __init__(self, idle_s: float, reply_wait_s: float) -> None:
        self._idle_s = idle_s
        self._reply_wait_s = reply_wait_s

    def sleep(self, seconds: float) -> None:
        """Wait at most the idle poll for flwr's 3 s wait, at most the reply wait otherwise."""
        if seconds >= FLWR_IDLE_POLL_S:
            time.sleep(min(seconds, self._idle_s))
        else:
            time.sleep(min(seconds, self._reply_wait_s))

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def shorten_supernode_poll(idle_s: float, reply_wait_s: float = _REPLY_WAIT_S) -> bool:
    """Make the SuperNode loop in this process poll every ``idle_s`` s when idle; return whether patched.

    While a ClientApp runs, the loop's 0.5 s wait for its reply becomes ``reply_wait_s``.
    """
    import flwr.supernode.start_client_internal as loop  # noqa: PLC0415

    current = getattr(loop, "time", None)
    if isinstance(current, _ShortSleeps):
        loop.time = _ShortSleeps(idle_s, reply_wait_s)  # type: ignore[assignment]
        return True
    if current is not time or not patch_enabled("supernode-poll"):
        return False
    loop.time = _ShortSleeps(idle_s, reply_wait_s)  # type: ignore[assignment]
    return True


def run_flower_supernode(argv: Sequence[str]) -> None:
    """Run flwr's ``flower-supernode`` entry point with ``argv`` in this process."""
    from flwr.supernode.cli.flower_supernode import flower_supernode  # noqa: PLC0415

    sys.argv = ["flower-supernode", *argv]
    flower_supernode()


# --- warm SuperExec (fall back; every ClientApp still passes the app gate) -----------------


def preload_clientapp_runtime() -> None:
    """Import what flwr's ``flwr-clientapp`` runs (so that forked tasks start warm)."""
    import flwr.supernode.runtime.run_clientapp  # noqa: F401, PLC0415
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp  # noqa: F401, PLC0415


def wrap_superexec_executor(wrap: Callable[[Any], Any]) -> bool:
    """Make the SuperExec in this process hand its subprocess executor to ``wrap``; return whether done.

    ``wrap(executor)`` returns the executor the SuperExec uses instead (same interface). When
    the patch does not recognise flwr, the SuperExec starts every task as flwr does (a fresh
    process found by name on ``PATH``: the app gate's executables), and one line says so.
    """
    if not patch_enabled("warm-executor"):
        return False
    import flwr.supercore.superexec.run_superexec as runner  # noqa: PLC0415
    from flwr.supercore.constant import ExecutorType  # noqa: PLC0415

    original = runner.get_executor
    if getattr(original, "__fedcare_wrapped__", False):
        return True

    def get_executor(executor_type: Any, *args: Any, **kwargs: Any) -> Any:
        executor = original(executor_type, *args, **kwargs)
        if executor_type == ExecutorType.SUBPROCESS:
            return wrap(executor)
        return executor

    get_executor.__fedcare_wrapped__ = True  # type: ignore[attr-defined]
    runner.get_executor = get_executor
    return True


def run_flower_superexec(argv: Sequence[str]) -> None:
    """Run flwr's ``flower-superexec`` entry point with ``argv`` in this process."""
    from flwr.supercore.cli.flower_superexec import flower_superexec  # noqa: PLC0415

    sys.argv = ["flower-superexec", *argv]
    flower_superexec()


def is_clientapp_task(spec: Any) -> bool:
    """Return whether an executor launch ``spec`` is a ClientApp task."""
    from flwr.supercore.constant import TaskType  # noqa: PLC0415

    return bool(spec.task_type == TaskType.CLIENT_APP)


def launch_accepted() -> Any:
    """Return the executor's "launched" result."""
    from flwr.supercore.superexec.executor.types import LaunchResult  # noqa: PLC0415

    return LaunchResult.accepted()


def clientapp_argv(spec: Any) -> list[str]:
    """Return ``flwr-clientapp``'s arguments for ``spec``, as flwr's SubprocessExecutor builds them."""
    args = ["--runtime-api-address", spec.runtime_api_address, "--token", spec.token]
    if spec.insecure:
        args.append("--insecure")
    elif spec.root_certificates_path is not None:
        args += ["--root-certificates", spec.root_certificates_path]
    if spec.parent_pid is not None:
        args += ["--parent-pid", str(spec.parent_pid)]
    if spec.runtime_dependency_install:
        args.append("--allow-runtime-dependency-installation")
    return args


# --- ServerApp Grid (fall back) -------------------------------------------------------------


def polls_deployment_grid(grid: Any) -> bool:
    """Return whether ``grid`` is flwr's deployment (HTTP) Grid whose reply polling fedcare may replace."""
    try:
        from flwr.superlink.grid.http_grid import HttpGrid  # noqa: PLC0415
    except ImportError:
        return False
    return isinstance(grid, HttpGrid) and patch_enabled("serverapp-poll")


# --- private names fedcare imports (no patch) -----------------------------------------------
#
# flwr names outside its public API that client/, server/ and simulations/ use unchanged. They are
# resolved from flwr on first use, never when this module is imported (the app gate and the CLI
# import it). The SecAgg+ constants are fingerprinted and fail closed (GUARDED_IMPORTS); the
# others are checked against SUPPORTED_FLWR only, and a missing one raises UnsupportedFlowerError.


class SecAggPlusNames(NamedTuple):
    """flwr's SecAgg+ names the site's secure-cohort check reads (``secaggplus_constants``)."""

    record_key_configs: str
    record_key_state: str
    key: Any  # flwr's Key: the setup/unmask config keys (STAGE, SAMPLE_NUMBER, ...)
    stage: Any  # flwr's Stage: SETUP, SHARE_KEYS, COLLECT_MASKED_VECTORS, UNMASK


def secaggplus_names() -> SecAggPlusNames:
    """Return flwr's SecAgg+ record keys, Key and Stage; fail closed on a flwr that changed them."""
    require("secaggplus-constants")
    targets = GUARDED_IMPORTS["secaggplus-constants"].targets
    return SecAggPlusNames(*(_resolve(t) for t in targets))


#: flwr's private names importable from this module (``from fedcare.flower_bridge import Run``):
#: name -> ``module:qualname`` (``module`` alone for a module), resolved by :func:`private_name`
PRIVATE_NAMES: dict[str, str] = {
    # client/secure.py (the SecAgg+ train mod)
    "MessageType": "flwr.app.message_type:MessageType",
    "ClientAppCallable": "flwr.clientapp.typing:ClientAppCallable",
    "KEY_CLIPPING_NORM": "flwr.supercore.differential_privacy:KEY_CLIPPING_NORM",
    # client/secure.py, server/secagg.py (the legacy fit messages SecAgg+ runs on)
    "recorddict_compat": "flwr.compat.common.recorddict_compat",
    # server/secagg.py (SecAggPlusWorkflow's legacy context and run end)
    "MAIN_CONFIGS_RECORD": "flwr.server.workflow.constant:MAIN_CONFIGS_RECORD",
    "MAIN_PARAMS_RECORD": "flwr.server.workflow.constant:MAIN_PARAMS_RECORD",
    "WorkflowKey": "flwr.server.workflow.constant:Key",
    "RunNotRunningException": "flwr.supercore.run:RunNotRunningException",
    # simulations/inprocess.py (the in-process Grid)
    "ErrorCode": "flwr.common.constant:ErrorCode",
    "Run": "flwr.supercore.run:Run",
    "TaskIdentity": "flwr.supercore.task_identity:TaskIdentity",
    # server/flower_app.py, client/cli.py (what `flwr run` checks and builds)
    "is_valid_name": "flwr.supercore.utils:is_valid_name",
    "load_and_validate": "flwr.cli.config_utils:load_and_validate",
    "build_fab_from_disk": "flwr.cli.build:build_fab_from_disk",
}


def private_name(name: str) -> Any:
    """Return flwr's private name ``name`` of :data:`PRIVATE_NAMES` on a supported flwr.

    Raises
    ------
    UnsupportedFlowerError
        The installed flwr is not a version fedcare supports, or lacks the name.
    """
    target = PRIVATE_NAMES[name]
    version = installed_flwr_version()
    if _minor(version) not in SUPPORTED_FLWR:
        raise UnsupportedFlowerError(
            f"fedcare refuses to use flwr {version or '?'}: it is not a version fedcare supports, "
            f"and fedcare uses its {target}. Install a supported flwr (flwr {_supported_text()}: "
            f"pip install 'flwr[simulation,dp]>=1.41,<1.43')"
        )
    try:
        return _resolve(target)
    except (ImportError, AttributeError) as err:
        raise UnsupportedFlowerError(
            f"fedcare cannot find {target} in flwr {version} ({type(err).__name__}: {err}); "
            f"reinstall a supported flwr (flwr {_supported_text()}: "
            f"pip install --force-reinstall 'flwr[simulation,dp]>=1.41,<1.43')"
        ) from None


def __getattr__(name: str) -> Any:
    """Resolve a name of :data:`PRIVATE_NAMES` from flwr when it is first imported (PEP 562)."""
    if name in PRIVATE_NAMES:
        return private_name(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _record() -> dict[str, dict[str, str]]:
    """Return the installed flwr's fingerprint of every patch (what :data:`FINGERPRINTS` holds)."""
    return {name: fingerprint(name) for name in (*PATCHES, *GUARDED_IMPORTS)}


if __name__ == "__main__":
    import json

    recorded = {_minor(installed_flwr_version()): _record()}
    sys.stdout.write(json.dumps(recorded, indent=1, sort_keys=True) + "\n")
