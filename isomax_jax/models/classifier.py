"""A backbone plus a classification head (the SoftMax head lives in :mod:`isomax_jax.heads`).

:class:`Classifier` is what :func:`isomax_jax.models.get_model` returns: it checks the images,
runs the backbone to pooled features ``[batch, features]`` and the head (submodule
``classifier``, as in the PyTorch reference) to logits ``[batch, num_classes]``. The features
are cast to float32 (at least) before the head, so with a bfloat16 backbone the head, the loss
and the scores still run in float32.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from isomax_jax.heads import SoftMaxHead  # noqa: F401  (its historical home)


class Classifier(nn.Module):
    """Images ``[batch, height, width, 3]`` -> backbone features -> head logits.

    Attributes:
      backbone: a module mapping images (and ``train=``) to features ``[batch, D]``.
      classifier: the head, mapping ``[batch, D]`` to ``[batch, C]``.

    Example:
      >>> from isomax_jax.models import get_model
      >>> model = get_model("small_resnet", num_classes=10, head="isomax_plus")
      >>> images = jnp.zeros((2, 32, 32, 3))
      >>> variables = jax.eval_shape(model.init, jax.random.key(0), images)  # or model.init
      >>> sorted(variables), sorted(variables["params"])
      (['batch_stats', 'params'], ['backbone', 'classifier'])
      >>> apply = lambda v, x: model.apply(v, x, train=False, return_features=True)
      >>> logits, features = jax.eval_shape(apply, variables, images)  # or apply(...)
      >>> logits.shape, features.shape
      ((2, 10), (2, 128))
    """

    backbone: nn.Module
    classifier: nn.Module

    def __call__(
        self, images: jax.typing.ArrayLike, *, train: bool = False, return_features: bool = False
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """Computes logits (and features).

        Args:
          images: float images ``[batch, height, width, 3]`` (NHWC, already normalised). The
            CIFAR architectures are defined for 32×32, torchvision's (``tv_*``) for 224×224.
          train: batch statistics (and their running-average update, with
            ``mutable=["batch_stats"]``) if True; running averages if False.
          return_features: also return the pooled backbone features.

        Returns:
          ``logits [batch, C]``, or ``(logits, features [batch, D])`` if ``return_features``;
          both float32 (or wider) whatever the backbone's compute dtype.
        """
        shape = np.shape(images)
        if len(shape) != 4 or shape[-1] != 3:
            raise ValueError(
                f"`images` must have shape [batch, height, width, 3] (NHWC); got {tuple(shape)}."
            )
        dtype = jnp.result_type(images)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(
                f"`images` must have a floating-point dtype (normalised images); got {dtype}."
            )
        features = self.backbone(jnp.asarray(images), train=train)
        features = features.astype(jnp.promote_types(features.dtype, jnp.float32))
        logits = self.classifier(features)
        return (logits, features) if return_features else logits
