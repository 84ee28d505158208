"""Fresh randomness for every process that can take a DP step (noise, Poisson sampling, rounding).

Differential privacy holds only if every released noise draw is fresh. Two failure modes are
closed here:

- **Forked processes share a generator state.** A warm SuperExec (``client.warm_exec``), a
  ``multiprocessing`` pool with the ``fork`` start method or any other ``os.fork`` copies torch's,
  NumPy's and ``random``'s global generator states into every child: two DP rounds forked from
  one parent would draw the *same* noise, and the difference of their updates would be a
  noise-free function of the data. Importing this module registers
  :func:`reseed_global_generators` with ``os.register_at_fork(after_in_child=...)``, so every
  fork made after the import (by any code path) reseeds torch's global CPU generator (and the
  CUDA generators, lazily if CUDA is not initialised), NumPy's legacy global generator and
  ``random`` from the operating system's entropy in the child. ``client.training`` and
  ``client.secure`` import it, so it is active in every process that trains.
- **A deployed site has no seed.** :func:`os_entropy_seed` returns a 63-bit seed from
  ``secrets`` (the OS's CSPRNG); ``client.training`` builds explicit torch generators from it for
  the DP noise and the Poisson sampling of every round instead of relying on global state.

Explicit seeds stay for simulations and tests (repeatable runs). They are always the site's own
(node config ``seed``, or the simulation's), never a value the coordinator sends.
"""

from __future__ import annotations

import logging
import os
import random
import secrets
from typing import Final

import numpy as np
import torch

__all__ = ["os_entropy_seed", "reseed_global_generators"]

logger = logging.getLogger(__name__)

_SEED_BITS: Final = 63  # torch.Generator.manual_seed takes a signed 64-bit value


def os_entropy_seed() -> int:
    """Return a fresh 63-bit seed from the operating system's CSPRNG (``secrets``)."""
    return secrets.randbits(_SEED_BITS)


def reseed_global_generators() -> None:
    """Reseed torch's (CPU, CUDA), NumPy's legacy and ``random``'s global generators from OS entropy.

    ``torch.manual_seed`` seeds the CPU generator and every CUDA device (queued until CUDA is
    initialised, so a child that initialises CUDA later is seeded too). Run in every forked child
    (see the module docstring); safe to call at any time.
    """
    torch.manual_seed(os_entropy_seed())
    # the legacy global generator is what libraries read (flwr's SecAgg+ rounding among them)
    np.random.seed(np.frombuffer(secrets.token_bytes(32), dtype=np.uint32))  # noqa: NPY002
    random.seed(secrets.token_bytes(32))


_registered = False


def _register() -> None:
    """Register :func:`reseed_global_generators` to run in every forked child (once per process)."""
    global _registered  # noqa: PLW0603 - one registration per interpreter
    if _registered:
        return
    os.register_at_fork(after_in_child=reseed_global_generators)
    _registered = True
    logger.debug("global generators are reseeded from OS entropy after every fork")


_register()
