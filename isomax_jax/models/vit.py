"""torchvision's Vision Transformer ViT-B/16 (Dosovitskiy et al. 2021), without its head.

The architecture of ``torchvision.models.vit_b_16``: a 16×16 stride-16 convolution patchifies the
image (``conv_proj``, with bias), a learned class token is put in front of the patch sequence,
learned position embeddings are added (``encoder.pos_embedding``), then 12 pre-LayerNorm encoder
blocks (multi-head self-attention with 12 heads, MLP 768 -> 3072 -> 768 with exact GELU), a final
LayerNorm, and the class token's output is the feature vector. Every LayerNorm has
``eps = 1e-6`` and two-pass variance, as PyTorch's. Dropout is 0 in torchvision's model and
absent here, so ``train`` changes nothing.

NHWC images ``[batch, 224, 224, 3]`` -> features ``[batch, 768]``: what torchvision's
``heads.head`` receives. The image size is fixed by the position embeddings (``image_size``),
as in torchvision. Submodule names mirror torchvision's ``state_dict`` keys
(``encoder.layers.encoder_layer_0.self_attention.in_proj_weight`` ↔
``encoder/layers/encoder_layer_0/self_attention/in_proj/kernel``, ``mlp.3`` ↔ ``mlp_3``);
:mod:`isomax_jax.torch_import` maps them (``torch_layout``). Initialisation is torchvision's.

Mixed precision: with ``dtype=jnp.bfloat16`` the projections compute in bfloat16, the LayerNorm
statistics and the attention softmax in float32 (parameters stay float32); the returned features
are float32.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

#: ``nn.Linear``'s default initialisation of a weight: ``U(±sqrt(1 / fan_in))``.
_torch_linear_init = jax.nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _layer_norm(dtype: Any, name: str) -> nn.LayerNorm:
    """PyTorch's ``LayerNorm(eps=1e-6)``: two-pass variance, statistics in float32."""
    return nn.LayerNorm(
        epsilon=1e-6, dtype=dtype, param_dtype=jnp.float32, use_fast_variance=False, name=name
    )


def _dense(features: int, dtype: Any, name: str, kernel_init, bias_init) -> nn.Dense:
    return nn.Dense(
        features,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=kernel_init,
        bias_init=bias_init,
        name=name,
    )


class SelfAttention(nn.Module):
    """PyTorch's ``nn.MultiheadAttention`` for self-attention (``batch_first``, no dropout).

    ``in_proj`` (``[D, 3D]``: query, key and value projections side by side, PyTorch's
    ``in_proj_weight`` transposed) and ``out_proj``; softmax of ``q k^T / sqrt(D / heads)``.

    Attributes:
      num_heads: attention heads; the width must be a multiple of it.
      dtype: compute dtype of the projections; the softmax is float32.
    """

    num_heads: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        batch, length, width = x.shape
        head_dim = width // self.num_heads
        qkv = _dense(
            3 * width,
            self.dtype,
            "in_proj",
            jax.nn.initializers.xavier_uniform(),
            jax.nn.initializers.zeros,
        )(x)
        q, k, v = (
            part.reshape(batch, length, self.num_heads, head_dim)
            for part in jnp.split(qkv, 3, axis=-1)
        )
        out = jax.nn.dot_product_attention(q, k, v, scale=1.0 / math.sqrt(head_dim))
        out = out.reshape(batch, length, width)
        return _dense(width, self.dtype, "out_proj", _torch_linear_init, jax.nn.initializers.zeros)(
            out
        )


class EncoderBlock(nn.Module):
    """``x + attention(ln_1(x))``, then ``+ mlp(ln_2(.))`` (``mlp_0`` -> exact GELU -> ``mlp_3``).

    Attributes:
      num_heads: attention heads.
      mlp_dim: hidden width of the MLP.
      dtype: compute dtype.
    """

    num_heads: int
    mlp_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        y = _layer_norm(self.dtype, "ln_1")(x)
        x = x + SelfAttention(self.num_heads, dtype=self.dtype, name="self_attention")(y)
        y = _layer_norm(self.dtype, "ln_2")(x)
        mlp_bias = jax.nn.initializers.normal(stddev=1e-6)
        xavier = jax.nn.initializers.xavier_uniform()
        y = _dense(self.mlp_dim, self.dtype, "mlp_0", xavier, mlp_bias)(y)
        y = jax.nn.gelu(y, approximate=False)
        y = _dense(width, self.dtype, "mlp_3", xavier, mlp_bias)(y)
        return x + y


