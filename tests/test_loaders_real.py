"""Loaders on the real shared data, through manifests, with exact known counts.

Counts asserted here were established independently of the loaders (plain pandas / numpy on
the raw files) and match ../shared/data/README.md where it states them.
"""

from __future__ import annotations

import tomllib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from fedcare.client.dataset import SiteData
from fedcare.client.loaders import load_site, load_site_result
from fedcare.client.manifest import parse_manifest
from fedcare.models import ModelSpec, build_for_data

REPO = Path(__file__).resolve().parents[1]
SITES = REPO / "simulations" / "sites"
PREFIX = "${FEDCARE_DATA_ROOT}"


def example(name: str, shared_data: Path, **data_changes: object) -> SiteData:
    """Load simulations/sites/<name>.toml with its shared-data paths pointed at ``shared_data``."""
    return load_site(example_manifest(name, shared_data, **data_changes))


def example_manifest(name: str, shared_data: Path, **data_changes: object):  # type: ignore[no-untyped-def]
    """Parse simulations/sites/<name>.toml, rewriting ``${FEDCARE_DATA_ROOT}`` to ``shared_data``."""
    raw = tomllib.loads((SITES / f"{name}.toml").read_text())
    for key in ("path", "outcomes"):
        if key in raw["data"]:
            assert raw["data"][key].startswith(PREFIX)
            raw["data"][key] = str(shared_data) + raw["data"][key][len(PREFIX) :]
    raw["data"].update(data_changes)
    return parse_manifest(raw, source=f"{name}.toml")


def all_targets(data: SiteData) -> np.ndarray:
    return np.concatenate([s.targets.numpy() for s in (data.train, data.val, data.test)])


def all_groups(data: SiteData) -> np.ndarray:
    return np.concatenate([s.groups for s in (data.train, data.val, data.test)])  # type: ignore[misc]


def smoke_forward(data: SiteData, family: str) -> torch.Tensor:
    """Run the model family the data is meant for on a few training rows."""
    model = build_for_data(
        ModelSpec(family=family, hidden_size=4, width=4),
        task=data.task,
        num_classes=data.num_classes,
        input_shape=data.input_shape,
        has_mask=data.has_mask,
    )
    with torch.no_grad():
        return model(*(t[:5] for t in data.train.inputs))


# --- heart disease: four hospitals, FLamby preparation -------------------------------------

HEART = {  # patients after dropping slope/ca/thal and rows with a missing value; num > 0
    "cleveland": (303, 139),
    "hungarian": (261, 98),
    "switzerland": (46, 45),
    "va": (130, 101),
}


@pytest.mark.parametrize("hospital", list(HEART))
def test_heart_disease_hospitals_match_flamby(shared_data: Path, hospital: str) -> None:
    # Execute
    data = example(f"heart_{hospital}", shared_data)
    # Assert
    patients, positives = HEART[hospital]
    y = all_targets(data)
    assert len(y) == patients
    assert int(y.sum()) == positives
    assert data.num_classes == 2 and data.kind == "table" and data.task == "binary"
    assert data.train.targets.dtype == torch.int64
    assert set(np.unique(y)) <= {0, 1}
    # 10 features kept, cp (4 categories) and restecg (3) one-hot: 8 numeric + 7 = 15
    assert data.input_shape == (15,)
    assert data.feature_names[:3] == ["age", "sex", "cp=1"]
    # standardised with train statistics: train mean 0 for the numeric columns
    x = data.train.inputs[0].numpy()
    assert np.allclose(x[:, 0].mean(), 0.0, atol=1e-5)
    assert np.allclose(x[:, 0].std(), 1.0, atol=1e-4)
    assert len(data.train) + len(data.val) + len(data.test) == patients
    assert smoke_forward(data, "logistic").shape == (5,)


