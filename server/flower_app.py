"""A study file and the Flower App folder built from it for ``flwr run``.

A study TOML names the study and holds the run configuration the ServerApp reads from
``context.run_config``, in the tables a simulation scenario uses (``server/study_tables.py``)::

    rounds = 2
    [study]
    name = "heart-disease"            # at most 24 lowercase letters, digits, '-'
    version = "1.0.0"                 # optional
    description = "..."               # optional

    [model]                           # ModelSpec + task, num_classes, input_shape, has_mask
    family = "logistic"
    input_shape = [15]
    [strategy]
    name = "fedavg"
    [training]
    batch_size = 32
    [secure_aggregation]              # optional: SecAgg+ (server.secagg); [client_dp] optional
    enabled = true

    [run]                             # deployment keys of server.config.RunConfig
    min-sites = 3                     # (the old form, every key here, still reads; convert it
    checkpoint-dir = "heart-model"    #  with ``fedcare study convert``)

The app ships the full run configuration (every RunConfig key, sorted), so its hash depends only
on the configuration, not on the file's spelling.

    [app]                             # optional: other installed components (tests, plug-ins)
    serverapp = "fedcare.server.app:app"
    clientapp = "fedcare.client.app:app"

The Flower App folder holds only a ``pyproject.toml`` whose components point at modules
*installed in the environment* (``fedcare.server.app:app``, ``fedcare.client.app:app``): flwr
1.41 validates a component with ``importlib.util.find_spec`` on ``sys.path`` plus the app
folder, and ``flwr-serverapp`` / ``flwr-clientapp`` load it with ``importlib.import_module``
after putting the unpacked FAB first on ``sys.path``. So the FAB ships no code: the SuperLink
and every SuperNode run the fedcare they have installed (runtime dependency installation is
off). The FAB's hash still identifies the study's configuration.
"""

from __future__ import annotations

import hashlib
import logging
import re
import tomllib
from pathlib import Path
from typing import Any, Union

import tomli_w
from pydantic import Field, ValidationError, field_validator, model_validator

from .. import __version__
from ..config_base import FrozenModel
from .config import InvalidRunConfigError, RunConfig
from .tracking import TRACKING_DEFAULTS
from .study_tables import (
    RUN_KEYS_WITH_TABLES,
    ClientDpSpec,
    SecureAggregationSpec,
    StrategySpec,
    StudyModelSpec,
    TrainingSpec,
    convert_run_table,
    tables_to_run_config,
)

__all__ = [
    "DEFAULT_CLIENTAPP",
    "DEFAULT_SERVERAPP",
    "AppFolderExistsError",
    "InvalidStudyError",
    "Study",
    "StudyInfo",
    "AppComponents",
    "app_hash",
    "build_flower_app",
    "convert_study_file",
    "load_study",
]

logger = logging.getLogger(__name__)

DEFAULT_SERVERAPP = "fedcare.server.app:app"
DEFAULT_CLIENTAPP = "fedcare.client.app:app"
PUBLISHER = "fedcare"
APP_PREFIX = "fedcare-"
MAX_STUDY_NAME = 32 - len(APP_PREFIX)
_NAME = re.compile(r"^[a-z][a-z0-9-]*[a-z0-9]$")
_COMPONENT = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")

ConfigValue = Union[bool, int, float, str, dict[str, Any]]


class InvalidStudyError(ValueError):
    """Raised when a study file is unreadable or does not validate."""


class AppFolderExistsError(FileExistsError):
    """Raised when the app folder to build holds files other than a previous build's."""


