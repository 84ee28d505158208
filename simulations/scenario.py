"""A simulation scenario: which data, how many hospitals, which model, strategy, DP and rounds.

A scenario is a TOML file validated by :class:`Scenario` (frozen, unknown fields refused)::

    name = "breast-cancer-dp"
    rounds = 5
    seed = 0
    baselines = ["pooled", "local"]     # optional: also train pooled and local-only models

    [data]                               # one of three sources, picked by kind:
    kind = "sklearn"                     #   built-in table shipped with scikit-learn
    name = "breast_cancer"               #   breast_cancer | diabetes
    # kind = "manifests"                 #   one site manifest per natural hospital
    # paths = ["sites/a.toml", "sites/b.toml"]
    # kind = "manifest"                  #   one manifest, partitioned into hospitals
    # path = "sites/all.toml"

    [partition]                          # sklearn / manifest sources only
    hospitals = 4
    kind = "iid"                         # iid | dirichlet | quantity | natural
    alpha = 0.5                          # dirichlet: label skew; quantity: size skew
    min_per_site = 10                    # training examples every hospital gets at least

    [model]                              # models.ModelSpec
    family = "logistic"

    [strategy]
    name = "fedavg"                      # and its parameters, in run-config spelling:
    # proximal-mu = 0.01

    [training]
    local_epochs = 1
    batch_size = 32
    lr = 0.1
    clip_grad_norm = 0.0                 # > 0: clip each batch's gradient norm (training without DP)

    [privacy]                            # privacy.settings.PrivacySettings (every site's policy)
    enabled = true
    target_epsilon = 3.0
    delta = 1e-5
    max_grad_norm = 1.0

    [policy]                             # optional privacy.policy.SitePolicy of every virtual site:
    max_epsilon_per_study = 3.0          # keys not given keep the node default (strict, SecAgg+ required)

    [artefacts]                          # optional (simulations.release): encrypt checkpoints and
    key = "keys/artefact.key"            #   the final model; a key file, "env" or "env:NAME"
    [audit]                              # optional: the server signs an audit log
    signing_key = "keys/audit.key"       #   (fedcare audit keygen)
    [release]                            # optional: membership-inference release gate
    max_membership_auc = 0.6             #   see simulations/release.py for every key

    [simulation]
    num_cpus = 2                         # Ray's CPUs; each virtual hospital uses client_num_cpus
    client_num_cpus = 1
    num_gpus = 0                         # Ray's GPUs (refused if this machine has fewer)
    client_num_gpus = 0.0                # share of a GPU per virtual hospital, e.g. 0.25
    round_timeout_s = 120
    min_sites = 2                        # default: every hospital
    evaluate_with_train = false          # true: evaluation rides in the next train message

Relative paths resolve against the scenario file's folder.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator

from ..config_base import FrozenModel
from ..models import ModelSpec
from ..models.families import FAMILIES
from ..privacy.policy import SitePolicy
from ..privacy.settings import PrivacySettings
from ..server.config import RunConfig
from ..server.study_tables import StrategySpec, TrainingSpec
from .builtin import BUILTIN_SOURCES
from .partition import PartitionScheme
from .secure import ClientDpSpec, SecureAggregationSpec, secure_run_fields
from .release import ArtefactSettings, AuditSettings, ReleaseSettings

__all__ = [
    "DEFAULT_SCENARIO",
    "DataSource",
    "InvalidScenarioError",
    "ManifestSource",
    "ManifestsSource",
    "PartitionSpec",
    "Scenario",
    "SimulationSettings",
    "SklearnSource",
    "StrategySpec",
    "TrainingSpec",
    "load_scenario",
    "with_ray_address",
]

DEFAULT_SCENARIO = Path(__file__).resolve().parent / "scenarios" / "default.toml"
"""The built-in scenario: breast cancer, 4 hospitals, DP logistic regression."""


class InvalidScenarioError(ValueError):
    """The scenario file is missing, not TOML, or does not validate."""


def _resolve(value: Path, info: ValidationInfo) -> Path:
    """Resolve a relative path against ``context["base_dir"]`` (the scenario's folder)."""
    value = Path(value).expanduser()
    base = (info.context or {}).get("base_dir")
    return Path(base) / value if base is not None and not value.is_absolute() else value


class SklearnSource(FrozenModel):
    """A built-in scikit-learn table (``simulations.builtin``), partitioned into hospitals."""

    kind: Literal["sklearn"]
    name: str = "breast_cancer"
    val: float = Field(default=0.15, ge=0.0, lt=1.0)
    test: float = Field(default=0.2, gt=0.0, lt=1.0)

    @field_validator("name")
    @classmethod
    def _known_source(cls, value: str) -> str:
        """Refuse an unknown built-in data set when the scenario loads (before any data or Ray)."""
        if value not in BUILTIN_SOURCES:
            raise ValueError(f"unknown built-in data set {value!r}; known: {', '.join(BUILTIN_SOURCES.names())}")
        return value


class ManifestsSource(FrozenModel):
    """One site manifest per natural hospital (no partitioning)."""

    kind: Literal["manifests"]
    paths: list[Path] = Field(min_length=1)

    @field_validator("paths")
    @classmethod
    def _resolve_all(cls, value: list[Path], info: ValidationInfo) -> list[Path]:
        """Resolve every path against the scenario's folder."""
        return [_resolve(p, info) for p in value]


class ManifestSource(FrozenModel):
    """One site manifest whose data is partitioned into virtual hospitals."""

    kind: Literal["manifest"]
    path: Path

    _resolve_path = field_validator("path")(_resolve)


DataSource = Annotated[Union[SklearnSource, ManifestsSource, ManifestSource], Field(discriminator="kind")]


class PartitionSpec(PartitionScheme):
    """How one dataset is split into virtual hospitals: a ``PartitionScheme`` plus their number.

    Attributes
    ----------
    hospitals : int
        Number of virtual hospitals.
    kind, alpha, min_per_site, assign :
        ``simulations.partition.PartitionScheme``: ``iid``, ``dirichlet`` (label skew),
        ``quantity`` (size skew) or ``natural`` (by ``Split.groups``).
    """

    hospitals: int = Field(default=4, ge=1)

    def scheme(self) -> PartitionScheme:
        """Return the partition scheme without the hospital count."""
        return PartitionScheme(**self.model_dump(exclude={"hospitals"}))


class SimulationSettings(FrozenModel):
    """Resources and limits of the simulation engine.

    ``num_gpus`` GPUs are given to Ray, and each virtual hospital's ClientApp reserves
    ``client_num_gpus`` of one (a fraction shares a GPU between hospitals); a hospital that
    reserved one trains on it (device ``auto``), the others on CPU.

    ``ray_address`` (e.g. ``"10.0.0.5:6379"`` or ``"auto"``) connects to a Ray cluster that is
    already running (``ray start --head`` ...) and uses its resources instead of starting a
    private local Ray instance; ``num_cpus``, ``num_gpus`` and ``object_store_mb`` are then the
    cluster's business and are not passed. fedcare never starts or stops a cluster it connects
    to: it only disconnects (docs/simulation.md).
    """

    ray_address: str | None = Field(default=None, min_length=1)
    num_cpus: int = Field(default=2, ge=1)
    client_num_cpus: float = Field(default=1.0, gt=0.0)
    num_gpus: int = Field(default=0, ge=0)
    client_num_gpus: float = Field(default=0.0, ge=0.0, le=1.0)
    round_timeout_s: float = Field(default=120.0, gt=0.0)
    min_sites: int | None = Field(default=None, ge=1)
    fraction_train: float = Field(default=1.0, gt=0.0, le=1.0)
    fraction_evaluate: float = Field(default=1.0, ge=0.0, le=1.0)
    evaluate_with_train: bool = False
    object_store_mb: int = Field(default=128, ge=80)

    @model_validator(mode="after")
    def _gpus_to_reserve(self) -> SimulationSettings:
        """Refuse a per-hospital GPU share without GPUs for Ray."""
        if self.client_num_gpus > 0 and self.num_gpus == 0 and self.ray_address is None:  # a cluster: its GPUs
            raise ValueError(
                f"client_num_gpus = {self.client_num_gpus:g} but num_gpus = 0: give Ray the GPUs to "
                "share (num_gpus = 1 or more), or set client_num_gpus = 0 to train on CPU"
            )
        return self


class Scenario(FrozenModel):
    """One simulation: data source, hospitals, model, strategy, DP, training and rounds."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    rounds: int = Field(default=3, ge=1)
    seed: int = 0
    baselines: list[Literal["pooled", "local"]] = []
    data: DataSource
    partition: PartitionSpec | None = None
    model: ModelSpec = ModelSpec()
    strategy: StrategySpec = StrategySpec()
    training: TrainingSpec = TrainingSpec()
    privacy: PrivacySettings = PrivacySettings()
    policy: SitePolicy | None = None  # every virtual site's policy; keys not given: node default
    simulation: SimulationSettings = SimulationSettings()
    secure_aggregation: SecureAggregationSpec = SecureAggregationSpec()  # simulations.secure
    client_dp: ClientDpSpec | None = None
    artefacts: ArtefactSettings = ArtefactSettings()
    audit: AuditSettings = AuditSettings()
    release: ReleaseSettings = ReleaseSettings()

    @field_validator("model")
    @classmethod
    def _known_family(cls, value: ModelSpec) -> ModelSpec:
        """Refuse an unknown model family when the scenario loads (before any data or Ray)."""
        if value.family not in FAMILIES:
            raise ValueError(f"unknown model family {value.family!r}; known: {', '.join(FAMILIES.names())}")
        return value

    @model_validator(mode="after")
    def _partition_fits_source(self) -> Scenario:
        """Require a partition for partitioned sources and refuse one for natural manifests."""
        if isinstance(self.data, ManifestsSource) and self.partition is not None:
            raise ValueError("[partition] is for kind = 'sklearn' or 'manifest'; 'manifests' lists the hospitals")
        if len(set(self.baselines)) != len(self.baselines):
            raise ValueError("baselines lists a baseline twice")
        self.run_config_fields()  # the strategy and its parameters must make a valid RunConfig
        return self

    def run_config_fields(self) -> dict[str, Any]:
        """Return the strategy fields of the RunConfig (run-config spellings turned into fields).

        Raises ``ValueError`` naming an unknown strategy or a parameter it does not take.
        """
        fields = {"strategy": self.strategy.name}
        fields.update({k.replace("-", "_"): v for k, v in self.strategy.params.items()})
        fields.update(secure_run_fields(self.secure_aggregation, self.client_dp))
        try:
            RunConfig(input_shape=(1,), study=self.name, **fields)  # type: ignore[arg-type]  # study: warnings once per study
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'strategy'}: {str(e['msg']).removeprefix('Value error, ')}"
                for e in exc.errors()
            )
            raise ValueError(f"[strategy] is invalid: {problems}") from None
        return fields

    @property
    def num_hospitals(self) -> int:
        """Return how many hospitals the scenario simulates."""
        if isinstance(self.data, ManifestsSource):
            return len(self.data.paths)
        return (self.partition or PartitionSpec()).hospitals


def with_ray_address(scenario: Scenario, address: str) -> Scenario:
    """Return ``scenario`` run on the Ray cluster at ``address`` (``fedcare simulate --ray-address``).

    Raises
    ------
    InvalidScenarioError
        When the address is empty.
    """
    try:
        sim = SimulationSettings.model_validate({**scenario.simulation.model_dump(), "ray_address": address})
    except ValidationError as exc:
        raise InvalidScenarioError(
            f"--ray-address {address!r} is invalid ({exc.errors()[0]['msg']}); give the head node's host:port"
        ) from None
    return scenario.model_copy(update={"simulation": sim})


def load_scenario(path: Path | str) -> Scenario:
    """Read and validate a scenario TOML; relative paths resolve against its folder.

    Raises
    ------
    InvalidScenarioError
        Naming every invalid, unknown or missing field.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise InvalidScenarioError(f"scenario {path} not found; pass a scenario TOML (see simulations/scenarios/)")
    try:
        with path.open("rb") as fh:
            raw = tomllib.load(fh)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InvalidScenarioError(f"scenario {path} is not valid TOML: {exc}") from None
    try:
        return Scenario.model_validate(raw, context={"base_dir": path.resolve().parent})
    except ValidationError as exc:
        problems = "; ".join(  # never the input value: a scenario may quote data
            f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: "
            f"{str(e['msg']).removeprefix('Value error, ')}"
            for e in exc.errors()
        )
        raise InvalidScenarioError(f"invalid scenario {path}: {problems}; fix the scenario file") from None
