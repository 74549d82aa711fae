"""Run the embedded default study and print wall time per rule from the Snakemake log.

    python bench/bench_study.py                    # fresh study in a temporary directory
    python bench/bench_study.py --workdir W --cores 2
    python bench/bench_study.py --log W/.snakemake/log/X.snakemake.log   # only read a log

Per rule: jobs, the sum of their wall times (core-seconds when jobs share the machine) and
the longest job; then the whole run's wall time. Job times come from the log's timestamps
(one-second resolution). Run it on an otherwise idle machine, or say the figures are contended.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAMP = re.compile(r"^\[(\w{3} \w{3} +\d+ \d\d:\d\d:\d\d \d{4})\]$")
START = re.compile(r"^(?:local)?rule (\w+):$")
JOBID = re.compile(r"^\s+jobid: (\d+)$")
FINISHED = re.compile(r"^Finished jobid: (\d+) \(Rule: (\w+)\)$")


def job_times(log: Path) -> dict[int, tuple[str, float]]:
    """``{jobid: (rule, seconds)}`` of every finished job of a Snakemake log."""
    now = None
    pending_rule = None
    started: dict[int, tuple[str, datetime]] = {}
    done = {}
    for line in log.read_text().splitlines():
        if match := STAMP.match(line):
            now = datetime.strptime(match.group(1), "%a %b %d %H:%M:%S %Y")
        elif match := START.match(line):
            pending_rule = match.group(1)
        elif (match := JOBID.match(line)) and pending_rule is not None:
            started[int(match.group(1))] = (pending_rule, now)
            pending_rule = None
        elif match := FINISHED.match(line):
            jobid = int(match.group(1))
            rule, begin = started[jobid]
            done[jobid] = (rule, (now - begin).total_seconds())
    return done


def rule_table(times: dict[int, tuple[str, float]]) -> str:
    by_rule = defaultdict(list)
    for rule, seconds in times.values():
        by_rule[rule].append(seconds)
    rows = sorted(by_rule.items(), key=lambda item: -sum(item[1]))
    lines = [f"{'rule':<20} {'jobs':>5} {'sum s':>8} {'max s':>7}"]
    lines += [f"{rule:<20} {len(s):>5} {sum(s):>8.0f} {max(s):>7.0f}" for rule, s in rows if rule != "all"]
    total = sum(sum(s) for rule, s in rows if rule != "all")
    lines.append(f"{'all jobs':<20} {sum(len(s) for r, s in rows if r != 'all'):>5} {total:>8.0f}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", help="results go here (default: a fresh temporary directory)")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--log", help="only summarise this Snakemake log")
    args = parser.parse_args()
    if args.log:
        print(rule_table(job_times(Path(args.log))))
        return 0
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="esa-study-"))
    begin = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"),
                          "--directory", str(workdir), "--cores", str(args.cores)])
    wall = time.perf_counter() - begin
    logs = sorted((workdir / ".snakemake" / "log").glob("*.snakemake.log"))
    print(rule_table(job_times(logs[-1])))
    print(f"study wall time: {wall:.0f} s ({wall / 60:.1f} min) on --cores {args.cores}, workdir {workdir}")
    return run.returncode


if __name__ == "__main__":
    sys.exit(main())