def test_heart_hospitals_share_one_feature_layout(shared_data: Path) -> None:
    names = {h: example(f"heart_{h}", shared_data).feature_names for h in HEART}
    # categories declared in the manifests keep the one-hot columns identical across sites
    assert len({tuple(v) for v in names.values()}) == 1


def test_heart_mean_imputation_keeps_every_row(shared_data: Path) -> None:
    data = example("heart_hungarian", shared_data, missing="mean")
    assert len(all_targets(data)) == 294
    assert torch.isfinite(data.train.inputs[0]).all()


def test_heart_as_parquet_with_a_header_loads_the_same(shared_data: Path, tmp_path: Path) -> None:
    # Prepare: the Cleveland file rewritten as Parquet, columns named, '?' as nulls
    import pandas as pd

    cols = tomllib.loads((SITES / "heart_cleveland.toml").read_text())["data"]["columns"]
    frame = pd.read_csv(shared_data / "heart_disease" / "processed.cleveland.data",
                        header=None, names=cols, na_values="?")  # fmt: skip
    frame.to_parquet(tmp_path / "cleveland.parquet")
    # Execute
    data = example("heart_cleveland", shared_data, path=str(tmp_path / "cleveland.parquet"),
                   has_header=True, columns=None)  # fmt: skip
    # Assert
    reference = example("heart_cleveland", shared_data)
    assert len(all_targets(data)) == 303 and int(all_targets(data).sum()) == 139
    assert torch.allclose(data.train.inputs[0], reference.train.inputs[0], atol=1e-5)


def test_heart_split_is_stratified_and_reproducible(shared_data: Path) -> None:
    a = example("heart_cleveland", shared_data)
    b = example("heart_cleveland", shared_data)
    assert torch.equal(a.test.inputs[0], b.test.inputs[0])
    rates = [float(s.targets.float().mean()) for s in (a.train, a.val, a.test)]
    assert max(rates) - min(rates) < 0.05
    assert (len(a.train), len(a.val), len(a.test)) == (211, 46, 46)


# --- PhysioNet 2012 set A --------------------------------------------------------------------

@pytest.fixture(scope="module")
def physionet(shared_data: Path):  # type: ignore[no-untyped-def]
    """The whole of set A, loaded once for this module."""
    return load_site_result(example_manifest("physionet2012_all", shared_data))


def test_physionet_all_patients_and_deaths(physionet) -> None:  # type: ignore[no-untyped-def]
    data = physionet.data
    y = all_targets(data)
    assert len(y) == 4000
    assert int(y.sum()) == 554
    assert data.kind == "sequence" and data.has_mask
    assert data.input_shape == (48, 36)
    x, lengths, mask = data.train.inputs
    assert x.dtype == torch.float32 and mask.dtype == torch.float32
    assert lengths.dtype == torch.int64 and bool((lengths == 48).all())
    assert x.shape[1:] == mask.shape[1:] == (48, 36)
    assert torch.isfinite(x).all()
    assert set(torch.unique(mask).tolist()) == {0.0, 1.0}


def test_physionet_groups_are_the_icu_types(physionet) -> None:  # type: ignore[no-untyped-def]
    data = physionet.data
    groups = all_groups(data)
    y = all_targets(data)
    assert Counter(groups.tolist()) == {"1": 577, "2": 874, "3": 1481, "4": 1068}
    deaths = {g: int(y[groups == g].sum()) for g in ("1", "2", "3", "4")}
    assert deaths == {"1": 81, "2": 43, "3": 275, "4": 155}


def test_physionet_mask_rates_are_plausible(physionet) -> None:  # type: ignore[no-untyped-def]
    rates = physionet.missing_rates
    names = physionet.data.feature_names
    assert list(rates) == names
    overall_observed = float(physionet.data.train.inputs[2].mean())
    assert 0.1 < overall_observed < 0.3  # hourly bins of sparse ICU data
    assert rates["HR"] < 0.2  # heart rate is charted nearly every hour
    assert rates["Cholesterol"] > 0.99  # measured about once per stay, if at all
    assert all(0.0 <= r <= 1.0 for r in rates.values())


