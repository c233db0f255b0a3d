"""Train state, the reference optimiser and pure train/eval steps.

The steps are pure functions of ``(state, batch)``: they run as they are on one device, under
``jax.jit`` with a data-parallel sharding (:mod:`isomax_jax.parallel`) or, with ``axis_name``,
inside ``jax.pmap``. Batches are dicts ``{"image": float32 [B, H, W, C], "label": int32 [B]}``;
evaluation batches may carry ``"mask"`` ([B], bool or float) marking the real examples of a padded
batch, so that summed metrics cover a test set exactly.

The loss follows the head family (docs/isomax.md): ``softmax`` trains with plain cross-entropy;
``isomax``, ``isomax_plus`` and ``dismax`` with the entropic loss
(:func:`isomax_jax.losses.isomax_loss`, entropic scale 10); ``dismax`` can add the FPR
augmentation and loss (:func:`isomax_jax.losses.dismax_fpr_loss`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import chex
import flax.struct
import jax
import jax.numpy as jnp
import optax

from isomax_jax import registry

HEADS = registry.HEAD_NAMES

Batch = Mapping[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Static description of the training loss (hashable, so it is part of the compiled step).

    Attributes:
      head: one of ``"softmax"``, ``"isomax"``, ``"isomax_plus"``, ``"dismax"``.
      entropic_scale: scale applied to the logits inside the IsoMax-family training loss only.
      fpr: DisMax fractional probability regularisation (batch permutation + mosaics of the second
        half); only valid with ``head="dismax"``.
      fpr_alpha: weight of the FPR KL term.
    """

    head: str
    entropic_scale: float = 10.0
    fpr: bool = False
    fpr_alpha: float = 1.0

    def __post_init__(self) -> None:
        registry.head(self.head)
        if self.fpr and self.head != "dismax":
            raise ValueError(f"fpr=True needs head='dismax', got head={self.head!r}")


class TrainState(flax.struct.PyTreeNode):
    """Everything a training step reads and writes.

    Attributes:
      step: int32 scalar, number of optimiser updates applied.
      params: the ``"params"`` collection (updated by the optimiser, weight decay included).
      batch_stats: the BatchNorm running statistics (``{}`` for a model without BatchNorm).
      opt_state: the optax state of ``tx``.
      rng: raw uint32 PRNG key data (checkpoint-friendly); consumed by the FPR augmentation.
      apply_fn: the model's ``apply`` (static).
      tx: the optax transformation (static).
      loss: the :class:`LossConfig` (static).
    """

    step: jax.Array
    params: chex.ArrayTree
    batch_stats: chex.ArrayTree
    opt_state: optax.OptState
    rng: jax.Array
    apply_fn: Callable = flax.struct.field(pytree_node=False)
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)
    loss: LossConfig = flax.struct.field(pytree_node=False)

    @property
    def variables(self) -> dict[str, chex.ArrayTree]:
        """The Flax variables ``{"params", "batch_stats"}`` for ``model.apply``."""
        return {"params": self.params, "batch_stats": self.batch_stats}


def multistep_schedule(
    *,
    steps_per_epoch: int,
    milestones: Sequence[int] = (150, 200, 250),
    base_learning_rate: float = 0.1,
    decay: float = 0.1,
) -> optax.Schedule:
    """The reference multi-step schedule (torch ``MultiStepLR``) expressed in optimiser steps.

    The learning rate is ``base_learning_rate * decay**k`` where ``k`` counts the milestones (in
    epochs) already passed; epoch ``e`` starts at step ``e * steps_per_epoch``.

    Example:
      >>> schedule = multistep_schedule(steps_per_epoch=10, milestones=(2, 3))
      >>> [round(float(schedule(s)), 6) for s in (0, 19, 20, 29, 30)]
      [0.1, 0.1, 0.01, 0.01, 0.001]
    """
    if steps_per_epoch <= 0:
        raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch}")
    boundaries = {}
    for epoch in milestones:
        step = int(epoch) * steps_per_epoch
        boundaries[step] = boundaries.get(step, 1.0) * decay
    return optax.piecewise_constant_schedule(base_learning_rate, boundaries)


