"""Known third-party notices that say nothing to a fedcare user, filtered at their source.

Each filter names one notice exactly: its message (a regular expression anchored at the start,
as :func:`warnings.filterwarnings` reads it), its category and the module that raises it, so a
new or changed notice from the same library still shows. Nothing else is filtered: fedcare's
own warnings (``PrivacyWarning`` above all) and every other library warning keep Python's
default handling. The known notices:

- **Opacus "Secure RNG turned off"** (``opacus.privacy_engine``, ``UserWarning``): fedcare
  builds the DP noise and Poisson-sampling generators itself from the operating system's
  entropy (``privacy.randomness.os_entropy_seed``) and passes them to Opacus; ``secure_mode``
  needs ``torchcsprng``, which cannot be installed (docs/privacy.md). Printed once per
  training process and round, it drowned the console.
- **Opacus "Optimal order is the largest alpha"** (``opacus.accountants.analysis.rdp``): the
  RDP→(ε, δ) conversion picked the largest order of the grid; the ε reported is still a valid
  upper bound (a wider grid could only lower it).
- **Ray's accelerator ``FutureWarning``** (``ray._private.worker``): a note about a future
  default of Ray for ``num_gpus = 0``; fedcare keeps today's behaviour.
- **Flower's ``run_simulation`` deprecation** and **"Manually terminating ClientAppActor"**
  (log records of the ``flwr`` logger, not Python warnings): the simulation runner calls
  ``run_simulation`` on purpose (in-process, no SuperLink), and its Ray actors are terminated
  at every normal end of a simulation; filtered by a :class:`logging.Filter` on the ``flwr``
  logger for those two messages.

:func:`install_notice_filters` is idempotent and is called by ``supervise.quiet_flower()``,
which every process that runs Flower or trains calls at start (the ``fedcare`` command, the
ServerApp and ClientApp modules, Ray's workers through the ClientApp module, the simulation
runner). It imports nothing from fedcare's packages (a foundation module, like ``supervise``).
"""

from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass
from typing import Final

__all__ = ["FLOWER_NOTICES", "KNOWN_NOTICES", "Notice", "add_warning_filters", "install_notice_filters"]


@dataclass(frozen=True)
class Notice:
    """One third-party warning filtered by message, category and raising module.

    Attributes
    ----------
    message : str
        Regular expression matched at the start of the warning's text.
    category : type of Warning
        The warning's class (subclasses match too, as in :func:`warnings.filterwarnings`).
    module : str
        Regular expression matched against the whole name of the module that raised it.
    why : str
        Why fedcare may hide it (shown in docs, never at run time).
    """

    message: str
    category: type[Warning]
    module: str
    why: str


#: the third-party warnings fedcare filters (each exactly; see the module docstring)
KNOWN_NOTICES: Final[tuple[Notice, ...]] = (
    Notice(
        message=r"Secure RNG turned off\. This is perfectly fine for experimentation",
        category=UserWarning,
        module=r"opacus\.privacy_engine",
        why="fedcare's DP noise generators are seeded from OS entropy (privacy/randomness.py)",
    ),
    Notice(
        message=r"Optimal order is the largest alpha\. Please consider expanding the range of alphas",
        category=UserWarning,
        module=r"opacus\.accountants\.analysis\.rdp",
        why="the ε reported is still a valid upper bound",
    ),
    Notice(
        message=r"Tip: In future versions of Ray, Ray will no longer override accelerator visible devices",
        category=FutureWarning,
        module=r"ray\._private\.worker",
        why="a note about a future Ray default; today's behaviour is what fedcare uses",
    ),
)

#: log messages of the ``flwr`` logger filtered (the format string, before %-arguments, and its first argument)
FLOWER_NOTICES: Final[tuple[tuple[str, str], ...]] = (
    (r"DEPRECATED FEATURE: %s", r"The `run_simulation` function is deprecated"),
    # a simulation's Ray actors at the normal end of run_simulation (flwr's VirtualClientEngineActor)
    (r"Manually terminating %s\Z", r"ClientAppActor\Z"),
)


class _FlowerNoticeFilter(logging.Filter):
    """Drop the ``flwr`` logger's records listed in :data:`FLOWER_NOTICES` (and nothing else)."""

    def __init__(self) -> None:
        super().__init__()
        self._patterns = [(re.compile(fmt), re.compile(arg)) for fmt, arg in FLOWER_NOTICES]

    def filter(self, record: logging.LogRecord) -> bool:
        """Return False for a listed notice, True for every other record."""
        args = record.args if isinstance(record.args, tuple) else ()
        first = str(args[0]) if args else ""
        for fmt, arg in self._patterns:
            if fmt.match(str(record.msg)) and arg.match(first):
                return False
        return True


_installed: list[bool] = []


def add_warning_filters() -> None:
    """Add one ``ignore`` filter per :data:`KNOWN_NOTICES` entry to the warnings filters now in force."""
    for notice in KNOWN_NOTICES:
        warnings.filterwarnings("ignore", message=notice.message, category=notice.category, module=notice.module)


def install_notice_filters() -> None:
    """Add the filters of :data:`KNOWN_NOTICES` and :data:`FLOWER_NOTICES` to this process (once)."""
    if _installed:
        return
    add_warning_filters()
    flower = logging.getLogger("flwr")
    if not any(isinstance(f, _FlowerNoticeFilter) for f in flower.filters):
        flower.addFilter(_FlowerNoticeFilter())
    _installed.append(True)
