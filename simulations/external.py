"""External validation of a saved model (``fedcare evaluate``) and what a model file records for it.

A model file (the federated ``final_model.npz``, or a baseline's ``baselines/*_model.npz``)
records, besides its weights (``server.checkpoint``):

- ``threshold``: the binary operating threshold chosen on validation data;
- ``preprocessing``: what the model expects of its inputs (``models.preprocessing``): ``per-site``
  (each site standardises with its own training statistics, the loaders' default) or ``global``
  (one mean / std per feature from the training sites' summed moments; applied here to the
  validation site's raw features, which needs a table manifest);
- ``training_data``: for each training site, the SHA-256 of the content of its source data files
  (:func:`source_digest`) and its split settings; never a record or an id.

:func:`evaluate_model_file` scores the model on a site manifest's split at the stored threshold:
accuracy, balanced accuracy, sensitivity, specificity, AUROC, AUPRC, Brier score and calibration
error (binary), MAE, RMSE, R² (regression), with 95 % intervals (Wilson for proportions, percentile
bootstrap for AUROC, MAE, R²). It warns (logged and in the result's ``warnings``) when the
validation site's source files are a training site's: the records overlap unless the split
evaluated is the training site's own held-out split (same split settings, ``test`` or ``val``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from ..client.data_digest import data_files
from ..client.dataset import SiteData, Split
from ..client.loaders import load_site
from ..client.manifest import SiteManifest, TableData, load_manifest
from ..client.metrics import global_evaluation, validation_threshold
from ..models.preprocessing import Preprocessing
from ..server.checkpoint import (
    MODEL_PREPROCESSING,
    MODEL_THRESHOLD,
    MODEL_TRAINING_DATA,
    amend_model_file,
    build_saved_model,
    load_model_file,
    write_json_atomic,
)
from ..server.config import RunConfig
from ..server.safekeeping import final_model_file, load_artefact_key
from .scenario import ManifestSource, ManifestsSource, Scenario, SklearnSource

__all__ = [
    "evaluate_model_file",
    "overlap_warnings",
    "source_digest",
    "store_operating_point",
    "training_data_of",
    "training_record",
]

logger = logging.getLogger(__name__)

_HELD_OUT: Final = ("test", "val")


def source_digest(manifest: SiteManifest) -> str:
    """Return the SHA-256 of the content of every data file a manifest names (not their paths: a copy matches)."""
    digests = []
    for named in data_files(manifest):
        files = sorted(p for p in named.rglob("*") if p.is_file()) if named.is_dir() else [named]
        for file in files:
            if file.is_file():
                digests.append(hashlib.sha256(file.read_bytes()).hexdigest())
    return hashlib.sha256(json.dumps(sorted(digests)).encode("utf-8")).hexdigest()


def training_record(site: str, *, source: str, split: Mapping[str, Any] | None, partitioned: bool) -> dict[str, Any]:
    """Return what a model file records of one training site (digest, split settings, whether it was a partition)."""
    return {"site": site, "source_sha256": source, "split": dict(split) if split is not None else None,
            "partitioned": bool(partitioned)}  # fmt: skip


def overlap_warnings(
    training: Sequence[Mapping[str, Any]], *, source: str, split_settings: Mapping[str, Any], split: str, site: str
) -> list[str]:
    """Return a warning for every training site whose source files are the validation site's (records may overlap)."""
    out = []
    for record in training:
        if record.get("source_sha256") != source:
            continue
        same_split = (not record.get("partitioned")) and record.get("split") == dict(split_settings)
        if same_split and split in _HELD_OUT:
            logger.info("site %s: evaluating the held-out %s split of training site %s (internal validation)",
                        site, split, record.get("site"))
            continue
        why = ("it was partitioned from the same file" if record.get("partitioned")
               else "its split settings differ" if not same_split else f"the {split!r} split includes training records")
        out.append(
            f"site {site!r} reads the same source data as training site {record.get('site')!r} ({why}): its "
            f"records overlap the model's training records, so these metrics are not an external validation; "
            "evaluate on another hospital's data, or on the training site's own held-out split (--split test)"
        )
    return out


def _load_for(preprocessing: Preprocessing, manifest: SiteManifest) -> SiteData:
    """Load the validation site as the model's preprocessing needs (raw table features for ``global``)."""
    if preprocessing.kind == "per-site":
        return load_site(manifest)
    if not isinstance(manifest.data, TableData):
        raise ValueError(
            f"the model carries global standardisation statistics, which fedcare applies to table data only; "
            f"site {manifest.site!r} is {manifest.data.kind!r}: validate this model on a table site"
        )
    raw = manifest.model_copy(update={"data": manifest.data.model_copy(update={"standardize": False})})
    data = load_site(raw)

    def apply(split: Split) -> Split:
        return dataclasses.replace(split, inputs=(preprocessing.apply(split.inputs[0]), *split.inputs[1:]))

    return dataclasses.replace(data, train=apply(data.train), val=apply(data.val), test=apply(data.test))


