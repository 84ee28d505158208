"""Everything fedcare takes from Opacus beyond its public API, in one place, each use guarded.

fedcare uses Opacus through its public API (``PrivacyEngine.make_private``,
``DPOptimizer.attach_step_hook``, ``GradSampleModule.to_standard_module``, the accountants'
``get_optimizer_hook_fn``). Three things go further; each is a guarded use, checked against the
installed Opacus version (:data:`SUPPORTED_OPACUS`: 1.5.x, 1.6.x) and a fingerprint (SHA-256 of
``inspect.getsource`` of each function or class it relies on; for a constant, of its ``repr``),
recorded per minor version in :data:`FINGERPRINTS` with ``python -m fedcare.privacy.opacus_bridge``
(on Opacus 1.5.4 and 1.6.0; ``fast-clipped-sum`` on 1.6 only: Opacus 1.5 has no
``GradSampleModule.cleanup``, so on 1.5 ``"auto"`` uses Opacus's own hooks and ``"fast"`` is
refused):

- ``fast-clipped-sum`` (**fail closed**: the DP guarantee of ``grad_sample_mode="fast"`` rests
  on it): fedcare's :class:`~fedcare.privacy.fast_grad.FastGradSampleModule` writes the clipped
  per-sample gradient sum into ``p.grad`` itself, removes Opacus's ghost-clipping hooks, and
  relies on ``DPOptimizerFastGradientClipping`` to add Gaussian noise of std ``sigma * C`` to
  exactly that sum, scale it and charge the accountant. Unrecognised: an explicit ``"fast"``
  raises :class:`UnsupportedOpacusError`; ``"auto"`` picks Opacus's own per-sample gradients
  instead (:func:`fast_clipped_sum_supported`, one log line).
- ``lean-accumulate`` (falls back): a subclass of that optimizer whose ``accumulate`` copies the
  clipped sum with ``clone()`` instead of ``copy.deepcopy`` (speed only). Unrecognised: Opacus's
  own optimizer is used unchanged.
- ``per-sample-leftovers`` (falls back): the names of the attributes Opacus leaves on
  parameters and layers (``OPACUS_PARAM_MONKEYPATCH_ATTRS``, functorch's
  ``ft_compute_sample_grad``), removed when training ends. Unrecognised: they are left.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import logging
import sys
from collections.abc import Iterable
from typing import Any

from torch import nn

__all__ = [
    "FINGERPRINTS",
    "GUARDS",
    "SUPPORTED_OPACUS",
    "UnsupportedOpacusError",
    "fast_clipped_sum_supported",
    "fingerprint",
    "installed_opacus_version",
    "lean_fast_clipping_optimizer",
    "require_fast_clipped_sum",
    "strip_per_sample_leftovers",
    "unrecognised",
]

logger = logging.getLogger(__name__)

#: Opacus minor versions whose internals fedcare knows (pyproject: ``opacus>=1.5,<1.7``)
SUPPORTED_OPACUS = ("1.5", "1.6")

#: guard name -> (kind, what it relies on, ``module:qualname`` targets)
GUARDS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "fast-clipped-sum": (
        "fail closed",
        "Opacus's fast-gradient-clipping optimizer noising and accounting the clipped sum "
        "fedcare's fast per-sample gradients leave in p.grad",
        (
            "opacus.optimizers.optimizer_fast_gradient_clipping:DPOptimizerFastGradientClipping",
            "opacus.optimizers.optimizer:DPOptimizer.add_noise",
            "opacus.optimizers.optimizer:DPOptimizer.scale_grad",
            "opacus.optimizers.optimizer:DPOptimizer.pre_step",
            "opacus.optimizers.optimizer:DPOptimizer.step",
            "opacus.optimizers.optimizer:DPOptimizer.attach_step_hook",
            "opacus.grad_sample.gsm_base:AbstractGradSampleModule.cleanup",
            "opacus.grad_sample.grad_sample_module:GradSampleModule.remove_hooks",
        ),
    ),
    "lean-accumulate": (
        "fall back",
        "a cheaper copy of the clipped sum in the fast-gradient-clipping optimizer",
        ("opacus.optimizers.optimizer_fast_gradient_clipping:DPOptimizerFastGradientClipping.accumulate",),
    ),
    "per-sample-leftovers": (
        "fall back",
        "removing the per-sample attributes Opacus leaves on parameters and layers",
        (
            "opacus.grad_sample.gsm_base:OPACUS_PARAM_MONKEYPATCH_ATTRS",
            "opacus.grad_sample.functorch:prepare_layer",
        ),
    ),
}

#: SHA-256 of each target's source (or ``repr``) per supported Opacus minor version
FINGERPRINTS: dict[str, dict[str, dict[str, str]]] = {
    "fast-clipped-sum": {
        # "1.5": none: fedcare calls cleanup(), which Opacus 1.5 lacks
        "1.6": {
            "opacus.optimizers.optimizer_fast_gradient_clipping:DPOptimizerFastGradientClipping":
                "c2a2cb04a0cffc71c25b926d28c76e8ef95651a1323b376949e824cbcf0c3b7d",
            "opacus.optimizers.optimizer:DPOptimizer.add_noise":
                "4380705bf5d8f89bcd21c9b3b69984d61b892169c4ce1b572a12b33f937d1213",
            "opacus.optimizers.optimizer:DPOptimizer.scale_grad":
                "ec629064142b9495e57ec23a37da96fcb8b1e7d20f31881871669368f7dc7469",
            "opacus.optimizers.optimizer:DPOptimizer.pre_step":
                "3c219ca43a5d89df588e558be14862c914f5e727eccfedddd323d543cb3c9946",
            "opacus.optimizers.optimizer:DPOptimizer.step":
                "0497c899ea41e13e4293bca4804e646f7cd3332c10b0130d7a4243f254bff76f",
            "opacus.optimizers.optimizer:DPOptimizer.attach_step_hook":
                "fc1ec35cd5708d443a2baf95c0b95b9d83ca978f360bd78bb5f4d6ff685027b1",
            "opacus.grad_sample.gsm_base:AbstractGradSampleModule.cleanup":
                "f732c1793f26249788b8400789e4e0a62ce057fd2001da118edc8ab4d95bf3c2",
            "opacus.grad_sample.grad_sample_module:GradSampleModule.remove_hooks":
                "9607a39e7840d37cd9043f04f146c9e941a40f9a00b40599aadcb9a8bb2b96fa",
        },
    },
    "lean-accumulate": {
        "1.5": {
            "opacus.optimizers.optimizer_fast_gradient_clipping:DPOptimizerFastGradientClipping.accumulate":
                "ae9dc6130a966adab7d074d5485feedd8689d266c1bda883a14a69957f3721f7",
        },
        "1.6": {
            "opacus.optimizers.optimizer_fast_gradient_clipping:DPOptimizerFastGradientClipping.accumulate":
                "ae9dc6130a966adab7d074d5485feedd8689d266c1bda883a14a69957f3721f7",
        },
    },
    "per-sample-leftovers": {
        "1.5": {
            "opacus.grad_sample.gsm_base:OPACUS_PARAM_MONKEYPATCH_ATTRS":
                "b7e8577c0401a6406c492f0d9b95271d31eb39d70e58c832fea8f7f625cf475c",
            "opacus.grad_sample.functorch:prepare_layer":
                "424eabcea5fde3f70467527b3b8a0d288d2990ed310b03bc3af3ab28680753ba",
        },
        "1.6": {
            "opacus.grad_sample.gsm_base:OPACUS_PARAM_MONKEYPATCH_ATTRS":
                "b7e8577c0401a6406c492f0d9b95271d31eb39d70e58c832fea8f7f625cf475c",
            "opacus.grad_sample.functorch:prepare_layer":
                "cb19353df1ff65b543a22f1c9367db4afa7170937294bf5c44ccb9f2c8aa892e",
        },
    },
}

_FUNCTORCH_ATTR = "ft_compute_sample_grad"


class UnsupportedOpacusError(RuntimeError):
    """Raised when a guarded Opacus use the DP guarantee rests on does not recognise Opacus."""


def installed_opacus_version() -> str:
    """Return the installed Opacus's version string."""
    import opacus  # noqa: PLC0415

    return str(getattr(opacus, "__version__", ""))


