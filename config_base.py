"""The base of every fedcare configuration and record model: frozen pydantic, unknown keys refused.

Every settings object, manifest, study file and result record fedcare validates derives from
:class:`FrozenModel` (``ConfigDict(frozen=True, extra="forbid")``): built once at the entry point,
never changed afterwards, and a misspelt key is an error instead of a silently ignored setting.
:class:`FiniteFrozenModel` also refuses NaN and infinity in float fields (privacy parameters,
budgets, metrics a report states). A model that needs another setting adds only that one
(pydantic merges ``model_config`` with the base's), e.g. ``model_config = ConfigDict(extra="allow")``.

It lives at the package root (like :mod:`fedcare.files`) because ``models/``, ``privacy/``,
``client/``, ``server/`` and ``simulations/`` all define such models, and importing it must not
import torch (``fedcare.models`` does). It imports nothing from fedcare.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

__all__ = ["FiniteFrozenModel", "FrozenModel"]


class FrozenModel(BaseModel):
    """A frozen pydantic model that refuses unknown fields."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class FiniteFrozenModel(FrozenModel):
    """A :class:`FrozenModel` whose float fields refuse NaN and infinity."""

    model_config = ConfigDict(allow_inf_nan=False)
