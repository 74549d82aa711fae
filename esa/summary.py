"""One screen of a finished study: baseline PPL, confirmed super weights, verdict counts and
the bad verdicts (``esa summary DIR [DIR ...]``).

A ``DIR`` is one study's report directory (``results/{model}/report/<key>/``, which the workflow
prints when it finishes) or a model's results directory (``results/{model}``), which holds one
report per config that was run there: each gets its block, the newest first. A report's
``inputs.json`` names the baseline and confirm files it read; a missing one prints "not run".
The directory itself is not optional: a mistyped path is an error, not a study that did not run.
"""

from __future__ import annotations

from pathlib import Path

from .errors import ESAError
from .io import read_parquet
from .layout import REPORT_FILES
from .results import read_json
from .verdicts import count_statuses


def _baseline_line(path: Path | None) -> str:
    if path is None or not path.exists():
        return "baseline: not run"
    m = read_json(path)
    state = "finite" if m["finite"] else "NOT FINITE"
    return (f"baseline: PPL {m['ppl']:.4g}  loss {m['loss']:.4f} +- {m['loss_stderr']:.2g}  "
            f"({m['tokens']} tokens, {m['windows']} windows, {state})")


def _super_weight_lines(path: Path | None) -> list[str]:
    if path is None or not path.exists():
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


def _verdict_lines(path: Path | None) -> list[str]:
    if path is None or not path.exists():
        return ["verdicts: not run"]
    verdicts = read_json(path)
    counts = count_statuses(verdicts)
    lines = ["verdicts: " + ", ".join(f"{n} {status}" for status, n in counts.items())]
    lines += [f"  BAD {v['check']} [{v['experiment']}]: {v['message']}"
              for v in verdicts if v["status"] == "bad"]
    return lines


def report_dirs(results_dir: str | Path) -> list[Path]:
    """The report directories ``results_dir`` names: itself when it is one, else every report
    of the model's results directory, the newest first."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        state = "is not a directory" if results_dir.exists() else "does not exist"
        raise ESAError(f"results directory {str(results_dir)!r} {state} (esa summary reads "
                       f"results/MODEL, the folder a study writes for each model, or one of its report/KEY folders)")
    if (results_dir / REPORT_FILES["inputs"]).exists():
        return [results_dir]
    found = (path.parent for path in results_dir.glob(f"report/*/{REPORT_FILES['inputs']}"))
    return sorted(found, key=lambda path: (path / REPORT_FILES["inputs"]).stat().st_mtime, reverse=True)


def _block(title: str, report: Path | None) -> str:
    inputs, root = ({}, None) if report is None else (read_json(report / REPORT_FILES["inputs"]), report.parents[1])

    def read(name: str) -> Path | None:
        return root / inputs[name] if inputs.get(name) else None

    lines = [f"ESA summary: {title}", _baseline_line(read("baseline")), *_super_weight_lines(read("super_weights")),
             *_verdict_lines(None if report is None else report / REPORT_FILES["verdicts"])]
    return "\n".join(lines) + "\n"


def summary_text(*results_dirs: str | Path) -> str:
    """The summary of each report the directories name (:func:`report_dirs`) as text, one block
    per report separated by a blank line, newline-terminated; a directory without a report yet
    is one block of "not run"."""
    blocks = []
    for results_dir in results_dirs:
        reports = report_dirs(results_dir)
        blocks += [_block(str(report), report) for report in reports] or [_block(str(results_dir), None)]
    return "\n".join(blocks)
