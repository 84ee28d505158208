"""``--set KEY=VALUE``: override one value of a scenario, validated as the file itself is.

``KEY`` is a dotted path into the scenario's tables (``training.lr``, ``privacy.target_epsilon``,
``partition.hospitals``, ``rounds``); ``VALUE`` is read as a TOML value (``0.1``, ``true``,
``"text"``, ``[1, 2]``), and as plain text when it is not one (``strategy.name=fedprox``). The
scenario is rebuilt from the keys it was given plus the override, so pydantic checks the new value
and every rule across fields (a scenario is frozen; nothing is changed in place). Keys the file
did not give stay unset (a ``[policy]`` key given by ``--set`` is as explicit as one in the file).
"""

from __future__ import annotations

import tomllib
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from .scenario import InvalidScenarioError, Scenario

__all__ = ["apply_overrides", "parse_assignment"]


def parse_assignment(text: str) -> tuple[list[str], Any]:
    """Return the dotted path and the value of ``KEY=VALUE``.

    Raises
    ------
    InvalidScenarioError
        When there is no ``=`` or the key is empty or malformed.
    """
    key, sep, raw = text.partition("=")
    path = [part.strip() for part in key.strip().split(".")]
    if not sep or not all(path):
        raise InvalidScenarioError(
            f"--set {text!r} is not KEY=VALUE; write e.g. --set training.lr=0.1 (a dotted path into the scenario)"
        )
    raw = raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # plain text: fedprox, breast_cancer, …
    return path, value


def _known_keys(node: Any) -> str:
    """Return the keys a table of the scenario takes (for an error message)."""
    return ", ".join(sorted(node)) if isinstance(node, dict) and node else "(none)"


def apply_overrides(scenario: Scenario, assignments: Sequence[str]) -> Scenario:
    """Return ``scenario`` with every ``KEY=VALUE`` of ``assignments`` applied, validated again.

    Raises
    ------
    InvalidScenarioError
        Naming the key when it is unknown, not a table where a table is needed, or its value is
        refused by the scenario's rules.
    """
    if not assignments:
        return scenario
    raw: dict[str, Any] = scenario.model_dump(exclude_unset=True)
    for text in assignments:
        path, value = parse_assignment(text)
        node: dict[str, Any] = raw
        shape: dict[str, Any] = scenario.model_dump()  # every key, given or default
        for depth, part in enumerate(path[:-1]):
            where = ".".join(path[: depth + 1])
            if part not in shape:
                raise InvalidScenarioError(
                    f"--set {text!r}: unknown scenario key {where!r}; keys here: {_known_keys(shape)}"
                )
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise InvalidScenarioError(f"--set {text!r}: {where!r} is a value, not a table; set {where}=VALUE")
            node, shape = child, shape[part] if isinstance(shape[part], dict) else {}
        node[path[-1]] = value
    try:
        return Scenario.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: "
            + ("unknown key (not a scenario setting); check its spelling in the scenario's tables"
               if e["type"] == "extra_forbidden" else str(e["msg"]).removeprefix("Value error, "))
            for e in exc.errors()
        )  # fmt: skip
        raise InvalidScenarioError(f"--set {', '.join(assignments)}: {problems}") from None
