"""Reading the Parquet files between steps: a damaged file is one error line naming it."""

import json
import os

import pandas as pd
import pytest

from esa.cli import main
from esa.errors import ESAError
from esa.io import read_parquet, write_parquet_atomic


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
    write_parquet_atomic(pd.DataFrame({"tensor": ["t"], "layer": [0], "module": ["mlp.down_proj"], "expert": [-1], "rows": [4],
                                       "cols": [4], "numel": [16]}), stats)
    write_parquet_atomic(pd.DataFrame({"tensor": ["t"] * 50, "flat_index": range(50)}), candidates)
    _damage(candidates, how)
    spec = json.dumps({"mode": "global", "k": 2, "seed": 0})
    assert main(["run", "topk", "--spec", spec, f"candidates={candidates}", f"stats={stats}", f"mask={mask}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"esa: error: cannot read Parquet file {str(candidates)!r}: ")
    assert not mask.exists()
