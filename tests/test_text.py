"""Clinical free text: the ``text`` site kind, the hashing tokeniser and the text model families.

Real files only: small CSV / Parquet tables written in ``tmp_path``, and the Medical Abstracts
corpus of ``../shared/data`` through ``simulations/sites/medical_abstracts.toml``.
"""

from __future__ import annotations

import contextlib
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from opacus.accountants import RDPAccountant
from opacus.validators import ModuleValidator

from fedcare.client.errors import LabelError, MalformedFileError, ManifestError, MissingValueError, SchemaError
from fedcare.client.loaders import load_site_file, load_site_result
from fedcare.client.manifest import load_manifest
from fedcare.client.metrics import evaluate
from fedcare.client.training import TrainSettings, train_local
from fedcare.models import FAMILIES, ModelSpec, build_for_data, get_weights
from fedcare.models.text import HashingTokenizer, TextBagOfEmbeddings, TextLSTM, TokenizerMismatchError
from fedcare.privacy.errors import PrivacyWarning
from fedcare.privacy.ledger import PrivacyLedger
from fedcare.privacy.policy import STRICT_DEFAULTS
from fedcare.privacy.settings import PrivacySettings
from fedcare.simulations.scenario import load_scenario

REPO = Path(__file__).resolve().parents[1]
SENTENCE = "Patient JOHN Smith, 54, admitted with chest pain."
# BLAKE2b-64 (little endian) of each lower-cased token, mod 4096, plus 1; fixed forever (a change
# of the rule must bump TOKENIZER_VERSION)
SENTENCE_IDS = [528, 3780, 436, 1742, 812, 868, 3385, 3652]

WORDS = {
    0: ["tumour", "carcinoma", "metastasis", "chemotherapy", "biopsy", "lymphoma"],
    1: ["infarction", "arrhythmia", "stenosis", "angina", "hypertension", "valve"],
    2: ["seizure", "stroke", "neuropathy", "dementia", "migraine", "sclerosis"],
}


def _texts(n: int, seed: int = 0) -> tuple[list[str], list[int]]:
    """Return ``n`` short synthetic case notes whose class words decide the label."""
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for i in range(n):
        label = i % 3
        words = list(rng.choice(WORDS[label], size=5)) + list(rng.choice(["the", "patient", "was", "seen"], size=4))
        rng.shuffle(words)
        texts.append("Patient " + " ".join(words) + ".")
        labels.append(label)
    return texts, labels


def _write_site(tmp_path: Path, frame: pd.DataFrame, *, name: str = "notes.csv", extra: str = "",
                split: str = "", classes: str = "[0, 1, 2]", task: str = "multiclass") -> Path:
    """Write ``frame`` and a text manifest pointing at it; return the manifest's path."""
    data = tmp_path / name
    if name.endswith(".parquet"):
        frame.to_parquet(data)
    else:
        frame.to_csv(data, index=False)
    manifest = tmp_path / "site.toml"
    manifest.write_text(
        f'site = "ward"\ntask = "{task}"\nclasses = {classes}\n\n[split]\nval = 0.2\ntest = 0.2\nseed = 0\n{split}\n'
        f'[data]\nkind = "text"\npath = "{name}"\ntext_column = "note"\nlabel_column = "dx"\n'
        f"buckets = 512\nmax_length = 16\n{extra}\n"
    )
    return manifest


def _notes(n: int = 60) -> pd.DataFrame:
    texts, labels = _texts(n)
    return pd.DataFrame({"patient": [f"p{i // 2}" for i in range(n)], "note": texts, "dx": labels})