class EncoderLayers(nn.Module):
    """``num_layers`` :class:`EncoderBlock` named ``encoder_layer_<i>`` (torchvision's names)."""

    num_layers: int
    num_heads: int
    mlp_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.num_layers):
            x = EncoderBlock(
                self.num_heads, self.mlp_dim, dtype=self.dtype, name=f"encoder_layer_{i}"
            )(x)
        return x


class Encoder(nn.Module):
    """Adds ``pos_embedding`` ``[1, length, width]``, runs ``layers``, then LayerNorm ``ln``."""

    num_layers: int
    num_heads: int
    mlp_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = jax.nn.initializers.normal(stddev=0.02)  # from BERT, as torchvision
        pos_embedding = self.param("pos_embedding", init, (1, *x.shape[1:]), jnp.float32)
        x = x + pos_embedding.astype(x.dtype)
        x = EncoderLayers(
            self.num_layers, self.num_heads, self.mlp_dim, dtype=self.dtype, name="layers"
        )(x)
        return _layer_norm(self.dtype, "ln")(x)


class VisionTransformer(nn.Module):
    """torchvision's ``VisionTransformer`` without ``heads``: images -> class-token features.

    Attributes:
      image_size: height and width of the images (the position embeddings are sized for it).
      patch_size: side of the square patches (the ``conv_proj`` kernel and stride).
      num_layers: encoder blocks.
      num_heads: attention heads.
      hidden_dim: width ``D`` of the tokens (the feature dimension).
      mlp_dim: hidden width of the MLPs.
      bn_axis_name: unused (no BatchNorm); kept so that every backbone has the same fields.
      dtype: compute dtype (float32 or bfloat16); parameters and the features are float32.

    Example (shapes only; ``init`` / ``apply`` give values):
      >>> backbone = tv_vit_b_16()
      >>> images = jnp.zeros((2, 224, 224, 3))
      >>> variables = jax.eval_shape(backbone.init, jax.random.key(0), images)
      >>> variables["params"]["encoder"]["pos_embedding"].shape
      (1, 197, 768)
      >>> jax.eval_shape(backbone.apply, variables, images).shape
      (2, 768)
    """

    image_size: int = 224
    patch_size: int = 16
    num_layers: int = 12
    num_heads: int = 12
    hidden_dim: int = 768
    mlp_dim: int = 3072
    bn_axis_name: str | None = None
    dtype: Any = jnp.float32

    #: The key layout of the ``state_dict`` (:mod:`isomax_jax.torch_import`) and the module
    #: that holds the classifier there (``heads.head.weight``, ``heads.head.bias``).
    torch_layout: ClassVar[str] = "torchvision"
    torch_head: ClassVar[str] = "heads.head"

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        del train  # no dropout, no BatchNorm
        batch, height, width, _ = x.shape
        if (height, width) != (self.image_size, self.image_size):
            raise ValueError(
                f"`images` must be {self.image_size}×{self.image_size} for this ViT (its position "
                f"embeddings are sized for it); got {height}×{width}."
            )
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}."
            )
        if self.hidden_dim % self.num_heads:
            raise ValueError(
                f"hidden_dim {self.hidden_dim} is not a multiple of num_heads {self.num_heads}."
            )
        p = self.patch_size
        fan_in = 3 * p * p
        x = nn.Conv(
            self.hidden_dim,
            (p, p),
            strides=(p, p),
            padding=((0, 0), (0, 0)),
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=jax.nn.initializers.normal(stddev=math.sqrt(1.0 / fan_in)),
            bias_init=jax.nn.initializers.zeros,
            name="conv_proj",
        )(x)
        x = x.reshape(batch, -1, self.hidden_dim)  # row-major patches, as torchvision's flatten
        class_token = self.param(
            "class_token", jax.nn.initializers.zeros, (1, 1, self.hidden_dim), jnp.float32
        )
        class_tokens = jnp.broadcast_to(class_token.astype(x.dtype), (batch, 1, self.hidden_dim))
        x = jnp.concatenate([class_tokens, x], axis=1)
        x = Encoder(
            self.num_layers, self.num_heads, self.mlp_dim, dtype=self.dtype, name="encoder"
        )(x)
        return x[:, 0].astype(jnp.promote_types(x.dtype, jnp.float32))


def tv_vit_b_16() -> VisionTransformer:
    """torchvision's ViT-B/16 at 224×224: 12 layers, 12 heads, width 768, MLP 3072; 768-d."""
    return VisionTransformer()
