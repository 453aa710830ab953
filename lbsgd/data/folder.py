"""Image folders as a source (``config.dataset='folder:<path>'``), read by the same pipeline as ImageNet.

Layout (one sub-folder per class, as ImageNet's own train/val folders)::

    <path>/train/<class>/*.jpg|*.jpeg|*.png
    <path>/val/<class>/...        (or 'validation' or 'test')

Classes are the train sub-folder names sorted by name; class i gets label i; at least two classes
must have training images. Files are listed in sorted order, so index -> file is deterministic and the
Remark 4 order (``lbsgd.data.order``) is the same on every host that sees the same folder. Symbolic links
are followed, but each file is counted once in a split, by its real path (the first path met in that
order names it), and a directory already walked (a link loop such as ``loop -> .``) is not walked again.
File names need not be UTF-8: TF opens them by their bytes (``os.fsencode``). Images are decoded to
3 channels (grayscale and CMYK JPEGs become RGB) and normalised with the ImageNet mean/std.
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


def _images(class_dir: str):
    """``(path, real path)`` of the images under ``class_dir``, in ``os.walk(followlinks=True)``'s top-down
    order with names sorted; a directory whose real path was already walked is skipped (link loops)."""
    real_class_dir = os.path.realpath(class_dir)
    walked = {real_class_dir}
    stack = [(class_dir, real_class_dir)]
    while stack:
        top, real_top = stack.pop()
        try:
            with os.scandir(top) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:  # unreadable: skipped, as os.walk does
            continue
        subdirs = []
        for e in entries:
            try:
                is_dir = e.is_dir()
            except OSError:
                is_dir = False
            if not is_dir and not (e.name.lower().endswith(EXTENSIONS) and not e.name.startswith(".")):
                continue
            # Not a link: the real path is the real parent's plus the name (no system call per file).
            real = os.path.realpath(e.path) if e.is_symlink() else os.path.join(real_top, e.name)
            if not is_dir:
                yield e.path, real
            elif real not in walked:
                walked.add(real)
                subdirs.append((e.path, real))
        stack.extend(reversed(subdirs))


def _files(split_dir: str, classes: list[str]) -> tuple[list[str], list[int]]:
    """Sorted image paths under ``split_dir/<class>/`` and their labels (index in ``classes``); each real
    file once (the first path that reaches it)."""
    paths, labels, seen = [], [], set()
    for label, name in enumerate(classes):
        class_dir = os.path.join(split_dir, name)
        if not os.path.isdir(class_dir):
            continue
        for path, real in _images(class_dir):
            if real not in seen:
                seen.add(real)
                paths.append(path)
                labels.append(label)
    return paths, labels


def shown(path: str) -> str:
    """``path`` as messages print it: a name that is not UTF-8 with its raw bytes as ``\\xNN`` escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _split(paths: list[str], labels: list[int]) -> sources.Split:
    """A random-access :class:`sources.Split` reading file ``paths[i]`` with label ``labels[i]``."""
    path_table = tf.constant([os.fsencode(p) for p in paths], tf.string)  # bytes: any file name
    label_table = tf.constant(labels, tf.int64)

    def read(i):
        return tf.io.read_file(tf.gather(path_table, i)), tf.gather(label_table, i)

    return sources.Split(num_examples=len(paths), read=read, describe=lambda i: shown(paths[i]))


def _check_two_classes(path: str, train_dir: str, classes: list[str], labels: list[int]) -> None:
    """Raise ``DataError`` unless at least two classes have training images (one class trains to accuracy 1)."""
    having = sorted(set(labels))
    if len(having) >= 2:
        return
    name = lambda c: repr(shown(c))
    if len(classes) == 1:
        found = f"one class, {name(classes[0])}"
    else:
        empty = [name(c) for i, c in enumerate(classes) if i not in having]
        more = f" and {len(empty) - 5} more" if len(empty) > 5 else ""
        none = f"{', '.join(empty[:5])}{more} {'has' if len(empty) == 1 else 'have'} none"
        found = f"training images of one class only, {name(classes[having[0]])} ({none})"
    raise DataError(
        f"folder dataset {path!r} has {found} in {train_dir!r}; a classifier needs at least two classes: "
        f"add a sub-folder with images for each other class, {train_dir}/<class>/*.jpg"
    )


@sources.register("folder:")
def load(path: str, data_dir: str | None = None) -> sources.Dataset:
    """Open ``path`` laid out as ``train/<class>/*`` and ``val|validation|test/<class>/*`` (see module doc);
    ``data_dir`` is not used (the path names the files).

    Raises ``DataError`` (one line, with the fix) when the folder, its class sub-folders, its
    evaluation folder or its images are missing, the evaluation folder has a class train lacks, or fewer
    than two classes have training images.
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
    _check_two_classes(path, train_dir, classes, train[1])
    return sources.Dataset(
        name=f"folder:{path}",
        train=_split(*train),
        eval=_split(*evals),
        num_classes=len(classes),
        channels=CHANNELS,
        mean=sources.IMAGENET_MEAN,
        std=sources.IMAGENET_STD,
    )