class StudyInfo(FrozenModel):
    """The ``[study]`` table: what the study is called.

    Attributes
    ----------
    name : str
        At most 24 lowercase letters, digits and ``-``; becomes the Flower App name
        ``fedcare-<name>`` (flwr caps app names at 32 characters).
    version : str
        The study's version (the FAB's version).
    description : str
        One line about the study.
    """

    name: str
    version: str = "1.0.0"
    description: str = ""

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        from ..flower_bridge import is_valid_name  # noqa: PLC0415 - flwr's own rule

        valid, _ = is_valid_name(f"{APP_PREFIX}{value}")
        if not _NAME.match(value) or not valid:
            raise ValueError(
                f"study name {value!r}: use at most {MAX_STUDY_NAME} lowercase letters, digits "
                "and '-', starting with a letter (e.g. heart-disease); Flower App names are "
                f"'{APP_PREFIX}<name>' and may not exceed 32 characters"
            )
        return value

    @field_validator("version")
    @classmethod
    def _version(cls, value: str) -> str:
        if not re.match(r"^\d+(\.\d+){0,2}$", value):
            raise ValueError(f"study version {value!r}: use MAJOR.MINOR.PATCH (e.g. 1.0.0)")
        return value


class AppComponents(FrozenModel):
    """The ``[app]`` table: which installed ServerApp and ClientApp run the study."""

    serverapp: str = DEFAULT_SERVERAPP
    clientapp: str = DEFAULT_CLIENTAPP

    @field_validator("serverapp", "clientapp")
    @classmethod
    def _ref(cls, value: str) -> str:
        if not _COMPONENT.match(value):
            raise ValueError(f"component {value!r} must be 'package.module:attribute'")
        return value


class Study(FrozenModel):
    """A study file: its name, its training tables, its deployment settings and the components that run it.

    The training tables (``rounds``, ``seed``, ``[model]``, ``[strategy]``, ``[training]``,
    ``[secure_aggregation]``, ``[client_dp]``) are those of a simulation scenario
    (``server/study_tables.py``); ``[run]`` holds the deployment keys. The old form (every key
    in ``[run]``) is still read, with a warning naming ``fedcare study convert``.
    """

    study: StudyInfo
    rounds: int | None = Field(default=None, ge=1)
    seed: int | None = None
    model: StudyModelSpec | None = None
    strategy: StrategySpec | None = None
    training: TrainingSpec | None = None
    secure_aggregation: SecureAggregationSpec | None = None
    client_dp: ClientDpSpec | None = None
    run: dict[str, ConfigValue] = Field(default_factory=dict)
    app: AppComponents = AppComponents()

    @field_validator("run")
    @classmethod
    def _scalars(cls, value: dict[str, Any]) -> dict[str, Any]:
        def check(table: dict[str, Any], prefix: str) -> None:
            for key, item in table.items():
                if isinstance(item, dict):
                    check(item, f"{prefix}{key}.")
                elif not isinstance(item, (bool, int, float, str)):
                    raise ValueError(
                        f"[run] {prefix}{key} is a {type(item).__name__}: Flower run configs "
                        "hold only strings, numbers, booleans and tables (write lists as "
                        "comma-separated strings)"
                    )

        check(value, "")
        return value

    @property
    def uses_fedcare_apps(self) -> bool:
        """Return whether the study runs fedcare's own ServerApp (whose config is RunConfig)."""
        return self.app.serverapp == DEFAULT_SERVERAPP

    @model_validator(mode="after")
    def _one_spelling(self) -> Study:
        """Refuse a setting given both in a table and in ``[run]``; warn on the old form."""
        tables = self.table_config()
        both = sorted(set(tables) & set(self.run))
        if both:
            raise ValueError(
                f"[run] repeats {', '.join(both)}, already set by the study's tables; keep the "
                "tables' spelling and remove them from [run]"
            )
        old = sorted(set(self.run) & RUN_KEYS_WITH_TABLES)
        if old:
            logger.warning(
                "study %s: [run] keys %s have table spellings now ([model], [training], "
                "[strategy]…, as in a scenario); `fedcare study convert FILE` rewrites the file "
                "(same run configuration, same app hash)", self.study.name, ", ".join(old),
            )
        return self

    def table_config(self) -> dict[str, ConfigValue]:
        """Return the run-config keys the training tables stand for (kebab-case, flat)."""
        return tables_to_run_config(
            rounds=self.rounds, seed=self.seed, model=self.model, strategy=self.strategy,
            training=self.training, secure_aggregation=self.secure_aggregation, client_dp=self.client_dp,
        )

    def app_config(self) -> dict[str, ConfigValue]:
        """Return the ``[tool.flwr.app.config]`` table: the tables' keys and ``[run]``, sorted, with
        ``study`` defaulting to the study's name for fedcare's apps (one privacy ledger per study).

        Sorted, so that a study in the old form and its conversion build the same app (same hash).
        """
        config: dict[str, ConfigValue] = {**self.table_config(), **self.run}
        if self.uses_fedcare_apps and "study" not in config:
            config["study"] = self.study.name
        return dict(sorted(config.items()))

    def canonical_app_config(self) -> dict[str, ConfigValue]:
        """Return the config the app ships: for fedcare's apps every RunConfig key, written in full
        (:meth:`RunConfig.to_run_config`), so the app hash depends only on the run configuration,
        never on how the file spells it; for other components :meth:`app_config`."""
        run_config = self.run_config()
        if run_config is None:
            return self.app_config()
        return dict(sorted(run_config.to_run_config().items()))

    def run_config(self) -> RunConfig | None:
        """Return the validated :class:`RunConfig` (None for a study with other components).

        Raises
        ------
        InvalidRunConfigError
            When ``[run]`` is not a valid fedcare run configuration.
        """
        if not self.uses_fedcare_apps:
            return None
        flat: dict[str, Any] = {}

        def walk(table: dict[str, Any], prefix: str) -> None:
            for key, item in table.items():
                if isinstance(item, dict):
                    walk(item, f"{prefix}{key}.")
                else:
                    flat[f"{prefix}{key}"] = item

        walk(self.app_config(), "")
        return RunConfig.from_run_config(flat)

    @property
    def app_name(self) -> str:
        """Return the Flower App (FAB) name."""
        return f"{APP_PREFIX}{self.study.name}"


