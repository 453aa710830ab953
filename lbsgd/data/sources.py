"""What a loaded dataset is, and the registry of the loaders that open one by name.

A dataset is a pair of random-access *splits*: ``read(index) -> (encoded example bytes, label)`` as a
TF function, so the pipeline (``lbsgd.data.pipeline``) can ask for the examples of the Remark 4 order
in order. An example is an encoded image file (``Dataset.kind == 'image'``) or a 1-D signal of
``Dataset.length`` positions x ``channels``, stored as raw float32 bytes (``'signal'``, MNIST-1D).
This module holds the types (:class:`Split`, :class:`Dataset`), the ways of making a split shared by
several sources (:func:`in_memory_split`, :func:`signal_split`, :func:`tfds_split`), and :func:`register`,
the decorator with which each source's module (``digits``, ``mnist1d``, ``tfds_source``, ``folder``)
names the loader ``lbsgd.data.loaders.load`` dispatches to.

TFDS datasets are read through ``tfds`` data sources, which need the array_record file format
(``tfds build --file_format=array_record``); the digits builder writes that format itself.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from lbsgd.errors import DataError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IN_MEMORY_MAX_BYTES",
    "DataError",
    "Dataset",
    "Loader",
    "Split",
    "exact_loaders",
    "first_line",
    "in_memory_split",
    "prefix_loaders",
    "register",
    "signal_split",
    "tfds_split",
]

# The accelerators belong to JAX; tf.data runs on the host CPU only. (Here, before any module of
# lbsgd.data makes a TF tensor: every one that does imports this module.)
tf.config.set_visible_devices([], "GPU")

ReadFn = Callable[[tf.Tensor], tuple[tf.Tensor, tf.Tensor]]
# A prepared TFDS split at most this large (encoded) is read into memory once when opened and served by
# tf.gather: per example, one Python call through the array_record source would cost more than the
# decoding and augmentation (digits: 32 -> 6 ms per 128-image batch on 2 cores).
IN_MEMORY_MAX_BYTES = 64 << 20

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class Split:
    """A random-access split: ``read(int64 index) -> (encoded example: tf.string, label: tf.int64)``;
    ``describe(index)`` names the example (a file path) in error messages when the split can;
    ``in_memory``: the encoded images are held in memory (``in_memory_split``)."""

    num_examples: int
    read: ReadFn
    describe: Callable[[int], str] | None = None
    in_memory: bool = False


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A training split, an evaluation split and what the model needs to know about them.

    ``kind``: 'image' (encoded image files; ``mean``/``std`` on the 0..1 pixel scale) or 'signal' (raw
    float32 ``[length, channels]``; ``mean``/``std`` on the signal's own scale)."""

    name: str
    train: Split
    eval: Split
    num_classes: int
    channels: int
    mean: tuple[float, ...]  # per-channel
    std: tuple[float, ...]
    kind: str = "image"
    length: int = 0  # signals: positions per example (config.image_size must equal it)

    def input_shape(self, image_size: int) -> tuple[int, ...]:
        """One preprocessed example's shape: ``(image_size, image_size, channels)`` for images (the
        pipeline crops or checks them to that size), ``(length, channels)`` for signals."""
        if self.kind == "signal":
            return (self.length, self.channels)
        return (image_size, image_size, self.channels)

    def size_problem(self, image_size: int) -> str | None:
        """Why ``config.image_size`` cannot be read from this dataset (None if it can): a signal's length is fixed."""
        if self.kind == "signal" and image_size != self.length:
            return (
                f"the signals of {self.name} have {self.length} positions; set --config.image_size={self.length} "
                f"(for a signal it is the length)"
            )
        return None


# What TensorFlow adds to an op's error for its own debugging: {{function_node ...}}, [[{{node ...}}]], [Op:...].
_TF_NODE_NAMES = re.compile(r"\{\{function_node [^}]*\}\}|\[\[\{\{node [^}]*\}\}\]\]|\[Op:[^\]]*\]( name: \S*)?")


def first_line(error: Exception) -> str:
    """The first line of ``error``'s message without TensorFlow's node names, whitespace collapsed (its
    type's name if it has none)."""
    text = _TF_NODE_NAMES.sub(" ", getattr(error, "message", None) or str(error)).strip()
    return " ".join(text.splitlines()[0].split()) if text else type(error).__name__


def in_memory_split(encoded_images, labels) -> Split:
    """A :class:`Split` over encoded images held in memory: ``read`` is a ``tf.gather``, so tf.data
    needs no Python call per example (the bytes, decoding and augmentation are those of the file)."""
    images = tf.constant(np.asarray(list(encoded_images), dtype=object), tf.string)
    labels = tf.constant(np.asarray(labels, dtype=np.int64), tf.int64)
    read = lambda i: (tf.gather(images, i), tf.gather(labels, i))
    return Split(num_examples=int(images.shape[0]), read=read, in_memory=True)


def signal_split(signals, labels) -> Split:
    """An :func:`in_memory_split` of signals ``[N, length, channels]``, each stored as its raw float32
    bytes (the pipeline's ``tf.io.decode_raw`` reads them back exactly)."""
    signals = np.ascontiguousarray(signals, dtype=np.float32)
    return in_memory_split([x.tobytes() for x in signals], labels)


def tfds_split(builder, split: str) -> Split:
    """Wrap a prepared TFDS split (array_record) as a random-access :class:`Split`; one of at most
    ``IN_MEMORY_MAX_BYTES`` encoded bytes is read into memory (:func:`in_memory_split`)."""
    try:
        source = builder.as_data_source(split=split, decoders={"image": tfds.decode.SkipDecoding()})
    except Exception as e:
        raise DataError(
            f"cannot open {builder.name}:{split} for random access ({e}); prepare it with "
            f"`tfds build {builder.name} --file_format=array_record`"
        ) from e

    num_bytes = int(builder.info.splits[split].num_bytes or 0)
    if 0 < num_bytes <= IN_MEMORY_MAX_BYTES:
        examples = source.__getitems__(list(range(len(source))))
        return in_memory_split([ex["image"] for ex in examples], [ex["label"] for ex in examples])

    def read_py(i):
        ex = source[int(i)]
        return np.asarray(ex["image"], dtype=object).reshape(()), np.int64(ex["label"])

    def read(i):
        image, label = tf.numpy_function(read_py, [i], [tf.string, tf.int64], stateful=False)
        return tf.ensure_shape(image, []), tf.ensure_shape(label, [])

    return Split(num_examples=len(source), read=read)


# A loader: (argument, data_dir) -> Dataset. The argument is the whole name for an exact kind
# ('digits', 'imagenet2012') and what follows the colon for a prefix kind ('tfds:<name>', 'folder:<path>');
# data_dir is --config.data_dir, else $TFDS_DATA_DIR, else None.
Loader = Callable[[str, str | None], Dataset]
exact_loaders: dict[str, Loader] = {}
prefix_loaders: dict[str, Loader] = {}


def register(kind: str) -> Callable[[Loader], Loader]:
    """Decorator: the loader of datasets named ``kind`` ('digits'), or ``kind<argument>`` when ``kind``
    ends in a colon ('folder:' for 'folder:<path>'). Returns the loader unchanged; a kind is registered once."""

    def add(loader: Loader) -> Loader:
        table, key = (prefix_loaders, kind[:-1]) if kind.endswith(":") else (exact_loaders, kind)
        if key in table:
            raise ValueError(f"dataset kind {kind!r} is registered twice ({table[key]} and {loader})")
        table[key] = loader
        return loader

    return add
