"""End-to-end: run the ESA workflow through a real one-node Slurm cluster.

tests/cluster/slurm.sh starts slurmctld + slurmd + munged under a temporary
directory (installing Debian's slurm-wlm/munge with apt-get if needed), and a
tiny ESA study is run with `--profile profiles/slurm`. We then check Slurm's own
records (squeue/scontrol/slurmctld log) that every job went through sbatch, and
that the results equal a local run. The demo workflow in tests/cluster/demo
checks the GPU-request switches of the profile.

Skipped only when not root or when Slurm is missing and apt-get is unavailable.
Set ESA_REQUIRE_SLURM_TEST=1 (CI) to turn those skips into failures.
Takes about a minute (mostly the executor's status-poll intervals).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import study_layout

REPO = Path(__file__).resolve().parents[1]
SLURM_SH = REPO / "tests" / "cluster" / "slurm.sh"
DEMO = REPO / "tests" / "cluster" / "demo" / "Snakefile"
PROFILE_SLURM = REPO / "profiles" / "slurm"
SNAKEMAKE_TIMEOUT = 300  # seconds; snakemake can hang when status polling breaks
# Faster polling than the profile's defaults: our jobs take a few seconds.
FAST_POLL = ["--slurm-init-seconds-before-status-checks", "1", "--seconds-between-status-checks", "1"]


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root: the test cluster runs slurmctld/slurmd as root"
    have_slurm = all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged"))
    if not have_slurm and not shutil.which("apt-get"):
        return "Slurm/munge not installed and apt-get unavailable"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _base_env() -> dict[str, str]:
    env = dict(os.environ)
    # never inherit an outer Slurm job's context
    for key in list(env):
        if key.startswith(("SLURM_", "SBATCH_", "SRUN_")):
            del env[key]
    # jobs run `python` from PATH on the node (sbatch --export=ALL): make it ours
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


class Cluster:
    def __init__(self, path: Path):
        self.dir = path
        self.conf = path / "slurm.conf"
        self.env = _base_env()
        self.env["SLURM_CONF"] = str(self.conf)

    def cmd(self, *args: str) -> str:
        return subprocess.run(list(args), env=self.env, check=True, capture_output=True,
                              text=True, timeout=30).stdout

    def jobs_in(self, workdir: Path) -> dict[str, tuple[str, str]]:
        """comment ("rule_<name>") -> (jobid, state) for jobs whose WorkDir is workdir."""
        out = self.cmd("squeue", "--states=all", "--noheader", "--format=%i|%k|%T|%Z")
        jobs = {}
        for line in out.splitlines():
            jobid, comment, state, wd = line.strip().split("|", 3)
            if Path(wd) == workdir:
                jobs[comment.strip()] = (jobid, state)
        return jobs


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    reason = _skip_reason()
    if reason:
        if os.environ.get("ESA_REQUIRE_SLURM_TEST") == "1":
            pytest.fail(f"Slurm cluster test required but: {reason}")
        print(f"SKIP test_slurm_cluster: {reason}")
        pytest.skip(reason)
    path = tmp_path_factory.mktemp("slurm")
    env = _base_env()
    # two fake (device-less) GPUs: GPU rules exercise the real --gpus path, two at a time
    env.update(SLURM_CI_FAKE_GPUS="2", SLURM_CI_CTLD_PORT=str(_free_port()),
               SLURM_CI_SLURMD_PORT=str(_free_port()))
    t0 = time.monotonic()
    try:
        proc = subprocess.run(["bash", str(SLURM_SH), "start", str(path)], env=env,
                              capture_output=True, text=True, timeout=900)
        print(proc.stderr[-4000:])
        assert proc.returncode == 0, f"slurm.sh start failed:\n{proc.stderr[-4000:]}"
        assert f"SLURM_CONF={path / 'slurm.conf'}" in proc.stdout
        print(f"cluster start: {time.monotonic() - t0:.1f}s")
        yield Cluster(path)
    finally:
        subprocess.run(["bash", str(SLURM_SH), "stop", str(path)], env=env, timeout=180)


def _snakemake(workdir: Path, env: dict[str, str], *args: str, snakefile: Path = DEMO) -> subprocess.CompletedProcess:
    workdir.mkdir(parents=True, exist_ok=True)
    # run from the workdir (the slurm plugin submits with `sbatch -D <cwd>`)
    cmd = ["timeout", "-k", "20", str(SNAKEMAKE_TIMEOUT), sys.executable, "-m", "snakemake",
           "--snakefile", str(snakefile), *args]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, env=env, cwd=workdir, capture_output=True, text=True,
                          timeout=SNAKEMAKE_TIMEOUT + 60)
    print(f"$ {' '.join(cmd)}\n  -> rc={proc.returncode} in {time.monotonic() - t0:.1f}s")
    assert proc.returncode != 124, f"snakemake timed out:\n{proc.stdout[-3000:]}{proc.stderr[-6000:]}"
    return proc


def _submitted_ids(output: str) -> list[str]:
    return re.findall(r"has been submitted with SLURM jobid (\d+)", output)


def _gpu_tres(scontrol_job: str) -> list[str]:
    """GPU-related TRES/GRES fields of `scontrol show job` output."""
    return re.findall(r"\b(?:TresPer\w+|Gres|TresBind)=\S*gpu\S*", scontrol_job, flags=re.I)


def _seed_inputs(workdir: Path, source: Path) -> None:
    """Pre-create the upstream outputs so that only `summary` needs to run."""
    (workdir / "results").mkdir(parents=True, exist_ok=True)
    for name in ("numbers.txt", "squares.txt"):
        shutil.copy(source / "results" / name, workdir / "results" / name)


def _esa(workdir: Path, env: dict[str, str], config: dict, *args: str) -> subprocess.CompletedProcess:
    """Run the ESA workflow itself (the project's Snakefile) in ``workdir``."""
    import yaml

    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    return _snakemake(workdir, env, "--configfile", str(workdir / "config.yaml"), *args,
                      snakefile=REPO / "Snakefile")


# the baseline and the scores: a table step (data) and model steps (model on the CPU, the others on a
# GPU), two of them side by side; the later phases' rules are submitted the same way, one level
# deeper each (~12 s of submission and status polls per level)
ESA_RULES = {"model", "data", "baseline", "scores_gradients"}


def test_esa_workflow_runs_through_slurm(slurm_cluster, tmp_path, tiny_model_dir):
    """A tiny ESA study's baseline and scores, submitted job by job with sbatch, equal the same
    jobs run locally."""
    import pandas as pd

    cluster = slurm_cluster
    config = {"model": {"name": "tiny", "source": str(tiny_model_dir)}, "device": "cpu",
              "data": {"source": "builtin:pydoc", "seq_len": 32, "eval_windows": 3},
              "seeds": [0], "scoring": {"max_samples": 2, "batch_size": 2, "candidates": 10},
              "resources": {"default": {"threads": 1, "mem_mb": 1000, "runtime": 10}},
              "experiments": [{"name": "zero", "metric": "grad_x_weight", "mode": "global", "topk": 5,
                               "perturb": "zero", "stability_check": False}]}
    local_dir, slurm_dir = tmp_path / "local", tmp_path / "slurm"
    layout = study_layout(config)
    targets = [layout.baseline_files()["metrics"], layout.score_files("grad_x_weight", 0)["candidates"]]
    # the local run alongside: the Slurm run mostly waits on the scheduler
    with ThreadPoolExecutor(1) as pool:
        local_run = pool.submit(_esa, local_dir, _base_env(), config, "--cores", "1", *targets)
        run = _esa(slurm_dir, cluster.env, config, "--profile", str(PROFILE_SLURM), *FAST_POLL, *targets)
        local = local_run.result()
    assert local.returncode == 0, local.stderr[-6000:]
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-8000:]

    # the scheduler's own records: every rule's jobs went through sbatch and completed
    submitted = _submitted_ids(out)
    jobs = cluster.jobs_in(slurm_dir)  # comments read rule_<name>[_wildcards_<values>]
    by_rule = {comment.removeprefix("rule_").split("_wildcards")[0]: jid for comment, (jid, _) in jobs.items()}
    assert set(by_rule) == ESA_RULES, jobs
    assert all(state == "COMPLETED" for _, state in jobs.values()), jobs
    assert sorted(jid for jid, _ in jobs.values()) == sorted(submitted)
    ctld_log = (cluster.dir / "log" / "slurmctld.log").read_text()
    for jid in submitted:
        assert f"_slurm_rpc_submit_batch_job: JobId={jid} " in ctld_log
    # GPU rules asked the (fake) GPU of the node; the others asked none
    for rule in ("baseline", "scores_gradients"):
        assert _gpu_tres(cluster.cmd("scontrol", "show", "job", by_rule[rule])) == ["TresPerJob=gres:gpu:1"], rule
    for rule in ("model", "data"):
        assert _gpu_tres(cluster.cmd("scontrol", "show", "job", by_rule[rule])) == [], rule

    # the same numbers as the local run
    baseline, candidates = targets
    assert (slurm_dir / baseline).read_text() == (local_dir / baseline).read_text()
    pd.testing.assert_frame_equal(pd.read_parquet(slurm_dir / candidates), pd.read_parquet(local_dir / candidates))