# --------------------------------------------------------------------------- tokeniser
def test_tokeniser_gives_the_fixed_ids_of_a_fixed_sentence() -> None:
    # Prepare
    tokenizer = HashingTokenizer(buckets=4096, max_length=12)
    # Execute
    ids, lengths = tokenizer.encode([SENTENCE])
    # Assert: exact ids, lower-casing, padding with 0, the length as mask
    assert ids.tolist() == [SENTENCE_IDS + [0, 0, 0, 0]]
    assert lengths.tolist() == [8]
    assert ids.dtype == np.int64
    assert tokenizer.encode(["patient john SMITH 54 Admitted WITH chest PAIN"])[0].tolist() == ids.tolist()


def test_tokeniser_ids_are_the_same_in_another_process_with_another_hash_seed() -> None:
    # Prepare: Python's str hash is salted per process; the tokeniser must not depend on it
    code = ("from fedcare.models.text import HashingTokenizer; "
            f"print(HashingTokenizer(buckets=4096, max_length=12).encode([{SENTENCE!r}])[0][0].tolist())")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    # Execute
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120, check=True)
    # Assert
    assert out.stdout.strip() == str(SENTENCE_IDS + [0, 0, 0, 0])


def test_tokeniser_truncates_normalises_and_keeps_case_when_asked() -> None:
    # Prepare
    cased = HashingTokenizer(buckets=4096, max_length=3, lowercase=False)
    lower = HashingTokenizer(buckets=4096, max_length=3)
    # Execute
    ids, lengths = lower.encode(["one two three four five", "\ufb01brosis fibrosis"])  # "ﬁ" ligature
    cased_ids, _ = cased.encode(["Aspirin aspirin"])
    # Assert: the first max_length tokens; NFKC makes the ligature the same word
    assert lengths.tolist() == [3, 2]
    assert ids[0].tolist() == [lower.token_id(w) for w in ("one", "two", "three")]
    assert ids[1, 0] == ids[1, 1] != 0
    assert cased_ids[0, 0] != cased_ids[0, 1]


def test_tokeniser_has_no_fit_step_and_no_vocabulary() -> None:
    # Prepare
    tokenizer = HashingTokenizer(buckets=64, max_length=8)
    before = tokenizer.model_dump()
    # Execute: encoding any text leaves the tokeniser exactly as it was (nothing learnt)
    tokenizer.encode(["a rare surname Zyxwvut", "another patient"])
    # Assert
    assert not any(hasattr(tokenizer, name) for name in ("fit", "fit_transform", "vocabulary", "vocab"))
    assert tokenizer.model_dump() == before == {"buckets": 64, "max_length": 8, "lowercase": True}
    with pytest.raises(Exception, match="frozen"):
        tokenizer.buckets = 128  # type: ignore[misc]


def test_model_spec_round_trips_the_tokenisation() -> None:
    # Prepare
    spec = ModelSpec(family="text_lstm", embedding_dim=8, buckets=1000, max_length=40, lowercase=False)
    # Execute: as a checkpoint's metadata and the run config carry it
    again = ModelSpec.model_validate_json(spec.model_dump_json())
    # Assert
    assert again == spec
    assert again.tokenizer() == HashingTokenizer(buckets=1000, max_length=40, lowercase=False)
    assert HashingTokenizer.from_tag(spec.tokenizer().tag) == spec.tokenizer()


def test_run_config_carries_the_tokenisation(tmp_path: Path) -> None:
    # Prepare
    from fedcare.server.config import RunConfig

    spec = ModelSpec(family="text_bag", embedding_dim=8, buckets=1000, max_length=40, lowercase=False)
    config = RunConfig(study="t", model=spec, task="multiclass", num_classes=3, input_shape=(40,))
    # Execute
    again = RunConfig.from_run_config(config.to_run_config())
    # Assert
    assert again.model == spec