def load_study(path: Path) -> Study:
    """Read and validate a study TOML file.

    Raises
    ------
    FileNotFoundError
        When the file does not exist.
    InvalidStudyError
        When it is not TOML or does not validate.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"study file {path} not found: pass the study's TOML file")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise InvalidStudyError(f"study file {path} is not valid TOML: {err}") from None
    try:
        study = Study.model_validate(raw)
        study.run_config()
    except ValidationError as err:
        lines = "\n".join(
            f"  - {'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}"
            for e in err.errors()
        )
        raise InvalidStudyError(f"invalid study file {path}:\n{lines}") from None
    except InvalidRunConfigError as err:
        raise InvalidStudyError(f"invalid [run] table in study file {path}: {err}") from None
    logger.debug("read study %s (%d run-config keys)", study.study.name, len(study.run))
    return study


def flower_pyproject(study: Study) -> dict[str, Any]:
    """Return the Flower App ``pyproject.toml`` document for ``study``."""
    return {
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {
            "name": study.app_name,
            "version": study.study.version,
            "description": study.study.description or f"fedcare study {study.study.name}",
            "license": "Apache-2.0",
            # documentation only: runtime dependency installation is off, every host runs
            # the fedcare it has installed
            "dependencies": [f"fedcare=={__version__}", "flwr>=1.41,<1.43"],
        },
        "tool": {
            "flwr": {
                "app": {
                    "publisher": PUBLISHER,
                    "components": {
                        "serverapp": study.app.serverapp,
                        "clientapp": study.app.clientapp,
                    },
                    "config": _with_tracking_keys(study),
                }
            }
        },
    }


def _with_tracking_keys(study: Study) -> dict[str, ConfigValue]:
    """Return the app's config plus, for fedcare's apps, the tracking keys with their empty defaults.

    ``fedcare run --mlflow-uri/--tensorboard`` sets them as run-config overrides (Flower refuses an
    override of a key the app lacks); the app, hence its hash, is the same with tracking on or off.
    """
    config = study.canonical_app_config()
    if not study.uses_fedcare_apps:
        return config
    return dict(sorted({**config, **TRACKING_DEFAULTS}.items()))


def build_flower_app(study: Study, out_dir: Path, *, check_modules: bool = True) -> Path:
    """Write the Flower App folder for ``study`` (a single ``pyproject.toml``); return it.

    Parameters
    ----------
    study : Study
        The validated study.
    out_dir : pathlib.Path
        Folder to write; created if missing, and it must hold nothing but a previous build's
        ``pyproject.toml`` (every file in it would be shipped in the FAB).
    check_modules : bool
        Validate the folder with flwr's own check, which imports nothing but needs the
        components' modules to be findable in this environment.

    Raises
    ------
    AppFolderExistsError
        When ``out_dir`` holds other files.
    InvalidStudyError
        When flwr rejects the generated app.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    others = [p.name for p in out_dir.iterdir() if p.name != "pyproject.toml"]
    if others:
        raise AppFolderExistsError(
            f"{out_dir} holds {sorted(others)}: every file there would be shipped to the "
            "SuperLink; build into an empty folder"
        )
    path = out_dir / "pyproject.toml"
    path.write_text(tomli_w.dumps(flower_pyproject(study)), encoding="utf-8")

    from ..flower_bridge import load_and_validate  # noqa: PLC0415 - flwr CLI-only import

    try:
        load_and_validate(path, check_module=check_modules)
    except (ValueError, ImportError) as err:  # find_spec raises ImportError for a missing parent
        raise InvalidStudyError(
            f"flwr rejects the app built for study {study.study.name!r}: {err}. Check [app] "
            "and that fedcare is installed in this environment"
        ) from None
    logger.info("built Flower App %s in %s", study.app_name, out_dir)
    return out_dir


