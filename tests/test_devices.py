"""`device: auto` resolved before it enters a result's key (esa/devices.py), torch-free."""

import subprocess
import sys
from pathlib import Path

import torch

from esa.devices import cuda_device_count, resolve_auto


def test_the_driver_probe_counts_what_torch_counts():
    """Without a CUDA driver (this machine) both see 0; on a GPU node both count the visible devices."""
    assert cuda_device_count() == torch.cuda.device_count()


def test_auto_is_resolved_and_explicit_devices_are_kept():
    local = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_auto("auto") == local
    for name in ("cpu", "cuda", "cuda:1"):
        assert resolve_auto(name) == name


def test_the_probe_imports_no_torch():
    code = "import sys; from esa.devices import resolve_auto; resolve_auto('auto'); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.stdout == "False\n"