def warmup_decay_schedule(
    *,
    total_steps: int,
    warmup_steps: int,
    peak_learning_rate: float,
    decay: str = "linear",
) -> optax.Schedule:
    """Linear warm-up from 0 to ``peak_learning_rate``, then linear or cosine decay to 0.

    The usual schedule of short CIFAR runs (a few epochs), where the papers' step schedule
    (made for 300 epochs) wastes most of the budget at a high rate.

    Args:
      total_steps: number of optimiser steps; the rate reaches 0 at ``total_steps``.
      warmup_steps: steps of linear warm-up, ``0 <= warmup_steps < total_steps``.
      peak_learning_rate: rate at the end of the warm-up.
      decay: ``"linear"`` or ``"cosine"``.

    Example:
      >>> schedule = warmup_decay_schedule(total_steps=10, warmup_steps=2, peak_learning_rate=0.2)
      >>> [round(float(schedule(s)), 3) for s in (0, 1, 2, 6, 10)]
      [0.0, 0.1, 0.2, 0.1, 0.0]
    """
    if total_steps <= 0 or not 0 <= warmup_steps < total_steps:
        raise ValueError(
            f"need 0 <= warmup_steps < total_steps, got warmup_steps={warmup_steps}, "
            f"total_steps={total_steps}"
        )
    decay_steps = total_steps - warmup_steps
    if decay == "linear":
        tail = optax.linear_schedule(peak_learning_rate, 0.0, decay_steps)
    elif decay == "cosine":
        tail = optax.cosine_decay_schedule(peak_learning_rate, decay_steps)
    else:
        raise ValueError(f"decay must be 'linear' or 'cosine', got {decay!r}")
    if warmup_steps == 0:
        return tail
    warmup = optax.linear_schedule(0.0, peak_learning_rate, warmup_steps)
    return optax.join_schedules([warmup, tail], [warmup_steps])


def reference_optimizer(
    learning_rate: float | optax.Schedule,
    *,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    nesterov: bool = True,
) -> optax.GradientTransformation:
    """SGD with Nesterov momentum and weight decay on all parameters, as torch ``optim.SGD``.

    ``chain(add_decayed_weights(wd), sgd(lr, momentum, nesterov))`` reproduces torch's update
    (weight decay added to the gradient before the momentum buffer).

    Example:
      >>> tx = reference_optimizer(0.1)
      >>> params = {"w": jnp.ones(2)}
      >>> updates, _ = tx.update({"w": jnp.ones(2)}, tx.init(params), params)
      >>> updates["w"]  # -lr * (1 + 0.9) * (g + wd * w)
      Array([-0.190019, -0.190019], dtype=float32)
    """
    return optax.chain(
        optax.add_decayed_weights(weight_decay),
        optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov),
    )


def create_train_state(
    model: Any,
    *,
    key: jax.Array,
    tx: optax.GradientTransformation,
    loss: LossConfig,
    input_shape: Sequence[int] = (1, 32, 32, 3),
    variables: Mapping[str, chex.ArrayTree] | None = None,
) -> TrainState:
    """Initialises the model (or takes given ``variables``) and the optimiser state.

    Args:
      model: a Linen module with ``apply(variables, images, train=bool)``.
      key: PRNG key; split into the initialisation key and the step key of the state.
      tx: the optax transformation, e.g. :func:`reference_optimizer`.
      loss: the :class:`LossConfig`.
      input_shape: NHWC shape of the dummy input used for initialisation.
      variables: optional existing ``{"params", "batch_stats"}`` (e.g. converted from PyTorch);
        by default the model is initialised (one jitted ``model.init`` with ``train=False``).

    Example:
      >>> import flax.linen as nn
      >>> class Net(nn.Module):
      ...   @nn.compact
      ...   def __call__(self, x, train=False):
      ...     return nn.Dense(3)(x.reshape(x.shape[0], -1))
      >>> state = create_train_state(Net(), key=jax.random.key(0), tx=reference_optimizer(0.1),
      ...                            loss=LossConfig("softmax"), input_shape=(1, 4, 4, 1))
      >>> int(state.step), state.params["Dense_0"]["kernel"].shape
      (0, (16, 3))
    """
    init_key, step_key = jax.random.split(key)
    if variables is None:
        # One compiled initialisation (eager init runs op by op: tens of seconds for a ResNet).
        variables = cast(Mapping[str, Any], _jitted_init(model, tuple(input_shape))(init_key))
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init(params),
        rng=jax.random.key_data(step_key),
        apply_fn=model.apply,
        tx=tx,
        loss=loss,
    )


