"""A run after a damaged or interrupted one: damaged results are found by their framing and
rebuilt by the same command, stale locks go, a live run's locks stay (esa.integrity, esa.recovery)."""

import base64
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
from conftest import snakemake, study_layout

from esa.integrity import damage, damaged_files
from esa.io import write_json_atomic, write_parquet_atomic
from esa.recovery import RUN_LOCK, SNAKEMAKE_LOCKS, SNAKEMAKE_METADATA, made_from, remove_damaged, remove_stale_locks


def _truncate(path, keep: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:keep])


def test_damage_is_read_from_the_framing(tmp_path):
    table = tmp_path / "t.parquet"
    write_parquet_atomic(pd.DataFrame({"a": range(100)}), table)
    size = table.stat().st_size
    assert damage(table) is None
    _truncate(table, size - 1)
    assert damage(table) == "no Parquet magic at the end (truncated or not Parquet)"
    table.write_bytes(b"")
    assert damage(table) == "0 bytes, too short for Parquet"
    table.write_bytes(b"PAR1" + b"\0" * 8 + (10**6).to_bytes(4, "little") + b"PAR1")
    assert damage(table) == "Parquet footer of 1000000 bytes does not fit a 20-byte file"

    summary = tmp_path / "s.json"
    write_json_atomic({"ppl": 1.5}, summary)
    assert damage(summary) is None
    _truncate(summary, 5)
    assert damage(summary) == "not valid JSON (5 bytes: Unterminated string starting at: line 2 column 3 (char 4))"

    from safetensors.torch import save_file
    import torch

    weights = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(4, 4)}, str(weights))
    assert damage(weights) is None
    size = weights.stat().st_size
    _truncate(weights, size - 16)
    assert damage(weights) == f"safetensors data ends at byte {size}, the file at {size - 16} (truncated)"
    _truncate(weights, 30)
    assert damage(weights).startswith("safetensors header of ") and damage(weights).endswith("(truncated)")

    other = tmp_path / "notes.txt"
    other.write_text("")
    assert damage(other) is None  # not a kind that is checked
    (tmp_path / ".s.json.abc.tmp").write_text("{")
    assert damaged_files(tmp_path) == {path: damage(path) for path in (weights, summary, table)}


def _record(workdir, output: str, inputs: list[str]) -> None:
    """A Snakemake file record of ``output`` (snakemake/persistence/file.py: the urlsafe
    base64 of the path, cut into directory names of at most NAME_MAX-1 characters, each but the
    last prefixed with "@")."""
    key = base64.urlsafe_b64encode(output.encode()).decode()
    step = os.pathconf(workdir, "PC_NAME_MAX") - 1
    chunks = [key[i:i + step] for i in range(0, len(key), step)]
    path = workdir / SNAKEMAKE_METADATA / Path(*["@" + c for c in chunks[:-1]], chunks[-1])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"record_format_version": 6, "input": inputs, "rule": "r"}))


def test_a_damaged_file_removes_what_was_made_from_it(tmp_path):
    deep = "results/m/" + "d" * 200 + "/" + "e" * 200 + "/deep.json"  # a record key longer than NAME_MAX
    files = {"results/m/a.parquet": [], "results/m/b.json": ["results/m/a.parquet"],
             "results/m/c.json": ["results/m/b.json", "results/m/x.json"], deep: ["results/m/c.json"],
             "results/m/x.json": [], "results/m/gone.json": ["results/m/a.parquet"]}
    for name, inputs in files.items():
        _record(tmp_path, name, inputs)
        if name != "results/m/gone.json":
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic({}, tmp_path / name)
    (tmp_path / SNAKEMAKE_METADATA / "not-base64!").write_text("{")
    assert made_from(tmp_path)["results/m/c.json"] == {deep}
    (tmp_path / "results/m/a.parquet").write_bytes(b"PAR1")
    found, dependents = remove_damaged(tmp_path)
    assert found == {tmp_path / "results/m/a.parquet": "4 bytes, too short for Parquet"}
    assert dependents == sorted(tmp_path / name for name in ("results/m/b.json", "results/m/c.json", deep))
    assert sorted(p.name for p in (tmp_path / "results/m").iterdir()) == ["d" * 200, "x.json"]
    assert not (tmp_path / deep).exists()


def test_a_damaged_checkpoint_file_removes_its_model_json(tmp_path):
    layout = study_layout({"model": {"name": "m", "source": "builtin:smollm2-135m"}, "device": "cpu",
                           "data": {"source": "builtin:pydoc"}})
    model_json = tmp_path / layout.model_ref
    model = model_json.parent  # the model step writes the checkpoint beside model.json
    summary = layout.data_files("eval")["summary"]
    (model / "checkpoint").mkdir(parents=True)
    model_json.write_text("{}")
    (model / "checkpoint/model.safetensors").write_bytes(b"\x10")
    _record(tmp_path, summary, [layout.model_ref])
    (tmp_path / summary).parent.mkdir(parents=True)
    (tmp_path / summary).write_text("{}")
    found, dependents = remove_damaged(tmp_path)
    assert list(found) == [model / "checkpoint/model.safetensors"]
    assert dependents == [tmp_path / summary]
    assert not model_json.exists() and not (model / "checkpoint/model.safetensors").exists()
    assert not (tmp_path / summary).exists()


