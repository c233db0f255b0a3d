"""Input-perturbation detectors: ODIN, and the step Mahalanobis' input pre-processing shares.

Both take one signed-gradient step on the *images* before scoring them:
``x' = x - eps * sign(grad_x L(x)) / std``, where ``std`` (``norm_std``) is the per-channel
standard deviation of the input normalisation (channels last, NHWC), so that ``eps`` is measured
in un-normalised pixel units as in the papers. The gradient is taken in JAX through
``apply_fn(images) -> (logits, features)``, which must treat examples independently (a model in
eval mode): the gradient of the *summed* loss then is each example's own gradient.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from isomax_jax import scores, validation
from isomax_jax.detectors.base import Detector, images_jit, model_outputs


def check_images(images, norm_std) -> jax.Array:
    """Static and (when concrete) value checks of ``images`` ``[B, ..., channels]``."""
    images = validation.as_array("images", images)
    validation.check_floating("images", images)
    if images.ndim < 2:
        raise ValueError(f"`images` must have shape [batch, ...]; got {tuple(images.shape)}.")
    if norm_std is not None and len(norm_std) != images.shape[-1]:
        raise ValueError(
            f"`norm_std` has {len(norm_std)} entries but `images` has {images.shape[-1]} channels "
            f"(last axis, NHWC); got images of shape {tuple(images.shape)}."
        )
    validation.check_finite("images", images)
    return images


def check_norm_std(norm_std) -> None:
    """Hyperparameter check: ``None`` or a tuple of positive floats."""
    if norm_std is None:
        return
    if not isinstance(norm_std, tuple) or not all(
        isinstance(s, int | float) and not isinstance(s, bool) and s > 0 for s in norm_std
    ):
        raise ValueError(
            f"`norm_std` must be None or a tuple of positive floats; got {norm_std!r}."
        )


def perturb(
    apply_fn: Callable,
    images: jax.Array,
    loss_fn: Callable[[jax.Array, jax.Array | None], jax.Array],
    *,
    eps: float,
    norm_std: tuple[float, ...] | None,
) -> jax.Array:
    """``images - eps * sign(grad sum_i loss_fn(logits, features)_i) / norm_std``.

    Args:
      apply_fn: ``images -> logits [B, C]``, ``(logits, features [B, D])`` or a dict with them
        (:func:`isomax_jax.detectors.base.model_outputs`).
      images: ``[B, ..., channels]``.
      loss_fn: ``(logits, features or None) -> [B]`` per-example losses; the step *decreases*
        them.
      eps: step size in un-normalised input units.
      norm_std: per-channel std of the input normalisation, or None (step of ``eps``).

    Returns:
      The perturbed images, same shape and dtype.
    """

    def total(x):
        return jnp.sum(loss_fn(*model_outputs(apply_fn(x))))

    step = jnp.sign(jax.grad(total)(images))
    if norm_std is not None:
        shape = (1,) * (images.ndim - 1) + (len(norm_std),)
        step = step / jnp.asarray(norm_std, images.dtype).reshape(shape)
    return images - eps * step


@dataclasses.dataclass(frozen=True)
class ODIN(Detector):
    """ODIN: temperature-scaled MSP of inputs perturbed to raise it.

    ``x' = x - eps sign(grad_x [-log S_yhat(x; T)]) / std``, score ``max_j softmax(f(x') / T)_j``
    (:func:`isomax_jax.scores.max_probability` of ``logits / T``), ``yhat`` the predicted class.

    Liang, Li & Srikant, "Enhancing The Reliability of Out-of-distribution Image Detection in Neural
    Networks", ICLR 2018. Defaults: ``temperature=1000`` (the paper's choice for every model),
    ``eps=0.0014`` (the paper tunes ``eps`` per model and dataset on OOD validation data; 0.0014 is
    the authors' released setting for DenseNet-BC on CIFAR-10, and pytorch-ood's default; fixed
    here because nothing may be tuned on OOD data), ``norm_std=None``: pass the per-channel std of
    your input normalisation (e.g. CIFAR-10 ``(0.2470, 0.2435, 0.2616)``) so ``eps`` is in pixel
    units as in the paper. ``needs_images`` unless ``eps == 0`` (then ``score`` on logits is MSP at
    temperature ``T``). Applies to every head.
    """

    temperature: float = 1000.0
    eps: float = 0.0014
    norm_std: tuple[float, ...] | None = None
    name = "odin"
    title = "ODIN"
    score_inputs = frozenset({"logits"})

    def __post_init__(self) -> None:
        validation.check_temperature(self.temperature)
        validation.check_real("eps", self.eps, minimum=0)
        check_norm_std(self.norm_std)

    @property
    def needs_images(self) -> bool:
        return self.eps > 0

    def _score(self, state, head_fn, *, logits):
        return scores.max_probability(logits / self.temperature)

    def score_images(self, state, apply_fn, images, **head_inputs):
        """ODIN scores ``[B]`` of ``images`` through ``apply_fn`` (input gradient in JAX).

        Internally jitted with ``apply_fn`` static: pass the same function object to reuse the
        compilation. Also works under an outer ``jax.jit``.
        """
        images = check_images(images, self.norm_std)
        return images_jit(self, apply_fn, {}, images)

    def _score_images(self, state, apply_fn, images):
        def loss(logits, features):
            log_p = jax.nn.log_softmax(logits / self.temperature, axis=1)
            predicted = jnp.argmax(jax.lax.stop_gradient(log_p), axis=1)
            return -jnp.take_along_axis(log_p, predicted[:, None], axis=1)[:, 0]

        x = images
        if self.eps > 0:
            x = perturb(apply_fn, images, loss, eps=self.eps, norm_std=self.norm_std)
        logits, _ = model_outputs(apply_fn(x))
        logits = self._prepare({}, logits=logits)["logits"]
        return self._score({}, None, logits=logits)


DETECTORS = (ODIN,)
