"""Decoding and augmentation as TF functions (used inside tf.data maps).

All randomness is stateless, seeded per example by the caller, so an example is augmented the
same way whatever device or process reads it.

Augmentations (``config.augment``):
  'none'      decode, scale to [0, 1], normalise per channel.
  'shift'     random translation by up to 1 pixel (zero pad + random crop), for 8x8 digits.
  'inception' ImageNet training (Goyal §5.1: "scale and aspect ratio data augmentation [Szegedy et
              al. 2015] as in [fb.resnet.torch]"): a random crop whose area is uniform in 8-100 % of
              the image and whose aspect ratio is uniform in 3/4-4/3 (width and height swapped with
              probability 1/2), 10 tries, else the central square; decoded straight from the JPEG
              crop window (the full image is never decoded); resized to image_size x image_size;
              flipped horizontally with probability 1/2.
Evaluation: 'center_crop' resizes the shorter side to image_size·256/224 (256 for 224) and takes the
central image_size x image_size crop; 'none' only decodes and normalises.

Normalisation: ``(pixel / 255 - mean) / std`` per channel.

Signals (``kind='signal'``, MNIST-1D): raw float32 ``[length, channels]`` (``image_size`` = length),
normalised as ``(x - mean) / std`` per channel; 'none', or 'shift': a random translation by up to one
position along the length (zero pad + random crop). 'inception' is for images only (``signal_problem``).
"""

from __future__ import annotations

from typing import Callable, Sequence

import tensorflow as tf

AUGMENTATIONS = ("none", "shift", "inception")
CROP_AREA = (0.08, 1.0)  # fraction of the image area
CROP_ASPECT = (3.0 / 4.0, 4.0 / 3.0)  # width / height, before the random swap
CROP_ATTEMPTS = 10
EVAL_RESIZE_RATIO = 256.0 / 224.0
# Bilinear without antialiasing, as the TF reference ImageNet pipelines; fb.resnet.torch used bicubic.
# The interpolation kernel is not part of the paper's recipe; bilinear is the cheaper one on a host CPU.
TRAIN_RESIZE_METHOD = "bilinear"


def _decode(encoded: tf.Tensor, channels: int) -> tf.Tensor:
    image = tf.io.decode_image(encoded, channels=channels, expand_animations=False)
    image.set_shape([None, None, channels])
    return image


