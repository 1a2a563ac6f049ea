"""Train/test split by class and the class-balanced sampling weights (as the release)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def split_per_class(keys: Sequence[str], labels: Sequence[int], train_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the train and test samples: per class, the first ``train_fraction`` train.

    Samples are ordered by ``keys`` (file paths), never by listing order, so the split
    is the same on every filesystem. Each class keeps ``round(fraction * count)``
    training samples, as the release does. Both index arrays are in key order.
    """
    order = np.array(sorted(range(len(keys)), key=keys.__getitem__), dtype=np.int64)
    sorted_labels = np.asarray(labels)[order]
    train, test = [], []
    for label in np.unique(sorted_labels):
        members = order[sorted_labels == label]
        n_train = round(train_fraction * len(members))
        train.append(members[:n_train])
        test.append(members[n_train:])
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))

    def in_key_order(parts: list[np.ndarray]) -> np.ndarray:
        indices = np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
        return indices[np.argsort(rank[indices])]

    return in_key_order(train), in_key_order(test)

def class_balanced_weights(targets: Sequence[int]) -> torch.Tensor:
    """Per-sample weights ``[N]`` of ``1 / count(class)``, so each class is drawn equally often."""
    targets = torch.as_tensor(np.asarray(targets), dtype=torch.long)
    counts = torch.bincount(targets).double()
    return (1.0 / counts[targets]).float()
