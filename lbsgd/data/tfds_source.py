"""Prepared TFDS datasets as a source: ``config.dataset='imagenet2012'`` or ``'tfds:<name>'``.

The dataset must be prepared in the array_record format (``tfds build <name> --file_format=array_record``;
ImageNet needs a manual download), so that its splits can be read at random (:func:`sources.tfds_split`).
The evaluation split is 'validation', else 'test'. Three-channel images are normalised with the
ImageNet mean/std, others with mean 0.5 and std 0.25 per channel.
"""

from __future__ import annotations

import tensorflow_datasets as tfds

from lbsgd.data import sources
from lbsgd.data.sources import DataError


@sources.register("imagenet2012")
@sources.register("tfds:")
def load(tfds_name: str, data_dir: str | None) -> sources.Dataset:
    """Open the prepared TFDS dataset ``tfds_name`` in ``data_dir`` (TFDS's default when None)."""
    try:
        b = tfds.builder(tfds_name, data_dir=data_dir)
    except Exception as e:
        reason = sources.first_line(e).split(" Available datasets")[0]
        raise DataError(
            f"unknown TFDS dataset {tfds_name!r} ({reason}); check the name against tfds.list_builders() "
            f"and --config.data_dir"
        ) from e
    if not b.is_prepared():
        raise DataError(
            f"TFDS dataset {tfds_name!r} is not prepared in {b.data_dir!r}; prepare it with "
            f"`tfds build {tfds_name} --file_format=array_record` (ImageNet needs a manual download)"
        )
    eval_split = "validation" if "validation" in b.info.splits else "test"
    channels = b.info.features["image"].shape[-1] or 3
    if channels == 3:
        mean, std = sources.IMAGENET_MEAN, sources.IMAGENET_STD
    else:
        mean, std = (0.5,) * channels, (0.25,) * channels
    return sources.Dataset(
        tfds_name,
        sources.tfds_split(b, "train"),
        sources.tfds_split(b, eval_split),
        b.info.features["label"].num_classes,
        channels,
        mean,
        std,
    )
