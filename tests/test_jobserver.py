"""The job server (esa/jobserver.py): jobs forked from it write the bits a fresh process writes,
report its exit status and stderr, die with their client, and other Pythons run on their own."""

import os
import re
import signal
import socket
import subprocess
import sys
import time

from conftest import snakemake, study_layout

from esa.jobserver import ADDRESS_ENV, Server, _refusal

SERVER_LOG = ".snakemake/esa-job-server.log"


def _files(root):
    """{relative path: bytes} of every result but the manifests (their times and RSS differ)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted((root / "results").rglob("*"))
            if p.is_file() and "manifest" not in p.name}


def test_jobs_forked_from_the_server_write_the_bits_of_fresh_processes(tmp_path, tiny_model_dir):
    config = {"model": {"name": "tiny", "source": str(tiny_model_dir)}, "device": "cpu",
              "data": {"source": "builtin:pydoc", "seq_len": 32, "eval_windows": 3},
              "seeds": [0], "plots": False, "report": False,
              "scoring": {"max_samples": 2, "batch_size": 2, "candidates": 10},
              "experiments": [{"name": "zero", "metric": "grad_x_weight", "mode": "global", "topk": 5,
                               "perturb": "zero", "stability_check": False}]}
    layout = study_layout(config)
    # a model step of each kind (an evaluation, a gradient pass) and the seeded table step
    targets = [layout.baseline_files()["metrics"], layout.mask("grad_x_weight", "global", 5, 0)]
    runs = {}
    for server in (True, False):
        workdir = tmp_path / str(server)
        workdir.mkdir()
        result = snakemake(workdir, {**config, "job_server": server}, *targets)
        assert result.returncode == 0, result.stdout[-3000:]
        runs[server] = workdir
    files = _files(runs[True])
    assert set(targets) <= files.keys() and len(files) > 10
    assert files == _files(runs[False])
    forked = re.findall(r"pid \d+: esa run (\w+)", (runs[True] / SERVER_LOG).read_text())
    assert sorted(forked) == ["baseline", "data", "data", "model", "scores", "topk"]
    assert not (runs[False] / SERVER_LOG).exists()


def _esa_run(env, *args, cwd):
    return subprocess.run([sys.executable, "-m", "esa", "run", *args], env=env, cwd=cwd,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=120)


def _wait_for(predicate, what, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_exit_status_and_stderr_come_back_and_a_killed_job_takes_its_step_along(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    server = Server()
    env = {**os.environ, ADDRESS_ENV: server.start()}
    try:
        # a bad spec: the child's exit status 2 and its one error line, as without the server
        served = _esa_run(env, "topk", "--spec", '{"k": 1}', cwd=tmp_path)
        alone = _esa_run(os.environ, "topk", "--spec", '{"k": 1}', cwd=tmp_path)
        assert (served.returncode, served.stderr, served.stdout) == (alone.returncode, alone.stderr, alone.stdout)
        assert served.returncode == 2 and served.stderr.startswith("esa: error: topk spec")
        log = tmp_path / SERVER_LOG
        assert "esa run topk" in log.read_text()

        # the job's process killed outright: its step dies with it and writes nothing
        ref = tmp_path / "model" / "model.json"
        job = subprocess.Popen([sys.executable, "-m", "esa", "run", "model", "--spec",
                                '{"source": "builtin:smollm2-135m"}', f"ref={ref}"], env=env, cwd=tmp_path,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        child = int(_wait_for(lambda: re.search(r"pid (\d+): esa run model", log.read_text()), "the fork")[1])
        assert _alive(child)
        job.send_signal(signal.SIGKILL)
        job.wait()
        _wait_for(lambda: not _alive(child), "the step to die with its job", timeout=10)
        assert not ref.exists()
    finally:
        server.stop()
    assert server.process is None


def test_another_python_or_user_is_refused():
    ours, theirs = socket.socketpair(socket.AF_UNIX)
    with ours, theirs:
        assert _refusal(ours, {"executable": sys.executable}, [0, 1, 2]) is None
        other = _refusal(ours, {"executable": "/opt/conda/envs/esa/bin/python"}, [0, 1, 2])
        assert other == f"Python /opt/conda/envs/esa/bin/python, not {sys.executable}"
        assert _refusal(ours, {"executable": sys.executable}, [0]) == "1 file descriptors, not 3"


def test_a_job_without_a_reachable_server_runs_on_its_own(tmp_path):
    """A stale address (a run's server gone): the step runs in the job's own process."""
    env = {**os.environ, ADDRESS_ENV: "esa-job-server-gone"}
    result = _esa_run(env, "topk", "--spec", '{"k": 1}', cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.startswith("esa: error: topk spec")
