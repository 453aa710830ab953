"""ResNet v1.5 in flax.linen, initialised as in Goyal et al. §5.1.

* v1.5: in a bottleneck block the stride sits on the 3x3 convolution, not the first 1x1.
* Two stems: ``'imagenet'`` (7x7/2 conv + 3x3/2 max-pool, for 224x224 inputs) and ``'small'``
  (one 3x3/1 conv, no pool, for 8x8 .. 32x32 inputs).
* Convolutions: He-normal init (fan_out, as in He et al. 2015); the final fully connected layer:
  weights N(0, 0.01²), bias 0 (Goyal §5.1).
* Zero-γ: the last BatchNorm γ of every residual block starts at 0, so each block starts as the
  identity (Goyal §5.1, "we initialize γ = 0 for the last BN layer of each residual block").
* BatchNorm momentum 0.9, ε = 1e-5. In training mode a BN layer normalises over the batch it is
  given; the trainer hands each worker's n examples separately (vmap over workers), so batch
  statistics are per worker (Goyal §2.3: "BN statistics computed over n examples").

This module imports only jax and flax.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

ModuleDef = Any

#: name -> (block kind, stage sizes, stem)
ARCHITECTURES = {
    # CIFAR-style 6n+2 networks (He et al. 2016 §4.2), for small images.
    "resnet8": ("basic", (1, 1, 1), "small"),
    "resnet14": ("basic", (2, 2, 2), "small"),
    "resnet20": ("basic", (3, 3, 3), "small"),
    "resnet32": ("basic", (5, 5, 5), "small"),
    "resnet56": ("basic", (9, 9, 9), "small"),
    # ImageNet networks (He et al. 2016 Table 1).
    "resnet18": ("basic", (2, 2, 2, 2), "imagenet"),
    "resnet34": ("basic", (3, 4, 6, 3), "imagenet"),
    "resnet50": ("bottleneck", (3, 4, 6, 3), "imagenet"),
    "resnet101": ("bottleneck", (3, 4, 23, 3), "imagenet"),
    "resnet152": ("bottleneck", (3, 8, 36, 3), "imagenet"),
}

conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")  # He et al. 2015
dense_init = nn.initializers.normal(stddev=0.01)  # Goyal §5.1


def _add_shortcut(block: nn.Module, residual, y):
    """relu(shortcut(x) + F(x)): identity, or a strided 1x1 projection + BN when the shape changes."""
    if residual.shape != y.shape:
        residual = block.conv(y.shape[-1], (1, 1), (block.strides, block.strides), name="proj_conv")(residual)
        residual = block.norm(name="proj_bn")(residual)
    return nn.relu(residual + y)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with an identity (or 1x1 projection) shortcut."""

    filters: int
    strides: int
    conv: ModuleDef
    norm: ModuleDef

    @nn.compact
    def __call__(self, x):
        residual = x
        y = self.conv(self.filters, (3, 3), (self.strides, self.strides))(x)
        y = nn.relu(self.norm()(y))
        y = self.conv(self.filters, (3, 3))(y)
        y = self.norm(scale_init=nn.initializers.zeros)(y)  # zero-γ
        return _add_shortcut(self, residual, y)


class BottleneckBlock(nn.Module):
    """1x1 → 3x3 (strided, v1.5) → 1x1 (4x filters) with an identity or projection shortcut."""

    filters: int
    strides: int
    conv: ModuleDef
    norm: ModuleDef

    @nn.compact
    def __call__(self, x):
        residual = x
        y = nn.relu(self.norm()(self.conv(self.filters, (1, 1))(x)))
        y = self.conv(self.filters, (3, 3), (self.strides, self.strides))(y)
        y = nn.relu(self.norm()(y))
        y = self.conv(self.filters * 4, (1, 1))(y)
        y = self.norm(scale_init=nn.initializers.zeros)(y)  # zero-γ
        return _add_shortcut(self, residual, y)


class ResNet(nn.Module):
    """ResNet v1.5 classifier.

    Attributes:
      stage_sizes: blocks per stage.
      block: 'basic' or 'bottleneck'.
      num_classes: output logits.
      stem: 'imagenet' (7x7/2 conv + max-pool) or 'small' (3x3/1 conv).
      width: filters of the first stage (doubles every stage).
      dtype: compute dtype (e.g. bfloat16); parameters and BN statistics stay float32.
      bn_momentum: running-average momentum of BatchNorm (Goyal: 0.9).
    """

    stage_sizes: Sequence[int]
    block: str = "bottleneck"
    num_classes: int = 1000
    stem: str = "imagenet"
    width: int = 64
    dtype: Any = jnp.float32
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x, train: bool = True):
        conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype, kernel_init=conv_init)
        norm = functools.partial(
            nn.BatchNorm,
            use_running_average=not train,
            momentum=self.bn_momentum,
            epsilon=self.bn_epsilon,
            dtype=self.dtype,
            param_dtype=jnp.float32,
        )
        block_cls = {"basic": BasicBlock, "bottleneck": BottleneckBlock}[self.block]
        x = x.astype(self.dtype)
        if self.stem == "imagenet":
            x = conv(self.width, (7, 7), (2, 2), padding=[(3, 3), (3, 3)], name="stem_conv")(x)
            x = nn.relu(norm(name="stem_bn")(x))
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
        elif self.stem == "small":
            x = conv(self.width, (3, 3), name="stem_conv")(x)
            x = nn.relu(norm(name="stem_bn")(x))
        else:
            raise ValueError(f"unknown stem {self.stem!r}: use 'imagenet' or 'small'")
        for i, num_blocks in enumerate(self.stage_sizes):
            for j in range(num_blocks):
                strides = 2 if i > 0 and j == 0 else 1
                x = block_cls(self.width * 2**i, strides, conv=conv, norm=norm)(x)
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dense(self.num_classes, kernel_init=dense_init, dtype=self.dtype, name="fc")(x)
        return x.astype(jnp.float32)


def create_model(
    name: str,
    *,
    num_classes: int,
    dtype: Any = jnp.float32,
    width: int | None = None,
    stem: str | None = None,
    bn_momentum: float = 0.9,
) -> ResNet:
    """Build a ResNet by name (see ``ARCHITECTURES``); ``stem``/``width`` override the defaults."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown model {name!r}: use one of {', '.join(ARCHITECTURES)}")
    block, stages, default_stem = ARCHITECTURES[name]
    stem = stem or default_stem
    if width is None:
        width = 16 if default_stem == "small" else 64
    return ResNet(
        stage_sizes=stages,
        block=block,
        num_classes=num_classes,
        stem=stem,
        width=width,
        dtype=dtype,
        bn_momentum=bn_momentum,
    )
