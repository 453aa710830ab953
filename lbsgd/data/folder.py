"""Image folders as a source (``config.dataset='folder:<path>'``), read by the same pipeline as ImageNet.

Layout (one sub-folder per class, as ImageNet's own train/val folders)::

    <path>/train/<class>/*.jpg|*.jpeg|*.png
    <path>/val/<class>/...        (or 'validation' or 'test')

Classes are the train sub-folder names sorted by name; class i gets label i. Files are listed in
sorted order, so index -> file is deterministic and the Remark 4 order (``lbsgd.data.order``) is the
same on every host that sees the same folder. Images are decoded to 3 channels (grayscale and CMYK
JPEGs become RGB) and normalised with the ImageNet mean/std.
"""

from __future__ import annotations

import os

import tensorflow as tf

from lbsgd.data import sources
from lbsgd.data.sources import DataError

EXTENSIONS = (".jpg", ".jpeg", ".png")
EVAL_DIRS = ("val", "validation", "test")
CHANNELS = 3


def _classes(train_dir: str) -> list[str]:
    return sorted(e.name for e in os.scandir(train_dir) if e.is_dir() and not e.name.startswith("."))


def _files(split_dir: str, classes: list[str]) -> tuple[list[str], list[int]]:
    """Sorted image paths under ``split_dir/<class>/`` and their labels (index in ``classes``)."""
    paths, labels = [], []
    for label, name in enumerate(classes):
        class_dir = os.path.join(split_dir, name)
        if not os.path.isdir(class_dir):
            continue
        for root, dirs, files in os.walk(class_dir, followlinks=True):
            dirs.sort()
            for f in sorted(files):
                if f.lower().endswith(EXTENSIONS) and not f.startswith("."):
                    paths.append(os.path.join(root, f))
                    labels.append(label)
    return paths, labels


def _split(paths: list[str], labels: list[int]) -> sources.Split:
    """A random-access :class:`sources.Split` reading file ``paths[i]`` with label ``labels[i]``."""
    path_table = tf.constant(paths, tf.string)
    label_table = tf.constant(labels, tf.int64)

    def read(i):
        return tf.io.read_file(tf.gather(path_table, i)), tf.gather(label_table, i)

    return sources.Split(num_examples=len(paths), read=read, describe=lambda i: paths[i])


@sources.register("folder:")
def load(path: str, data_dir: str | None = None) -> sources.Dataset:
    """Open ``path`` laid out as ``train/<class>/*`` and ``val|validation|test/<class>/*`` (see module doc);
    ``data_dir`` is not used (the path names the files).

    Raises ``DataError`` (one line, with the fix) when the folder, its class sub-folders, its
    evaluation folder or its images are missing, or the evaluation folder has a class train lacks.
    """
    layout = f"lay it out as {path}/train/<class>/*.jpg and {path}/val/<class>/*.jpg"
    root = os.path.expanduser(path)
    if not os.path.isdir(root):
        raise DataError(f"folder dataset {path!r} does not exist; {layout}")
    train_dir = os.path.join(root, "train")
    if not os.path.isdir(train_dir):
        raise DataError(f"folder dataset {path!r} has no 'train' sub-folder; {layout}")
    classes = _classes(train_dir)
    if not classes:
        raise DataError(f"{train_dir!r} has no class sub-folders; {layout}")
    eval_dir = next((os.path.join(root, d) for d in EVAL_DIRS if os.path.isdir(os.path.join(root, d))), None)
    if eval_dir is None:
        raise DataError(f"folder dataset {path!r} has no evaluation sub-folder ({', '.join(EVAL_DIRS)}); {layout}")
    extra = sorted(set(_classes(eval_dir)) - set(classes))
    if extra:
        raise DataError(
            f"{eval_dir!r} has classes that {train_dir!r} lacks ({', '.join(extra[:5])}); "
            f"give every class a train sub-folder"
        )
    train = _files(train_dir, classes)
    evals = _files(eval_dir, classes)
    for name, (paths, _) in (("train", train), (os.path.basename(eval_dir), evals)):
        if not paths:
            raise DataError(
                f"folder dataset {path!r} has no {'/'.join(EXTENSIONS)} images under {name}/<class>/; {layout}"
            )
    return sources.Dataset(
        name=f"folder:{path}",
        train=_split(*train),
        eval=_split(*evals),
        num_classes=len(classes),
        channels=CHANNELS,
        mean=sources.IMAGENET_MEAN,
        std=sources.IMAGENET_STD,
    )
