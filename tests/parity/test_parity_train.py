"""Three full SGD steps of small_resnet match PyTorch + the reference losses (float32).

Same initial weights (the torch twin's, converted with ``isomax_jax.torch_import``), same
batches, BatchNorm in training mode in both, the reference optimiser (SGD, Nesterov, momentum
0.9, weight decay 1e-4 on all parameters) and the reference loss ``*LossSecondPart`` of
``robust_deep_learning`` -> the losses of every step and the parameters after 3 steps agree.
"""

import jax
import numpy as np
import pytest

from isomax_jax import models, torch_import, train

torch = pytest.importorskip("torch")

STEPS = 3
BATCH = 8
LR = 0.1
RTOL = 1e-4
ATOL = 1e-6  # parameters that pass through zero: absolute floor, far below the update size

SECOND_PARTS = {"isomax": "IsoMaxLossSecondPart", "dismax": "DisMaxLossSecondPart"}


def _batches():
    rng = np.random.default_rng(1)
    for _ in range(STEPS):
        yield (
            rng.normal(size=(BATCH, 32, 32, 3)).astype(np.float32),
            rng.integers(0, 10, size=(BATCH,)).astype(np.int32),
        )


@pytest.mark.parametrize("head", ["isomax", "dismax"])
def test_three_sgd_steps_match_pytorch(reference, head):
    from parity import torch_models

    torch.manual_seed(0)
    torch_model = torch_models.build("small_resnet", num_classes=10, head=head)
    if head != "isomax":  # isomax prototypes start at 0 as in the reference; others random
        torch_models.randomize_(torch_model, seed=0)
    flax_model = models.get_model("small_resnet", num_classes=10, head=head)
    variables = torch_import.convert_state_dict(
        flax_model, {k: v.numpy().copy() for k, v in torch_model.state_dict().items()}
    )

    criterion = getattr(reference, SECOND_PARTS[head])(torch_model.classifier)
    params = [p for p in torch_model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=LR, momentum=0.9, nesterov=True, weight_decay=1e-4)
    torch_model.train()
    criterion.train()
    torch_losses = []
    for images, labels in _batches():
        opt.zero_grad()
        logits = torch_model(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()))
        loss = criterion(logits, torch.from_numpy(labels).long())
        loss.backward()
        opt.step()
        torch_losses.append(loss.item())

    state = train.create_train_state(
        flax_model,
        key=jax.random.key(0),
        tx=train.reference_optimizer(LR),
        loss=train.LossConfig(head),
        variables=variables,
    )
    step_fn = jax.jit(train.train_step)
    jax_losses = []
    for images, labels in _batches():
        state, metrics = step_fn(state, {"image": images, "label": labels})
        jax_losses.append(float(metrics["loss"]))
    np.testing.assert_allclose(jax_losses, torch_losses, rtol=RTOL)
    assert len(set(np.round(torch_losses, 4))) == STEPS  # the steps did change the model

    expected = torch_import.convert_state_dict(
        flax_model, {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
    )
    got = jax.tree_util.tree_leaves_with_path(jax.device_get(state.params))
    want = dict(jax.tree_util.tree_leaves_with_path(expected["params"]))
    assert len(got) == len(want)
    for path, value in got:
        np.testing.assert_allclose(
            value, want[path], rtol=RTOL, atol=ATOL, err_msg=jax.tree_util.keystr(path)
        )
    # Running statistics follow torch's update (momentum 0.1 = Flax 0.9; the running variance
    # from the unbiased batch variance).
    got_stats = dict(jax.tree_util.tree_leaves_with_path(jax.device_get(state.batch_stats)))
    want_stats = jax.tree_util.tree_leaves_with_path(expected["batch_stats"])
    assert len(got_stats) == len(want_stats)
    for path, value in want_stats:
        np.testing.assert_allclose(
            got_stats[path], value, rtol=RTOL, atol=ATOL, err_msg=jax.tree_util.keystr(path)
        )
