"""The Snakemake DAG end to end on a tiny model: baseline numbers, caching, bad config."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import snakemake, study_layout

from esa.data import read_windows
from esa.evaluation import evaluate
from esa.models import load_model, source_from_ref

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny_config(tiny_model_dir):
    return {"model": {"name": "tiny", "source": str(tiny_model_dir)}, "device": "cpu",
            "data": {"source": "builtin:pydoc", "seq_len": 32, "eval_windows": 6},
            "baseline": {"batch_size": 4}}


def _log(layout, job: str, step: str, **wildcards) -> str:
    """The concrete log of one job: ``layout.log(job)`` with its step's key filled in."""
    return layout.log(job).replace("{key}", layout.key(step, **wildcards))


def test_baseline_dag_runs_caches_and_reproduces(tmp_path, tiny_config):
    layout = study_layout(tiny_config)
    files = {name: tmp_path / path for name, path in layout.baseline_files().items()}
    target = layout.baseline_files()["metrics"]
    first = snakemake(tmp_path, tiny_config, target)
    assert first.returncode == 0, first.stdout[-3000:]
    metrics = json.loads(files["metrics"].read_text())
    # independent check: evaluate the stored evaluation windows directly
    model = load_model(source_from_ref(tmp_path / layout.model_ref), "cpu", "fp32", "eager")
    windows = torch.from_numpy(read_windows(tmp_path / layout.data_files("eval")["windows"]))
    assert windows.shape == (6, 32)
    reference = evaluate(model, windows, batch_size=1)
    assert abs(metrics["ppl"] - reference.ppl) / reference.ppl < 1e-5
    assert metrics["tokens"] == 6 * 31 and metrics["windows"] == 6 and metrics["finite"]
    manifest = json.loads(files["manifest"].read_text())
    assert {"python", "versions", "device_name", "dtype", "git_commit", "config_hash", "start", "end",
            "wall_seconds", "peak_host_rss_mb"} <= manifest.keys()
    assert json.loads(files["config"].read_text())["batch_size"] == 4
    assert (tmp_path / _log(layout, "baseline", "baseline")).exists()

    dry = snakemake(tmp_path, tiny_config, "-n", target)
    assert "Nothing to be done" in dry.stdout

    files["metrics"].unlink()
    again = snakemake(tmp_path, tiny_config, target)
    assert again.returncode == 0
    assert json.loads(files["metrics"].read_text())["ppl"] == metrics["ppl"]

    calib_windows = layout.data_files("calib")["windows"]
    assert snakemake(tmp_path, tiny_config, calib_windows).returncode == 0
    calib = read_windows(tmp_path / calib_windows)
    assert not {tuple(w) for w in calib} & {tuple(w) for w in windows.numpy()}


def test_unknown_config_key_is_a_schema_error(tmp_path, tiny_config):
    tiny_config["data"]["seqlen"] = 64
    result = snakemake(tmp_path, tiny_config, "-n")
    assert result.returncode != 0
    assert "invalid config at data: Additional properties are not allowed ('seqlen' was unexpected)" in result.stdout


def test_bad_value_is_a_schema_error(tmp_path, tiny_config):
    tiny_config["dtype"] = "float8"
    result = snakemake(tmp_path, tiny_config, "-n")
    assert result.returncode != 0 and "invalid config at dtype: 'float8' is not one of" in result.stdout


@pytest.mark.parametrize("data, message", [
    ({"seq_len": 4096}, "seq_len 4096 exceeds the model's context of 128 tokens"),
    ({"eval_windows": 100000}, "eval_windows 100000 is more than the"),
])
def test_data_errors_leave_no_output(tmp_path, tiny_config, data, message):
    tiny_config["data"].update(data)
    layout = study_layout(tiny_config)
    result = snakemake(tmp_path, tiny_config, layout.data_files("eval")["windows"])
    assert result.returncode != 0
    log = (tmp_path / _log(layout, "data_eval", "data", part="eval")).read_text().strip().splitlines()
    assert log[-1].startswith("esa: error: ") and message in log[-1]
    assert not list((tmp_path / layout.root / "data").rglob("*"))


def test_runbook_phase1_command(tmp_path, tiny_model_dir):
    """`scripts/run_baseline.py` with the runbook's flags writes the four files via the DAG."""
    out = tmp_path / "outputs/p1_baseline/tiny"
    cmd = [sys.executable, str(REPO / "scripts/run_baseline.py"), "--model", str(tiny_model_dir),
           "--device", "cpu", "--max-samples", "3", "--batch-size", "2", "--out-dir", str(out),
           "--workdir", str(tmp_path / "work")]
    too_long = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert too_long.returncode == 2
    assert ("run_baseline: error: the workflow failed: seq_len 256 exceeds the model's context of 128 tokens"
            in too_long.stdout)
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({"model": {"name": "x", "source": "x"},
                                    "data": {"source": "builtin:pydoc", "seq_len": 32}}))
    cmd += ["--config", str(base)]
    result = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:]
    assert {"metrics.json", "windows.parquet", "experiment_manifest.json", "config.json"} <= {
        p.name for p in out.iterdir()}
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["windows"] == 3 and metrics["finite"]
    assert json.loads((out / "config.json").read_text())["batch_size"] == 2

    bad = subprocess.run([*cmd[:4], "--device", "cuda:7", "--out-dir", str(tmp_path / "bad")],
                         capture_output=True, text=True, timeout=120)
    if not torch.cuda.is_available():
        assert bad.returncode == 2 and "device 'cuda:7' requested" in bad.stderr
        assert bad.stderr.strip().count("\n") == 0 and not (tmp_path / "bad").exists()