# --------------------------------------------------------------------------- loader
def test_csv_site_loads_splits_by_patient_and_tokenises(tmp_path: Path) -> None:
    # Prepare
    manifest = _write_site(tmp_path, _notes(60), split='by = "patient"')
    # Execute
    result = load_site_result(load_manifest(manifest))
    data = result.data
    # Assert
    assert (data.kind, data.input_shape, data.num_classes, data.has_mask) == ("text", (16,), 3, False)
    assert len(data.train) + len(data.val) + len(data.test) == 60
    assert result.patients == 30 and result.unit == "patients" and result.class_names == ["0", "1", "2"]
    groups = [set(s.groups) for s in (data.train, data.val, data.test)]
    assert not (groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2])
    ids, lengths, tags = data.train.inputs
    assert ids.dtype == lengths.dtype == tags.dtype == torch.int64
    assert int(ids.max()) <= 512 and int(ids.min()) >= 0
    assert set(tags.tolist()) == {HashingTokenizer(buckets=512, max_length=16).tag}
    assert "Patient" not in " ".join(result.notes)


def test_parquet_site_loads_like_the_csv(tmp_path: Path) -> None:
    # Prepare
    frame = _notes(60)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    # Execute
    csv_site = load_site_file(_write_site(tmp_path / "a", frame))
    pq_site = load_site_file(_write_site(tmp_path / "b", frame, name="notes.parquet"))
    # Assert
    for a, b in zip(csv_site.train.inputs, pq_site.train.inputs, strict=True):
        assert torch.equal(a, b)


def test_missing_text_column_is_refused_naming_the_columns(tmp_path: Path) -> None:
    manifest = _write_site(tmp_path, _notes().rename(columns={"note": "report"}))
    with pytest.raises(SchemaError, match=r"no column 'note' \(data.text_column\); columns in the file: "
                                          r"\['patient', 'report', 'dx'\]"):
        load_site_file(manifest)


def test_empty_text_is_refused_or_dropped_on_request(tmp_path: Path) -> None:
    # Prepare
    frame = _notes()
    frame.loc[[3, 7], "note"] = ["", " ... "]
    (tmp_path / "drop").mkdir()
    # Execute / Assert: refused by default, with the rows and the fix, never the text
    with pytest.raises(MissingValueError, match=r"'note' is empty or holds no word at data rows 4, 8 "
                                                r"\(2 rows\).*empty_text = \"drop_rows\""):
        load_site_file(_write_site(tmp_path, frame))
    result = load_site_result(load_manifest(_write_site(tmp_path / "drop", frame, extra='empty_text = "drop_rows"')))
    assert result.patients == 58
    assert result.notes[0].startswith("2 rows with an empty text dropped")


def test_label_outside_the_classes_is_refused(tmp_path: Path) -> None:
    frame = _notes()
    frame.loc[5, "dx"] = 9
    with pytest.raises(LabelError, match=r"column 'dx' holds labels outside the declared classes \[0, 1, 2\]: 9 "
                                         r"\(1 rows, first at data row 6\)"):
        load_site_file(_write_site(tmp_path, frame))


def test_non_utf8_file_is_refused(tmp_path: Path) -> None:
    # Prepare: a Latin-1 export ("é" is byte 0xE9)
    manifest = _write_site(tmp_path, _notes())
    data = tmp_path / "notes.csv"
    data.write_bytes(data.read_bytes().replace(b"Patient", "Patiént".encode("latin-1"), 1))
    # Execute / Assert
    with pytest.raises(MalformedFileError, match="notes.csv is not UTF-8 text.*export it as UTF-8 CSV"):
        load_site_file(manifest)


def test_text_kind_refuses_regression_and_one_column_for_both(tmp_path: Path) -> None:
    manifest = _write_site(tmp_path, _notes(), task="regression", classes="[0, 1, 2]")
    with pytest.raises(ManifestError, match="classes is for classification"):
        load_manifest(manifest)
    manifest.write_text(manifest.read_text().replace('label_column = "dx"', 'label_column = "note"'))
    with pytest.raises(ManifestError, match="text_column and label_column name the same column"):
        load_manifest(manifest)


