"""The config schema: every field once, every experiment file complete, one-line errors."""

import pathlib

import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

from lbsgd import errors, strategies
from lbsgd.config import schema, validate

REPO = pathlib.Path(__file__).resolve().parent.parent
EXPERIMENTS = sorted(p for p in (REPO / "experiments").glob("*.py") if p.name != "__init__.py")


def _load(path, *overrides):
    """The config of ``--config=path`` with ``--config.X=Y`` overrides, parsed as lbsgd.main parses it."""
    argv = ["prog", f"--config={path}", *overrides]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True, sys_argv=argv)
    values(argv)
    return values.config


def test_schema_defaults_are_valid_and_every_field_is_documented():
    config = schema.base_config()
    validate.check_config(config)
    assert len({f.name for f in schema.FIELDS}) == len(schema.FIELDS)
    assert all(f.doc for f in schema.FIELDS)
    for section, defaults in strategies.registry.sections().items():
        assert dict(config[section]) == defaults


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_every_experiment_has_every_field_and_passes_validation(path):
    config = _load(path)
    assert set(config.keys()) == set(schema.names())
    validate.check_config(config)


def test_noise_scale_can_be_switched_on_for_imagenet():
    config = _load(REPO / "experiments" / "imagenet_256.py", "--config.noise_scale=True")
    assert config.noise_scale is True and config.num_workers == 8
    validate.check_config(config)  # allreduce with k = 8: the estimate's preconditions hold


def test_imagenet_configs_override_only_what_differs_from_the_base():
    """Every field an experiment leaves alone is the schema's default (one source of truth)."""
    base = schema.base_config()
    k256 = _load(REPO / "experiments" / "imagenet_256.py")
    k8k = _load(REPO / "experiments" / "imagenet_8k.py")
    assert k256.model == "resnet50" and k256.per_worker_batch_size == 32 and k256.decay_epochs == (30, 60, 80)
    assert k8k.num_workers == 256 and k8k.base_learning_rate == k256.base_learning_rate
    assert k256.label_smoothing == base.label_smoothing and k256.momentum == base.momentum


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("num_workers", 0, "config.num_workers=0 must be a positive number"),
        ("momentum", 1.0, "config.momentum=1.0 must be a number in [0.0, 1.0)"),
        ("model_stem", "tiny", "config.model_stem='tiny' is unknown; use one of: '', imagenet, space_to_depth, small"),
        ("nesterov", "yes", "config.nesterov='yes' must be True or False"),
        ("decay_epochs", (30, "x"), "config.decay_epochs=(30, 'x') must be a tuple of epochs"),
        ("dtype", "float16", "needs loss scaling"),
        ("dtype", "float64", "config.dtype='float64' is unknown"),
    ],
)
def test_a_bad_value_is_one_line_naming_the_field(field, value, message):
    config = schema.base_config().to_dict()  # a plain dict: no ConfigDict type lock, as a user's file may give
    config[field] = value
    config = ml_collections.ConfigDict(config, type_safe=False)
    with pytest.raises(errors.ConfigError) as e:
        validate.check_config(config)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_an_unknown_or_missing_field_is_one_line():
    config = schema.base_config()
    config.num_workerz = 8
    with pytest.raises(
        errors.ConfigError, match=r"config.num_workerz is not a config field; did you mean num_workers\?"
    ):
        validate.check_config(config)
    config = schema.base_config()
    del config["seed"]
    with pytest.raises(errors.ConfigError, match="config.seed is missing"):
        validate.check_config(config)
