"""config ``deterministic``: the process-wide switch to deterministic kernels (that two runs of the
scores under it give the same bits on a GPU is a device test: tests/test_device.py)."""

import os

import pytest
import torch

from esa.determinism import CUBLAS_WORKSPACE, use_deterministic_kernels


@pytest.fixture
def restore_mode(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    yield
    torch.use_deterministic_algorithms(False)


def test_off_changes_nothing(restore_mode):
    use_deterministic_kernels(False)
    assert not torch.are_deterministic_algorithms_enabled()
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ


def test_on_switches_torch_and_fixes_the_cublas_workspace(restore_mode):
    use_deterministic_kernels(True)
    assert torch.are_deterministic_algorithms_enabled()
    assert not torch.is_deterministic_algorithms_warn_only_enabled()  # an op without one raises
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == CUBLAS_WORKSPACE == ":4096:8"


def test_a_workspace_the_user_chose_is_kept(restore_mode, monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    use_deterministic_kernels(True)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
