"""Every config field of a run, once: its default, its type, its choices and what it means.

``base_config()`` is a ``ml_collections.ConfigDict`` of every field at its default (the digits run of
``experiments/digits.py``) plus one section per registered strategy with options
(``lbsgd.strategies.registry.sections``). Experiment files start from it and override only what
differs; ``lbsgd.config.validate`` checks a config against ``FIELDS``; the trainer reads fields as
``config.<name>`` and never supplies a default of its own.

Names follow Goyal et al. 2017: k = ``num_workers``, n = ``per_worker_batch_size``; the global minibatch
kn is derived, never set.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import ml_collections

from lbsgd import strategies
from lbsgd.models.factory import NAMES as MODEL_NAMES
from lbsgd.optim import DECAYS, LR_SCALINGS, OPTIMIZERS, TRUST_RATIOS, WARMUPS
from lbsgd.parallel.aggregators import AGGREGATIONS

DTYPES = ("float32", "bfloat16")  # float16 needs loss scaling, which lbsgd does not do: refused
AUGMENTATIONS = ("none", "shift", "inception")
DATASETS = (
    "digits",
    "mnist1d",
    "mnist1d_large",
    "mnist1d:<train>,<test>[,<seed>]",
    "imagenet2012",
    "tfds:<name>",
    "folder:<path>",
)
NONFINITE_POLICIES = ("stop", "skip")  # config.on_nonfinite
STEMS = ("", "imagenet", "space_to_depth", "small")  # '' = the model's own stem


def _positive(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        return f"config.{name}={value!r} must be a positive number; set --config.{name}=<value > 0>"


def _positive_number(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        return f"config.{name}={value!r} must be a positive number; set --config.{name}=<value > 0>"


def _zero_or_count(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return f"config.{name}={value!r} must be 0 (automatic) or a positive integer"


def _integer(name, value):
    if isinstance(value, bool) or not isinstance(value, int):
        return f"config.{name}={value!r} must be an integer"


def _boolean(name, value):
    if not isinstance(value, bool):
        return f"config.{name}={value!r} must be True or False"


def _string(name, value):
    if not isinstance(value, str):
        return f"config.{name}={value!r} must be a string"


def _epochs(name, value):
    ok = isinstance(value, (tuple, list)) and all(
        not isinstance(v, bool) and isinstance(v, (int, float)) and v >= 0 for v in value
    )
    if not ok:
        return f"config.{name}={value!r} must be a tuple of epochs >= 0, e.g. --config.{name}='(30, 60, 80)'"


def in_range(low: float, high: float, high_open: bool = False) -> Callable:
    """A check: a finite number in [low, high] (or [low, high) with ``high_open``)."""

    def check(name, value):
        ok = (
            not isinstance(value, bool)
            and isinstance(value, (int, float))
            and math.isfinite(value)
            and low <= value
            and (value < high if high_open else value <= high)
        )
        if not ok:
            return (
                f"config.{name}={value!r} must be a number in [{low}, {high}{')' if high_open else ']'}; "
                f"set --config.{name}=<value in range>"
            )

    return check


def _dataset(name, value):
    known = isinstance(value, str) and (
        value in ("digits", "mnist1d", "mnist1d_large", "imagenet2012")
        or (value.startswith(("tfds:", "folder:", "mnist1d:")) and len(value.split(":", 1)[1]) > 0)
    )
    if not known:
        return f"config.{name}={value!r} is unknown; use one of: {', '.join(DATASETS)}"


def _num_devices(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return f"config.{name}={value!r} must be 0 (all devices) or a positive count"


@dataclasses.dataclass(frozen=True)
class Field:
    """One config field: name, default, meaning, and either its choices or a check (one line or None)."""

    name: str
    default: Any
    doc: str
    choices: tuple | None = None
    check: Callable[[str, Any], str | None] | None = None

    def problem(self, value) -> str | None:
        """One line saying what is wrong with ``value`` and how to fix it, or None."""
        if self.choices is not None:
            if value not in self.choices:
                shown = [repr(c) if c == "" else str(c) for c in self.choices]
                return f"config.{self.name}={value!r} is unknown; use one of: {', '.join(shown)}"
            return None
        return self.check(self.name, value) if self.check else None


F = Field
FIELDS: tuple[Field, ...] = (
    # Data.
    F("dataset", "digits", "'digits' | 'mnist1d' | 'mnist1d_large' | 'mnist1d:<train>,<test>' | 'imagenet2012' | "
      "'tfds:<name>' | 'folder:<path>'", check=_dataset),
    F("data_dir", "", "TFDS data directory; '' = $TFDS_DATA_DIR or ~/tensorflow_datasets", check=_string),
    F("augment", "shift", "'none' | 'shift' (digits) | 'inception' (random-size crop + flip)", AUGMENTATIONS),
    F("image_size", 8, "input height and width in pixels; for signals (MNIST-1D) the length", check=_positive),
    F("validation_fraction", 0.0, ">0: evaluate on this fraction of the training split, held out (lbsgd.data.holdout), "
      "not on the test split", check=in_range(0.0, 1.0, high_open=True)),
    # Workers (Goyal's k and n).
    F("num_workers", 8, "k: workers; the global minibatch is k*n", check=_positive),
    F("per_worker_batch_size", 16, "n: examples per worker per step (BatchNorm batch, §2.3)", check=_positive),
    F("bn_group_size", 1, "g: BatchNorm statistics over the g*n examples of g workers; divides k", check=_positive),
    F("num_devices", 0, "devices to use; 0 = all of every process; must divide k", check=_num_devices),
    F("accumulation_steps", 1, "microsteps a device runs its k/d workers in; 0 = automatic", check=_zero_or_count),
    F("max_device_batch", 0, "with accumulation_steps=0: most examples per microstep", check=_zero_or_count),
    # How workers combine (lbsgd.strategies).
    F("strategy", "allreduce", "how workers combine: a name registered in lbsgd.strategies", check=_string),
    F("aggregation", "psum", "allreduce's sum: 'psum' | 'ring' | 'halving_doubling' (§4)", AGGREGATIONS),
    F("bucket_mb", 25.0, "ring/halving-doubling bucket size in MiB", check=_positive_number),
    F("topology", "", "dpsgd/gossip graph; '' = the strategy's default", check=_string),
    # Model.
    F("model", "resnet8", "a ResNet of lbsgd.models.resnet (images) or resnet1d (signals)", MODEL_NAMES),
    F("model_width", 16, "channels of the first stage; 0 = the model's default", check=_zero_or_count),
    F("model_stem", "", "'' (the model's own) | 'imagenet' | 'space_to_depth' (same function, MLPerf's layout) | 'small'", STEMS),
    F("dtype", "float32", "compute dtype: 'float32' | 'bfloat16' (parameters stay float32)", check=_string),
    F("label_smoothing", 0.0, "label smoothing of the cross-entropy", check=in_range(0.0, 1.0, high_open=True)),
    # Optimizer (lbsgd.optim.factory).
    F("optimizer", "goyal_sgd", "'goyal_sgd' | 'lars' | 'sgd'", OPTIMIZERS),
    F("lars_trust_ratio", "optax", "lars: 'optax' (||g + wd w||) | 'paper' (||g|| + wd ||w||)", TRUST_RATIOS),
    F("trust_coefficient", 0.001, "lars: the trust coefficient eta of You et al.", check=_positive_number),
    F("base_learning_rate", 0.4, "eta per base_batch_size examples (§2.1)", check=_positive_number),
    F("base_batch_size", 256, "the batch size eta is given for", check=_positive),
    F("lr_scaling", "linear", "'linear' (eta*kn/256) | 'sqrt' | 'saturating' (McCandlish et al.)", LR_SCALINGS),
    F("b_noise", 0.0, "saturating: the gradient noise scale B_noise in examples", check=in_range(0.0, math.inf, True)),
    F("b_noise_from", "", "saturating: a workdir or results.json that measured B_noise", check=_string),
    F("lr_max", 0.0, "saturating: eta_max; 0 = eta * b_noise / 256", check=in_range(0.0, math.inf, True)),
    F("warmup", "gradual", "'gradual' | 'constant' | 'none' (§2.2)", WARMUPS),
    F("warmup_epochs", 2, "epochs of warmup", check=in_range(0.0, math.inf, True)),
    F("decay", "cosine", "'step' | 'cosine' | 'none'", DECAYS),
    F("decay_epochs", (), "step decay: the epochs at which the rate is multiplied by decay_factor", check=_epochs),
    F("decay_factor", 0.1, "step decay: the factor", check=in_range(0.0, 1.0)),
    F("momentum", 0.9, "momentum m (eq. 10)", check=in_range(0.0, 1.0, high_open=True)),
    F("nesterov", True, "Nesterov momentum", check=_boolean),
    F("weight_decay", 5e-4, "L2 weight decay lambda (Remark 1), not on BN or biases", check=in_range(0.0, 1.0)),
    F("momentum_correction", True, "scale the momentum by eta_{t+1}/eta_t (Remark 2)", check=_boolean),
    F("num_epochs", 20, "epochs to train", check=_positive),
    # Bookkeeping.
    F("seed", 0, "initial parameters and data order (Remark 4)", check=_integer),
    F("eval_batch_size", 128, "examples per eval step over all devices", check=_positive),
    F("log_every_steps", 20, "steps between training-metric lines", check=_positive),
    F("eval_every_epochs", 10, "epochs between evaluations; 0 = at the end only", check=in_range(0.0, math.inf, True)),
    F("checkpoint_every_steps", 200, "steps between checkpoints", check=_positive),
    F("max_steps", -1, ">0: stop after this many steps (smoke tests)", check=_integer),
    F("steps_per_dispatch", 1, "steps run on the device per call (lax.scan); logging etc. rounded to it", check=_positive),
    F("noise_scale", False, "estimate the gradient noise scale B_simple (allreduce, k >= 2)", check=_boolean),
    F("noise_scale_decay", 0.99, "decay per step of its moving average", check=in_range(0.0, 1.0, high_open=True)),
    F("target_accuracy", 0.0, ">0: results.json's seconds_to_target", check=in_range(0.0, 1.0)),
    F("on_nonfinite", "stop", "NaN/inf loss or gradient: 'stop' (exit 3) | 'skip' the update", NONFINITE_POLICIES),
    F("max_consecutive_nonfinite", 10, "skip: stop after this many skipped steps in a row", check=_positive),
)
del F

BY_NAME = {f.name: f for f in FIELDS}


def base_config() -> ml_collections.ConfigDict:
    """Every field at its default, and every registered strategy's option section at its defaults."""
    c = ml_collections.ConfigDict()
    for field in FIELDS:
        setattr(c, field.name, field.default)
    for section, defaults in strategies.registry.sections().items():
        setattr(c, section, ml_collections.ConfigDict(dict(defaults)))
    return c


def names() -> tuple[str, ...]:
    """Every top-level field and option section a config has."""
    return tuple(BY_NAME) + tuple(strategies.registry.sections())