def test_medical_abstracts_manifest_loads_the_real_corpus(shared_data: Path) -> None:
    # Execute
    result = load_site_result(load_manifest(REPO / "simulations" / "sites" / "medical_abstracts.toml"))
    data = result.data
    # Assert: 2,888 abstracts, 5 classes, stratified 70/15/15, ids within the 4096 buckets
    assert result.patients == 2888 and result.class_names == ["1", "2", "3", "4", "5"]
    assert (len(data.train), len(data.val), len(data.test)) == (2020, 434, 434)
    assert data.input_shape == (256,)
    counts = np.bincount(torch.cat([s.targets for s in (data.train, data.val, data.test)]).numpy())
    assert counts.tolist() == [633, 299, 385, 610, 961]  # the corpus README's class sizes
    assert int(data.train.inputs[0].max()) <= 4096
    assert 150 <= float(data.train.inputs[1].float().median()) <= 256


# --------------------------------------------------------------------------- models
@pytest.mark.parametrize("family", ["text_lstm", "text_bag"])
def test_text_families_pass_opacus_strict_validation(family: str) -> None:
    # Prepare
    spec = ModelSpec(family=family, embedding_dim=8, hidden_size=4, buckets=100, max_length=10)
    # Execute
    model = build_for_data(spec, task="multiclass", num_classes=3, input_shape=(10,))
    # Assert
    assert ModuleValidator.validate(model, strict=True) == []
    assert isinstance(model, FAMILIES.get(family))
    assert model(torch.tensor([[1, 2, 3] + [0] * 7]), torch.tensor([3])).shape == (1, 3)


def test_text_families_are_not_in_the_strict_default_policy() -> None:
    # a hospital opts in; the scenario does so for its virtual sites
    assert not {"text_lstm", "text_bag"} & set(STRICT_DEFAULTS["allowed_model_families"])
    scenario = load_scenario(REPO / "simulations" / "scenarios" / "medical_text.toml")
    assert scenario.policy is not None and {"text_lstm", "text_bag"} <= set(scenario.policy.allowed_model_families)


def test_model_refuses_ids_of_another_tokeniser(tmp_path: Path) -> None:
    # Prepare: the site tokenised with 512 buckets, the study's model says 1000
    data = load_site_file(_write_site(tmp_path, _notes()))
    model = build_for_data(ModelSpec(family="text_bag", buckets=1000, max_length=16), task="multiclass",
                           num_classes=3, input_shape=data.input_shape)
    # Execute / Assert: told which settings the ids came from and which to set
    with pytest.raises(TokenizerMismatchError, match=r"made with buckets = 512, max_length = 16, lowercase = true, "
                                                     r"but the model was built for buckets = 1000"):
        evaluate(model, data.test, "multiclass")
    with pytest.raises(ValueError, match="tokenised to 16 tokens but the model spec says max_length = 8"):
        build_for_data(ModelSpec(family="text_lstm", max_length=8), task="multiclass", num_classes=3,
                       input_shape=data.input_shape)


def test_lstm_reads_each_text_at_its_last_token() -> None:
    # Prepare
    torch.manual_seed(0)
    model = TextLSTM(num_classes=3, embedding_dim=4, hidden_size=5, tokenizer=HashingTokenizer(buckets=50, max_length=6))
    ids = torch.tensor([[5, 6, 7, 0, 0, 0]])
    # Execute: what follows the last token (padding or anything else) does not change the output
    a = model(ids, torch.tensor([3]))
    b = model(torch.tensor([[5, 6, 7, 9, 9, 9]]), torch.tensor([3]))
    # Assert
    assert torch.equal(a, b)


