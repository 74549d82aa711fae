"""``experiment_manifest.json``: what ran, where, on which code, and what it cost."""

from __future__ import annotations

import platform
import resource
import subprocess
import sys
import time
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version

import torch

from .config import REPO, config_hash

PACKAGES = ("torch", "transformers", "snakemake", "datasets", "pandas", "pyarrow", "esa")


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def git_commit() -> str | None:
    """The project's commit, with ``-dirty`` when tracked files differ from it."""
    def git(*args):
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10)

    head = git("rev-parse", "HEAD")
    if head.returncode != 0:
        return None
    dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    return head.stdout.strip() + ("-dirty" if dirty else "")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class RunRecord:
    """Start a record now; :meth:`finish` returns the manifest with wall time and peak memory."""

    def __init__(self, config: dict, device: torch.device, dtype: str, step: str):
        self.config, self.device, self.dtype, self.step = config, device, dtype, step
        self.started, self._t0 = _now(), time.perf_counter()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    def finish(self, **extra) -> dict:
        if self.device.type == "cuda":
            peak = {"peak_gpu_memory_mb": torch.cuda.max_memory_allocated(self.device) / 2**20}
        else:
            peak = {}
        peak["peak_host_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return {
            "step": self.step,
            "python": sys.version.split()[0],
            "versions": {p: _version(p) for p in PACKAGES},
            "device": str(self.device),
            "device_name": device_name(self.device),
            "dtype": self.dtype,
            "git_commit": git_commit(),
            # the hub commits of the model and the data (esa.revisions); None: a local or builtin source
            "model_revision": self.config.get("model_revision"),
            "data_revision": self.config.get("data_revision"),
            "config_hash": config_hash(self.config),
            "start": self.started,
            "end": _now(),
            "wall_seconds": round(time.perf_counter() - self._t0, 3),
            **peak,
            **extra,
        }
