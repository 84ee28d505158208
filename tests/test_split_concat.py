"""client.dataset.Split.concat: the one way fedcare pools splits (sites, or a site's own splits)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedcare.client.dataset import Split


def _split(rows: list[list[float]], targets: list[int], groups: list[str] | None = None) -> Split:
    x = torch.tensor(rows, dtype=torch.float32).reshape(len(rows), 2)
    return Split(inputs=(x,), targets=torch.tensor(targets), groups=None if groups is None else np.array(groups))


def test_concat_keeps_rows_in_order_and_prefixes_groups_with_site_names() -> None:
    # Prepare: two sites that reuse the patient id "p1"
    a = _split([[1, 2], [3, 4]], [0, 1], ["p1", "p2"])
    b = _split([[5, 6]], [1], ["p1"])
    # Execute
    pooled = Split.concat([a, b], names=["cleveland", "va"])
    # Assert
    assert pooled.inputs[0].tolist() == [[1, 2], [3, 4], [5, 6]]
    assert pooled.targets.tolist() == [0, 1, 1]
    assert pooled.groups is not None
    assert pooled.groups.tolist() == ["cleveland:p1", "cleveland:p2", "va:p1"]


def test_concat_without_names_or_without_every_groups_has_no_groups() -> None:
    # Prepare
    a = _split([[1, 2]], [0], ["p1"])
    b = _split([[3, 4]], [1], None)
    # Execute
    unnamed = Split.concat([a, a])
    partial = Split.concat([a, b], names=["x", "y"])
    # Assert
    assert unnamed.groups is None and len(unnamed) == 2
    assert partial.groups is None and len(partial) == 2


def test_concat_skips_empty_splits_of_any_shape_and_keeps_every_input() -> None:
    # Prepare: a sequence split (x, lengths, mask) and an empty split whose tensors are 1-D
    x = torch.ones(2, 3, 4)
    full = Split(inputs=(x, torch.tensor([3, 3]), torch.ones(2, 3, 4)), targets=torch.tensor([0, 1]))
    empty = Split(inputs=(torch.zeros(0), torch.zeros(0), torch.zeros(0)), targets=torch.zeros(0, dtype=torch.long))
    # Execute
    pooled = Split.concat([empty, full, empty])
    only_empty = Split.concat([empty, empty])
    # Assert
    assert [tuple(t.shape) for t in pooled.inputs] == [(2, 3, 4), (2,), (2, 3, 4)]
    assert len(only_empty) == 0


def test_concat_refuses_no_splits_and_a_wrong_number_of_names() -> None:
    # Prepare
    a = _split([[1, 2]], [0])
    # Execute / Assert
    with pytest.raises(ValueError, match="at least one"):
        Split.concat([])
    with pytest.raises(ValueError, match="one name per split"):
        Split.concat([a, a], names=["only-one"])