# --------------------------------------------------------------------------- DP training
@pytest.mark.parametrize("family", ["text_bag", "text_lstm"])
def test_dp_training_charges_the_ledger_like_the_other_families(tmp_path: Path, family: str) -> None:
    # Prepare
    data = load_site_file(_write_site(tmp_path, _notes(90)))
    torch.manual_seed(0)
    model = build_for_data(ModelSpec(family=family, embedding_dim=8, hidden_size=4, buckets=512, max_length=16),
                           task="multiclass", num_classes=3, input_shape=data.input_shape)
    ledger = PrivacyLedger.open(tmp_path / "ledgers", site="ward", study=family)
    privacy = PrivacySettings.with_target(epsilon=3.0, delta=1e-3)
    train = TrainSettings(batch_size=8, lr=0.5, seed=3, device="cpu")
    # Execute: two rounds of a two-round study
    results = [train_local(model, data, train=train, privacy=privacy, ledger=ledger, planned_rounds=2, round_index=r)
               for r in (1, 2)]
    # Assert: reported ε = ledger's = a fresh Opacus accountant's over the same history
    fresh = RDPAccountant()
    fresh.history = [tuple(h) for h in ledger.history]
    assert results[-1].epsilon == ledger.spent_epsilon() == fresh.get_epsilon(delta=1e-3)
    assert 0 < results[0].epsilon < results[-1].epsilon <= 3.0
    assert all(r["steps_done"] == r["steps_reserved"] == r["steps_charged"] > 0 for r in ledger.rounds)
    assert results[0].noise_multiplier > 0 and math.isfinite(results[-1].loss)
    for p in model.parameters():  # the caller's module is left without Opacus attributes
        assert not hasattr(p, "grad_sample")


def test_dp_noise_moves_every_bucket_plain_sgd_only_the_buckets_used(tmp_path: Path) -> None:
    # Prepare: which embedding rows an update changes tells which hashed tokens a site's texts
    # hold (the hash is public: a dictionary of names can be tested against them)
    data = load_site_file(_write_site(tmp_path, _notes(60)))
    used = set(torch.cat([s.inputs[0].flatten() for s in (data.train,)]).tolist()) - {0}
    spec = ModelSpec(family="text_bag", embedding_dim=4, buckets=512, max_length=16)
    changed = {}
    for name, privacy in (("dp", PrivacySettings.with_target(epsilon=3.0, delta=1e-3)),
                          ("plain", PrivacySettings.disabled())):
        torch.manual_seed(0)
        model = build_for_data(spec, task="multiclass", num_classes=3, input_shape=data.input_shape)
        before = get_weights(model)["embedding.weight"]
        ledger = PrivacyLedger.open(tmp_path / "ledgers", site="ward", study=name)
        # Execute
        with pytest.warns(PrivacyWarning, match="DISABLED") if name == "plain" else contextlib.nullcontext():
            train_local(model, data, train=TrainSettings(batch_size=8, lr=0.5, seed=1, device="cpu"),
                        privacy=privacy, ledger=ledger, planned_rounds=1, round_index=1)
        after = get_weights(model)["embedding.weight"]
        changed[name] = set(np.flatnonzero((after != before).any(axis=1)).tolist())
    # Assert: DP noise reaches all 513 rows (padding included); plain SGD only the rows used
    assert changed["dp"] == set(range(513))
    assert changed["plain"] == used


def test_bag_model_learns_the_synthetic_notes(tmp_path: Path) -> None:
    # Prepare
    data = load_site_file(_write_site(tmp_path, _notes(150)))
    torch.manual_seed(0)
    model = TextBagOfEmbeddings(num_classes=3, embedding_dim=8, tokenizer=HashingTokenizer(buckets=512, max_length=16))
    ledger = PrivacyLedger.open(tmp_path / "ledgers", site="ward", study="learn")
    # Execute
    with pytest.warns(PrivacyWarning, match="DISABLED"):
        for r in range(1, 4):
            train_local(model, data, train=TrainSettings(local_epochs=5, batch_size=8, lr=2.0, seed=r, device="cpu"),
                        privacy=PrivacySettings.disabled(), ledger=ledger, planned_rounds=3, round_index=r)
    # Assert
    assert evaluate(model, data.test, "multiclass")["accuracy"] >= 0.9