def _normalize(image: tf.Tensor, mean: Sequence[float], std: Sequence[float]) -> tf.Tensor:
    image = tf.cast(image, tf.float32) / 255.0
    return (image - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


def _decode_signal(encoded: tf.Tensor, length: int, channels: int) -> tf.Tensor:
    return tf.reshape(tf.io.decode_raw(encoded, tf.float32), [length, channels])


def _normalize_signal(x: tf.Tensor, mean: Sequence[float], std: Sequence[float]) -> tf.Tensor:
    return (x - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


def signal_problem(augment: str) -> str | None:
    """Why signals cannot be read with ``augment`` (None if they can)."""
    if augment in ("none", "shift"):
        return None
    return f"--config.augment={augment!r} crops images; signals take --config.augment=none or shift"


def signal_train_fn(augment: str, length: int, channels: int, mean, std) -> Callable:
    """``fn(encoded, seed[2]) -> float32 [length, channels]`` for training on signals (normalised)."""
    if signal_problem(augment):
        raise ValueError(signal_problem(augment))

    def fn(encoded, seed):
        x = _decode_signal(encoded, length, channels)
        if augment == "shift":
            x = tf.image.stateless_random_crop(tf.pad(x, [[1, 1], [0, 0]]), [length, channels], seed=seed)
        return _normalize_signal(x, mean, std)

    return fn


def signal_eval_fn(length: int, channels: int, mean, std) -> Callable:
    """``fn(encoded) -> float32 [length, channels]`` for evaluation on signals (normalised, as they are)."""
    return lambda encoded: _normalize_signal(_decode_signal(encoded, length, channels), mean, std)


def random_crop_window(
    image_hw: tf.Tensor, seed: tf.Tensor, area_range=CROP_AREA, aspect_range=CROP_ASPECT, attempts: int = CROP_ATTEMPTS
) -> tf.Tensor:
    """The random-size crop window ``[y, x, h, w]`` (int32) of Goyal §5.1 / fb.resnet.torch, stateless.

    Each of ``attempts`` candidates draws an area A·U(area_range) (A = image area), an aspect ratio
    r ~ U(aspect_range), w = round(sqrt(area·r)), h = round(sqrt(area/r)), swaps w and h with
    probability 1/2, and a uniformly placed top-left corner. The first candidate that fits inside the
    image is taken; if none fits, the central square of side min(height, width) (what fb.resnet.torch's
    fallback, scale + center crop, sees).
    """
    hw = tf.cast(image_hw[:2], tf.float32)
    img_h, img_w = hw[0], hw[1]
    u = tf.random.stateless_uniform([5, attempts], seed=seed, dtype=tf.float32)
    area = (area_range[0] + (area_range[1] - area_range[0]) * u[0]) * img_h * img_w
    aspect = aspect_range[0] + (aspect_range[1] - aspect_range[0]) * u[1]
    w = tf.maximum(tf.round(tf.sqrt(area * aspect)), 1.0)
    h = tf.maximum(tf.round(tf.sqrt(area / aspect)), 1.0)
    swap = u[2] < 0.5
    w, h = tf.where(swap, h, w), tf.where(swap, w, h)
    fits = (h <= img_h) & (w <= img_w)
    y = tf.minimum(tf.floor(u[3] * (img_h - h + 1.0)), tf.maximum(img_h - h, 0.0))
    x = tf.minimum(tf.floor(u[4] * (img_w - w + 1.0)), tf.maximum(img_w - w, 0.0))
    first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)  # index of the first fit (0 if none)
    side = tf.minimum(img_h, img_w)
    fallback = tf.stack([tf.floor((img_h - side) / 2), tf.floor((img_w - side) / 2), side, side])
    window = tf.where(tf.reduce_any(fits), tf.stack([y[first], x[first], h[first], w[first]]), fallback)
    return tf.cast(window, tf.int32)


def inception_params(image_hw: tf.Tensor, seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """``(crop window [y, x, h, w], flip: bool)`` of one training example, a function of ``seed`` only."""
    seeds = tf.random.experimental.stateless_split(seed, 2)
    window = random_crop_window(image_hw, seeds[0])
    flip = tf.random.stateless_uniform([], seed=seeds[1], dtype=tf.float32) < 0.5
    return window, flip


def inception_crop(encoded: tf.Tensor, seed: tf.Tensor, image_size: int, channels: int) -> tf.Tensor:
    """Random-size crop + resize + random flip (Goyal §5.1); a JPEG is decoded only inside the crop window.

    Returns float32 ``[image_size, image_size, channels]`` on the 0..255 scale.
    """

    def jpeg():
        hw = tf.image.extract_jpeg_shape(encoded)[:2]
        window, flip = inception_params(hw, seed)
        return tf.image.decode_and_crop_jpeg(encoded, window, channels=channels), flip

    def other():  # PNG, GIF, BMP: these formats cannot be decoded partially
        full = _decode(encoded, channels)
        window, flip = inception_params(tf.shape(full)[:2], seed)
        return tf.slice(full, tf.stack([window[0], window[1], 0]), tf.stack([window[2], window[3], channels])), flip

    crop, flip = tf.cond(tf.io.is_jpeg(encoded), jpeg, other)
    crop.set_shape([None, None, channels])
    image = tf.image.resize(crop, [image_size, image_size], method=TRAIN_RESIZE_METHOD, antialias=False)
    return tf.cond(flip, lambda: tf.reverse(image, axis=[1]), lambda: image)


def center_crop(encoded: tf.Tensor, image_size: int, channels: int) -> tf.Tensor:
    """Evaluation view (Goyal §5.1, single 224x224 crop): shorter side to image_size·256/224, central crop.

    Deterministic. Returns float32 ``[image_size, image_size, channels]`` on the 0..255 scale.
    """
    image = _decode(encoded, channels)
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = (image_size * EVAL_RESIZE_RATIO) / tf.reduce_min(shape)
    new = tf.maximum(tf.cast(tf.round(shape * scale), tf.int32), image_size)
    image = tf.image.resize(image, new, method="bilinear", antialias=True)
    top = (new[0] - image_size) // 2
    left = (new[1] - image_size) // 2
    return tf.image.crop_to_bounding_box(image, top, left, image_size, image_size)


def size_mismatch(augment: str, image_size: int, height: int, width: int) -> str | None:
    """Why a decoded ``height`` x ``width`` image cannot be read with ``augment`` at ``image_size`` (None if it can).

    'none' and 'shift' (and evaluation after them) read an image as it is, so it must be exactly
    image_size x image_size; 'inception' crops and resizes any size (evaluation: the center crop).
    """
    if augment == "inception" or (height, width) == (image_size, image_size):
        return None
    fits = f"set --config.image_size={height} if every image is {height}x{width}, " if height == width else ""
    return (
        f"is {height}x{width} pixels but --config.augment={augment!r} reads images as they are, so "
        f"--config.image_size={image_size} needs exactly {image_size}x{image_size}; {fits}resize the images to "
        f"{image_size}x{image_size}, or use --config.augment=inception (random crops resized to image_size)"
    )


def train_fn(augment: str, image_size: int, channels: int, mean, std) -> Callable:
    """``fn(encoded, seed[2]) -> float32 [image_size, image_size, channels]`` for training (normalised)."""
    if augment not in AUGMENTATIONS:
        raise ValueError(f"unknown config.augment {augment!r}: use one of {', '.join(AUGMENTATIONS)}")

    def fn(encoded, seed):
        if augment == "inception":
            image = inception_crop(encoded, seed, image_size, channels)
        else:
            image = _decode(encoded, channels)
            if augment == "shift":
                padded = tf.pad(image, [[1, 1], [1, 1], [0, 0]])
                image = tf.image.stateless_random_crop(padded, tf.shape(image), seed=seed)
            image = tf.ensure_shape(image, [image_size, image_size, channels])
        return _normalize(image, mean, std)

    return fn


def eval_fn(augment: str, image_size: int, channels: int, mean, std) -> Callable:
    """``fn(encoded) -> float32 [image_size, image_size, channels]`` for evaluation (normalised).

    Datasets trained with 'inception' crops are evaluated on the center crop; others as they are.
    """
    mode = "center_crop" if augment == "inception" else "none"

    def fn(encoded):
        if mode == "center_crop":
            image = center_crop(encoded, image_size, channels)
        else:
            image = tf.ensure_shape(_decode(encoded, channels), [image_size, image_size, channels])
        return _normalize(image, mean, std)

    return fn
