"""Attack: read a hospital's cached image features from what its node sends or saves.

``models.scatter`` memoises the scattering features of every image a process has seen (a site
trains on the same images each round). Features of a 28 px image are a near-invertible summary of
it, so they must stay in the process's memory. The attacker is the coordinator (or anyone holding
the model file): it receives the update the site sends (``get_weights``), the saved model file,
and a pickled model (what Ray ships between processes). None may contain a cached feature.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from fedcare.models import ModelSpec, build_for_data, get_weights
from fedcare.models.scatter import FEATURES, FeatureCache
from fedcare.server.checkpoint import load_model_file, save_model_file


def _contains(blob: bytes, features: torch.Tensor) -> bool:
    """Return whether any 64-byte run of ``features``' float32 bytes occurs in ``blob``."""
    raw = features.contiguous().numpy().astype(np.float32).tobytes()
    return any(raw[i : i + 64] in blob for i in range(0, min(len(raw), 4096), 64))


def test_update_model_file_and_pickle_hold_no_cached_feature(tmp_path: Path) -> None:
    # Prepare: a site's model sees its "patients" (the cache now holds their features)
    torch.manual_seed(0)
    model = build_for_data(ModelSpec(family="scatternet"), task="binary", num_classes=2, input_shape=(1, 28, 28))
    images = torch.rand(8, 1, 28, 28)
    model(images)
    settings = b"scattering2d:J=2:L=8:side=28"
    cached = FEATURES.get(FeatureCache.key(images[0], settings))
    assert cached is not None  # the attack has something to look for
    # Execute: everything the coordinator gets
    update = get_weights(model)
    blob_update = b"".join(np.ascontiguousarray(v).tobytes() for v in update.values())
    path = tmp_path / "model.npz"
    save_model_file(path, update, {"model_spec": ModelSpec(family="scatternet").model_dump(), "task": "binary",
                                   "num_classes": 2, "input_shape": [1, 28, 28]})
    blob_file = path.read_bytes()
    blob_pickle = pickle.dumps(model)
    # Assert: only the linear head travels; no cached feature in any of them
    assert set(update) == {"head.weight", "head.bias"}
    for blob in (blob_update, blob_file, blob_pickle):
        assert not _contains(blob, cached)
    arrays, _ = load_model_file(path)
    assert set(arrays) == {"head.weight", "head.bias"}