def evaluate_model_file(
    model_path: Path | str,
    site_path: Path | str,
    *,
    split: str = "test",
    out: Path | str | None = None,
    key: str | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Evaluate a saved model on a site manifest's data (external validation) at its stored threshold.

    Writes ``{"model", "site", "manifest", "split", "num_examples", "threshold", "preprocessing",
    "metrics", "intervals", "warnings"}`` as JSON to ``out`` (default
    ``<model folder>/external_<site>_<split>.json``) and returns it with the file's path under
    ``"file"``. ``key`` (a key file, ``"env"`` or ``"env:NAME"``) decrypts a ``final_model.npz.enc``.

    Raises
    ------
    CheckpointError
        When the model file is unreadable, tampered, or encrypted and no (or the wrong) key given.
    DataValidationError
        When the site's data fails validation.
    ValueError
        When the site's data does not fit the model, or ``split`` is unknown.
    """
    arrays, meta = load_model_file(model_path, key=load_artefact_key(key))
    manifest = load_manifest(site_path)
    preprocessing = Preprocessing.from_meta(meta)
    data = _load_for(preprocessing, manifest)
    expected = (meta["task"], int(meta["num_classes"]), tuple(meta["input_shape"]), bool(meta["has_mask"]))
    found = (data.task, data.num_classes, tuple(data.input_shape), data.has_mask)
    if expected[0] != found[0] or expected[2:] != found[2:] or (
        data.task != "regression" and expected[1] != found[1]
    ):
        raise ValueError(
            f"site {data.name!r} has (task, classes, input shape, mask) = {found}, the model expects "
            f"{expected}; validate on a site with the study's features and classes"
        )
    model = build_saved_model(arrays, meta)
    choices = {"test": data.test, "val": data.val, "train": data.train}
    if split == "all":
        chosen = Split.concat([data.train, data.val, data.test])
    elif split in choices:
        chosen = choices[split]
    else:
        raise ValueError(f"unknown split {split!r}; use test, val, train or all")
    if len(chosen) == 0:
        raise ValueError(f"site {data.name!r} has no {split} examples; pick another --split")
    warnings = overlap_warnings(meta.get(MODEL_TRAINING_DATA) or [], source=source_digest(manifest),
                                split_settings=manifest.split.model_dump(), split=split, site=data.name)  # fmt: skip
    for text in warnings:
        logger.warning("%s", text)
    threshold = float(meta.get(MODEL_THRESHOLD, 0.5) or 0.5)
    result_eval = global_evaluation(model, [chosen], data.task, threshold=threshold, seed=seed)
    target = Path(out) if out is not None else Path(model_path).parent / f"external_{data.name}_{split}.json"
    result: dict[str, Any] = {
        "model": str(model_path),
        "site": data.name,
        "manifest": str(site_path),
        "split": split,
        "num_examples": len(chosen),
        "threshold": threshold if data.task == "binary" else None,
        "threshold_stored": MODEL_THRESHOLD in meta,
        "preprocessing": preprocessing.kind,
        "metrics": {k: float(v) for k, v in result_eval.metrics.items()},
        "intervals": result_eval.intervals,
        "warnings": warnings,
    }
    write_json_atomic(target, result)
    return {**result, "file": str(target)}


def training_data_of(scenario: Scenario, hospitals: Sequence[SiteData]) -> list[dict[str, Any]]:
    """Return the ``training_data`` records of a scenario's hospitals (source digests and split settings)."""
    source = scenario.data
    if isinstance(source, ManifestsSource):
        records = []
        for path, site in zip(source.paths, hospitals, strict=True):
            manifest = load_manifest(path)
            records.append(training_record(site.name, source=source_digest(manifest),
                                           split=manifest.split.model_dump(), partitioned=False))  # fmt: skip
        return records
    if isinstance(source, SklearnSource):
        digest = hashlib.sha256(f"builtin:{source.name}".encode()).hexdigest()
    else:
        assert isinstance(source, ManifestSource)
        digest = source_digest(load_manifest(source.path))
    return [training_record(h.name, source=digest, split=None, partitioned=True) for h in hospitals]


def store_operating_point(config: RunConfig, scenario: Scenario, hospitals: Sequence[SiteData]) -> dict[str, Any] | None:
    """Store the threshold, preprocessing and training data digests in a run's final model file; return them.

    The threshold is chosen on the hospitals' validation splits, from their summed per-class score
    histograms (:func:`~fedcare.client.metrics.validation_threshold`). None when the run wrote no
    final model. An encrypted model is re-encrypted under the run's key with its bound metadata.
    """
    source, key, expected = final_model_file(config)
    if not source.is_file():
        return None
    arrays, meta = load_model_file(source, key=key, expected=expected)
    threshold = validation_threshold(build_saved_model(arrays, meta), [h.val for h in hospitals], hospitals[0].task)
    updates = {MODEL_THRESHOLD: threshold, MODEL_PREPROCESSING: Preprocessing().to_meta(),
               MODEL_TRAINING_DATA: training_data_of(scenario, hospitals)}  # fmt: skip
    amend_model_file(source, updates, key=key, expected=expected)
    logger.info("final model: operating threshold %.2f stored in %s", threshold, source)
    return updates
