"""Files between steps: a damaged Parquet input is one error line naming it; outputs are written
atomically, with the umask's mode, and a full disk is one error line naming the file."""

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from esa.candidates import build_candidates
from esa.cli import main
from esa.errors import ESAError
from esa.io import read_parquet, write_atomic, write_json_atomic, write_parquet_atomic
from esa.targets import Target, target_table


def _damage(path, how: str) -> None:
    if how == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(os.urandom(512))


@pytest.mark.parametrize("how", ["truncated", "random bytes"])
def test_damaged_parquet_is_an_error_naming_the_file(tmp_path, how):
    path = tmp_path / "table.parquet"
    write_parquet_atomic(pd.DataFrame({"a": range(100), "b": [f"x{i}" for i in range(100)]}), path)
    assert read_parquet(path, columns=["b"])["b"].tolist()[:2] == ["x0", "x1"]
    _damage(path, how)
    with pytest.raises(ESAError) as err:
        read_parquet(path)
    message = str(err.value)
    assert message.startswith(f"cannot read Parquet file {str(path)!r}: ") and "\n" not in message
    assert "Parquet magic bytes not found" in message


@pytest.mark.parametrize("how", ["truncated", "random bytes"])
def test_step_with_damaged_input_ends_in_one_error_line(tmp_path, capsys, how):
    """`esa run topk` on a damaged candidates.parquet: exit 2, one `esa: error:` line, no mask."""
    stats, candidates, mask = (tmp_path / f"{name}.parquet" for name in ("stats", "candidates", "mask"))
    write_parquet_atomic(pd.DataFrame({"tensor": ["t"], "layer": [0], "module": ["mlp.down_proj"], "expert": [-1],
                                       "rows": [4], "cols": [4], "numel": [16]}), stats)
    write_parquet_atomic(pd.DataFrame({"tensor": ["t"] * 50, "flat_index": range(50)}), candidates)
    _damage(candidates, how)
    spec = json.dumps({"mode": "global", "k": 2, "seed": 0})
    assert main(["run", "topk", "--spec", spec, f"candidates={candidates}", f"stats={stats}", f"mask={mask}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"esa: error: cannot read Parquet file {str(candidates)!r}: ")
    assert not mask.exists()


def _topk_argv(tmp_path, mask) -> list[str]:
    """`esa run topk` on valid inputs (a 4x4 target's candidates) writing ``mask``."""
    target = Target("t", 0, "mlp.down_proj", 4, 4)
    scores = {"t": torch.arange(16, dtype=torch.float32).reshape(4, 4)}
    stats, candidates = tmp_path / "stats.parquet", tmp_path / "candidates.parquet"
    write_parquet_atomic(target_table([target]), stats)
    write_parquet_atomic(build_candidates([target], scores, scores, scores, m=4), candidates)
    spec = json.dumps({"mode": "global", "k": 2, "seed": 0})
    return ["run", "topk", "--spec", spec, f"candidates={candidates}", f"stats={stats}", f"mask={mask}"]


@pytest.fixture
def umask():
    """``os.umask`` for one test; the process's umask is restored after it."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


@pytest.mark.parametrize("mask_bits, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)],
                         ids=["umask022", "umask077"])
def test_step_output_has_the_umask_mode(tmp_path, umask, mask_bits, file_mode, dir_mode):
    """Like a plain open(): 0666 & ~umask (mkstemp's 0600 hid results from collaborators)."""
    mask = tmp_path / "new" / "mask.parquet"
    argv = _topk_argv(tmp_path, mask)
    umask(mask_bits)
    assert main(argv) == 0
    assert (mask.stat().st_mode & 0o777, mask.parent.stat().st_mode & 0o777) == (file_mode, dir_mode)


@pytest.mark.parametrize("write", [
    lambda path: write_parquet_atomic(pd.DataFrame({"a": [1]}), path),
    lambda path: write_json_atomic({"a": 1}, path),
    lambda path: write_atomic(path, lambda tmp: Path(tmp).write_bytes(b"x")),
    # safetensors writes a 0600 file of its own and renames it over the temporary file
    lambda path: write_atomic(path, lambda tmp: save_file({"a": torch.ones(3)}, tmp)),
], ids=["parquet", "json", "write_atomic", "safetensors"])
@pytest.mark.parametrize("mask_bits, file_mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)],
                         ids=["umask022", "umask077", "umask002"])
def test_every_atomic_writer_has_the_umask_mode(tmp_path, umask, write, mask_bits, file_mode):
    umask(mask_bits)
    path = write(tmp_path / "out")
    assert path.stat().st_mode & 0o777 == file_mode
    assert os.listdir(tmp_path) == ["out"]  # no temporary file left


def _mount_point(path) -> str:
    """The filesystem's mount point as df names it (an oracle independent of esa.io)."""
    return subprocess.run(["df", "--output=target", str(path)], capture_output=True, text=True,
                          check=True).stdout.split()[-1]


@pytest.mark.parametrize("error, reason", [
    (OSError(errno.ENOSPC, "No space left on device"), "no space left on device"),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), "disk quota exceeded"),
    # safetensors (Rust) raises SafetensorError, which carries no errno, only its message
    (RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"),
     "no space left on device"),
], ids=["ENOSPC", "EDQUOT", "rust"])
def test_full_disk_is_one_error_naming_file_and_free_space(tmp_path, monkeypatch, error, reason):
    def half_write(tmp: str) -> None:
        Path(tmp).write_bytes(b"PAR1 half a file")
        raise error

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=12_000_000))
    path = tmp_path / "x" / "y.parquet"
    with pytest.raises(ESAError) as err:
        write_atomic(path, half_write)
    assert str(err.value) == f"{reason} writing {path} (12.0 MB free on {_mount_point(tmp_path)})"
    assert err.value.__cause__ is error
    assert os.listdir(path.parent) == []  # neither the output nor the temporary file


