"""224-px preprocessing in TensorFlow: decoding, torchvision's evaluation crop, Inception crop.

Pure graph functions of one encoded image (used inside ``tf.data`` maps by
:mod:`isomax_jax.data.imagenet`); every random choice comes from an explicit stateless seed.

**Evaluation** (:func:`preprocess_for_eval`) reproduces torchvision's
``transforms.Resize(256) + CenterCrop(224)`` on PIL images (``ImageClassification`` preset of the
``IMAGENET1K_V1`` weights, ``references/classification`` with its default PIL backend):

* decode with libjpeg's accurate integer DCT, which gives PIL's pixels bit for bit (TensorFlow's
  default fast DCT differs by up to ~9 levels);
* resize the shorter side to ``resize_size`` and the longer one to
  ``int(resize_size * long / short)`` (torchvision truncates), bilinear **with antialiasing**:
  PIL's ``Image.resize(..., BILINEAR)`` widens its triangle filter by the downscaling factor,
  which ``tf.image.resize(..., antialias=True)`` does as well. The result is rounded to uint8 as
  PIL returns it; it differs from PIL's by at most one level (PIL rounds to uint8 between its
  horizontal and vertical passes), 0.1-0.2 levels on average (tests/test_data_imagenet.py);
* centre crop ``crop_size`` with torchvision's offsets ``round((size - crop) / 2)`` (half to
  even, as Python's ``round``).

**Training** (:func:`preprocess_for_train`) is the Flax ImageNet example's (itself the
Inception / ResNet reference): a random window of 8-100 % of the area and aspect ratio 3/4-4/3
(``sample_distorted_bounding_box``, 10 attempts, minimum object coverage 0.1), decoded with
``decode_and_crop_jpeg`` (only the window is decoded, TensorFlow's default DCT as in Flax); if
sampling fails, the centre crop of ``224 / (224 + 32)`` of the shorter side; resized to
``image_size`` and flipped left-right with probability 1/2. The resize is bilinear (the kind of
torchvision's ``RandomResizedCrop``; Flax uses bicubic) without antialiasing by default, as in
Flax: antialiasing (what PIL, hence torchvision, does) halves the pipeline's throughput on one
core (375 vs 691 images per CPU-second on 384x512 JPEGs here) for a difference the training
augmentation does not need; ``antialias=True`` gives it.

Example:
  >>> import io, numpy as np, tensorflow as tf
  >>> from PIL import Image
  >>> buf = io.BytesIO()
  >>> Image.fromarray(np.full((300, 400, 3), 128, np.uint8)).save(buf, format="JPEG")
  >>> preprocess_for_eval(tf.constant(buf.getvalue())).shape
  TensorShape([224, 224, 3])
  >>> seed = tf.constant([0, 1], tf.int64)
  >>> preprocess_for_train(tf.constant(buf.getvalue()), seed).dtype
  tf.float32
"""

from __future__ import annotations

import tensorflow as tf

__all__ = [
    "CROP_PADDING",
    "INTERPOLATIONS",
    "decode_rgb",
    "eval_resize_shape",
    "preprocess_for_eval",
    "preprocess_for_train",
    "train_crop_window",
]

#: The Flax example's fallback centre crop keeps ``image_size / (image_size + 32)`` of the side.
CROP_PADDING = 32
#: Interpolations of the resizes.
INTERPOLATIONS = ("bilinear", "bicubic")


def _is_jpeg(image_bytes: tf.Tensor) -> tf.Tensor:
    return tf.io.is_jpeg(image_bytes)


def decode_rgb(image_bytes: tf.Tensor) -> tf.Tensor:
    """Encoded JPEG or PNG -> uint8 ``[H, W, 3]`` (JPEG with the accurate DCT: PIL's pixels)."""
    return tf.cond(
        _is_jpeg(image_bytes),
        lambda: tf.io.decode_jpeg(image_bytes, channels=3, dct_method="INTEGER_ACCURATE"),
        lambda: tf.io.decode_png(image_bytes, channels=3),
    )


def eval_resize_shape(
    height: tf.Tensor, width: tf.Tensor, size: int
) -> tuple[tf.Tensor, tf.Tensor]:
    """torchvision's ``Resize(size)`` output ``(height, width)``: shorter side ``size``, the
    longer ``int(size * long / short)`` (computed in float64 as Python does)."""
    h, w = tf.cast(height, tf.float64), tf.cast(width, tf.float64)
    short, long = tf.minimum(h, w), tf.maximum(h, w)
    new_long = tf.cast(tf.floor(size * long / short), tf.int32)
    portrait = height > width
    new_h = tf.where(portrait, new_long, size)
    new_w = tf.where(portrait, size, new_long)
    return new_h, new_w


