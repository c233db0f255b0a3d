"""The evaluator against detectors + ood_metrics computed by hand, on a small Flax model."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from isomax_jax import detectors, evaluation, heads
from isomax_jax.metrics import ood_metrics

C, H = 3, 6  # classes, image side


class Net(nn.Module):
    head: nn.Module

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3))(x))
        features = jnp.mean(x, axis=(1, 2))
        return self.head(features), features


def make_set(seed, n, ood=False):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % C
    centers = np.linspace(-1, 1, C)[:, None, None, None] * np.ones((C, H, H, 3))
    images = centers[labels] + rng.normal(size=(n, H, H, 3)) * 0.5
    if ood:
        images = rng.uniform(-3, 3, size=(n, H, H, 3))
    return images.astype(np.float32), labels


def batched(images, labels, sizes, with_labels=True):
    out, start = [], 0
    for size in sizes:
        batch = {"image": images[start : start + size]}
        if with_labels:
            batch["label"] = labels[start : start + size]
        out.append(batch)
        start += size
    assert start == len(images)
    return out


@pytest.fixture(scope="module")
def model():
    net = Net(heads.SoftMaxHead(C))
    variables = net.init(jax.random.key(0), jnp.zeros((1, H, H, 3)))

    def outputs_fn(images):
        logits, features = net.apply(variables, images)
        return {"logits": logits, "features": features}

    params = variables["params"]["head"]
    head_fn = jax.jit(lambda f: heads.SoftMaxHead(C).apply({"params": params}, f))
    return outputs_fn, dict(kernel=params["kernel"], bias=params["bias"], head_fn=head_fn)


def test_evaluator_equals_detectors_and_metrics_by_hand(model, x64):
    """In float64, so that the sharded, padded forward pass and one plain call agree to 1e-12
    (in float32 they differ in the last bit, which RMD's cancellation amplifies)."""
    outputs_fn, head = model
    f64 = lambda images, labels: (images.astype(np.float64), labels)  # noqa: E731
    train, test = f64(*make_set(0, 120)), f64(*make_set(1, 45))
    near, far = f64(*make_set(2, 30, ood=True)), f64(*make_set(3, 26, ood=True))
    names = ["msp", "energy", "mahalanobis", "relative_mahalanobis", "knn", "vim", "react", "ash"]
    dets = [detectors.get(n, k=5) if n == "knn" else detectors.get(n) for n in names]
    report = evaluation.evaluate(
        outputs_fn,
        head="softmax",
        fit_batches=(b for b in batched(*train, (50, 7, 63))),  # a generator: spooled for ViM
        id_batches=batched(*test, (20, 20, 5)),  # not a multiple of the 8 devices: padded
        ood_batches={
            "near": {"a": batched(*near, (30,), False)},
            "far": {"b": batched(*far, (13, 13), False)},
        },  # fmt: skip
        detectors=dets,
        progress=False,
        **head,
    )
    out = {k: outputs_fn(v[0]) for k, v in dict(train=train, test=test, a=near, b=far).items()}
    for det in dets:
        state = det.fit(
            features=out["train"]["features"], labels=train[1], logits=out["train"]["logits"],
            **head,
        )  # fmt: skip
        want = {s: np.asarray(det.score(state, **out[s], **head)) for s in ("test", "a", "b")}
        tol = dict(rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(report.scores["in"][det.name], want["test"], **tol)
        for s in ("a", "b"):
            np.testing.assert_allclose(report.scores[s][det.name], want[s], **tol)
            for conv in ("reference", "openood"):
                by_hand = ood_metrics(want["test"], want[s], convention=conv)
                got = report.metrics[conv][s][det.name]
                for metric, value in by_hand.items():
                    np.testing.assert_allclose(got[metric], float(value), rtol=1e-12)
    predicted = np.asarray(out["test"]["logits"]).argmax(1)
    assert report.accuracy == float(np.mean(predicted == test[1]))
    assert report.num_examples == {"in": 45, "a": 30, "b": 26}
    assert report.groups == {"near": ("a",), "far": ("b",)}
    means = report.group_means("openood")
    assert means["far"]["knn"]["auroc"] == report.metrics["openood"]["b"]["knn"]["auroc"]
    text = report.to_markdown()
    assert "**near (mean)**" in text and "Mahalanobis" in text and "Convention `openood`" in text
    data = json.loads(report.to_json())
    assert data["accuracy"] == report.accuracy and "scores" not in data


def test_default_detectors_masks_and_skips(model):
    outputs_fn, head = model
    train, test, ood = make_set(0, 60), make_set(1, 24), make_set(2, 24, ood=True)
    padded = [
        {"image": np.concatenate([test[0][:12], np.full((4, H, H, 3), 7.0, np.float32)]),
         "label": np.concatenate([test[1][:12], [-1] * 4]),
         "mask": np.arange(16) < 12},
        {"image": test[0][12:], "label": test[1][12:]},
    ]  # fmt: skip
    kwargs = dict(
        head="softmax", fit_batches=batched(*train, (60,)), progress=False,
        ood_batches={"ood": batched(*ood, (24,), False)}, perturbation_max_examples=20,
    )  # fmt: skip
    masked = evaluation.evaluate(outputs_fn, id_batches=padded, **kwargs)
    plain = evaluation.evaluate(outputs_fn, id_batches=batched(*test, (12, 12)), **kwargs)
    assert masked.num_examples["in"] == 24
    assert "vim" in masked.skipped and "needs bias, kernel" in masked.skipped["vim"]
    assert "react" in masked.skipped and "odin" in masked.detectors  # differentiable: kept
    assert set(masked.detectors) == {
        n for n in detectors.NAMES if detectors.get(n).applies_to("softmax")
    } - set(masked.skipped)
    for name in masked.detectors:
        np.testing.assert_array_equal(masked.scores["in"][name], plain.scores["in"][name])
    assert len(masked.scores["ood"]["odin"]) == 20  # input perturbation: the first 20 only
    odin = detectors.get("odin")
    want = odin.score_images({}, lambda x: outputs_fn(x), ood[0][:20])
    np.testing.assert_allclose(masked.scores["ood"]["odin"], want, rtol=1e-6)


def test_non_differentiable_or_logits_only_models(model):
    outputs_fn, _ = model

    def opaque(images):  # e.g. a model run outside JAX: no input gradient
        shape = jax.ShapeDtypeStruct((images.shape[0], C), jnp.float32)
        logits = jax.pure_callback(lambda x: np.asarray(outputs_fn(x)["logits"]), shape, images)
        return logits  # logits only

    train, test, ood = make_set(0, 30), make_set(1, 24), make_set(2, 24, ood=True)
    kwargs = dict(
        head="softmax", fit_batches=batched(*train, (30,)), progress=False,
        id_batches=batched(*test, (24,)), ood_batches={"o": batched(*ood, (24,), False)},
    )  # fmt: skip
    report = evaluation.evaluate(opaque, **kwargs)
    assert "cannot be differentiated" in report.skipped["odin"]
    assert "logits only" in report.skipped["knn"] and "msp" in report.detectors
    with pytest.raises(ValueError, match="detector `odin` needs the images' gradient"):
        evaluation.evaluate(opaque, detectors=["odin"], **kwargs)
    with pytest.raises(ValueError, match="detector `min_distance` does not apply"):
        evaluation.evaluate(outputs_fn, detectors=["min_distance"], **kwargs)
    with pytest.raises(ValueError, match="`fit_batches` is needed"):
        evaluation.evaluate(outputs_fn, detectors=["knn"], **{**kwargs, "fit_batches": None})
    with pytest.raises(ValueError, match="non-empty mapping"):
        evaluation.evaluate(outputs_fn, **{**kwargs, "ood_batches": {}})


def test_docs_example_runs(capsys):
    """docs/evaluation.md's first example ("your own Flax model, in ten lines") runs."""
    import pathlib
    import re

    text = (pathlib.Path(__file__).parents[1] / "docs" / "evaluation.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "docs/evaluation.md", "exec"), namespace)  # noqa: S102
    report = namespace["report"]
    assert report.groups == {"near": ("shifted",), "far": ("noise",)}
    assert {"mahalanobis", "knn", "min_distance", "odin"} <= set(report.detectors)
    assert "head_fn" in report.skipped["react"]
    assert "**far (mean)**" in capsys.readouterr().out


def test_nan_images_are_an_error_naming_the_set(model):
    """Issue 20.4: NaN/inf inputs from a user's pipeline give a clear error before any metric,
    naming the set (the training split included)."""
    outputs_fn, head = model
    train, test, ood = make_set(0, 30), make_set(1, 24), make_set(2, 24, ood=True)
    bad = ood[0].copy()
    bad[5, 0, 0, 0] = np.nan
    kwargs = dict(head="softmax", detectors=["msp", "knn"], progress=False)
    with pytest.raises(ValueError, match=r"set 'noisy': 1 of 24 examples give non-finite logits"):
        evaluation.evaluate(
            outputs_fn, fit_batches=batched(*train, (30,)), id_batches=batched(*test, (24,)),
            ood_batches={"noisy": batched(bad, ood[1], (24,), False)}, **kwargs,
        )  # fmt: skip
    train_bad = train[0].copy()
    train_bad[3] = np.inf
    with pytest.raises(ValueError, match=r"the training split \(`fit_batches`\): `features`"):
        evaluation.evaluate(
            outputs_fn, fit_batches=batched(train_bad, train[1], (30,)),
            id_batches=batched(*test, (24,)), ood_batches={"o": batched(*ood, (24,), False)},
            **kwargs,
        )  # fmt: skip