def test_locks_of_a_live_run_are_left_alone(tmp_path):
    """Another process holding the run lock (a Snakemake still running) keeps its locks; once
    it is gone, however it ended, they are stale and removed."""
    locks = tmp_path / SNAKEMAKE_LOCKS
    locks.mkdir(parents=True)
    (locks / "0.input.lock").write_text("x")
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        from esa.recovery import hold_run_lock
        assert hold_run_lock({str(tmp_path)!r})
        print("held", flush=True)
        sys.stdin.read()
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        assert remove_stale_locks(tmp_path) == [] and (locks / "0.input.lock").exists()
    finally:
        holder.kill()
        holder.wait()
    assert (tmp_path / RUN_LOCK).exists()
    assert remove_stale_locks(tmp_path) == [locks / "0.input.lock"] and not (locks / "0.input.lock").exists()


@pytest.fixture
def topk_config(tiny_model_dir):
    return {"model": {"name": "tiny", "source": str(tiny_model_dir)}, "device": "cpu", "seeds": [0],
            "plots": False, "report": False,
            "data": {"source": "builtin:pydoc", "seq_len": 32, "eval_windows": 4},
            "scoring": {"max_samples": 4, "candidates": 20},
            "experiments": [{"name": "e", "metric": "grad_x_weight", "mode": "global", "topk": 5}]}


def _jobs(dry_run_output: str) -> dict[str, int]:
    """The job counts of Snakemake's dry-run table."""
    table = dry_run_output.split("Job stats:", 1)[1].split("This was a dry-run", 1)[0]
    rows = [line.split() for line in table.splitlines()]
    return {row[0]: int(row[1]) for row in rows if len(row) == 2 and row[1].isdigit() and row[0].isidentifier()
            and row[0] != "total"}


def test_a_damaged_result_is_rebuilt_by_the_same_command(tmp_path, topk_config):
    """Before: a truncated mask.parquet was named by the step that read it, and `snakemake -n`
    said there was nothing to do; then a truncated candidates.parquet was removed but, with the
    mask made from it present, never rebuilt."""
    layout = study_layout(topk_config)
    target = layout.mask("grad_x_weight", "global", 5, 0)
    first = snakemake(tmp_path, topk_config, target)
    assert first.returncode == 0, first.stdout[-3000:]
    mask = tmp_path / target
    candidates = tmp_path / layout.score_files("grad_x_weight", 0)["candidates"]
    before = {path: pd.read_parquet(path) for path in (mask, candidates)}
    assert "Nothing to be done" in snakemake(tmp_path, topk_config, "-n", target).stdout

    _truncate(mask, mask.stat().st_size // 2)
    dry = snakemake(tmp_path, topk_config, "-n", target)
    assert (f"esa: removed damaged {mask.relative_to(tmp_path)} (no Parquet magic at the end (truncated or not "
            f"Parquet)); this run rebuilds it where a step needs it") in dry.stdout.splitlines()
    assert _jobs(dry.stdout) == {"topk": 1}
    rebuilt = snakemake(tmp_path, topk_config, target)
    assert rebuilt.returncode == 0, rebuilt.stdout[-3000:]
    pd.testing.assert_frame_equal(pd.read_parquet(mask), before[mask])
    assert "Nothing to be done" in snakemake(tmp_path, topk_config, "-n", target).stdout

    candidates.write_bytes(b"")  # an intermediate whose one consumer, the mask, is present
    dry = snakemake(tmp_path, topk_config, "-n", target)
    lines = dry.stdout.splitlines()
    assert (f"esa: removed damaged {candidates.relative_to(tmp_path)} (0 bytes, too short for Parquet); this run "
            f"rebuilds it where a step needs it") in lines
    assert (f"esa: removed the 1 results made from the damaged files too ({mask.relative_to(tmp_path)}); this "
            f"run rebuilds them from whole inputs") in lines
    assert _jobs(dry.stdout) == {"scores_gradients": 1, "topk": 1}
    rebuilt = snakemake(tmp_path, topk_config, target)
    assert rebuilt.returncode == 0, rebuilt.stdout[-3000:]
    for path, frame in before.items():
        pd.testing.assert_frame_equal(pd.read_parquet(path), frame)
    assert "Nothing to be done" in snakemake(tmp_path, topk_config, "-n", target).stdout
