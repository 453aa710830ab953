"""ResNet v1.5 in flax.linen, initialised as in Goyal et al. §5.1.

* v1.5: in a bottleneck block the stride sits on the 3x3 convolution, not the first 1x1.
* Stems: ``'imagenet'`` (7x7/2 conv + 3x3/2 max-pool, for 224x224 inputs), ``'space_to_depth'`` (the
  same function of the same parameters, computed as MLPerf's TPU ResNet-50 does: a 4x4/1 convolution on
  a 2x2 space-to-depth input of 12 channels, ``SpaceToDepthStem``) and ``'small'`` (one 3x3/1 conv, no
  pool, for 8x8 .. 32x32 inputs).
* Convolutions: He-normal init (fan_out, as in He et al. 2015); the final fully connected layer:
  weights N(0, 0.01²), bias 0 (Goyal §5.1).
* Zero-γ: the last BatchNorm γ of every residual block starts at 0, so each block starts as the
  identity (Goyal §5.1, "we initialize γ = 0 for the last BN layer of each residual block").
* On the CPU backend, convolutions with at most ``SMALL_CONV_POSITIONS`` output positions per image and
  ≥ 128 input channels (the 2x2 last stage of ResNet-18/50 at 64x64) are computed as kh·kw
  matrix products of shifted inputs (``conv_general_dilated``): the same sums, 1e-6 apart, where XLA's
  CPU convolution is pathologically slow. Every other backend and shape uses ``lax.conv_general_dilated``.
* BatchNorm momentum 0.9, ε = 1e-5. In training mode a BN layer normalises over the batch it is
  given; the trainer hands each worker's n examples separately (vmap over workers), so batch
  statistics are per worker (Goyal §2.3: "BN statistics computed over n examples"), or each BN group's
  g·n examples together. ``bn_axis_name``/``bn_axis_index_groups`` (default: none) make every BN layer
  average its batch mean and mean square over that named axis (``lax.pmean``, Flax's own
  ``axis_name``), for a BN group whose examples lie on several devices.

This module imports only jax and flax.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

ModuleDef = Any

#: On CPU, a convolution with at most this many output positions (H_out·W_out) per image is computed as
#: shifted matrix products. Measured on a 2-core CPU, fwd+bwd, 128 images (float32): 3x3 conv with 512
#: channels at 2x2 3,133 ms as XLA's convolution vs 54 ms as 9 products (58x); 256->512 stride 2 at 4x4
#: 378 vs 27 ms; 128 channels at 2x2 44 vs 6 ms; but 4x4 outputs 59 vs 71 ms (slower), hence 4. Below
#: ``SMALL_CONV_MIN_CHANNELS`` input channels the gain is a few ms (64 at 2x2: 6.6 vs 3.0 ms) and the
#: unrolled products cost more compilation than they save (the digits ResNet-8: +1.2 s), so XLA's stays.
SMALL_CONV_POSITIONS = 4
SMALL_CONV_MIN_CHANNELS = 128
_NHWC = ("NHWC", "HWIO", "NHWC")


def conv_general_dilated(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count: int = 1,
    precision=None,
    preferred_element_type=None,
    **kwargs,
):
    """``lax.conv_general_dilated`` with the arguments Flax's ``nn.Conv`` passes, computed on the CPU
    backend as kh·kw shifted matrix products when the output has at most ``SMALL_CONV_POSITIONS``
    positions per image and the input ``SMALL_CONV_MIN_CHANNELS`` channels or more (NHWC/HWIO, no
    dilation, no groups): out[b, i, j] = Σ_{dy, dx}
    x_pad[b, s·i + dy, s·j + dx] · w[dy, dx]. The parameters and the result are those of the convolution
    (summation order aside); only XLA's CPU convolution, very slow for tiny spatial sizes, is avoided."""
    conv = functools.partial(
        lax.conv_general_dilated,
        lhs,
        rhs,
        window_strides,
        padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        precision=precision,
        preferred_element_type=preferred_element_type,
        **kwargs,
    )
    if (
        jax.default_backend() != "cpu"
        or lhs.ndim != 4
        or feature_group_count != 1
        or kwargs
        or any(d != 1 for d in (lhs_dilation or ()) + (rhs_dilation or ()))
        or lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
        != lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
    ):
        return conv()
    kh, kw, cin, _ = rhs.shape
    sh, sw = window_strides
    pads = lax.padtype_to_pads(lhs.shape[1:3], (kh, kw), window_strides, padding) if isinstance(padding, str) else padding
    (pt, pb), (pl, pr) = pads
    out_h = (lhs.shape[1] + pt + pb - kh) // sh + 1
    out_w = (lhs.shape[2] + pl + pr - kw) // sw + 1
    if out_h * out_w > SMALL_CONV_POSITIONS or out_h < 1 or out_w < 1 or cin < SMALL_CONV_MIN_CHANNELS:
        return conv()
    x = jnp.pad(lhs, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    acc = preferred_element_type or jnp.promote_types(lhs.dtype, jnp.float32)
    out = None
    for dy in range(kh):
        for dx in range(kw):
            end = (x.shape[0], dy + sh * (out_h - 1) + 1, dx + sw * (out_w - 1) + 1, cin)
            tap = lax.slice(x, (0, dy, dx, 0), end, (1, sh, sw, 1))
            term = jnp.einsum("bhwc,cd->bhwd", tap, rhs[dy, dx], precision=precision, preferred_element_type=acc)
            out = term if out is None else out + term
    return out.astype(preferred_element_type or jnp.result_type(lhs.dtype, rhs.dtype))


#: name -> (block kind, stage sizes, stem)
ARCHITECTURES = {
    # The smallest ResNet: the small stem, one basic block (identity shortcut), the classifier; four weighted
    # layers. For plumbing (layouts, processes, resume), not accuracy: its train step compiles in a third of
    # ResNet-8's time on CPU (1.2 vs 3.7 s), but it pools a stride-1 stage globally and learns slowly (digits,
    # one epoch, width 8: 15 % vs ResNet-8's 33 %).
    "resnet4": ("basic", (1,), "small"),
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


def space_to_depth(x, block: int = 2):
    """[B, H, W, C] -> [B, H/block, W/block, block·block·C]: each block x block patch becomes one position,
    its pixels ordered (row in the patch, column in the patch, channel)."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // block, block, w // block, block, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, h // block, w // block, block * block * c)


class SpaceToDepthStem(nn.Module):
    """The ImageNet stem's 7x7 stride-2 convolution (padding 3) computed as a 4x4 stride-1 convolution on a
    2x2 space-to-depth input, as MLPerf's TPU ResNet-50 does: 12 input channels instead of 3 and no
    stride, a better shape for matrix units. The parameter is the same 7x7xCxF ``kernel`` (checkpoints are
    interchangeable with ``stem='imagenet'``); it is zero-padded to 8x8 (one leading row and column) and
    regrouped to 4x4x(4C)xF, and the input is padded by 4 before / enough after and regrouped to match,
    so that every output is the same sum of the same products."""

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        """[B, H, W, C] -> [B, ceil(H/2), ceil(W/2), features], equal to the 7x7/2 convolution."""
        kernel = self.param("kernel", conv_init, (7, 7, x.shape[-1], self.features), jnp.float32)
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        c = x.shape[-1]
        k8 = jnp.pad(kernel, ((1, 0), (1, 0), (0, 0), (0, 0)))  # 8x8, a zero leading row and column
        k4 = k8.reshape(4, 2, 4, 2, c, self.features).transpose(0, 2, 1, 3, 4, 5).reshape(4, 4, 4 * c, self.features)
        out_h, out_w = (x.shape[1] + 1) // 2, (x.shape[2] + 1) // 2  # the 7x7/2 convolution's output, padding 3
        pad_h, pad_w = 2 * (out_h + 3) - x.shape[1] - 4, 2 * (out_w + 3) - x.shape[2] - 4
        x = jnp.pad(x, ((0, 0), (4, pad_h), (4, pad_w), (0, 0)))
        return lax.conv_general_dilated(space_to_depth(x), k4, (1, 1), "VALID", dimension_numbers=_NHWC)


def batch_norm(model: nn.Module, train: bool) -> Callable[..., nn.BatchNorm]:
    """The BatchNorm of a ResNet ``model`` (2-D here, 1-D in ``resnet1d``): its momentum, ε and dtype, float32
    statistics, batch statistics in training, and the BN-group axis (``bn_axis_name``/``bn_axis_index_groups``)."""
    return functools.partial(
        nn.BatchNorm,
        use_running_average=not train,
        momentum=model.bn_momentum,
        epsilon=model.bn_epsilon,
        dtype=model.dtype,
        param_dtype=jnp.float32,
        axis_name=model.bn_axis_name,
        axis_index_groups=model.bn_axis_index_groups,
    )


class ResNet(nn.Module):
    """ResNet v1.5 classifier.

    Attributes:
      stage_sizes: blocks per stage.
      block: 'basic' or 'bottleneck'.
      num_classes: output logits.
      stem: 'imagenet' (7x7/2 conv + max-pool), 'space_to_depth' (the same, computed on a 2x2
        space-to-depth input) or 'small' (3x3/1 conv).
      width: filters of the first stage (doubles every stage).
      dtype: compute dtype (e.g. bfloat16); parameters and BN statistics stay float32.
      bn_momentum: running-average momentum of BatchNorm (Goyal: 0.9).
      bn_axis_name: a named axis over which BatchNorm averages its batch statistics (None: the batch
        given is the whole BN batch).
      bn_axis_index_groups: groups of ``bn_axis_name`` indices averaged separately (None: all).
    """

    stage_sizes: Sequence[int]
    block: str = "bottleneck"
    num_classes: int = 1000
    stem: str = "imagenet"
    width: int = 64
    dtype: Any = jnp.float32
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    bn_axis_name: str | None = None
    bn_axis_index_groups: Any = None

    @nn.compact
    def __call__(self, x, train: bool = True):
        conv = functools.partial(
            nn.Conv, use_bias=False, dtype=self.dtype, kernel_init=conv_init, conv_general_dilated=conv_general_dilated
        )
        norm = batch_norm(self, train)
        block_cls = {"basic": BasicBlock, "bottleneck": BottleneckBlock}[self.block]
        x = x.astype(self.dtype)
        if self.stem in ("imagenet", "space_to_depth"):
            if self.stem == "imagenet":
                x = conv(self.width, (7, 7), (2, 2), padding=[(3, 3), (3, 3)], name="stem_conv")(x)
            else:
                x = SpaceToDepthStem(self.width, dtype=self.dtype, name="stem_conv")(x)
            x = nn.relu(norm(name="stem_bn")(x))
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
        elif self.stem == "small":
            x = conv(self.width, (3, 3), name="stem_conv")(x)
            x = nn.relu(norm(name="stem_bn")(x))
        else:
            raise ValueError(f"unknown stem {self.stem!r}: use 'imagenet', 'space_to_depth' or 'small'")
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