def _minor(version: str) -> str:
    return ".".join(version.split(".")[:2])


def _resolve(target: str) -> Any:
    module_name, _, qualname = target.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _digest_of(obj: Any) -> str:
    if inspect.isfunction(obj) or inspect.isclass(obj) or inspect.ismethod(obj):
        text = inspect.getsource(obj)
    else:
        text = repr(obj)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def fingerprint(guard: str) -> dict[str, str]:
    """Return the SHA-256 digest of each of ``guard``'s targets in the installed Opacus."""
    digests: dict[str, str] = {}
    for target in GUARDS[guard][2]:
        try:
            digests[target] = _digest_of(_resolve(target))
        except (ImportError, AttributeError, OSError, TypeError) as err:
            digests[target] = f"missing: {type(err).__name__}: {err}"
    return digests


def unrecognised(guard: str) -> str | None:
    """Return why ``guard`` does not recognise the installed Opacus, or None when it does."""
    version = installed_opacus_version()
    minor = _minor(version)
    if minor not in SUPPORTED_OPACUS:
        return f"Opacus {version or '?'} is not a version fedcare supports"
    known = FINGERPRINTS.get(guard, {}).get(minor)
    if known is None:
        return f"no fingerprint of {guard!r} is recorded for Opacus {minor}"
    changed = sorted(t for t, d in fingerprint(guard).items() if known.get(t) != d)
    if changed:
        return f"Opacus {version} differs from the Opacus {minor} fedcare knows in {', '.join(changed)}"
    return None


