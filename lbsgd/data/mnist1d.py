"""The second embedded dataset: MNIST-1D (Greydanus 2020, "Scaling down deep learning"), generated offline.

MNIST-1D is ten 1-D templates of 12 points (one per digit) turned into signals of 40 positions by random
padding, dilation, scaling, translation, correlated and i.i.d. noise and shear. The ``mnist1d`` package
(PyPI) generates it procedurally with ``make_dataset``; this module calls only that (never its
``get_dataset``, which downloads), with the global NumPy and ``random`` states saved and restored around
it, so nothing is downloaded and the caller's random state is untouched. The result is a function of
(seed, sizes) only.

Names (``config.dataset``):

==========================================  ===================================================
``mnist1d``                                  the paper's split: 4,000 train / 1,000 test, seed 42
``mnist1d_large``                            60,000 train / 10,000 test, seed 42
``mnist1d:<train>,<test>[,<seed>]``           any split (train + test a multiple of 10; seed 42)
==========================================  ===================================================

A split is generated as one set of train + test examples (``train_split=1``: the package's global
standardisation, mean 0 and standard deviation 1, is over the whole set), the first ``train`` of them for
training and the next ``test`` for testing; ``mnist1d`` is exactly the package's default 4,000 / 1,000
split. Generation is a Python loop (about 0.3 ms an example on one core): the split is cached in
``<data_dir>/mnist1d/`` as a ``.npz`` keyed by (seed, sizes) and written atomically; a cache whose
generation arguments differ is regenerated. A data directory that cannot be written is a one-line
``DataError``.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import zipfile

import numpy as np

from lbsgd.data import sources
from lbsgd.data.digits import default_data_dir, unwritable
from lbsgd.data.sources import DataError

NUM_CLASSES, CHANNELS, LENGTH = 10, 1, 40
SEED = 42  # the package's (and the paper's) default
SPLITS = {"mnist1d": (4000, 1000), "mnist1d_large": (60000, 10000)}
MEAN, STD = (0.0,), (1.0,)  # make_dataset standardises the whole set already
CACHE_VERSION = 1


def generation_args(num_examples: int, seed: int) -> dict:
    """``mnist1d``'s default generation arguments for ``num_examples`` examples of seed ``seed``, in one
    split (``train_split=1``), without the download address."""
    from mnist1d.data import get_dataset_args

    args = get_dataset_args(as_dict=True)
    args.pop("url", None)
    args.update(num_samples=num_examples, train_split=1.0, seed=seed, final_seq_length=LENGTH)
    return args


def generate(num_train: int, num_test: int, seed: int = SEED) -> dict[str, np.ndarray]:
    """Generate a split with ``mnist1d.data.make_dataset`` (offline, deterministic per (seed, sizes)):
    ``{'x': float32 [num_train, 40], 'y': int64, 'x_test', 'y_test'}``. The global NumPy and ``random``
    states are restored afterwards."""
    total = num_train + num_test
    if num_train <= 0 or num_test <= 0 or total % NUM_CLASSES:
        raise DataError(
            f"MNIST-1D split {num_train},{num_test}: both sizes must be positive and their sum a multiple of "
            f"{NUM_CLASSES} (equal examples per class), e.g. mnist1d:4000,1000"
        )
    from mnist1d.data import make_dataset
    from mnist1d.utils import ObjectView

    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        data = make_dataset(ObjectView(generation_args(total, seed)))
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    x, y = data["x"].astype(np.float32), data["y"].astype(np.int64)
    return {"x": x[:num_train], "y": y[:num_train], "x_test": x[num_train:], "y_test": y[num_train:]}


def cache_path(data_dir: str, num_train: int, num_test: int, seed: int) -> str:
    """Where the split of (seed, sizes) is cached under ``data_dir``."""
    return os.path.join(data_dir, "mnist1d", f"mnist1d_{num_train}_{num_test}_seed{seed}.npz")


def _key(num_train: int, num_test: int, seed: int) -> str:
    """What a cached file must have been generated with: the cache version and the generation arguments."""
    args = generation_args(num_train + num_test, seed)
    return json.dumps({"version": CACHE_VERSION, "num_train": num_train, "args": args}, sort_keys=True)


def _read_cache(path: str, key: str) -> dict[str, np.ndarray] | None:
    """The cached split at ``path`` if it is intact and of ``key``; None otherwise."""
    try:
        with np.load(path) as f:
            if str(f["key"]) != key:
                return None
            return {name: f[name] for name in ("x", "y", "x_test", "y_test")}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None


def _write_cache(path: str, key: str, data: dict[str, np.ndarray]) -> None:
    """Write ``data`` to ``path`` atomically (a temporary file in the same directory, then renamed)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".mnist1d-", suffix=".npz.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, key=np.asarray(key), **data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # as an ordinary file (mkstemp's is private)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def cached(num_train: int, num_test: int, seed: int = SEED, data_dir: str | None = None) -> dict[str, np.ndarray]:
    """The split of (seed, sizes) from the cache under ``data_dir`` (else :func:`default_data_dir`),
    generated and cached on first use. Raises ``DataError`` (one line) when it cannot be cached there."""
    data_dir = data_dir or default_data_dir()
    path, key = cache_path(data_dir, num_train, num_test, seed), _key(num_train, num_test, seed)
    data = _read_cache(path, key) if os.path.exists(path) else None
    if data is None:
        data = generate(num_train, num_test, seed)
        try:
            _write_cache(path, key, data)
        except OSError as e:
            raise DataError(unwritable(data_dir, e, "write the MNIST-1D cache")) from None
    return data


def parse(argument: str) -> tuple[int, int, int]:
    """``'<train>,<test>[,<seed>]'`` -> (train, test, seed); a one-line ``DataError`` if malformed."""
    parts = argument.split(",")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (2, 3):
        raise DataError(f"dataset 'mnist1d:{argument}' is not mnist1d:<train>,<test>[,<seed>], e.g. mnist1d:4000,1000")
    return values[0], values[1], values[2] if len(values) == 3 else SEED


def dataset(name: str, num_train: int, num_test: int, seed: int, data_dir: str | None) -> sources.Dataset:
    """The split of (seed, sizes) as a signal :class:`sources.Dataset` named ``name`` ('train' and 'test')."""
    data = cached(num_train, num_test, seed, data_dir)
    train = sources.signal_split(data["x"][..., None], data["y"])
    test = sources.signal_split(data["x_test"][..., None], data["y_test"])
    return sources.Dataset(name, train, test, NUM_CLASSES, CHANNELS, MEAN, STD, kind="signal", length=LENGTH)


@sources.register("mnist1d")
@sources.register("mnist1d_large")
def load(name: str, data_dir: str | None) -> sources.Dataset:
    """``mnist1d`` (4,000 / 1,000) or ``mnist1d_large`` (60,000 / 10,000), seed 42, cached in ``data_dir``."""
    return dataset(name, *SPLITS[name], SEED, data_dir)


@sources.register("mnist1d:")
def load_split(argument: str, data_dir: str | None) -> sources.Dataset:
    """``mnist1d:<train>,<test>[,<seed>]``: any seeded split, cached in ``data_dir``."""
    num_train, num_test, seed = parse(argument)
    return dataset(f"mnist1d:{argument}", num_train, num_test, seed, data_dir)
