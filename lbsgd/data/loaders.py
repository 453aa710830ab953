"""Open a dataset by name (``config.dataset``) through the registry of ``lbsgd.data.sources``.

Each source's module registers its loader with ``@sources.register``; importing them here (at the top,
nothing lazily) fills the registry before :func:`load` can be called:

=====================  ====================================================
name                   loader
=====================  ====================================================
``digits``             ``lbsgd.data.digits.load`` (embedded, nothing to download)
``imagenet2012``       ``lbsgd.data.tfds_source.load`` (a prepared TFDS dataset)
``tfds:<name>``        ``lbsgd.data.tfds_source.load``
``folder:<path>``      ``lbsgd.data.folder.load`` (``train/<class>/*`` and ``val/<class>/*``)
=====================  ====================================================

A new source is one module with a decorated loader, imported below, and a line in the table and in ``NAMES``.
"""

from __future__ import annotations

import os

from lbsgd.data import digits, folder, sources, tfds_source  # noqa: F401 - importing registers their loaders
from lbsgd.data.sources import DataError

NAMES = "'digits', 'imagenet2012', 'tfds:<name>' or 'folder:<path>'"  # as the unknown-name error lists them


def load(name: str, data_dir: str = "") -> sources.Dataset:
    """Open dataset ``name``: 'digits', 'imagenet2012', 'tfds:<name>' or 'folder:<path>'.

    ``data_dir`` (else ``$TFDS_DATA_DIR``, else TFDS's default) is where TFDS datasets are prepared.
    Raises :class:`DataError` (one line, with the fix) for an unknown name or a dataset that cannot be opened.
    """
    data_dir = data_dir or os.environ.get("TFDS_DATA_DIR") or None
    if name in sources.exact_loaders:
        return sources.exact_loaders[name](name, data_dir)
    kind, colon, argument = name.partition(":")
    if colon and kind in sources.prefix_loaders:
        return sources.prefix_loaders[kind](argument, data_dir)
    raise DataError(f"unknown dataset {name!r}: use {NAMES}")
