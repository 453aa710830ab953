"""A run's configuration: ``schema`` (every field, its default, type and choices, once) and ``validate``
(pure checks, each failure one line). ``base_config()`` is every field at its default."""

from lbsgd.config.schema import FIELDS, base_config

__all__ = ["FIELDS", "base_config"]
