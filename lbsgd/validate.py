"""The config checks, under their older import path: see ``lbsgd.config.validate``."""

from lbsgd.config.validate import (
    check_config,
    check_dataset,
    check_fields,
    check_layout,
    check_scaling,
    check_workdir,
    resolve_b_noise,
)
from lbsgd.config.schema import AUGMENTATIONS, DATASETS, DTYPES
from lbsgd.errors import ConfigError

__all__ = [
    "AUGMENTATIONS",
    "ConfigError",
    "DATASETS",
    "DTYPES",
    "check_config",
    "check_dataset",
    "check_fields",
    "check_layout",
    "check_scaling",
    "check_workdir",
    "resolve_b_noise",
]
