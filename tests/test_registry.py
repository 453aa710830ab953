"""A new strategy is one file: this test file defines one, registers it, validates its option and trains
digits with it through the same paths as the built-in strategies."""

import dataclasses
import json

import jax
import pytest

from conftest import tiny_config
from lbsgd import errors, strategies
from lbsgd.config import schema, validate
from lbsgd.strategies import registry
from lbsgd.strategies.allreduce import Allreduce


@dataclasses.dataclass(frozen=True)
class ScaledOptions(registry.Options):
    """``config.scaled``: the factor the summed gradient is multiplied by."""

    gradient_scale: float = 1.0

    def validate(self):
        """A factor in (0, 4]."""
        if not registry.is_number_in(self.gradient_scale, 0, 4) or self.gradient_scale == 0:
            return f"config.scaled.gradient_scale={self.gradient_scale!r} must be a number in (0, 4]"
        return None


@dataclasses.dataclass(frozen=True)
class ScaledAllreduce(Allreduce):
    """Allreduce whose summed gradient is multiplied by ``gradient_scale``."""

    gradient_scale: float = 1.0

    @classmethod
    def from_config(cls, config, options, num_devices):
        """Allreduce's fields and the factor."""
        return cls(aggregation=config.aggregation, bucket_mb=config.bucket_mb, gradient_scale=options.gradient_scale)

    def reduce(self, ctx, grads):
        """The allreduce sum, scaled."""
        return jax.tree.map(lambda g: g * self.gradient_scale, super().reduce(ctx, grads))

    def describe(self):
        """Name, aggregation and factor."""
        return {**super().describe(), "gradient_scale": self.gradient_scale}


@pytest.fixture(scope="module")
def registered():
    """Register the test strategy for this module only (the registry is process-wide)."""
    registry.register(
        "scaled_allreduce", ScaledOptions, section="scaled", compare={"scaled x2": ("scaled.gradient_scale=2.0",)}
    )(ScaledAllreduce)
    yield "scaled_allreduce"
    registry.REGISTRY.pop("scaled_allreduce")


def _config(data_dir, **fields):
    config = schema.base_config()  # after registration: it has the new section
    for key, value in {**dict(tiny_config(data_dir).items()), **fields}.items():
        if key not in ("scaled",):
            config[key] = value
    return config


def test_registration_gives_the_config_section_and_the_comparison_entry(registered):
    config = schema.base_config()
    assert dict(config.scaled) == {"gradient_scale": 1.0}
    assert ("scaled x2", ("strategy=scaled_allreduce", "scaled.gradient_scale=2.0")) in registry.compare_entries()
    assert registered in registry.names()


def test_a_bad_option_value_is_one_line_through_the_shared_validation(registered, data_dir):
    config = _config(data_dir, strategy=registered)
    config.scaled.gradient_scale = 9.0
    with pytest.raises(errors.ConfigError) as e:
        validate.check_config(config)
    assert str(e.value) == "config.scaled.gradient_scale=9.0 must be a number in (0, 4]"
    config = _config(data_dir)  # allreduce, but the new strategy's option changed: refused like the built-ins'
    config.scaled.gradient_scale = 2.0
    with pytest.raises(
        errors.ConfigError, match="config.scaled.gradient_scale is an option of strategy scaled_allreduce"
    ):
        validate.check_config(config)


def test_it_trains_digits_and_scale_one_is_allreduce_exactly(registered, data_dir, tmp_path):
    from lbsgd import train

    runs = {}
    for name, strategy, scale in (("allreduce", "allreduce", 1.0), ("one", registered, 1.0), ("half", registered, 0.5)):
        config = _config(data_dir, strategy=strategy, max_steps=4)
        config.scaled.gradient_scale = scale
        validate.check_config(config)
        runs[name] = train.train_and_evaluate(config, str(tmp_path / name))
    assert runs["one"]["strategy"] == registered and runs["one"]["gradient_scale"] == 1.0
    assert json.load(open(tmp_path / "half" / "results.json"))["gradient_scale"] == 0.5
    for key in ("eval_loss", "train_loss", "eval_accuracy"):
        assert runs["one"][key] == runs["allreduce"][key]  # the same program: bitwise the same numbers
    assert runs["half"]["train_loss"] != runs["allreduce"]["train_loss"]  # the option reaches the step
    assert runs["half"]["steps"] == 4


def test_built_in_strategies_are_registered_in_table_order():
    assert registry.names()[:6] == ("allreduce", "dpsgd", "gossip_pull", "gossip_push", "easgd", "async_ps")
    assert strategies.REGISTRY is registry.REGISTRY
