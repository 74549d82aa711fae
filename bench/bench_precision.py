"""The accuracy table of mixed precision: the embedded default study run in fp32 and in bf16
mixed precision (esa/precision.py), compared result by result (a benchmark, not a test).

    python bench/bench_precision.py [--workdir W] [--cores 2] [--configfile F ...]
                                    [--out bench/precision.json] [--table]

Both studies run in one project directory (``--workdir``, default a fresh temporary one), so
they share the model and the windows and differ in every step that runs the model. Compared:

- the baseline PPL;
- per metric and seed: the Jaccard index of the global top-100 and top-1,000 and Spearman's
  rho of the two scores on their union (from each scores step's per-tensor candidate pools:
  a weight outside a pool takes the pool's lowest score; the pools of 300 per tensor hold
  every weight of a global top-1,000 unless one tensor holds more than 300 of them, which the
  table reports as ``pool_bound``);
- every perturbation condition: dPPL and its interval;
- the confirmed super weights and their PPL factors;
- every verdict's status;
- the wall time per rule (``bench_study.rule_table``) and of each study.

The default may be ``auto`` only if the confirmed super weights and the verdicts are the same
and every metric's top-100 Jaccard is >= 0.9 (issue 21); the last line says which it is.
``--table`` prints the README's tables from ``--out``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from bench_study import REPO, job_times, rule_table

from esa.config import config_from_files
from esa.layout import Layout

MODES = ("no", "bf16")
TOPS = (100, 1000)
JACCARD_MIN = 0.9


def run_study(workdir: Path, mode: str, cores: int, configfiles: list[str]) -> dict:
    """Run the study in ``mode``; its wall time and per-rule table."""
    files = ["--configfile", *configfiles] if configfiles else []
    begin = time.perf_counter()
    subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory",
                    str(workdir), "--cores", str(cores), *files, "--config", f"mixed_precision={mode}"], check=True)
    wall = time.perf_counter() - begin
    log = sorted((workdir / ".snakemake" / "log").glob("*.snakemake.log"))[-1]
    times = job_times(log)
    rules: dict[str, float] = {}
    for rule, seconds in times.values():
        rules[rule] = rules.get(rule, 0.0) + seconds
    print(rule_table(times))
    return {"wall_s": round(wall, 1), "rules_s": rules}


def _global_top(candidates: pd.DataFrame, k: int) -> pd.Series:
    """The k highest scores of the pooled candidates, indexed by (tensor, flat_index)."""
    top = candidates[candidates["end"] == "top"].set_index(["tensor", "flat_index"])["score"]
    return top.nlargest(k)


def score_agreement(pools: dict[str, pd.DataFrame], k: int) -> dict:
    """Jaccard of the two modes' global top-k, Spearman's rho on their union, and whether a
    tensor's whole pool entered a top-k (the pool then bounds it)."""
    tops = {mode: _global_top(pool, k) for mode, pool in pools.items()}
    union = tops["no"].index.union(tops["bf16"].index)
    ranks = []
    for mode, pool in pools.items():
        scores = pool[pool["end"] == "top"].set_index(["tensor", "flat_index"])["score"]
        floor = scores.groupby(level="tensor").min()
        values = scores.reindex(union)
        missing = values.isna()
        values[missing] = floor.reindex(union[missing].get_level_values("tensor")).to_numpy()
        ranks.append(values.rank().to_numpy())
    per_tensor = max(int(pool[pool["end"] == "top"].groupby("tensor").size().min()) for pool in pools.values())
    bound = any(int(top.index.get_level_values("tensor").value_counts().max()) >= per_tensor for top in tops.values())
    shared = len(tops["no"].index.intersection(tops["bf16"].index))
    return {"jaccard": shared / len(union), "spearman": float(np.corrcoef(*ranks)[0, 1]), "pool_bound": bound}


def compare(workdir: Path, config: dict) -> dict:
    """Every compared number of the two studies (module docstring)."""
    layouts = {mode: Layout({**config, "mixed_precision": mode}) for mode in MODES}
    model = layouts["no"].models[0]
    layouts = {mode: layout.of(model) for mode, layout in layouts.items()}

    def read(path: str):
        path = workdir / path
        return json.loads(path.read_text()) if path.suffix == ".json" else pd.read_parquet(path)

    out: dict = {"baseline": {mode: read(layout.baseline_files()["metrics"])["ppl"]
                              for mode, layout in layouts.items()}}
    out["scores"] = []
    for metric in layouts["no"].scored_metrics():
        for seed in config["seeds"]:
            pools = {mode: read(layout.score_files(metric, seed)["candidates"]) for mode, layout in layouts.items()}
            for k in TOPS:
                out["scores"].append({"metric": metric, "seed": seed, "k": k, **score_agreement(pools, k)})
    out["perturb"] = []
    for name, experiment in layouts["no"].experiments.items():
        if not experiment["perturb"]:
            continue
        results = {mode: read(layout.experiment_files(name)["perturb"]["results"]) for mode, layout in layouts.items()}
        for (_, a), (_, b) in zip(results["no"].iterrows(), results["bf16"].iterrows()):
            out["perturb"].append({"experiment": name, "set": a["set"], "seed": int(a["seed"]),
                                   **{f"{column}_{mode}": float(row[column]) for mode, row in (("no", a), ("bf16", b))
                                      for column in ("delta_ppl", "delta_ppl_lo", "delta_ppl_hi")}})
    confirmed = {}
    for mode, layout in layouts.items():
        table = read(layout.confirm_files()["super_weights"])
        table = table[table["confirmed"]]
        confirmed[mode] = {f"{t} [{i}]": float(r) for t, i, r in zip(table["tensor"], table["flat_index"],
                                                                    table["ppl_ratio"])}
    out["confirmed"] = confirmed
    out["verdicts"] = {mode: {f"{v['check']}/{v['experiment']}": v["status"]
                              for v in read(layout.report_files()["verdicts"])} for mode, layout in layouts.items()}
    return out


