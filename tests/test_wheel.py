"""The package as users get it: ``python -m build`` and the wheel in a clean virtual environment.

Builds the sdist and, from it, the wheel (``py.typed`` included, the version from
``isomax_jax.__version__``), installs the wheel with its runtime dependencies only (pinned by
``constraints.txt``) into a fresh virtual environment without this environment's packages,
checks that ``import isomax_jax`` imports neither TensorFlow nor torch, and runs the README's
quick-start block there.
"""

import json
import pathlib
import re
import subprocess
import sys
import tarfile
import zipfile

import pytest

import isomax_jax

ROOT = pathlib.Path(__file__).resolve().parents[1]

CHECK = r"""
import importlib.metadata, json, pathlib, sys
import isomax_jax
heavy = sorted(m for m in ("tensorflow", "torch", "tensorflow_datasets") if m in sys.modules)
namespace = {}
exec(compile(pathlib.Path(sys.argv[1]).read_text(), "README quick start", "exec"), namespace)
score = namespace["ood_score"]
print(json.dumps({
    "file": isomax_jax.__file__,
    "version": isomax_jax.__version__,
    "metadata_version": importlib.metadata.version("isomax_jax"),
    "py_typed": (pathlib.Path(isomax_jax.__file__).parent / "py.typed").is_file(),
    "heavy_imports": heavy,
    "score_shape": list(score.shape),
}))
"""


def _run(command, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> pathlib.Path:
    """``python -m build``: the sdist, then the wheel built from it (offline: no isolation)."""
    pytest.importorskip("build", reason="install the test extra: pip install -e '.[test]'")
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)])
    return out


@pytest.mark.slow
def test_build_gives_sdist_and_typed_wheel(dist):
    version = isomax_jax.__version__
    (wheel,) = dist.glob(f"isomax_jax-{version}-py3-none-any.whl")
    (sdist,) = dist.glob(f"isomax_jax-{version}.tar.gz")
    names = zipfile.ZipFile(wheel).namelist()
    assert "isomax_jax/py.typed" in names
    assert not [n for n in names if n.startswith(("tests/", "experiments/", "examples/"))]
    metadata = zipfile.ZipFile(wheel).read(f"isomax_jax-{version}.dist-info/METADATA").decode()
    requires = re.findall(r"^Requires-Dist: (jax\S*)", metadata, flags=re.M)
    assert requires and all("<" in r for r in requires), requires  # bounded above
    with tarfile.open(sdist) as tar:
        members = tar.getnames()
    assert f"isomax_jax-{version}/isomax_jax/py.typed" in members
    assert f"isomax_jax-{version}/setup.cfg" in members


@pytest.mark.slow
def test_wheel_installs_and_runs_the_quick_start_in_a_clean_venv(dist, tmp_path):
    (wheel,) = dist.glob("isomax_jax-*.whl")
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)])  # no access to this environment's packages
    python = venv / "bin" / "python"
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    _run([*pip, "-c", str(ROOT / "constraints.txt"), str(wheel)], timeout=1200)
    _run([str(python), "-m", "pip", "check"])

    readme = (ROOT / "README.md").read_text()
    quick_start = re.findall(r"```python\n(.*?)```", readme, flags=re.S)[0]
    block = tmp_path / "quick_start.py"
    block.write_text(quick_start)
    env = {"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"}
    result = _run([str(python), "-c", CHECK, str(block)], cwd=tmp_path, env=env, timeout=600)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert str(venv) in report["file"]  # the installed wheel, not the working tree
    assert report["version"] == report["metadata_version"] == isomax_jax.__version__
    assert report["py_typed"]
    assert report["heavy_imports"] == []  # neither TensorFlow nor torch comes with the core
    assert report["score_shape"] == [4]
