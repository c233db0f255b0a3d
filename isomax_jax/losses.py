"""Losses of the IsoMax family: the entropic cross-entropy and DisMax's FPR augmentation.

All three heads (IsoMax, IsoMax+, DisMax) train with the same *entropic* cross-entropy, i.e.
cross-entropy on ``entropic_scale * logits`` with ``entropic_scale = 10``; the scale is used only
in the training loss, never at inference.

Deviation from the reference, on purpose: the PyTorch reference computes
``-log(softmax(10 * logits)[y])`` (softmax, then log), which is ``inf`` when the target
probability underflows to 0 (e.g. a logit gap above ~10.4 in float32 after scaling by 10). Here
the loss is computed with ``log_softmax``, which equals the reference wherever the reference is
finite and stays finite (with finite gradients) where it is not.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from isomax_jax import validation


def _label_in_range(labels: jax.Array, num_classes: int) -> jax.Array:
    return (labels >= 0) & (labels < num_classes)


def _target_cross_entropy(scaled_logits: jax.Array, labels: jax.Array) -> jax.Array:
    """``-log softmax(z)[y]`` per row, accurate also when the loss is tiny.

    ``logsumexp(z) - z_y`` loses all relative precision as the loss goes to 0 (it computes
    ``log(1 + tiny)``); here the sum over the non-maximal classes goes through ``log1p``.
    The maximum ``m`` is a constant for differentiation (the loss does not depend on it); the
    derivative is ``softmax(z) - onehot(y)``.
    """
    num_classes = scaled_logits.shape[1]
    in_range = _label_in_range(labels, num_classes)
    safe_labels = jnp.where(in_range, labels, 0)
    maximum = jax.lax.stop_gradient(jnp.max(scaled_logits, axis=1, keepdims=True))
    shifted = scaled_logits - maximum
    is_top = jax.nn.one_hot(jnp.argmax(scaled_logits, axis=1), num_classes, dtype=bool)
    top = jnp.sum(jnp.where(is_top, shifted, 0), axis=1)  # value 0, derivative to the max
    rest = jnp.sum(jnp.where(is_top, 0, jnp.exp(shifted)), axis=1)
    log_normalizer = top + jnp.log1p(rest * jnp.exp(-top))
    at_label = jnp.take_along_axis(shifted, safe_labels[:, None], axis=1)[:, 0]
    return jnp.where(in_range, log_normalizer - at_label, jnp.nan)


def isomax_loss(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    entropic_scale: float = 10.0,
) -> jax.Array:
    """Entropic cross-entropy of IsoMax, IsoMax+ and DisMax, one value per example.

    ``loss_i = -log softmax(entropic_scale * logits_i)[labels_i]``, computed with log-softmax
    (finite where the reference's softmax-then-log gives ``inf``; see the module docstring).
    The caller reduces (the reference takes the mean). DisMax's validation loss in the reference
    uses ``entropic_scale=1.0``.

    Args:
      logits: ``[batch, num_classes]`` logits of an IsoMax-family head.
      labels: ``[batch]`` integer class indices. Out-of-range labels cannot be checked inside
        ``jit``: their loss is NaN. Use :func:`isomax_jax.validate_labels` eagerly to get an error.
      entropic_scale: the entropic scale ``E_s`` (10 in the papers).

    Returns:
      ``[batch]`` losses, float32 or wider (bfloat16 logits give float32).

    Example:
      >>> logits = jnp.array([[-1.0, -2.0], [-0.5, -0.5]])
      >>> isomax_loss(logits, jnp.array([0, 1]))
      Array([4.539890e-05, 6.931472e-01], dtype=float32)
    """
    logits, labels = validation.check_logits_labels(logits, labels)
    return _target_cross_entropy(entropic_scale * logits, labels)


def _check_images_labels(images, labels):
    images = validation.as_array("images", images)
    labels = validation.as_array("labels", labels)
    validation.check_rank("images", images, 4, "[batch, height, width, channels]")
    validation.check_integer("labels", labels)
    validation.check_shape("labels", labels, images.shape[:1], "[batch]")
    return images, labels


def fpr_mosaic(images: jax.typing.ArrayLike) -> jax.Array:
    """DisMax FPR mosaic of the second half of a batch (no permutation).

    For the second half (``h = batch // 2`` onwards) each image keeps its top-left quadrant and
    takes its bottom-left quadrant from the image rolled by 1 within the second half, its
    top-right from the image rolled by 2 and its bottom-right from the image rolled by 3
    (``roll(x, k)[i] = x[i - k]``). The first half is unchanged.

    Args:
      images: ``[batch, height, width, channels]`` (NHWC).

    Returns:
      Images of the same shape and dtype.

    Example:
      >>> images = jnp.arange(4.0)[:, None, None, None] * jnp.ones((4, 2, 2, 1))
      >>> fpr_mosaic(images)[2:, :, :, 0]  # second half: quadrants from samples 2 and 3
      Array([[[2., 2.],
              [3., 3.]],
      <BLANKLINE>
             [[3., 3.],
              [2., 2.]]], dtype=float32)
    """
    images = validation.as_array("images", images)
    validation.check_rank("images", images, 4, "[batch, height, width, channels]")
    half = images.shape[0] // 2
    rows, cols = images.shape[1] // 2, images.shape[2] // 2
    second = images[half:]
    mosaic = second
    mosaic = mosaic.at[:, rows:, :cols].set(jnp.roll(second[:, rows:, :cols], 1, axis=0))
    mosaic = mosaic.at[:, :rows, cols:].set(jnp.roll(second[:, :rows, cols:], 2, axis=0))
    mosaic = mosaic.at[:, rows:, cols:].set(jnp.roll(second[:, rows:, cols:], 3, axis=0))
    return jnp.concatenate([images[:half], mosaic], axis=0)


def dismax_fpr_augment(
    key: jax.Array, images: jax.typing.ArrayLike, labels: jax.typing.ArrayLike
) -> tuple[jax.Array, jax.Array]:
    """DisMax FPR ("fractional probability regularization") augmentation.

    Permutes the batch with ``key``, then builds 4-quadrant mosaics in the second half (see
    :func:`fpr_mosaic`). Train on the returned images with :func:`dismax_fpr_loss` and the
    returned (permuted) labels.

    Args:
      key: a JAX PRNG key for the permutation.
      images: ``[batch, height, width, channels]`` (NHWC).
      labels: ``[batch]`` integer labels.

    Returns:
      ``(images, labels)``: the mosaicked images and the permuted labels, same shapes/dtypes.

    Example:
      >>> images = jnp.arange(4.0)[:, None, None, None] * jnp.ones((4, 2, 2, 1))
      >>> new_images, new_labels = dismax_fpr_augment(jax.random.key(0), images, jnp.arange(4))
      >>> new_images.shape, new_labels.shape
      ((4, 2, 2, 1), (4,))
    """
    images, labels = _check_images_labels(images, labels)
    permutation = jax.random.permutation(key, images.shape[0])
    return fpr_mosaic(images[permutation]), labels[permutation]


def fpr_targets(labels: jax.typing.ArrayLike, num_classes: int) -> jax.Array:
    """Soft targets of the FPR mosaics: 0.25 on each of the four source labels.

    Args:
      labels: ``[n]`` integer labels of the mosaic half (the permuted labels ``[batch // 2:]``).
      num_classes: ``C``.

    Returns:
      ``[n, C]`` float32 target distributions (0.25 per quadrant, summed where labels coincide).

    Example:
      >>> fpr_targets(jnp.array([0, 1, 1, 2]), 3)
      Array([[0.25, 0.5 , 0.25],
             [0.25, 0.5 , 0.25],
             [0.25, 0.5 , 0.25],
             [0.25, 0.5 , 0.25]], dtype=float32)
    """
    labels = validation.as_array("labels", labels)
    validation.check_rank("labels", labels, 1, "[n]")
    validation.check_integer("labels", labels)
    # A sum of four arrays is an array (sum's `0` start never survives).
    return sum(0.25 * jax.nn.one_hot(jnp.roll(labels, k), num_classes) for k in range(4))  # pyright: ignore[reportReturnType]


def dismax_fpr_loss(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    entropic_scale: float = 10.0,
    alpha: float = 1.0,
) -> jax.Array:
    """DisMax training loss with the FPR add-on (a scalar: it mixes examples).

    ``(mean(isomax_loss(first half)) + alpha * KL(targets || softmax(E_s * z_second_half))) / 2``
    with the KL averaged over the second half (torch ``batchmean``) and the targets of
    :func:`fpr_targets`. Log-probabilities come from log-softmax (finite where the reference's
    ``log(softmax(.))`` gives ``inf``).

    Args:
      logits: ``[batch, num_classes]`` logits of the images from :func:`dismax_fpr_augment`.
      labels: ``[batch]`` the permuted labels returned by :func:`dismax_fpr_augment`.
      entropic_scale: the entropic scale ``E_s``.
      alpha: weight of the KL term.

    Returns:
      Scalar loss, float32 or wider.

    Example:
      >>> logits = jnp.zeros((4, 3))
      >>> dismax_fpr_loss(logits, jnp.array([0, 1, 1, 2]))
      Array(0.7520387, dtype=float32)
    """
    logits, labels = validation.check_logits_labels(logits, labels)
    batch, num_classes = logits.shape
    if batch < 2:
        raise ValueError(f"`logits` needs a batch of at least 2 for FPR; got shape {logits.shape}.")
    half = batch // 2
    scaled = entropic_scale * logits
    cross_entropy = jnp.mean(_target_cross_entropy(scaled[:half], labels[:half]))
    log_probs = jax.nn.log_softmax(scaled[half:], axis=1)
    targets = fpr_targets(labels[half:], num_classes).astype(log_probs.dtype)
    in_range = jnp.all(_label_in_range(labels[half:], num_classes))
    log_targets = jnp.log(jnp.where(targets > 0, targets, 1))
    kl = jnp.sum(targets * (log_targets - log_probs)) / (batch - half)
    kl = jnp.where(in_range, kl, jnp.nan)
    return (cross_entropy + alpha * kl) / 2
