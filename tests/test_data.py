"""Remark 4 data order, the digits dataset and the tf.data pipeline."""

import errno
import itertools
import os

import numpy as np
import pytest

from lbsgd.data import digits, order, pipeline, sources

K, N = 8, 16


def test_worker_batches_is_one_permutation_per_epoch_cut_into_workers():
    b = order.worker_batches(1437, K, N, seed=3, epoch=5)
    assert b.shape == (1437 // (K * N), K, N)  # partial last batch dropped
    flat = b.reshape(-1)
    assert len(np.unique(flat)) == flat.size  # every example at most once per epoch
    assert flat.min() >= 0 and flat.max() < 1437
    # The cut is of one permutation: workers' slices are consecutive pieces of it.
    np.testing.assert_array_equal(flat, order.epoch_permutation(1437, 3, 5)[: flat.size])


def test_order_depends_on_seed_and_epoch_only():
    a = order.worker_batches(1000, 4, 8, seed=1, epoch=2)
    np.testing.assert_array_equal(a, order.worker_batches(1000, 4, 8, seed=1, epoch=2))
    assert not np.array_equal(a, order.worker_batches(1000, 4, 8, seed=1, epoch=3))
    assert not np.array_equal(a, order.worker_batches(1000, 4, 8, seed=2, epoch=2))
    # Changing k while keeping kn regroups the same examples: the epoch order is the same.
    np.testing.assert_array_equal(a.reshape(-1), order.worker_batches(1000, 8, 4, seed=1, epoch=2).reshape(-1))


def test_eval_batches_cover_every_example_once():
    idx, mask = order.eval_batches(360, 128)
    assert idx.shape == (3, 128)
    assert mask.sum() == 360
    np.testing.assert_array_equal(np.sort(idx[mask > 0]), np.arange(360))


def test_digits_split_is_fixed_stratified_and_disjoint():
    train, test = digits.split_indices()
    assert len(train) == 1437 and len(test) == 360
    assert not set(train) & set(test)
    from sklearn.datasets import load_digits

    y = load_digits().target
    counts = np.bincount(y[test], minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # stratified: ~36 per class
    np.testing.assert_array_equal(test, digits.split_indices()[1])


@pytest.fixture(scope="module")
def ds(data_dir):
    return pipeline.load("digits", data_dir)


def _labels_by_index(data_dir, split):

    source = digits.builder(data_dir).as_data_source(split=split)
    return np.array([int(source[i]["label"]) for i in range(len(source))]), source


_ARGS = dict(num_workers=K, per_worker_batch_size=N, seed=0, first_worker=0, num_local_workers=K, augment="none", image_size=8)


def _take(ds, steps, **kw):
    args = dict(_ARGS, start_step=0)
    args.update(kw)
    return list(itertools.islice(pipeline.train_iterator(ds, **args), steps))


@pytest.mark.parametrize("processes", [2, 4, 8])
def test_each_process_reads_only_its_workers_and_together_they_read_the_global_order(ds, processes):
    steps = 13  # crosses the epoch boundary (11 steps per epoch)
    whole = _take(ds, steps)
    per = K // processes
    parts = [_take(ds, steps, first_worker=p * per, num_local_workers=per) for p in range(processes)]
    for s in range(steps):
        np.testing.assert_array_equal(np.concatenate([p[s]["label"] for p in parts]), whole[s]["label"])
        np.testing.assert_array_equal(np.concatenate([p[s]["image"] for p in parts]), whole[s]["image"])


def test_batches_hold_the_examples_remark4_assigns(ds, data_dir):
    labels, _ = _labels_by_index(data_dir, "train")
    got = _take(ds, 12)
    for s, b in enumerate(got):
        epoch, i = divmod(s, 11)
        want = order.worker_batches(1437, K, N, 0, epoch)[i].reshape(-1)
        np.testing.assert_array_equal(b["label"], labels[want])


def test_resuming_at_a_step_gives_the_same_batches(ds):
    ref = _take(ds, 14, augment="shift")
    resumed = _take(ds, 4, augment="shift", start_step=10)
    for a, b in zip(ref[10:], resumed):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])


def test_shift_augmentation_is_a_one_pixel_translation(ds):
    plain = _take(ds, 1)[0]["image"]
    shifted = _take(ds, 1, augment="shift")[0]["image"]
    background = plain.min()  # a zero pixel after normalisation (digits have zero borders)
    moved = 0
    for x, y in zip(plain, shifted):
        matches = []
        for dy, dx in itertools.product((-1, 0, 1), repeat=2):
            padded = np.pad(x[..., 0], 1, constant_values=background)
            cand = padded[1 + dy : 9 + dy, 1 + dx : 9 + dx]
            matches.append(np.allclose(cand, y[..., 0], atol=1e-6))
        assert any(matches)
        moved += not matches[4]  # index 4 is (0, 0)
    assert moved > len(plain) // 2  # 8 of 9 offsets move the image


