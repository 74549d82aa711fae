"""Which device ``device: auto`` means, decided before it enters a result's key (torch-free).

Results are keyed by what they depend on (``esa.layout``), and the device is part of that: a
study run with ``auto`` on a CPU machine and one run with ``cpu`` share every result. So
``auto`` is resolved where the DAG is built, without importing torch (seconds per Snakemake
start): the CUDA driver is asked how many devices it shows (``cuInit`` + ``cuDeviceGetCount``,
which honour ``CUDA_VISIBLE_DEVICES``, as torch's own count does).

Under a cluster executor the machine building the DAG (a login node) decides for the jobs:
Snakemake starts each job on its node by parsing the Snakefile again, and that job takes the
head's resolution from ``ESA_DEVICE`` (``rules/common.smk``), so the two agree on every key.
A login node without a GPU resolves ``auto`` to ``cpu``: there, write ``device: cuda``.
"""

from __future__ import annotations

import ctypes
import ctypes.util

AUTO, CPU, CUDA = "auto", "cpu", "cuda"
DEVICE_VARIABLE = "ESA_DEVICE"  # the head's resolution, handed to the jobs a cluster starts


def cuda_device_count() -> int:
    """CUDA devices the driver shows this process; 0 without a driver or a device."""
    name = ctypes.util.find_library("cuda") or "libcuda.so.1"
    try:
        driver = ctypes.CDLL(name)
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if driver.cuInit(0) != 0 or driver.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


def resolve_auto(device: str) -> str:
    """``device`` with ``auto`` replaced by ``cuda`` (a CUDA device is visible) or ``cpu``; any
    other name unchanged."""
    if device != AUTO:
        return device
    return CUDA if cuda_device_count() > 0 else CPU
