"""The one relabel-and-renumber of bmseg, checked against numpy's own ``unique`` on label
images with gaps, on numpy arrays and torch tensors alike."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bmseg.label_images import keep_where, relabel, renumber


def gappy_labels(seed: int = 0) -> np.ndarray:
    """A label image whose labels skip values (0, 3, 7, 8, 20, 41) and repeat in blobs."""
    rng = np.random.default_rng(seed)
    values = np.array([0, 3, 7, 8, 20, 41], np.int32)
    return values[rng.integers(0, len(values), size=(37, 53))]


def unique_renumbered(labels: np.ndarray) -> np.ndarray:
    """Independent reference: ranks of the values, background kept 0."""
    values, inverse = np.unique(labels, return_inverse=True)
    ranks = inverse.reshape(labels.shape)
    return (ranks if values[0] == 0 else ranks + 1).astype(np.int32)


@pytest.mark.parametrize("as_tensor", [False, True])
def test_renumber_equals_numpys_unique_ranks_on_labels_with_gaps(as_tensor: bool) -> None:
    labels = gappy_labels()
    given = torch.from_numpy(labels) if as_tensor else labels
    result = renumber(given)
    result = result.numpy() if as_tensor else result
    assert result.dtype == np.int32
    np.testing.assert_array_equal(result, unique_renumbered(labels))


@pytest.mark.parametrize("as_tensor", [False, True])
def test_relabel_gives_the_listed_labels_their_order_and_drops_the_rest(as_tensor: bool) -> None:
    labels = gappy_labels(1)
    kept = [20, 3, 41]  # not ascending: the new numbers follow this order
    given = torch.from_numpy(labels) if as_tensor else labels
    result = relabel(given, kept)
    result = result.numpy() if as_tensor else result
    expected = np.zeros_like(labels)
    for new, old in enumerate(kept, start=1):
        expected[labels == old] = new
    np.testing.assert_array_equal(result, expected)


@pytest.mark.parametrize("as_tensor", [False, True])
def test_keep_where_keeps_flagged_labels_in_ascending_order(as_tensor: bool) -> None:
    labels = gappy_labels(2)
    keep = np.zeros(42, bool)
    keep[[0, 7, 41]] = True  # a flag on background changes nothing
    given, flags = (
        (torch.from_numpy(labels), torch.from_numpy(keep)) if as_tensor else (labels, keep)
    )
    result = keep_where(given, flags)
    result = result.numpy() if as_tensor else result
    expected = np.select([labels == 7, labels == 41], [1, 2], 0)
    np.testing.assert_array_equal(result, expected)


def test_an_empty_label_image_stays_empty() -> None:
    empty = np.zeros((4, 5), np.int32)
    np.testing.assert_array_equal(renumber(empty), empty)
    assert renumber(torch.from_numpy(empty)).sum() == 0
