"""The Flax ImageNet example as a peer of ``bench step``: find it, import it by path, time its ``train_step``.

Its ``train.py`` and ``models.py`` come from a checkout of google/flax (``examples/imagenet``); the step is
pmapped over the same devices, on the same global batch and model (``FLAX_MODELS``), as lbsgd's.
Errors are ``lbsgd.errors.PeerError`` (one line). JAX is imported only inside the functions that run it,
so ``bench step`` can check ``--flax_dir`` before JAX starts.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
from typing import Sequence

import ml_collections

from lbsgd.bench import common
from lbsgd.bench.flops import jaxpr_flops
from lbsgd.errors import PeerError

#: lbsgd model name -> the Flax ImageNet example's ``models.<name>`` (the same ResNet v1.5).
FLAX_MODELS = {
    "resnet18": "ResNet18",
    "resnet34": "ResNet34",
    "resnet50": "ResNet50",
    "resnet101": "ResNet101",
    "resnet152": "ResNet152",
}


def find_flax_example(flax_dir: str) -> str:
    """The folder holding the Flax ImageNet example's train.py and models.py: ``flax_dir`` itself or
    ``flax_dir/examples/imagenet`` (a whole google/flax checkout); raises PeerError if neither has them."""
    for d in (flax_dir, os.path.join(flax_dir, "examples", "imagenet")):
        if all(os.path.isfile(os.path.join(d, f)) for f in ("train.py", "models.py")):
            return d
    raise PeerError(
        f"--flax_dir={flax_dir!r} has no train.py and models.py (point it at a checkout of google/flax, "
        "or at its examples/imagenet)"
    )


def _load_by_path(name: str, path: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _hide_gpus_from_tensorflow() -> None:
    """Keep TensorFlow (which the example imports) off the GPUs, as the example's main.py does."""
    try:
        import tensorflow as tf  # optional and heavy: only where the example runs on a GPU

        tf.config.set_visible_devices([], "GPU")
    except Exception:  # noqa: BLE001 - no TensorFlow: train.py's own import will say so
        pass


def load_flax_example(flax_dir: str):
    """Import the Flax ImageNet example's ``train`` and ``models`` modules by path: ``(train, models)``.

    Its train.py does ``import input_pipeline`` and ``import models``; those names are bound to the
    example's own files while it loads and restored afterwards. TensorFlow (which it imports) is kept
    off the GPUs, as the example's main.py does. Raises PeerError (one line) if it cannot be imported.
    """
    import jax  # not at module level: bench step imports this module before JAX may start

    folder = find_flax_example(flax_dir)
    if jax.default_backend() == "gpu":
        _hide_gpus_from_tensorflow()
    saved = {name: sys.modules.get(name) for name in ("models", "input_pipeline")}
    try:
        models = _load_by_path("models", os.path.join(folder, "models.py"))
        if os.path.isfile(os.path.join(folder, "input_pipeline.py")):
            _load_by_path("input_pipeline", os.path.join(folder, "input_pipeline.py"))
        train = _load_by_path("lbsgd_bench_flax_imagenet_train", os.path.join(folder, "train.py"))
    except Exception as e:  # noqa: BLE001 - report any import failure in one line
        raise PeerError(f"cannot import the Flax example from {folder}: {type(e).__name__}: {e}") from None
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    return train, models


def flax_program(flax_train, flax_models, *, model: str, width: int, dtype: str, num_classes: int, devices, images, labels):
    """The Flax ImageNet example's own ``train_step``, pmapped over ``devices`` as its ``train_and_evaluate``
    does it (``in_axes=(None, 0)``, axis 'batch'), with its initial state and the global batch
    ``images``/``labels`` split evenly over the devices: ``(p_train_step, state, batch)``. The model is
    ``models.<FLAX_MODELS[model]>`` at ``dtype`` with ``num_filters=width``; its optimizer is the example's
    (SGD, Nesterov momentum, L2 in the loss); no loss scaling (``half_precision`` off: ``dtype`` is set
    directly)."""
    import jax  # not at module level: bench step imports this module before JAX may start
    import jax.numpy as jnp

    devices = list(devices)
    d = len(devices)
    global_batch, image_size = images.shape[0], images.shape[1]
    flax_train.NUM_CLASSES = num_classes  # its loss one-hots against this module constant
    net = getattr(flax_models, FLAX_MODELS[model])(num_classes=num_classes, dtype=jnp.dtype(dtype), num_filters=width)
    config = ml_collections.ConfigDict(
        dict(half_precision=False, momentum=0.9, learning_rate=0.1, warmup_epochs=5.0, num_epochs=100.0)
    )
    lr_fn = flax_train.create_learning_rate_fn(config, 0.1 * global_batch / 256, 1000)
    with jax.default_device(devices[0]):
        state = flax_train.create_train_state(jax.random.key(0), config, net, image_size, lr_fn)
    p_train_step = jax.pmap(
        functools.partial(flax_train.train_step, learning_rate_fn=lr_fn),
        in_axes=(None, 0),
        out_axes=(None, 0),
        axis_name="batch",
        devices=devices,
    )
    to_devices = jax.pmap(lambda x: x, devices=devices)
    batch = {
        "image": to_devices(images.reshape(d, global_batch // d, *images.shape[1:])),
        "label": to_devices(labels.reshape(d, global_batch // d)),
    }
    return p_train_step, state, batch


def measure_flax_step(
    flax_train,
    flax_models,
    *,
    model: str,
    width: int,
    dtype: str,
    num_classes: int,
    devices: Sequence,
    images,
    labels,
    repeats: int,
    warmup: int = 1,
    count_flops: bool = False,
    in_flight: int = 1,
) -> dict:
    """Time the Flax ImageNet example's own ``train_step`` (``flax_program``) on ``images``/``labels`` over
    ``devices``. Timed like ``harness.measure_step`` (``in_flight`` steps a window); returns ``{'times',
    'compile_s', 'step_flops', 'loss'}``.
    """
    import jax  # not at module level: bench step imports this module before JAX may start

    p_train_step, state, batch = flax_program(
        flax_train, flax_models, model=model, width=width, dtype=dtype, num_classes=num_classes, devices=devices,
        images=images, labels=labels,
    )  # fmt: skip
    compiled, compile_s = common.compile_timed(p_train_step, state, batch)
    flops = jaxpr_flops(jax.make_jaxpr(p_train_step)(state, batch).jaxpr) if count_flops else 0.0
    carry = {"state": state}

    def one_step():
        carry["state"], carry["metrics"] = compiled(carry["state"], batch)

    def wait():
        jax.block_until_ready((carry["state"], carry["metrics"]))

    times = common.time_steps(one_step, wait, repeats=repeats, warmup=warmup, in_flight=in_flight)
    return {"times": times, "compile_s": compile_s, "step_flops": flops, "loss": float(carry["metrics"]["loss"][0])}
