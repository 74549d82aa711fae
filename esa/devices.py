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

The same probes tell ``esa.precision`` whether a device multiplies bf16 fast: a CUDA device's
compute capability (``cuDeviceGetAttribute``), a CPU's feature flags (``/proc/cpuinfo``).
"""

from __future__ import annotations

import ctypes
import ctypes.util

AUTO, CPU, CUDA = "auto", "cpu", "cuda"
DEVICE_VARIABLE = "ESA_DEVICE"  # the head's resolution, handed to the jobs a cluster starts


CPUINFO = "/proc/cpuinfo"
_CC_MAJOR, _CC_MINOR = 75, 76  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR / _MINOR


def _cuda_driver():
    """The CUDA driver library, initialised; None without one (or without a device)."""
    name = ctypes.util.find_library("cuda") or "libcuda.so.1"
    try:
        driver = ctypes.CDLL(name)
    except OSError:
        return None
    return driver if driver.cuInit(0) == 0 else None


def cuda_device_count() -> int:
    """CUDA devices the driver shows this process; 0 without a driver or a device."""
    driver, count = _cuda_driver(), ctypes.c_int(0)
    if driver is None or driver.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


def cuda_compute_capability(index: int = 0) -> tuple[int, int] | None:
    """(major, minor) of visible CUDA device ``index``; None when there is no such device."""
    driver, device = _cuda_driver(), ctypes.c_int(0)
    if driver is None or driver.cuDeviceGet(ctypes.byref(device), index) != 0:
        return None
    major, minor = ctypes.c_int(0), ctypes.c_int(0)
    for value, attribute in ((major, _CC_MAJOR), (minor, _CC_MINOR)):
        if driver.cuDeviceGetAttribute(ctypes.byref(value), attribute, device) != 0:
            return None
    return major.value, minor.value


def cpu_flags() -> set[str]:
    """The feature flags the kernel lists for this machine's CPUs (``CPUINFO``; empty where it
    lists none)."""
    try:
        with open(CPUINFO) as lines:
            for line in lines:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def resolve_auto(device: str) -> str:
    """``device`` with ``auto`` replaced by ``cuda`` (a CUDA device is visible) or ``cpu``; any
    other name unchanged."""
    if device != AUTO:
        return device
    return CUDA if cuda_device_count() > 0 else CPU