def decision(result: dict) -> str:
    """The default the table allows (issue 21's rule), with the reason."""
    same_weights = set(result["confirmed"]["no"]) == set(result["confirmed"]["bf16"])
    same_verdicts = result["verdicts"]["no"] == result["verdicts"]["bf16"]
    worst = min(row["jaccard"] for row in result["scores"] if row["k"] == 100)
    ok = same_weights and same_verdicts and worst >= JACCARD_MIN
    return (f"default: {'auto' if ok else 'no'} (same confirmed super weights: {same_weights}; same verdicts: "
            f"{same_verdicts}; worst top-100 Jaccard {worst:.3f} vs >= {JACCARD_MIN})")


def table(result: dict) -> str:
    """The README's tables (markdown)."""
    lines = [f"baseline PPL: fp32 {result['baseline']['no']:.6f}, bf16 mixed {result['baseline']['bf16']:.6f} "
             f"({result['baseline']['bf16'] / result['baseline']['no'] - 1:+.2e} relative)", "",
             "| metric | top-100 Jaccard (worst seed) | top-1,000 Jaccard | Spearman on the top-1,000 union |",
             "|---|---|---|---|"]
    scores = pd.DataFrame(result["scores"])
    for metric, rows in scores.groupby("metric", sort=False):
        by_k = {k: rows[rows["k"] == k] for k in TOPS}
        bound = " (pool-bound)" if by_k[1000]["pool_bound"].any() else ""
        lines.append(f"| {metric} | {by_k[100]['jaccard'].min():.3f} | {by_k[1000]['jaccard'].min():.3f}{bound} "
                     f"| {by_k[1000]['spearman'].min():.4f} |")
    lines += ["", "| experiment | set | seed | dPPL fp32 [interval] | dPPL bf16 mixed [interval] |",
              "|---|---|---|---|---|"]
    for row in result["perturb"]:
        cells = [f"{row[f'delta_ppl_{m}']:.4g} [{row[f'delta_ppl_lo_{m}']:.3g}, {row[f'delta_ppl_hi_{m}']:.3g}]"
                 for m in MODES]
        lines.append(f"| {row['experiment']} | {row['set']} | {row['seed']} | {cells[0]} | {cells[1]} |")
    lines += ["", "| confirmed super weight | factor fp32 | factor bf16 mixed |", "|---|---|---|"]
    confirmed = result["confirmed"]
    for weight in sorted(set(confirmed["no"]) | set(confirmed["bf16"])):
        lines.append(f"| {weight} | {confirmed['no'].get(weight, float('nan')):.4g} "
                     f"| {confirmed['bf16'].get(weight, float('nan')):.4g} |")
    verdicts = result["verdicts"]
    differ = [name for name in verdicts["no"] if verdicts["no"][name] != verdicts["bf16"].get(name)]
    lines += ["", f"verdicts: {len(verdicts['no'])}, differing: {', '.join(differ) or 'none'}", "",
              "| rule | fp32 s | bf16 mixed s |", "|---|---|---|"]
    times = result["times"]
    fp32, bf16 = times["no"]["rules_s"], times["bf16"]["rules_s"]
    for rule in sorted(fp32, key=lambda r: -fp32[r]):
        if rule != "all":
            lines.append(f"| {rule} | {fp32[rule]:.0f} | {bf16.get(rule, 0):.0f} |")
    lines += [f"| study (wall) | {times['no']['wall_s']:.0f} | {times['bf16']['wall_s']:.0f} |", "", decision(result)]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", help="both studies go here (default: a fresh temporary directory)")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--configfile", nargs="*", default=[])
    parser.add_argument("--out", default=str(REPO / "bench" / "precision.json"))
    parser.add_argument("--table", action="store_true", help="only print the tables of --out")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(Path(args.out).read_text())))
        return 0
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="esa-precision-"))
    times = {mode: run_study(workdir, mode, args.cores, args.configfile) for mode in MODES}
    result = {**compare(workdir, config_from_files(args.configfile)), "times": times}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
