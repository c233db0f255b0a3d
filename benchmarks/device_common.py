"""What the parts of ``benchmarks/device_check.py`` share: the log, the JSON of every figure,
the models and the library's train state and step with a learning rate set between steps."""

from __future__ import annotations

import json
import os
import threading
import time

import jax
import jax.numpy as jnp
import optax

from isomax_jax import train
from isomax_jax.models import get_model, make_head
from isomax_jax.models.classifier import Classifier
from isomax_jax.models.resnet import CifarResNet

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

RESULTS: dict = {"parts": {}}
_LOCK = threading.Lock()
START = time.monotonic()


def log(message: str) -> None:
    print(f"[{time.monotonic() - START:6.1f}s] {message}", flush=True)


def write_json(path) -> None:
    if path is None:
        return
    with _LOCK:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(RESULTS, f, indent=1, default=str)
        os.replace(tmp, path)


def build_model(name: str, head: str, dtype):
    """``get_model(name, ...)``, or for ``name="tiny"`` (``--smoke``) a 1-block ResNet."""
    if name != "tiny":
        return get_model(name, num_classes=10, head=head, dtype=dtype)
    backbone = CifarResNet(stage_sizes=(1,), widths=(8,), stem_width=8, stem_stride=2,
                           shortcut="zero_pad", dtype=dtype)  # fmt: skip
    return Classifier(backbone, make_head(head, num_classes=10))


def sgd_with_learning_rate(learning_rate: float) -> optax.GradientTransformation:
    """The reference optimiser (SGD-Nesterov 0.9, weight decay 1e-4) with the learning rate a
    hyperparameter of its state (:func:`set_learning_rate`): one compiled step for every lr."""
    return optax.inject_hyperparams(train.reference_optimizer)(learning_rate=learning_rate)


def set_learning_rate(state: train.TrainState, learning_rate: float) -> train.TrainState:
    hyperparams = {**state.opt_state.hyperparams, "learning_rate": jnp.float32(learning_rate)}
    return state.replace(opt_state=state.opt_state._replace(hyperparams=hyperparams))


def train_state(model, head: str, tx, *, key=None, variables=None) -> train.TrainState:
    """The library's train state of ``model`` (initialised from ``key``, or ``variables``)."""
    return train.create_train_state(
        model, key=jax.random.key(0) if key is None else key, tx=tx,
        loss=train.LossConfig(head), variables=variables,
    )  # fmt: skip


def jitted_train_step():
    """``isomax_jax.train.train_step`` under ``jit``, the state donated."""
    return jax.jit(train.train_step, donate_argnums=0)