def _supported_text() -> str:
    return " or ".join(f"{v}.x" for v in SUPPORTED_OPACUS)


def _fall_back(guard: str) -> bool:
    """Return True when ``guard`` recognises Opacus; else log one line and return False."""
    reason = unrecognised(guard)
    if reason is None:
        return True
    logger.warning(
        "fedcare: %s; Opacus's own behaviour is kept instead of %s (supported: Opacus %s)",
        reason, GUARDS[guard][1], _supported_text(),
    )  # fmt: skip
    return False


def require_fast_clipped_sum() -> None:
    """Raise :class:`UnsupportedOpacusError` unless fedcare's fast per-sample path knows this Opacus."""
    reason = unrecognised("fast-clipped-sum")
    if reason is not None:
        raise UnsupportedOpacusError(
            f"grad_sample_mode 'fast' refused: {reason}, and its DP noise relies on "
            f"{GUARDS['fast-clipped-sum'][1]}. Use grad_sample_mode 'auto' or 'hooks', or "
            f"install Opacus {_supported_text()} (pip install 'opacus>=1.5,<1.7')"
        )


def fast_clipped_sum_supported() -> bool:
    """Return whether ``"auto"`` may pick the fast path (one log line when it may not)."""
    return _fall_back("fast-clipped-sum")


def lean_fast_clipping_optimizer(dp_optimizer: Any) -> Any:
    """Return an optimizer like ``dp_optimizer`` whose ``accumulate`` copies with ``clone()``.

    Built with Opacus's public constructor from ``dp_optimizer``'s settings (wrapped optimizer,
    noise multiplier, clipping norm, expected batch size, loss reduction, generator, secure
    mode) and its step hook (the accountant's). Returns ``dp_optimizer`` itself when the guard
    does not recognise Opacus.
    """
    if not _fall_back("lean-accumulate"):
        return dp_optimizer
    lean = _lean_class()(
        dp_optimizer.original_optimizer,
        noise_multiplier=dp_optimizer.noise_multiplier,
        max_grad_norm=dp_optimizer.max_grad_norm,
        expected_batch_size=dp_optimizer.expected_batch_size,
        loss_reduction=dp_optimizer.loss_reduction,
        generator=dp_optimizer.generator,
        secure_mode=dp_optimizer.secure_mode,
    )
    lean.attach_step_hook(dp_optimizer.step_hook)
    return lean


_LEAN: list[type] = []


def _lean_class() -> type:
    if not _LEAN:
        from opacus.optimizers import DPOptimizerFastGradientClipping  # noqa: PLC0415

        class LeanFastGradientClippingOptimizer(DPOptimizerFastGradientClipping):
            """Opacus's ``DPOptimizerFastGradientClipping`` with a cheaper copy of the clipped sum.

            Opacus copies ``p.grad`` into ``p.summed_grad`` with ``copy.deepcopy`` (about 50 us a
            tensor on this CPU, the largest DP overhead for the regression models); ``clone()``
            makes the same copy. Noise, scaling, step skipping and the accountant hook are
            inherited unchanged.
            """

            def accumulate(self) -> None:
                """Store ``p.grad`` (the clipped sum) into ``p.summed_grad``, adding when present."""
                for p in self.params:
                    if p.summed_grad is not None:
                        p.summed_grad.add_(p.grad)
                    else:
                        p.summed_grad = p.grad.detach().clone()

        _LEAN.append(LeanFastGradientClippingOptimizer)
    return _LEAN[0]


def strip_per_sample_leftovers(modules: Iterable[nn.Module]) -> None:
    """Remove the attributes Opacus leaves on ``modules``' parameters and on the layers."""
    if not _fall_back("per-sample-leftovers"):
        return
    from opacus.grad_sample.gsm_base import OPACUS_PARAM_MONKEYPATCH_ATTRS  # noqa: PLC0415

    for module in modules:
        if hasattr(module, _FUNCTORCH_ATTR):
            delattr(module, _FUNCTORCH_ATTR)
        for p in module.parameters(recurse=False):
            for attr in OPACUS_PARAM_MONKEYPATCH_ATTRS:
                if hasattr(p, attr):
                    delattr(p, attr)


if __name__ == "__main__":
    import json

    record = {name: fingerprint(name) for name in GUARDS}
    sys.stdout.write(json.dumps({_minor(installed_opacus_version()): record}, indent=1) + "\n")
