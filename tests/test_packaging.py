"""Packaging: one version, ranges bounded by the tested environment, known-bad versions out.

``setup.cfg`` bounds every dependency above at the newest version tested; ``constraints.txt``
pins the exact versions CI and the default experiment install with (``scripts/test.sh``,
``scripts/run_default.sh``). These tests keep the three consistent with each other and with the
environment the suite runs in.
"""

import configparser
import importlib.metadata
import pathlib
import re

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

import isomax_jax

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The runtime dependencies: what `pip install isomax_jax` brings, and what the numbers depend on.
CORE = ("jax", "jaxlib", "flax", "optax", "chex", "numpy", "orbax-checkpoint")


def _setup_cfg() -> configparser.ConfigParser:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    return config


def _requirements() -> dict[str, list[Requirement]]:
    """``{"install": [...], extra: [...]}`` from setup.cfg (``%(data)s`` references expanded)."""
    config = _setup_cfg()
    groups = {"install": config["options"]["install_requires"]}
    groups.update(config["options.extras_require"])
    return {
        name: [Requirement(line) for line in text.splitlines() if line.strip()]
        for name, text in groups.items()
    }


def _constraints() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[canonicalize_name(name)] = Version(version)
    return pins


def test_one_version_source():
    config = _setup_cfg()
    assert config["metadata"]["version"].strip() == "attr: isomax_jax.__version__"
    assert Version(isomax_jax.__version__) == Version(importlib.metadata.version("isomax_jax")), (
        "the installed metadata is stale: reinstall (bash scripts/test.sh does)"
    )


def test_changelog_has_this_version():
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert re.search(rf"^## \[?{re.escape(isomax_jax.__version__)}\]?", changelog, flags=re.M)


def test_every_dependency_has_an_upper_bound_the_constraints_satisfy():
    pins = _constraints()
    for group, requirements in _requirements().items():
        for requirement in requirements:
            spec = requirement.specifier
            assert any(s.operator in ("<", "<=", "==") for s in spec), (
                f"{requirement} ({group}) has no upper bound"
            )
            name = canonicalize_name(requirement.name)
            assert name in pins, f"{name} ({group}) is not pinned in constraints.txt"
            assert spec.contains(pins[name], prereleases=True), (
                f"constraints.txt pins {name}=={pins[name]}, outside {group}'s {spec}"
            )


def test_core_environment_is_the_pinned_one():
    """The suite runs in the named environment (scripts/test.sh installs it)."""
    pins = _constraints()
    for name in CORE:
        installed = Version(importlib.metadata.version(name))
        assert installed.public == pins[canonicalize_name(name)].public, (
            f"{name} {installed} is installed, constraints.txt pins {pins[name]}: "
            "install with `pip install -c constraints.txt ...` (bash scripts/test.sh)"
        )


@pytest.mark.parametrize("bad", ["0.11.2"])
def test_known_bad_jax_versions_are_excluded(bad):
    """jax 0.11.2 gives NaN bfloat16 logits on XLA:CPU (docs/accelerators.md): out of range."""
    (jax,) = [r for r in _requirements()["install"] if r.name == "jax"]
    assert not jax.specifier.contains(bad), f"{jax} admits jax {bad} (docs/accelerators.md)"
    assert importlib.metadata.version("jax") != bad