def test_other_write_errors_pass_through(tmp_path):
    def failing(tmp: str) -> None:
        Path(tmp).write_bytes(b"half")
        raise OSError(errno.EIO, "Input/output error")

    with pytest.raises(OSError, match="Input/output error"):
        write_atomic(tmp_path / "y.parquet", failing)
    assert os.listdir(tmp_path) == []


@pytest.fixture
def full_filesystem(tmp_path):
    """A real 64 KiB tmpfs filled to the last byte by one file (needs root to mount)."""
    mount = tmp_path / "fs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        reason = f"cannot mount a tmpfs: {(done.stderr.strip() or done.stdout.strip())}"
        print(reason, file=sys.stderr)
        pytest.skip(reason)
    try:
        with pytest.raises(OSError) as full, open(mount / "filler", "wb") as handle:
            handle.write(b"\0" * 2**17)
        assert full.value.errno == errno.ENOSPC and shutil.disk_usage(mount).free == 0
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_step_on_a_full_disk_is_one_error_line(tmp_path, capsys, full_filesystem):
    """`esa run topk` writing its mask to a full filesystem: exit 2, one line, nothing left."""
    mask = full_filesystem / "mask.parquet"
    assert main(_topk_argv(tmp_path, mask)) == 2
    assert capsys.readouterr().err == (f"esa: error: no space left on device writing {mask} "
                                       f"(0 B free on {full_filesystem})\n")
    assert os.listdir(full_filesystem) == ["filler"]


def test_safetensors_on_a_full_disk_is_one_error(full_filesystem):
    """The Rust writer's error (no errno) is recognised too: the full-scores file is the largest."""
    path = full_filesystem / "scores.safetensors"
    with pytest.raises(ESAError) as err:
        write_atomic(path, lambda tmp: save_file({"a": torch.ones(1000)}, tmp))
    assert str(err.value) == f"no space left on device writing {path} (0 B free on {full_filesystem})"
    assert os.listdir(full_filesystem) == ["filler"]
