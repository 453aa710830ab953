"""A validation split held out from the training split, for tuning without the test split.

``hold_out(dataset, fraction)`` returns the dataset with ``round(fraction * N)`` of its N training examples
(at least one) taken out of training and made its evaluation split; its own evaluation split (the test
split) is dropped, so nothing that reads the returned dataset can read a test example. Which examples are
held out is a fixed seeded choice (``VALIDATION_SEED``) that depends on N and the count only — never on a
run's seed — so every run of a tuning grid trains on the same examples and is scored on the same ones.
Both parts keep the training split's order of indices, and ``read`` maps an index of a part to its index
in the training split, so the pipeline (Remark 4 order, augmentation) works on them unchanged.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

from lbsgd.data.sources import Dataset, Split

VALIDATION_SEED = 0x56414C  # fixed: the held-out examples never depend on config.seed


def num_held_out(num_train: int, fraction: float) -> int:
    """How many of ``num_train`` training examples ``fraction`` holds out: round(fraction * N), at least 1."""
    return max(1, round(fraction * num_train))


def held_out_indices(num_train: int, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(training indices, validation indices) into the training split: disjoint, sorted, together every index."""
    perm = np.random.Generator(np.random.PCG64(np.random.SeedSequence([VALIDATION_SEED, num_train]))).permutation(
        num_train
    )
    count = num_held_out(num_train, fraction)
    return np.sort(perm[count:]), np.sort(perm[:count])


def subset(split: Split, indices: np.ndarray) -> Split:
    """The examples ``indices`` of ``split``, as a split of their own (index i reads ``split``'s ``indices[i]``)."""
    table = tf.constant(np.asarray(indices, np.int64))
    describe = (lambda i: split.describe(int(indices[i]))) if split.describe else None
    return Split(
        num_examples=len(indices),
        read=lambda i: split.read(tf.gather(table, i)),
        describe=describe,
        in_memory=split.in_memory,
    )


def hold_out(dataset: Dataset, fraction: float) -> Dataset:
    """``dataset`` with a held-out validation split (see the module doc) as its evaluation split, and no test split."""
    train, validation = held_out_indices(dataset.train.num_examples, fraction)
    return dataclasses.replace(dataset, train=subset(dataset.train, train), eval=subset(dataset.train, validation))
