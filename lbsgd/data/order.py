"""The data order of Goyal et al. Remark 4, as a pure function of (seed, epoch).

Remark 4 ("Data shuffling"): one random permutation of the whole training set per epoch, the
permuted set cut into global minibatches of kn, each cut into k worker slices of n. A partial last
minibatch is dropped. Nothing here depends on the number of devices or processes, so the same
(k, n, seed) gives every worker the same examples wherever it runs.
"""

from __future__ import annotations

import numpy as np


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
    """Number of full global minibatches in one epoch (the partial last one is dropped)."""
    return num_examples // global_batch_size


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of ``range(num_examples)`` used in ``epoch`` (Remark 4); depends on (seed, epoch) only."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), int(epoch), 0x4C425347])))
    return rng.permutation(num_examples)


def worker_batches(
    num_examples: int, num_workers: int, per_worker_batch_size: int, seed: int, epoch: int
) -> np.ndarray:
    """Example indices of one epoch as an int array of shape [steps, k, n] (Remark 4).

    ``result[s, w]`` are the n examples worker ``w`` processes at step ``s`` of ``epoch``.
    """
    kn = num_workers * per_worker_batch_size
    steps = steps_per_epoch(num_examples, kn)
    perm = epoch_permutation(num_examples, seed, epoch)[: steps * kn]
    return perm.reshape(steps, num_workers, per_worker_batch_size)


def eval_batches(num_examples: int, global_batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Every example exactly once, in order, padded to full batches.

    Returns (indices, mask), both of shape [steps, global_batch_size]; padded slots repeat index 0
    with mask 0 so they never count.
    """
    steps = -(-num_examples // global_batch_size)
    padded = steps * global_batch_size
    idx = np.arange(padded)
    mask = (idx < num_examples).astype(np.float32)
    idx = np.where(idx < num_examples, idx, 0)
    return idx.reshape(steps, global_batch_size), mask.reshape(steps, global_batch_size)
