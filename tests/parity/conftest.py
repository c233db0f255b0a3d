"""Fixtures for parity tests against the PyTorch references.

References: ``robust-deep-learning==0.5.0`` (the IsoMax authors' package) and
``pytorch-ood==0.4.0`` (post-hoc detectors). Tests here are skipped only when torch (or the
reference package) cannot be imported. The reference's loss "second parts" and calibration call
``.cuda()`` / ``.to('cuda')`` unconditionally; the ``torch_cpu`` fixture turns those into no-ops
for the test's duration.

torchvision (0.28.0, installed with ``--no-deps`` beside the CPU torch) is the reference of the
``tv_*`` models. Its compiled ops do not load with this torch build, and its package ``__init__``
imports ``torchvision._meta_registrations``, which registers fake kernels for those ops and fails
without them; the models never use the ops. :func:`import_torchvision` therefore puts an empty
``torchvision._meta_registrations`` into ``sys.modules`` before ``import torchvision``; the
``torchvision`` fixture skips when it still cannot be imported.

pytorch-ood's package ``__init__`` imports its dataset, model and augmentation modules, which
import torchvision; pytorch-ood's detectors never use it. The ``pytorch_ood`` fixture imports the
real torchvision as above when it can, and otherwise puts a stub ``torchvision`` (the submodules
pytorch-ood imports, whose attributes are inert placeholder classes) into ``sys.modules``
*before* importing pytorch_ood. Within one process both fixtures see the same torchvision,
whichever runs first.
"""

import importlib.util
import sys
import types

import pytest

# The torchvision modules pytorch-ood 0.4.0 imports (grep "torchvision" in its sources).
TORCHVISION_MODULES = (
    "torchvision",
    "torchvision.datasets",
    "torchvision.datasets.utils",
    "torchvision.models",
    "torchvision.models.resnet",
    "torchvision.transforms",
    "torchvision.transforms.functional",
)


class _TorchvisionStub(types.ModuleType):
    """A module whose every public attribute is an inert placeholder class.

    pytorch-ood subclasses some of them at import time (``VisionDataset``, ``ResNet``) and only
    calls the others inside dataset/model code that the detector tests never run.
    """

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        placeholder = type(name, (), {"__init__": lambda self, *args, **kwargs: None})
        placeholder.__module__ = self.__name__
        setattr(self, name, placeholder)
        return placeholder


def _forget_torchvision() -> None:
    """Removes torchvision and its submodules from ``sys.modules`` (a failed import's debris)."""
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]


def import_torchvision() -> types.ModuleType | None:
    """The real torchvision, imported with ``_meta_registrations`` stubbed; None if it cannot be
    (not installed, or stubbed for pytorch-ood already)."""
    module = sys.modules.get("torchvision")
    if module is not None:
        return None if isinstance(module, _TorchvisionStub) else module
    for package in ("torch", "torchvision"):
        if importlib.util.find_spec(package) is None:
            return None
    # Fake kernels of the compiled ops, which fail without them; the models never use them.
    sys.modules["torchvision._meta_registrations"] = types.ModuleType(
        "torchvision._meta_registrations"
    )
    try:
        import torchvision
    except Exception:  # a wheel that does not load beside this torch even so
        _forget_torchvision()
        return None
    return torchvision


def install_torchvision_stub() -> bool:
    """Stubs torchvision in ``sys.modules`` unless a working one imports; True if stubbed."""
    if isinstance(sys.modules.get("torchvision"), _TorchvisionStub):
        return True
    if import_torchvision() is not None:
        return False
    for name in TORCHVISION_MODULES:
        module = _TorchvisionStub(name)
        module.__path__ = []  # a package, so its submodules resolve from sys.modules
        sys.modules[name] = module
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, module)
    return True


@pytest.fixture(scope="session")
def torchvision():
    """The real ``torchvision`` package (0.28.0 in CI), the reference of the ``tv_*`` models.

    Skips when torch or torchvision is not installed, or torchvision does not import (or was
    stubbed for pytorch-ood because it did not).
    """
    module = import_torchvision()
    if module is None:
        pytest.skip("torchvision cannot be imported (pip install --no-deps torchvision==0.28.0)")
    return module


@pytest.fixture(scope="session")
def pytorch_ood():
    """The ``pytorch_ood`` package (0.4.0), imported after stubbing torchvision.

    Skips only when torch or pytorch_ood is not installed; any other import failure is an error.
    """
    for package in ("torch", "pytorch_ood"):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"{package} is not installed")
    install_torchvision_stub()
    import pytorch_ood as package

    assert package.__version__ == "0.4.0", package.__version__
    return package


@pytest.fixture
def torch_cpu(monkeypatch):
    """``torch`` with ``Tensor.cuda``, ``Module.cuda`` and ``Tensor.to(cuda)`` made no-ops."""
    torch = pytest.importorskip("torch")
    original_to = torch.Tensor.to

    def to(self, *args, **kwargs):
        device = args[0] if args else kwargs.get("device")
        if isinstance(device, (str, torch.device)) and torch.device(device).type == "cuda":
            return self
        return original_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *args, **kwargs: self)
    monkeypatch.setattr(torch.nn.Module, "cuda", lambda self, *args, **kwargs: self)
    monkeypatch.setattr(torch.Tensor, "to", to)
    return torch


@pytest.fixture
def reference(torch_cpu):
    """The ``robust_deep_learning`` package (imported with the CPU patches active)."""
    return pytest.importorskip("robust_deep_learning")


@pytest.fixture
def torch_float64(pytorch_ood):
    """torch's default dtype float64 for the test (pytorch-ood allocates with it)."""
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.fixture
def float_keeps_float64(monkeypatch, torch_float64):
    """``Tensor.float()`` keeps float64 tensors, so the pytorch-ood detectors that cast to
    float32 (ViM, DICE, fDBD, NNGuide) run in float64."""
    import torch

    original = torch.Tensor.float

    def float_(self, *args, **kwargs):
        return self if self.dtype == torch.float64 else original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "float", float_)
