"""The README's usage example runs as written."""

import pathlib
import re

import jax.numpy as jnp
import numpy as np

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    namespace: dict = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)  # noqa: S102
    score = np.asarray(namespace["ood_score"])
    assert score.shape == (4,)
    assert np.all(np.isfinite(score))
    loss = namespace["loss_fn"](
        namespace["params"], jnp.ones((2, 32, 32, 3)), jnp.array([0, 1], dtype=jnp.int32)
    )
    assert np.isfinite(float(loss))


def test_readme_detectors_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    block = next(b for b in blocks if "detectors.get(" in b)
    namespace: dict = {}
    exec(compile(block, str(README), "exec"), namespace)  # noqa: S102
    score = np.asarray(namespace["ood_score"])
    assert score.shape == (8,)
    assert np.all(np.isfinite(score))


def test_readme_deployment_example_runs():
    """The deployment block continues the detectors block (same namespace), as a reader runs
    them."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    first = next(b for b in blocks if "detectors.get(" in b)
    deploy = next(b for b in blocks if "OODDetector" in b)
    namespace: dict = {}
    exec(compile(first, str(README), "exec"), namespace)  # noqa: S102
    exec(compile(deploy, str(README), "exec"), namespace)  # noqa: S102
    is_in = np.asarray(namespace["is_in"])
    assert is_in.shape == (8,) and is_in.dtype == bool
    assert namespace["det"].name == "knn" and namespace["det"].tpr == 0.95
