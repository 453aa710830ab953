"""The model of a run from its config: ``config.model`` at ``config.dtype`` (the config glue of
``lbsgd.models``; the models themselves know nothing of configs).

Two families, by the inputs they take: the ResNets of ``lbsgd.models.resnet`` read images
``[H, W, C]``; the 1-D ResNets of ``lbsgd.models.resnet1d`` read signals ``[L, C]`` (MNIST-1D).
``config.image_size`` is the side of an image, or the length of a signal.
"""

from __future__ import annotations

import jax.numpy as jnp

from lbsgd.models import resnet, resnet1d

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
NAMES = tuple(resnet.ARCHITECTURES) + tuple(resnet1d.ARCHITECTURES)  # every config.model


def input_kind(name: str) -> str:
    """What model ``name`` reads: 'signal' (a 1-D ResNet) or 'image'."""
    return "signal" if name in resnet1d.ARCHITECTURES else "image"


def input_shape(name: str, size: int, channels: int) -> tuple[int, ...]:
    """One example's shape for model ``name``: ``(size, size, channels)`` for an image model,
    ``(size, channels)`` for a signal model (``size`` = ``config.image_size``)."""
    return (size, channels) if input_kind(name) == "signal" else (size, size, channels)


def from_config(config, num_classes: int):
    """The model named by ``config.model`` at ``config.dtype``, with ``config.model_width`` (0: the
    model's default) and ``config.model_stem`` ('': the model's own; 1-D ResNets have one stem only)."""
    width = config.model_width or None
    if input_kind(config.model) == "signal":
        if config.model_stem not in ("", "small"):
            raise ValueError(f"config.model_stem={config.model_stem!r} is for 2-D ResNets; {config.model} has one stem")
        return resnet1d.create_model(config.model, num_classes=num_classes, dtype=DTYPES[config.dtype], width=width)
    return resnet.create_model(
        config.model,
        num_classes=num_classes,
        dtype=DTYPES[config.dtype],
        width=width,
        stem=config.model_stem or None,
    )
