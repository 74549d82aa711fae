"""One screen of a finished study: baseline PPL, confirmed super weights, verdict counts and
the bad verdicts, read from ``results/{model}/`` (``esa summary RESULTS_DIR [RESULTS_DIR ...]``).

Files read, each optional (a missing one prints "not run"): ``baseline/metrics.json``,
``confirm/super_weights.parquet`` (``esa.confirm.SUPER_WEIGHT_COLUMNS``), ``report/verdict.json``.
The directory itself is not optional: a mistyped path is an error, not a study that did not run.
"""

from __future__ import annotations

from pathlib import Path

from .errors import ESAError
from .io import read_parquet
from .layout import Layout
from .results import read_json
from .verdicts import count_statuses


def _baseline_line(path: Path) -> str:
    if not path.exists():
        return "baseline: not run"
    m = read_json(path)
    state = "finite" if m["finite"] else "NOT FINITE"
    return (f"baseline: PPL {m['ppl']:.4g}  loss {m['loss']:.4f} +- {m['loss_stderr']:.2g}  "
            f"({m['tokens']} tokens, {m['windows']} windows, {state})")


def _super_weight_lines(path: Path) -> list[str]:
    if not path.exists():
        return ["super weights: not run"]
    df = read_parquet(path)
    found_by = {}
    if "metric" in df.columns:  # one row per (metric, rank): a weight several metrics rank is one weight
        found_by = df.groupby(["tensor", "flat_index"], sort=False)["metric"].agg(", ".join).to_dict()
        df = df.drop_duplicates(["tensor", "flat_index"])
    confirmed = df[df["confirmed"]]
    lines = [f"super weights: {len(confirmed)} confirmed of {len(df)} tested"]
    for r in confirmed.itertuples(index=False):
        by = found_by.get((r.tensor, r.flat_index))
        lines.append(f"  {r.tensor}[{r.row}, {r.col}]  w={r.weight:.4g}  PPL {r.ppl_before:.4g} -> "
                     f"{r.ppl_after:.4g} (x{r.ppl_ratio:.3g})" + (f"  top-N of {by}" if by else ""))
    return lines


def _verdict_lines(path: Path) -> list[str]:
    if not path.exists():
        return ["verdicts: not run"]
    verdicts = read_json(path)
    counts = count_statuses(verdicts)
    lines = ["verdicts: " + ", ".join(f"{n} {status}" for status, n in counts.items())]
    lines += [f"  BAD {v['check']} [{v['experiment']}]: {v['message']}"
              for v in verdicts if v["status"] == "bad"]
    return lines


def summary_text(*results_dirs: str | Path) -> str:
    """The summary of each results directory (``results/{model}``) as text, one block per
    directory separated by a blank line, newline-terminated."""
    blocks = []
    for results_dir in results_dirs:
        if not Path(results_dir).is_dir():
            state = "is not a directory" if Path(results_dir).exists() else "does not exist"
            raise ESAError(f"results directory {str(results_dir)!r} {state} (esa summary reads "
                           f"results/MODEL, the folder a study writes for each model)")
        layout = Layout(root=str(results_dir))
        lines = [f"ESA summary: {results_dir}", _baseline_line(Path(layout.baseline_files()["metrics"])),
                 *_super_weight_lines(Path(layout.confirm_files()["super_weights"])),
                 *_verdict_lines(Path(layout.report_files()["verdicts"]))]
        blocks.append("\n".join(lines) + "\n")
    return "\n".join(blocks)