def _jitted_init(model: Any, input_shape: tuple[int, ...]) -> Callable[[jax.Array], Any]:
    def init(key):
        return model.init(key, jnp.zeros(input_shape, jnp.float32), train=False)

    return jax.jit(init)


def per_example_loss(logits: jax.Array, labels: jax.Array, *, loss: LossConfig) -> jax.Array:
    """Training loss of each example for the head family, ``[B, C], [B] -> [B]`` (no FPR):
    the head's own loss in the registry (:meth:`isomax_jax.registry.HeadSpec.loss`)."""
    return registry.head(loss.head).loss(logits, labels, entropic_scale=loss.entropic_scale)


def _check_batch(batch: Batch, *, need_label: bool = True) -> None:
    if "image" not in batch:
        raise ValueError(f"batch must have an 'image' entry, got keys {sorted(batch)}")
    image = batch["image"]
    if image.ndim != 4:
        raise ValueError(f"batch['image'] must be [B, H, W, C], got shape {image.shape}")
    if need_label:
        if "label" not in batch:
            raise ValueError(f"batch must have a 'label' entry, got keys {sorted(batch)}")
        if batch["label"].shape != image.shape[:1]:
            raise ValueError(
                f"batch['label'] must be [B]={image.shape[:1]}, got shape {batch['label'].shape}"
            )
        if not jnp.issubdtype(batch["label"].dtype, jnp.integer):
            raise TypeError(f"batch['label'] must be integer, got {batch['label'].dtype}")