def app_hash(app_dir: Path) -> str:
    """Return the SHA-256 (hex) of the FAB ``flwr run`` builds from ``app_dir``.

    flwr 1.41 builds FABs deterministically (fixed zip timestamps, ``build_fab_from_disk``,
    the same call ``flwr run`` makes), so this is the hash the SuperLink and every SuperNode
    see for the run, and what a hospital pins with ``fedcare node start --trust-app``.
    """
    from ..flower_bridge import build_fab_from_disk  # noqa: PLC0415 - flwr CLI-only import

    return hashlib.sha256(build_fab_from_disk(Path(app_dir))).hexdigest()


def convert_study_file(source: Path, destination: Path | None = None) -> str:
    """Rewrite a study file from the old form (everything in ``[run]``) into the training tables.

    Returns the new TOML text; writes it to ``destination`` when given (a new file: an existing
    one is never overwritten). The conversion is checked: the new document must describe the
    same run configuration and build the same app (hence the same app hash) as the old one.

    Raises
    ------
    FileNotFoundError
        When ``source`` does not exist.
    InvalidStudyError
        When ``source`` is invalid, or a key is given both in ``[run]`` and in its table.
    FileExistsError
        When ``destination`` already exists.
    """
    from ..files import write_new  # noqa: PLC0415 - only this command writes

    old = load_study(Path(source))
    raw = tomllib.loads(Path(source).read_text(encoding="utf-8"))
    try:
        document = convert_run_table(raw)
        new = Study.model_validate(document)
    except (ValueError, ValidationError) as err:
        raise InvalidStudyError(f"cannot convert {source}: {err}") from None
    if new.canonical_app_config() != old.canonical_app_config():
        raise InvalidStudyError(  # a defect of the converter, never silently written
            f"converting {source} would change its run configuration; convert it by hand "
            "(docs/deployment.md shows the tables)"
        )
    text = tomli_w.dumps(document)
    if destination is not None:
        write_new(Path(destination), text.encode("utf-8"), mode=0o644)
    return text