def test_eval_windows_are_checked_before_any_scoring(tmp_path, tiny_config):
    """On 2 cores the evaluation data step, which checks eval_windows against the text, ends the
    run before any scoring starts: both data steps take one thread, and a scores job waits for
    two (that new evaluation windows still never re-score: test_study)."""
    tiny_config.update(seeds=[0], plots=False, report=False,
                       experiments=[{"name": "e", "metric": "grad_x_weight", "mode": "global", "topk": 5}])
    tiny_config["data"]["eval_windows"] = 100000
    layout = study_layout(tiny_config)
    failed = snakemake(tmp_path, tiny_config, "--cores", "2")  # the last --cores counts
    assert failed.returncode != 0
    log = (tmp_path / _log(layout, "data_eval", "data", part="eval")).read_text().strip().splitlines()
    assert log[-1].startswith("esa: error: eval_windows 100000 is more than the")
    assert re.search(r"INFO esa.data: text source 'builtin:pydoc': one document per pydoc topic; "
                     r"calibration \d+ document\(s\), evaluation \d+ document\(s\)$", log[-2])
    assert not (tmp_path / layout.root / "scores").exists() and not list((tmp_path / layout.logs).glob("scores*"))


def _job_of(run: subprocess.Popen, step: str):
    """The `esa run STEP` job process that Snakemake ``run`` started, once it exists."""
    import psutil

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and run.poll() is None:
        for child in psutil.Process(run.pid).children(recursive=True):
            try:
                if {"esa", "run", step} <= set(child.cmdline()):
                    return child
            except psutil.NoSuchProcess:
                pass
        time.sleep(0.05)
    raise AssertionError(f"no {step} job started")


def test_killed_run_resumes_with_the_default_command(tmp_path, tiny_config):
    """Snakemake itself killed with SIGKILL while a job runs: the plain command removes the
    stale lock and reruns the cut-short job (profiles/default sets rerun-incomplete); before,
    it was refused until `snakemake --unlock`."""
    target = study_layout(tiny_config).model_ref
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(tiny_config))
    run = subprocess.Popen([sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"),
                            "--directory", str(tmp_path), "--configfile", str(tmp_path / "config.yaml"),
                            "--cores", "2", target], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    job = _job_of(run, "model")
    run.kill()  # Snakemake alone: its job goes on, finishes and never reports back
    run.wait()
    job.wait(timeout=300)
    locks = sorted(p.name for p in (tmp_path / ".snakemake/locks").glob("*.lock"))
    assert (tmp_path / target).exists()

    refused = snakemake(tmp_path, tiny_config, "--workflow-profile", "none", target)
    for lock in locks:  # the model step has no inputs: an output lock only
        assert f"esa: removed .snakemake/locks/{lock}, a lock left by a Snakemake run that no longer runs" in (
            refused.stdout.splitlines())
    assert refused.returncode != 0 and "IncompleteFilesException" in refused.stdout  # locks gone, marker kept
    resumed = snakemake(tmp_path, tiny_config, target)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert re.search(r"Using workflow specific profile \S*profiles/default ", resumed.stdout)
    assert "localrule model:" in resumed.stdout  # rerun (Snakemake 9 says "Forced execution")
    assert not list((tmp_path / ".snakemake/locks").glob("*.lock"))


def test_jobs_run_the_interpreter_that_runs_snakemake(tmp_path, tiny_config):
    """The venv's snakemake run without activating the venv (as job scripts do): before, every
    job ran the first `python` on PATH (here one that cannot import ESA's dependencies)."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "python").write_text("#!/bin/sh\necho 'the wrong python' >&2\nexit 3\n")
    (fake / "python").chmod(0o755)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(tiny_config))
    target = study_layout(tiny_config).model_ref
    venv_snakemake = Path(sys.executable).parent / "snakemake"
    result = subprocess.run([str(venv_snakemake), "--snakefile", str(REPO / "Snakefile"), "--directory",
                             str(tmp_path), "--configfile", str(tmp_path / "config.yaml"), "--cores", "2",
                             target], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, timeout=600, env={**os.environ, "PATH": f"{fake}:/usr/bin:/bin"})
    assert result.returncode == 0, result.stdout[-3000:]
    assert json.loads((tmp_path / target).read_text())["kind"] == "dir"


def test_building_the_dag_and_the_table_steps_never_import_torch(tmp_path):
    """`snakemake -n` (every code version included) and the table steps' jobs start without
    torch, transformers or matplotlib: importing them costs seconds per job."""
    heavy = ("torch", "transformers")
    dry = subprocess.run([sys.executable, "-X", "importtime", "-m", "snakemake", "--snakefile",
                          str(REPO / "Snakefile"), "--directory", str(tmp_path), "-n", "--quiet", "rules"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=300)
    assert dry.returncode == 0, dry.stdout[-2000:] + dry.stderr[-2000:]
    assert "topk" in dry.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in dry.stderr.splitlines() if "|" in line}
    assert not imported & set(heavy)
    probe = ("import sys\nfrom esa.cli import step_function\nfrom esa.step_table import TABLE_STEPS\n"
             "for step in TABLE_STEPS:\n    step_function(step)\n"
             "print(sorted(m for m in ('torch', 'transformers', 'matplotlib') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", probe], stdout=subprocess.PIPE, text=True, check=True,
                            cwd=REPO)
    assert loaded.stdout.strip() == "[]"
