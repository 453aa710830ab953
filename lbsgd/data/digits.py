"""The embedded default dataset: scikit-learn's 1,797 real 8x8 handwritten digits, as a TFDS builder.

The images ship inside scikit-learn, so nothing is downloaded. The builder writes them once into the
TFDS data directory (array_record files, like any prepared TFDS dataset), after which the digits go
through exactly the same tfds + tf.data code path as ImageNet. ``config.dataset='digits'`` opens them
(:func:`load`). A data directory that cannot be written (read-only, full) is a one-line ``DataError``.

Split: a fixed stratified split (seed 0) into 1,437 training and 360 test images.
Pixels: scikit-learn's 0..16 intensities mapped to 0..255 (round(v * 255 / 16)), one channel.
"""

from __future__ import annotations

import errno
import os

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from lbsgd.data import sources
from lbsgd.data.sources import DataError

NUM_TEST = 360
SPLIT_SEED = 0
NUM_CLASSES, CHANNELS = 10, 1
MEAN, STD = (0.3053,), (0.3759,)  # per channel, on the 0..1 scale


def split_indices() -> tuple[np.ndarray, np.ndarray]:
    """Indices (into ``sklearn.datasets.load_digits()``) of the fixed train and test splits."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    y = load_digits().target
    train, test = train_test_split(np.arange(len(y)), test_size=NUM_TEST, random_state=SPLIT_SEED, stratify=y)
    return np.sort(train), np.sort(test)


class LbsgdDigits(tfds.core.GeneratorBasedBuilder):
    """TFDS builder for scikit-learn's digits (1,437 train / 360 test, 8x8x1 uint8, 10 classes)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Stratified 1437/360 split of sklearn.datasets.load_digits, seed 0."}

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            description="scikit-learn's 8x8 handwritten digits (UCI optdigits test set), 0..16 scaled to 0..255.",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(8, 8, 1)),
                    "label": tfds.features.ClassLabel(num_classes=10),
                }
            ),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        train, test = split_indices()
        return {"train": self._generate_examples(train), "test": self._generate_examples(test)}

    def _generate_examples(self, indices):
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
        for i in indices:
            yield int(i), {"image": images[i], "label": int(digits.target[i])}


def default_data_dir() -> str:
    """TFDS's default data directory, read now (TFDS reads it once, on import): $TFDS_DATA_DIR, else
    ~/tensorflow_datasets."""
    return os.environ.get("TFDS_DATA_DIR") or os.path.join(os.path.expanduser("~"), "tensorflow_datasets")


# What a failed write says, most specific first: an OSError's strerror, or found in a TF or array_record message.
_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EIO)


def unwritable(data_dir: str, error: Exception, what: str = "prepare the digits dataset") -> str:
    """One line: ``data_dir`` cannot take what a source writes there (``what``: the prepared digits, the
    MNIST-1D cache), the OS's reason, and the fix."""
    if isinstance(error, OSError) and error.strerror:
        code, reason = error.errno, error.strerror + (f": {error.filename!r}" if error.filename else "")
    else:
        text = sources.first_line(error)
        code = next((c for c in _WRITE_ERRNOS if os.strerror(c) in text), None)
        reason = os.strerror(code) if code else text
    fix = "free space there, or " if code in (errno.ENOSPC, errno.EDQUOT) else ""
    return (
        f"cannot {what} in {data_dir!r} ({reason}); {fix}"
        f"pass --config.data_dir=<a writable directory> or set TFDS_DATA_DIR"
    )


def builder(data_dir: str | None) -> LbsgdDigits:
    """The digits builder, prepared into ``data_dir`` (else :func:`default_data_dir`) on first use (a second or so).

    Raises ``DataError`` (one line: the directory, the OS's reason, the fix) when it cannot be written there.
    """
    data_dir = data_dir or default_data_dir()
    try:
        b = LbsgdDigits(data_dir=data_dir, file_format="array_record")
        if not b.is_prepared():
            b.download_and_prepare(download_config=tfds.download.DownloadConfig(verify_ssl=False))
    except (OSError, RuntimeError, tf.errors.OpError) as e:  # array_record's writer raises RuntimeError
        raise DataError(unwritable(data_dir, e)) from e
    return b


@sources.register("digits")
def load(name: str, data_dir: str | None) -> sources.Dataset:
    """The digits as a :class:`sources.Dataset` ('train' and 'test'), prepared into ``data_dir`` if needed."""
    b = builder(data_dir)
    train, test = sources.tfds_split(b, "train"), sources.tfds_split(b, "test")
    return sources.Dataset("digits", train, test, NUM_CLASSES, CHANNELS, MEAN, STD)