def test_gpu_requests_switched_off_by_config(slurm_cluster, tmp_path):
    """gpus_per_job=0 -> the plugin emits no --gpus at all (the CI off-switch)."""
    cluster = slurm_cluster
    seed = tmp_path / "seed"
    (seed / "results").mkdir(parents=True)
    (seed / "results" / "numbers.txt").write_text("".join(f"{i}\n" for i in range(1, 11)))
    (seed / "results" / "squares.txt").write_text("".join(f"{i * i}\n" for i in range(1, 11)))
    workdir = tmp_path / "nogpu"
    _seed_inputs(workdir, seed)

    run = _snakemake(workdir, cluster.env, "--profile", str(PROFILE_SLURM), *FAST_POLL,
                     "--config", "gpus_per_job=0")
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-8000:]
    jobs = cluster.jobs_in(workdir)
    assert set(jobs) == {"rule_summary"}, jobs
    assert _gpu_tres(cluster.cmd("scontrol", "show", "job", jobs["rule_summary"][0])) == []
    assert "gpus=0 cuda=\n" in (workdir / "logs" / "summary.log").read_text()
    assert (workdir / "results" / "summary.txt").read_text() == "n=10 sum=55 sum_sq=385\n"


def test_unsatisfiable_gpu_request_fails_fast(slurm_cluster, tmp_path):
    """More GPUs than the cluster has: sbatch rejects the job, snakemake fails (no hang)."""
    cluster = slurm_cluster
    seed = tmp_path / "seed"
    (seed / "results").mkdir(parents=True)
    (seed / "results" / "numbers.txt").write_text("1\n")
    (seed / "results" / "squares.txt").write_text("1\n")
    workdir = tmp_path / "toomany"
    _seed_inputs(workdir, seed)

    t0 = time.monotonic()
    run = _snakemake(workdir, cluster.env, "--profile", str(PROFILE_SLURM), *FAST_POLL,
                     "--config", "gpus_per_job=3")
    out = run.stdout + run.stderr
    assert run.returncode != 0
    assert "SLURM sbatch failed" in out and "--gpus=3" in out, out[-8000:]
    assert "Requested node configuration is not available" in out
    assert time.monotonic() - t0 < 120
    # Slurm keeps a record of the rejected submission, in state FAILED; nothing pending
    assert all(state == "FAILED" for _, state in cluster.jobs_in(workdir).values())
