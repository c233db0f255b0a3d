"""Train state, optimiser, schedule and the pure train/eval steps."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_worker import init_state, make_batch

from isomax_jax import train

RTOL = 1e-5


def _log_softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def _train_logits(state, images):
    logits, _ = state.apply_fn(state.variables, images, train=True, mutable=["batch_stats"])
    return np.asarray(logits, np.float64)


def test_multistep_schedule_matches_torch_multisteplr():
    torch = pytest.importorskip("torch")
    steps_per_epoch, milestones = 3, (2, 4, 5)
    schedule = train.multistep_schedule(steps_per_epoch=steps_per_epoch, milestones=milestones)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(milestones), gamma=0.1)
    for epoch in range(7):
        torch_lr = opt.param_groups[0]["lr"]
        for i in range(steps_per_epoch):
            step = epoch * steps_per_epoch + i
            np.testing.assert_allclose(schedule(step), torch_lr, rtol=1e-6, err_msg=f"step {step}")
        opt.step()
        sched.step()


def test_reference_optimizer_matches_torch_sgd():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    w0 = rng.normal(size=(4, 3)).astype(np.float32)
    grads = rng.normal(size=(6, 4, 3)).astype(np.float32)
    schedule = train.multistep_schedule(steps_per_epoch=2, milestones=(1,))
    tx = train.reference_optimizer(schedule)
    params, opt_state = jnp.asarray(w0), tx.init(jnp.asarray(w0))
    p = torch.nn.Parameter(torch.tensor(w0))
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[2], gamma=0.1)  # in steps
    for g in grads:
        updates, opt_state = tx.update(jnp.asarray(g), opt_state, params)
        params = params + updates
        p.grad = torch.tensor(g)
        opt.step()
        sched.step()
    np.testing.assert_allclose(params, p.detach().numpy(), rtol=1e-6, atol=1e-7)


def test_softmax_train_step_loss_and_update():
    state = init_state()
    batch = make_batch(0, batch_size=8)
    logits = _train_logits(state, batch["image"])
    expected_loss = -np.mean(_log_softmax(logits)[np.arange(8), batch["label"]])
    new_state, metrics = jax.jit(train.train_step)(state, batch)
    np.testing.assert_allclose(metrics["loss"], expected_loss, rtol=RTOL)
    expected_acc = np.mean(logits.argmax(1) == batch["label"])
    np.testing.assert_allclose(metrics["accuracy"], expected_acc, rtol=RTOL)
    assert int(new_state.step) == 1
    # The update is the optimiser's update of the loss gradient.
    grads = jax.jit(
        jax.grad(
            lambda p: jnp.mean(
                train.per_example_loss(
                    state.apply_fn(
                        {"params": p, "batch_stats": state.batch_stats},
                        batch["image"],
                        train=True,
                        mutable=["batch_stats"],
                    )[0],
                    batch["label"],
                    loss=state.loss,
                )
            )
        )
    )(state.params)
    updates, _ = state.tx.update(grads, state.opt_state, state.params)
    expected_params = jax.tree.map(lambda old, u: old + u, state.params, updates)
    chex.assert_trees_all_close(new_state.params, expected_params, rtol=RTOL, atol=1e-7)
    # BatchNorm running statistics: momentum 0.9 towards the batch statistics.
    mean0 = state.batch_stats["BatchNorm_0"]["mean"]
    mean1 = new_state.batch_stats["BatchNorm_0"]["mean"]
    conv = nn.Conv(8, (3, 3), strides=(2, 2), use_bias=False).apply(
        {"params": state.params["Conv_0"]}, batch["image"]
    )
    batch_mean = np.asarray(conv, np.float64).mean(axis=(0, 1, 2))
    np.testing.assert_allclose(mean1, 0.9 * np.asarray(mean0) + 0.1 * batch_mean, rtol=RTOL)


@pytest.mark.parametrize("head", ["isomax", "isomax_plus", "dismax"])
def test_isomax_family_uses_entropic_loss(head):
    pytest.importorskip("isomax_jax.heads")
    pytest.importorskip("isomax_jax.losses")
    state = init_state(head=head)
    batch = make_batch(1, batch_size=8)
    logits = _train_logits(state, batch["image"])
    expected = -np.mean(_log_softmax(10.0 * logits)[np.arange(8), batch["label"]])
    _, metrics = jax.jit(train.train_step)(state, batch)
    np.testing.assert_allclose(metrics["loss"], expected, rtol=RTOL)


def test_dismax_fpr_step_uses_augmentation_and_fpr_loss():
    losses = pytest.importorskip("isomax_jax.losses")
    pytest.importorskip("isomax_jax.heads")
    state = init_state(head="dismax")
    state = state.replace(loss=train.LossConfig("dismax", fpr=True))
    batch = make_batch(2, batch_size=8)
    _, aug_key = jax.random.split(jax.random.wrap_key_data(state.rng))
    images, labels = losses.dismax_fpr_augment(aug_key, batch["image"], batch["label"])
    logits, _ = state.apply_fn(state.variables, images, train=True, mutable=["batch_stats"])
    expected = losses.dismax_fpr_loss(logits, labels, entropic_scale=10.0, alpha=1.0)
    new_state, metrics = jax.jit(train.train_step)(state, batch)
    np.testing.assert_allclose(metrics["loss"], expected, rtol=RTOL)
    assert not np.array_equal(new_state.rng, state.rng)  # a fresh key for the next step


def test_eval_step_masked_sums_equal_unpadded():
    state = init_state()
    batch = make_batch(3, batch_size=8)
    logits = np.asarray(state.apply_fn(state.variables, batch["image"], train=False), np.float64)
    ce = -_log_softmax(logits)[np.arange(8), batch["label"]]
    padded = {
        "image": np.concatenate([batch["image"], np.full((3, 8, 8, 3), 1e4, np.float32)]),
        "label": np.concatenate([batch["label"], np.full(3, 7, np.int32)]),
        "mask": np.arange(11) < 8,
    }
    sums = jax.jit(train.eval_step)(state, padded)
    np.testing.assert_allclose(sums["loss_sum"], ce.sum(), rtol=RTOL)
    np.testing.assert_allclose(sums["correct"], np.sum(logits.argmax(1) == batch["label"]), rtol=0)
    np.testing.assert_allclose(sums["count"], 8.0, rtol=0)
    unmasked = jax.jit(train.eval_step)(state, batch)
    chex.assert_trees_all_close(sums, unmasked, rtol=RTOL)


def test_train_step_compiles_once():
    traces = []

    def counted(state, batch):
        traces.append(1)
        return train.train_step(state, batch)

    step_fn = jax.jit(counted, donate_argnums=0)
    state = init_state()
    for step in range(3):
        state, _ = step_fn(state, make_batch(step, batch_size=4))
    assert len(traces) == 1 and step_fn._cache_size() == 1


def test_bad_inputs_are_rejected():
    state = init_state()
    batch = make_batch(0, batch_size=4)
    with pytest.raises(
        ValueError, match=r"batch\['label'\] must be \[B\]=\(4,\), got shape \(3,\)"
    ):
        train.train_step(state, {"image": batch["image"], "label": batch["label"][:3]})
    with pytest.raises(TypeError, match=r"batch\['label'\] must be integer, got float32"):
        train.train_step(state, {"image": batch["image"], "label": np.zeros(4, np.float32)})
    with pytest.raises(ValueError, match=r"must be \[B, H, W, C\], got shape \(4, 8, 8\)"):
        train.train_step(state, {"image": batch["image"][..., 0], "label": batch["label"]})
    with pytest.raises(ValueError, match=r"must have a 'label' entry, got keys \['image'\]"):
        train.train_step(state, {"image": batch["image"]})
    with pytest.raises(ValueError, match=r"batch\['mask'\] must be \[B\]=\(4,\), got shape \(2,\)"):
        train.eval_step(state, {**batch, "mask": np.ones(2, bool)})
    with pytest.raises(ValueError, match=r"`head` must be one of .*; got 'cosine'"):
        train.LossConfig("cosine")
    with pytest.raises(ValueError, match=r"fpr=True needs head='dismax', got head='isomax'"):
        train.LossConfig("isomax", fpr=True)
    with pytest.raises(ValueError, match="steps_per_epoch must be positive, got 0"):
        train.multistep_schedule(steps_per_epoch=0)