def test_physionet_standardised_with_train_statistics(physionet) -> None:  # type: ignore[no-untyped-def]
    x, _, mask = physionet.data.train.inputs
    hr = names_index(physionet.data.feature_names, "HR")
    observed = x[..., hr][mask[..., hr] > 0]
    assert abs(float(observed.mean())) < 1e-3
    assert abs(float(observed.std()) - 1.0) < 1e-2


def names_index(names: list[str], name: str) -> int:
    return names.index(name)


def test_physionet_feeds_the_lstm(physionet) -> None:  # type: ignore[no-untyped-def]
    assert smoke_forward(physionet.data, "lstm").shape == (5,)


def test_physionet_one_icu_type_with_static_features(shared_data: Path) -> None:
    # Execute
    data = example("physionet2012_icu2", shared_data, static=["Age", "Gender"])
    # Assert
    y = all_targets(data)
    assert len(y) == 874 and int(y.sum()) == 43
    assert data.input_shape == (48, 38)
    assert data.feature_names[-2:] == ["Age", "Gender"]
    assert set(all_groups(data).tolist()) == {"2"}


# --- MIT-BIH windows -------------------------------------------------------------------------

# complete 252-sample windows per record (events within 126 samples of an edge are dropped)
MITBIH_WINDOWS = {
    "100": 2271, "102": 2187, "104": 2227, "105": 2572, "106": 2027, "108": 1762,
    "114": 1879, "116": 2411, "119": 1987, "121": 1862, "123": 1517, "200": 2600,
}  # fmt: skip


@pytest.mark.filterwarnings("ignore:.*min_cohort_size = 5 is below the default")
def test_mitbih_all_records_windows(shared_data: Path) -> None:
    # Execute: all 12 records, no decimation
    data = example("mitbih_site_a", shared_data, records=None, decimate=1)
    # Assert: 25,311 beats minus 9 too close to an edge; every one of the 2,011 PVC kept
    y = all_targets(data)
    assert len(y) == 25_302 == sum(MITBIH_WINDOWS.values())
    assert int(y.sum()) == 2_011
    assert Counter(all_groups(data).tolist()) == MITBIH_WINDOWS
    assert data.input_shape == (252, 1) and data.kind == "signal" and not data.has_mask
    x, lengths = data.train.inputs
    assert x.shape[1:] == (252, 1) and bool((lengths == 252).all())
    # per-window standardisation
    assert torch.allclose(x[:10].mean(dim=1), torch.zeros(10, 1), atol=1e-4)


@pytest.mark.filterwarnings("ignore:.*min_cohort_size = 5 is below the default")
def test_mitbih_two_sites_partition_the_patients(shared_data: Path) -> None:
    a = example("mitbih_site_a", shared_data)
    b = example("mitbih_site_b", shared_data)
    assert (len(all_targets(a)), int(all_targets(a).sum())) == (13_046, 585)
    assert (len(all_targets(b)), int(all_targets(b).sum())) == (12_256, 1_426)
    assert not set(all_groups(a)) & set(all_groups(b))
    assert a.input_shape == (126, 1)  # decimated by 2
    assert smoke_forward(a, "lstm").shape == (5,)


@pytest.mark.filterwarnings("ignore:.*min_cohort_size = 5 is below the default")
def test_mitbih_split_by_record_keeps_patients_together(shared_data: Path) -> None:
    m = example_manifest("mitbih_site_a", shared_data, records=None)
    raw = m.model_dump()
    raw["split"]["by"] = "record"
    data = load_site(parse_manifest(raw))
    sets = [set(s.groups.tolist()) for s in (data.train, data.val, data.test)]  # type: ignore[union-attr]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert sum(len(s) for s in sets) == 12