def test_eval_iterator_reads_every_test_example_once_across_processes(ds, data_dir):
    labels, _ = _labels_by_index(data_dir, "test")
    got_labels, got_mask = [], []
    slots = 32  # 4 "processes" x 32 slots = global eval batch 128
    for p in range(4):
        for b in pipeline.eval_iterator(
            ds, global_batch_size=128, first_slot=p * slots, num_local_slots=slots, augment="none", image_size=8
        ):
            got_labels.append(b["label"][b["mask"] > 0])
            got_mask.append(b["mask"])
    assert np.concatenate(got_mask).sum() == 360
    np.testing.assert_array_equal(np.sort(np.concatenate(got_labels)), np.sort(labels))


def test_unknown_dataset_is_a_clear_error():
    with pytest.raises(pipeline.DataError, match="unknown dataset"):
        pipeline.load("mnist-but-typo")


def test_in_memory_split_serves_the_same_batches_as_reading_the_source(data_dir, monkeypatch):
    """Small TFDS splits are held in memory (tf.gather instead of a Python call per example); the batches,
    augmentation included, must be those of the per-example array_record reads."""
    cached = pipeline.load("digits", data_dir)
    monkeypatch.setattr(sources, "IN_MEMORY_MAX_BYTES", 0)
    uncached = pipeline.load("digits", data_dir)
    assert cached.train.in_memory and not uncached.train.in_memory
    a = _take(cached, 12, augment="shift", start_step=5)
    b = _take(uncached, 12, augment="shift", start_step=5)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])


def test_a_run_gets_exactly_the_steps_it_asks_for(ds):
    """``num_steps`` ends the pipeline after that many batches: the first ones of the endless order."""
    endless = _take(ds, 15, start_step=7)
    finite = list(pipeline.train_iterator(ds, **_ARGS, start_step=7, num_steps=13))
    assert len(finite) == 13
    for x, y in zip(endless, finite):
        np.testing.assert_array_equal(x["label"], y["label"])


def test_an_unwritable_home_is_one_line_naming_the_directory(tmp_path, monkeypatch):
    """No --config.data_dir and no $TFDS_DATA_DIR: the digits are prepared in ~/tensorflow_datasets, which
    cannot be made under a read-only HOME (as root, permission bits do not stop writes: HOME under a file)."""
    root = os.geteuid() == 0
    home = tmp_path / "home"
    if root:
        (tmp_path / "file").write_text("")
        home = tmp_path / "file" / "home"
    else:
        home.mkdir(mode=0o500)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("TFDS_DATA_DIR", raising=False)
    with pytest.raises(pipeline.DataError) as e:
        pipeline.load("digits", "")
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"cannot prepare the digits dataset in {str(home / 'tensorflow_datasets')!r} (")
    assert (os.strerror(errno.ENOTDIR) if root else os.strerror(errno.EACCES)) in msg
    assert msg.endswith("; pass --config.data_dir=<a writable directory> or set TFDS_DATA_DIR")


@pytest.mark.parametrize("kind", ["array_record", "tf", "os"])
def test_a_full_disk_while_preparing_the_digits_is_one_line(tmp_path, monkeypatch, kind):
    """ENOSPC as each layer reports it when the examples are written: array_record's writer (a RuntimeError, its
    text as on a full 64 KiB tmpfs), TF's file system (an OpError) and Python's (an OSError)."""
    import tensorflow as tf
    from tensorflow_datasets.core import file_adapters

    def full(cls, path, iterator):
        reason = os.strerror(errno.ENOSPC)
        raise {
            "array_record": RuntimeError(f"write() failed: {reason}; writing {path}; at byte 65536; Failed to close"),
            "tf": tf.errors.ResourceExhaustedError(None, None, f"{path}; {reason}"),
            "os": OSError(errno.ENOSPC, reason, str(path)),
        }[kind]

    monkeypatch.setattr(file_adapters.ArrayRecordFileAdapter, "write_examples", classmethod(full))
    with pytest.raises(pipeline.DataError) as e:
        pipeline.load("digits", str(tmp_path))
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"cannot prepare the digits dataset in {str(tmp_path)!r} (No space left on device")
    assert msg.endswith("); free space there, or pass --config.data_dir=<a writable directory> or set TFDS_DATA_DIR")
