"""Fixtures for parity tests against the PyTorch reference (``robust-deep-learning==0.5.0``).

Tests here are skipped only when torch (or the reference package) cannot be imported. The
reference's loss "second parts" and calibration call ``.cuda()`` / ``.to('cuda')``
unconditionally; the ``torch_cpu`` fixture turns those into no-ops for the test's duration.
"""

import pytest


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
