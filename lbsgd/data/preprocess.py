"""Decoding and augmentation as TF functions (used inside tf.data maps).

All randomness is stateless, seeded per example by the caller, so an example is augmented the
same way whatever device or process reads it.

Augmentations (``config.augment``):
  'none'      decode, scale to [0, 1], normalise per channel.
  'shift'     random translation by up to 1 pixel (zero pad + random crop), for 8x8 digits.
  'inception' ImageNet training: random-size crop covering 8-100 % of the area with aspect ratio
              3/4-4/3, decoded straight from the JPEG crop window (the full image is never decoded),
              resized to image_size x image_size, random horizontal flip (Goyal §5.1, following
              Szegedy et al. 2015 as in fb.resnet.torch).
Evaluation: 'center_crop' resizes the shorter side to image_size·256/224 and takes the central
image_size x image_size crop; 'none' only decodes and normalises.
"""

from __future__ import annotations

from typing import Callable, Sequence

import tensorflow as tf

AUGMENTATIONS = ("none", "shift", "inception")
CROP_AREA = (0.08, 1.0)
CROP_ASPECT = (3.0 / 4.0, 4.0 / 3.0)
EVAL_RESIZE_RATIO = 256.0 / 224.0


def _decode(encoded: tf.Tensor, channels: int) -> tf.Tensor:
  image = tf.io.decode_image(encoded, channels=channels, expand_animations=False)
  image.set_shape([None, None, channels])
  return image


def _normalize(image: tf.Tensor, mean: Sequence[float], std: Sequence[float]) -> tf.Tensor:
  image = tf.cast(image, tf.float32) / 255.0
  return (image - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


def random_crop_window(image_shape: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  """A random-size crop window ``[y, x, h, w]`` (area 8–100 %, aspect 3/4–4/3), stateless.

  Falls back to the central crop of the whole image when no window is found in 10 tries.
  """
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      image_shape, bounding_boxes=tf.zeros([1, 0, 4]), seed=seed, min_object_covered=0.0,
      aspect_ratio_range=CROP_ASPECT, area_range=CROP_AREA, max_attempts=10,
      use_image_if_no_bounding_boxes=True)
  return tf.stack([begin[0], begin[1], size[0], size[1]])


def inception_crop(encoded: tf.Tensor, seed: tf.Tensor, image_size: int, channels: int) -> tf.Tensor:
  """Random-size crop + resize + random flip; JPEGs are decoded only inside the crop window."""
  seeds = tf.random.experimental.stateless_split(seed, 2)
  is_jpeg = tf.io.is_jpeg(encoded)
  shape = tf.cond(is_jpeg, lambda: tf.image.extract_jpeg_shape(encoded),
                  lambda: tf.shape(_decode(encoded, channels), out_type=tf.int32))
  window = random_crop_window(shape, seeds[0])

  def jpeg():
    return tf.image.decode_and_crop_jpeg(encoded, window, channels=channels)

  def other():
    full = _decode(encoded, channels)
    return tf.image.crop_to_bounding_box(full, window[0], window[1], window[2], window[3])

  crop = tf.cond(is_jpeg, jpeg, other)
  crop.set_shape([None, None, channels])
  image = tf.image.resize(crop, [image_size, image_size], method="bilinear", antialias=False)
  return tf.image.stateless_random_flip_left_right(image, seeds[1])


def center_crop(encoded: tf.Tensor, image_size: int, channels: int) -> tf.Tensor:
  """Resize the shorter side to image_size·256/224, then take the central square crop."""
  image = _decode(encoded, channels)
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  scale = (image_size * EVAL_RESIZE_RATIO) / tf.reduce_min(shape)
  new = tf.cast(tf.round(shape * scale), tf.int32)
  image = tf.image.resize(image, new, method="bilinear", antialias=True)
  top = (new[0] - image_size) // 2
  left = (new[1] - image_size) // 2
  return tf.image.crop_to_bounding_box(image, top, left, image_size, image_size)


def train_fn(augment: str, image_size: int, channels: int, mean, std) -> Callable:
  """``fn(encoded, seed[2]) -> float32 [image_size, image_size, channels]`` for training."""
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
  """``fn(encoded) -> float32 [image_size, image_size, channels]`` for evaluation.

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