def train_step(
    state: TrainState, batch: Batch, *, axis_name: str | None = None
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One SGD step on a batch: forward in train mode, loss, gradients, update, BN statistics.

    Args:
      state: the :class:`TrainState`.
      batch: ``{"image": float32 [B, H, W, C], "label": int32 [B]}``.
      axis_name: set only inside ``jax.pmap``/``shard_map`` over that axis: gradients, metrics and
        BatchNorm statistics are averaged across it (exact global-batch BatchNorm additionally
        needs the model's BatchNorm to use the same ``axis_name``). Under plain ``jax.jit`` with a
        sharded batch leave it ``None``: the step already sees the global batch.

    Returns:
      ``(new_state, metrics)`` with scalar metrics ``loss`` (mean training loss) and ``accuracy``.

    Example:
      >>> import flax.linen as nn
      >>> class Net(nn.Module):
      ...   @nn.compact
      ...   def __call__(self, x, train=False):
      ...     return nn.Dense(3)(x.reshape(x.shape[0], -1))
      >>> state = create_train_state(Net(), key=jax.random.key(0), tx=reference_optimizer(0.1),
      ...                            loss=LossConfig("softmax"), input_shape=(1, 4, 4, 1))
      >>> batch = {"image": jnp.ones((2, 4, 4, 1)), "label": jnp.array([0, 1])}
      >>> state, metrics = jax.jit(train_step)(state, batch)
      >>> int(state.step), metrics["loss"].shape
      (1, ())
    """
    _check_batch(batch)
    images, labels = batch["image"], batch["label"]
    cfg = state.loss
    rng = state.rng
    if cfg.fpr:
        from isomax_jax import losses

        rng, aug_key = jax.random.split(jax.random.wrap_key_data(rng))
        rng = jax.random.key_data(rng)
        images, labels = losses.dismax_fpr_augment(aug_key, images, labels)

    def loss_fn(params):
        variables = {"params": params, "batch_stats": state.batch_stats}
        logits, updates = state.apply_fn(variables, images, train=True, mutable=["batch_stats"])
        if cfg.fpr:
            from isomax_jax import losses

            loss = losses.dismax_fpr_loss(
                logits, labels, entropic_scale=cfg.entropic_scale, alpha=cfg.fpr_alpha
            )
        else:
            loss = jnp.mean(per_example_loss(logits, labels, loss=cfg))
        return loss, (logits, updates.get("batch_stats", {}))

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    accuracy = jnp.mean(jnp.argmax(logits, axis=-1) == labels)
    metrics = {"loss": loss, "accuracy": accuracy}
    if axis_name is not None:
        grads = jax.lax.pmean(grads, axis_name)
        batch_stats = jax.lax.pmean(batch_stats, axis_name)
        metrics = jax.lax.pmean(metrics, axis_name)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(
        step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state, rng=rng
    )
    return new_state, metrics


def eval_step(
    state: TrainState,
    batch: Batch,
    *,
    axis_name: str | None = None,
    return_outputs: bool = False,
) -> dict[str, jax.Array] | tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """Masked metric sums on a batch, BatchNorm in inference mode (and optionally the outputs).

    Sums (not means) are returned so that a padded last batch and several hosts combine exactly:
    accumulate them over batches and divide by ``count`` at the end.

    Args:
      state: the :class:`TrainState`.
      batch: ``{"image": [B, H, W, C], "label": [B]}`` and optionally ``"mask"`` [B] (bool or
        0/1 float); examples with a zero mask are ignored, and so are examples with a negative
        label (the OOD sets' label -1): they count in no sum.
      axis_name: inside ``pmap``, the sums are additionally summed over this axis.
      return_outputs: also return ``{"logits": [B, C], "features": [B, D]}`` of every example
        (the model must accept ``return_features=True``, as :func:`isomax_jax.models.get_model`
        models do), e.g. to score OOD detectors from the same forward pass.

    Returns:
      ``{"loss_sum", "correct", "count"}`` float32 scalars (the loss is the head family's training
      loss without FPR), or ``(sums, outputs)`` with ``return_outputs``.

    Example:
      >>> import flax.linen as nn
      >>> class Net(nn.Module):
      ...   @nn.compact
      ...   def __call__(self, x, train=False):
      ...     return nn.Dense(3)(x.reshape(x.shape[0], -1))
      >>> state = create_train_state(Net(), key=jax.random.key(0), tx=reference_optimizer(0.1),
      ...                            loss=LossConfig("softmax"), input_shape=(1, 4, 4, 1))
      >>> batch = {"image": jnp.ones((3, 4, 4, 1)), "label": jnp.array([0, 1, 0]),
      ...          "mask": jnp.array([True, True, False])}
      >>> float(eval_step(state, batch)["count"])
      2.0
    """
    _check_batch(batch)
    labels = batch["label"]
    outputs = {}
    if return_outputs:
        logits, features = state.apply_fn(
            state.variables, batch["image"], train=False, return_features=True
        )
        outputs = {"logits": logits, "features": features}
    else:
        logits = state.apply_fn(state.variables, batch["image"], train=False)
    mask = batch.get("mask")
    mask = jnp.ones(labels.shape, bool) if mask is None else jnp.asarray(mask).astype(bool)
    if mask.shape != labels.shape:
        raise ValueError(f"batch['mask'] must be [B]={labels.shape}, got shape {mask.shape}")
    labelled = mask & (labels >= 0)
    loss = per_example_loss(logits, jnp.where(labelled, labels, 0), loss=state.loss)
    correct = jnp.argmax(logits, axis=-1) == labels
    sums = {
        "loss_sum": jnp.sum(jnp.where(labelled, loss, 0.0)),
        "correct": jnp.sum(jnp.where(labelled, correct, False).astype(jnp.float32)),
        "count": jnp.sum(labelled.astype(jnp.float32)),
    }
    if axis_name is not None:
        sums = jax.lax.psum(sums, axis_name)
    return (sums, outputs) if return_outputs else sums