def preprocess_for_eval(
    image_bytes: tf.Tensor,
    *,
    resize_size: int = 256,
    crop_size: int = 224,
    interpolation: str = "bilinear",
) -> tf.Tensor:
    """Encoded image -> uint8 ``[crop_size, crop_size, 3]``: torchvision's Resize + CenterCrop.

    Args:
      image_bytes: scalar string tensor, a JPEG or PNG file.
      resize_size: the shorter side after resizing (256 for most torchvision weights; e.g.
        232 for ``ResNet50_Weights.IMAGENET1K_V2``).
      crop_size: the side of the centre crop; ``<= resize_size``.
      interpolation: ``"bilinear"`` (torchvision's default) or ``"bicubic"``, antialiased.
    """
    image = decode_rgb(image_bytes)
    shape = tf.shape(image)
    new_h, new_w = eval_resize_shape(shape[0], shape[1], resize_size)
    resized = tf.image.resize(image, tf.stack([new_h, new_w]), method=interpolation, antialias=True)
    resized = tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8)
    # torchvision: int(round((size - crop) / 2.0)); tf.round rounds half to even like Python.
    top = tf.cast(tf.round(tf.cast(new_h - crop_size, tf.float64) / 2.0), tf.int32)
    left = tf.cast(tf.round(tf.cast(new_w - crop_size, tf.float64) / 2.0), tf.int32)
    cropped = resized[top : top + crop_size, left : left + crop_size]
    return tf.ensure_shape(cropped, [crop_size, crop_size, 3])


def train_crop_window(
    shape: tf.Tensor,
    seed: tf.Tensor,
    *,
    image_size: int = 224,
    area_range: tuple[float, float] = (0.08, 1.0),
    aspect_ratio_range: tuple[float, float] = (3 / 4, 4 / 3),
) -> tf.Tensor:
    """The training crop window ``[top, left, height, width]`` (int32) of an image of ``shape``.

    ``sample_distorted_bounding_box`` (stateless, ``seed`` int ``[2]``) as in the Flax example;
    when it returns the whole image (sampling failed), the centre square of
    ``image_size / (image_size + CROP_PADDING)`` of the shorter side instead.
    """
    height, width = shape[0], shape[1]
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.stack([height, width, 3]),
        bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, shape=[1, 1, 4]),
        seed=seed,
        min_object_covered=0.1,
        aspect_ratio_range=aspect_ratio_range,
        area_range=area_range,
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    failed = tf.logical_and(tf.equal(size[0], height), tf.equal(size[1], width))
    side = tf.cast(
        image_size / (image_size + CROP_PADDING) * tf.cast(tf.minimum(height, width), tf.float32),
        tf.int32,
    )
    centre = tf.stack([(height - side + 1) // 2, (width - side + 1) // 2, side, side])
    sampled = tf.stack([begin[0], begin[1], size[0], size[1]])
    return tf.where(failed, centre, sampled)


def preprocess_for_train(
    image_bytes: tf.Tensor,
    seed: tf.Tensor,
    *,
    image_size: int = 224,
    area_range: tuple[float, float] = (0.08, 1.0),
    aspect_ratio_range: tuple[float, float] = (3 / 4, 4 / 3),
    interpolation: str = "bilinear",
    antialias: bool = False,
) -> tf.Tensor:
    """Encoded image -> float32 ``[image_size, image_size, 3]`` on the 0-255 scale.

    Random window (:func:`train_crop_window`), decoded alone for JPEGs, resized (``antialias``:
    widen the filter when downscaling, as PIL), flipped left-right with probability 1/2;
    ``seed`` (int ``[2]``) fixes both choices.
    """
    # tf.random.experimental exists at runtime; TensorFlow's stubs do not declare it.
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))  # pyright: ignore[reportAttributeAccessIssue]
    window_of = lambda shape: train_crop_window(  # noqa: E731
        shape, crop_seed, image_size=image_size, area_range=area_range,
        aspect_ratio_range=aspect_ratio_range,
    )  # fmt: skip

    def jpeg():
        window = window_of(tf.io.extract_jpeg_shape(image_bytes))
        return tf.io.decode_and_crop_jpeg(image_bytes, window, channels=3)

    def other():
        image = tf.io.decode_png(image_bytes, channels=3)
        top, left, height, width = tf.unstack(window_of(tf.shape(image)))
        return image[top : top + height, left : left + width]

    image = tf.cond(_is_jpeg(image_bytes), jpeg, other)
    image = tf.image.resize(
        image, [image_size, image_size], method=interpolation, antialias=antialias
    )
    image = tf.image.stateless_random_flip_left_right(image, flip_seed)
    return tf.ensure_shape(image, [image_size, image_size, 3])
