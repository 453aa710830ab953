"""Open a dataset by name (``config.dataset``) through the registry of ``lbsgd.data.sources``.

Each source's module registers its loader with ``@sources.register``; importing them here (at the top,
nothing lazily) fills the registry before :func:`load` can be called:

=====================  ====================================================
name                   loader
=====================  ====================================================
``digits``             ``lbsgd.data.digits.load`` (embedded, nothing to download)
``mnist1d``            ``lbsgd.data.mnist1d.load`` (generated offline: 4,000 / 1,000 signals)
``mnist1d_large``      ``lbsgd.data.mnist1d.load`` (60,000 / 10,000)
``mnist1d:<tr>,<te>``  ``lbsgd.data.mnist1d.load_split`` (any seeded split: ``<train>,<test>[,<seed>]``)
``imagenet2012``       ``lbsgd.data.tfds_source.load`` (a prepared TFDS dataset)
``tfds:<name>``        ``lbsgd.data.tfds_source.load``
``folder:<path>``      ``lbsgd.data.folder.load`` (``train/<class>/*`` and ``val/<class>/*``)
=====================  ====================================================

A new source is one module with a decorated loader, imported below, and a line in the table and in ``NAMES``.
"""

from __future__ import annotations

import os

from lbsgd.data import digits, folder, mnist1d, sources, tfds_source  # noqa: F401 - importing registers their loaders
from lbsgd.data.sources import DataError

# As the unknown-name error lists them.
NAMES = (
    "'digits', 'mnist1d', 'mnist1d_large', 'mnist1d:<train>,<test>[,<seed>]', 'imagenet2012', 'tfds:<name>' "
    "or 'folder:<path>'"
)


def load(name: str, data_dir: str = "") -> sources.Dataset:
    """Open dataset ``name``: one of ``NAMES``.

    ``data_dir`` (else ``$TFDS_DATA_DIR``, else TFDS's default) is where TFDS datasets are prepared (and
    MNIST-1D cached).
    Raises :class:`DataError` (one line, with the fix) for an unknown name or a dataset that cannot be opened.
    """
    data_dir = data_dir or os.environ.get("TFDS_DATA_DIR") or None
    if name in sources.exact_loaders:
        return sources.exact_loaders[name](name, data_dir)
    kind, colon, argument = name.partition(":")
    if colon and kind in sources.prefix_loaders:
        return sources.prefix_loaders[kind](argument, data_dir)
    raise DataError(f"unknown dataset {name!r}: use {NAMES}")
