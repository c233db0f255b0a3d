"""The documentation site: every public module has an API page, and Sphinx builds it cleanly.

The build is the one ``docs/conf.py`` describes (autodoc + napoleon for the API reference, MyST
for the guides in ``docs/*.md``), with warnings as errors, so a docstring that does not render
(a malformed table, a broken cross-reference to a duplicate object, a missing page in a
toctree) fails here rather than on the published site.
"""

import os
import pathlib
import pkgutil
import re
import subprocess
import sys

import pytest

import isomax_jax

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _public_modules() -> set[str]:
    names = {"isomax_jax"}
    for info in pkgutil.walk_packages(isomax_jax.__path__, prefix="isomax_jax."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            names.add(info.name)
    return names


def _documented_modules() -> set[str]:
    text = "\n".join(p.read_text() for p in sorted((DOCS / "api").glob("*.rst")))
    return set(re.findall(r"^\.\. automodule:: (\S+)", text, flags=re.M))


def test_every_public_module_has_an_api_page():
    missing = sorted(_public_modules() - _documented_modules())
    assert not missing, f"add an `.. automodule::` to a docs/api/*.rst page for {missing}"
    stale = sorted(_documented_modules() - _public_modules())
    assert not stale, f"docs/api documents modules that do not exist: {stale}"


def test_every_guide_is_in_the_site():
    index = (DOCS / "index.md").read_text()
    for guide in sorted(DOCS.glob("*.md")):
        if guide.stem != "index":
            listed = re.search(rf"^{guide.stem}$", index, flags=re.M)
            assert listed, f"{guide.name} is in no toctree of docs/index.md"


@pytest.mark.slow
def test_sphinx_builds_without_warnings(tmp_path):
    pytest.importorskip("sphinx", reason="install the docs extra: pip install -e '.[docs]'")
    pytest.importorskip("myst_parser", reason="install the docs extra: pip install -e '.[docs]'")
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    command = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html"]
    command += ["-d", str(tmp_path / "doctrees"), str(DOCS), str(tmp_path / "html")]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    warnings = [line for line in result.stderr.splitlines() if "WARNING" in line or "ERROR" in line]
    assert result.returncode == 0, "\n".join(warnings) or result.stderr[-4000:]
    index = (tmp_path / "html" / "index.html").read_text()
    assert "IsoMaxPlusHead" in index  # the quick start leads
    api = (tmp_path / "html" / "api" / "detectors.html").read_text()
    assert 'id="isomax_jax.detectors.get"' in api  # detectors.get's arguments, from autodoc
