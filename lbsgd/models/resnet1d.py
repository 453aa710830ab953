"""A 1-D ResNet in flax.linen for signals ``[batch, length, channels]`` (MNIST-1D: length 40, one channel).

The residual blocks are ``lbsgd.models.resnet``'s own (``BasicBlock``, ``BottleneckBlock``) given a
convolution over one axis (:func:`conv1d`: the block's k x k kernel and s x s stride become k and s), so
every convention is that of the 2-D ResNet (He et al. 2016, initialised as in Goyal et al. 2017 §5.1):
He-normal (fan_out) convolutions without bias, zero-γ on the last BatchNorm of every block, the final
fully connected layer N(0, 0.01²) with bias 0, BatchNorm momentum 0.9 and ε = 1e-5, per-worker batch
statistics (the trainer hands each worker's n examples separately), and ``bn_axis_name`` /
``bn_axis_index_groups`` for BN groups spanning devices.

Layout: a stem convolution (kernel ``stem_kernel``, stride 1) + BN + ReLU, stages of basic blocks whose
width doubles and whose length halves at every stage after the first, global average pooling over the
length, the classifier. The CIFAR-style 6n+2 depths of He et al. 2016 §4.2 name them (``ARCHITECTURES``).

This module imports only jax and flax (and ``lbsgd.models.resnet``).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from lbsgd.models.resnet import BasicBlock, BottleneckBlock, batch_norm, conv_init, dense_init

#: name -> (block kind, stage sizes)
ARCHITECTURES = {
    "resnet1d_8": ("basic", (1, 1, 1)),
    "resnet1d_14": ("basic", (2, 2, 2)),
    "resnet1d_20": ("basic", (3, 3, 3)),
}
DEFAULT_WIDTH = 32


def conv1d(features: int, kernel_size, strides=1, *, name=None, **kwargs) -> nn.Conv:
    """``nn.Conv`` over the length axis, called as the 2-D blocks call theirs: a square kernel ``(k, k)``
    and stride ``(s, s)`` become ``(k,)`` and ``(s,)``; ``kwargs`` (bias, dtype, init) pass through."""
    first = lambda v: (v[0],) if isinstance(v, (tuple, list)) else (v,)
    return nn.Conv(features, first(kernel_size), first(strides), name=name, **kwargs)


class ResNet1D(nn.Module):
    """1-D ResNet classifier on ``[batch, length, channels]``.

    Attributes:
      stage_sizes: blocks per stage.
      block: 'basic' or 'bottleneck' (``lbsgd.models.resnet``'s blocks, on one axis).
      num_classes: output logits.
      width: filters of the first stage (doubles every stage).
      stem_kernel: kernel length of the stem convolution.
      dtype: compute dtype; parameters and BN statistics stay float32.
      bn_momentum, bn_epsilon: BatchNorm's (Goyal: momentum 0.9).
      bn_axis_name, bn_axis_index_groups: as ``lbsgd.models.resnet.ResNet``'s (BN groups spanning devices).
    """

    stage_sizes: Sequence[int]
    block: str = "basic"
    num_classes: int = 10
    width: int = DEFAULT_WIDTH
    stem_kernel: int = 5
    dtype: Any = jnp.float32
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    bn_axis_name: str | None = None
    bn_axis_index_groups: Any = None

    @nn.compact
    def __call__(self, x, train: bool = True):
        conv = functools.partial(conv1d, use_bias=False, dtype=self.dtype, kernel_init=conv_init)
        norm = batch_norm(self, train)
        block_cls = {"basic": BasicBlock, "bottleneck": BottleneckBlock}[self.block]
        x = conv(self.width, self.stem_kernel, name="stem_conv")(x.astype(self.dtype))
        x = nn.relu(norm(name="stem_bn")(x))
        for i, num_blocks in enumerate(self.stage_sizes):
            for j in range(num_blocks):
                strides = 2 if i > 0 and j == 0 else 1
                x = block_cls(self.width * 2**i, strides, conv=conv, norm=norm)(x)
        x = jnp.mean(x, axis=1)
        x = nn.Dense(self.num_classes, kernel_init=dense_init, dtype=self.dtype, name="fc")(x)
        return x.astype(jnp.float32)


def create_model(
    name: str, *, num_classes: int, dtype: Any = jnp.float32, width: int | None = None, bn_momentum: float = 0.9
) -> ResNet1D:
    """Build a 1-D ResNet by name (see ``ARCHITECTURES``); ``width`` overrides ``DEFAULT_WIDTH``."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown model {name!r}: use one of {', '.join(ARCHITECTURES)}")
    block, stages = ARCHITECTURES[name]
    return ResNet1D(
        stage_sizes=stages,
        block=block,
        num_classes=num_classes,
        width=width or DEFAULT_WIDTH,
        dtype=dtype,
        bn_momentum=bn_momentum,
    )
