"""The model of a run from its config: ``config.model`` at ``config.dtype`` (the config glue of
``lbsgd.models``; the models themselves know nothing of configs)."""

from __future__ import annotations

import jax.numpy as jnp

from lbsgd.models import resnet

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def from_config(config, num_classes: int):
    """The ResNet named by ``config.model`` at ``config.dtype``, with ``config.model_width`` (0: the
    model's default) and ``config.model_stem`` ('': the model's own)."""
    return resnet.create_model(
        config.model,
        num_classes=num_classes,
        dtype=DTYPES[config.dtype],
        width=config.model_width or None,
        stem=config.model_stem or None,
    )