@pytest.mark.filterwarnings("ignore:.*min_cohort_size = 2 is below the default")
def test_mitbih_four_groups_hold_out_one_patient_each(shared_data: Path) -> None:
    # Prepare / Execute: the 4 hospitals of benchmarks/utility.py's MIT-BIH federation
    groups = [example(f"mitbih_group{g}", shared_data) for g in range(1, 5)]
    # Assert: the 12 patients, each in one hospital; one held-out (test) patient per hospital,
    # with the PVC counts of ../shared/data/README.md (119: 444, 200: 826, 105: 41, 104: 2)
    patients = [set(all_groups(d).tolist()) for d in groups]
    assert sum(len(p) for p in patients) == 12 and len(set().union(*patients)) == 12
    held_out = [set(d.test.groups.tolist()) for d in groups]  # type: ignore[union-attr]
    assert [{str(r) for r in h} for h in held_out] == [{"119"}, {"200"}, {"105"}, {"104"}]
    assert [int(d.test.targets.sum()) for d in groups] == [444, 826, 41, 2]
    assert all(len(d.val) == 0 for d in groups)
    assert all(not set(d.train.groups.tolist()) & h for d, h in zip(groups, held_out, strict=True))  # type: ignore[union-attr]
    assert groups[0].input_shape == (63, 1)  # 0.7 s at 360 Hz, decimated by 4


# --- MedMNIST ------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("name", "sizes", "positives"),
    [
        ("breastmnist", (546, 78, 156), (399, 57, 114)),
        ("pneumoniamnist", (3882, 524, 624), (3494, 389, 390)),
    ],
)
def test_medmnist_file_splits(shared_data: Path, name: str, sizes: tuple, positives: tuple) -> None:
    data = example(name, shared_data)
    splits = (data.train, data.val, data.test)
    assert tuple(len(s) for s in splits) == sizes
    assert tuple(int(s.targets.sum()) for s in splits) == positives
    assert data.input_shape == (1, 28, 28) and data.kind == "image"
    x = data.train.inputs[0]
    assert x.dtype == torch.float32 and float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert smoke_forward(data, "cnn").shape == (5,)


def test_png_folder_from_real_breastmnist_images(shared_data: Path, tmp_path: Path) -> None:
    # Prepare: 60 real images written as PNG, two images per patient
    from PIL import Image

    npz = np.load(shared_data / "medmnist" / "breastmnist_28.npz")
    images, labels = npz["train_images"][:60], npz["train_labels"][:60]
    folder = tmp_path / "png"
    folder.mkdir()
    lines = ["file,diagnosis,patient"]
    for i, (img, lab) in enumerate(zip(images, labels)):
        Image.fromarray(img).save(folder / f"img{i:03d}.png")
        lines.append(f"img{i:03d}.png,{int(lab)},p{i // 2}")
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    raw = {
        "site": "png-site",
        "task": "binary",
        "classes": [0, 1],
        "split": {"val": 0.2, "test": 0.2, "by": "patient"},
        "data": {"kind": "images_png", "folder": "png", "labels": "labels.csv",
                 "filename_column": "file", "label_column": "diagnosis",
                 "expected_shape": [28, 28]},
    }  # fmt: skip
    # Execute
    data = load_site(parse_manifest(raw, base_dir=tmp_path))
    # Assert: pixel-exact, patients never in two splits
    assert len(data.train) + len(data.val) + len(data.test) == 60
    assert data.input_shape == (1, 28, 28)
    first = data.train.groups[0]  # type: ignore[index]
    idx = int(first[1:]) * 2
    expected = torch.as_tensor(images[idx] / 255.0, dtype=torch.float32)
    assert torch.allclose(data.train.inputs[0][0, 0], expected)
    sets = [set(s.groups.tolist()) for s in (data.train, data.val, data.test)]  # type: ignore[union-attr]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert int(all_targets(data).sum()) == int(labels.sum())
