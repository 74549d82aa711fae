"""`esa summary DIR`: a report directory, or a model's results directory with one block per
report found in it (newest first); a path that is not a directory is one error line."""

import os

import pandas as pd

from esa.cli import main
from esa.io import write_json_atomic, write_parquet_atomic
from esa.layout import REPORT_FILES

NEW, OLD = "0123456789", "abcdefabcd"  # two report keys: two configs run in one project

# confirm's table, one row per (metric, rank): the confirmed weight two metrics rank is one weight
SUPER_WEIGHTS = pd.DataFrame({
    "metric": ["grad_x_weight", "activation_magnitude", "grad_x_weight"],
    "tensor": ["model.layers.1.mlp.down_proj.weight"] * 2 + ["model.layers.0.mlp.down_proj.weight"],
    "flat_index": [103, 103, 10], "row": [3, 3, 0], "col": [7, 7, 10], "weight": [-1.5, -1.5, 0.25],
    "ppl_before": [12.3456] * 3, "ppl_after": [250.0, 250.0, 12.5], "ppl_ratio": [20.3, 20.3, 1.0125],
    "confirmed": [True, True, False]})
VERDICTS = [
    {"check": "baseline_finite", "experiment": "-", "status": "good", "message": "PPL 12.35 is finite"},
    {"check": "top_beats_random", "experiment": "gxw", "status": "bad", "message": "top dPPL 0.1 <= random 0.2"},
    {"check": "seed_stability", "experiment": "gxw", "status": "warn", "message": "Jaccard 0.4 across seeds"}]


def _metrics(ppl: float, loss: float) -> dict:
    return {"ppl": ppl, "loss": loss, "loss_stderr": 0.0123, "tokens": 186, "windows": 6, "finite": True}


def _report(root, key: str, inputs: dict, verdicts: list, mtime: float):
    """A report directory of results/MODEL as the report step leaves it: verdict.json, and
    inputs.json naming the files it read relative to ``root``; inputs.json's mtime ``mtime``."""
    report = root / "report" / key
    write_json_atomic(verdicts, report / REPORT_FILES["verdicts"])
    write_json_atomic(inputs, report / REPORT_FILES["inputs"])
    os.utime(report / REPORT_FILES["inputs"], (mtime, mtime))
    return report


def _study(tmp_path):
    """results/tiny with two reports: the newer one of a study with experiments (a baseline,
    confirm's super weights, three verdicts), the older one of a baseline-only config."""
    root = tmp_path / "results" / "tiny"
    write_json_atomic(_metrics(12.3456, 2.5133), root / "baseline/1111111111/metrics.json")
    write_json_atomic(_metrics(9.87654, 2.29), root / "baseline/2222222222/metrics.json")
    write_parquet_atomic(SUPER_WEIGHTS, root / "confirm/3333333333/super_weights.parquet")
    new = _report(root, NEW, {"baseline": "baseline/1111111111/metrics.json",
                              "baseline_config": "baseline/1111111111/config.json",
                              "super_weights": "confirm/3333333333/super_weights.parquet",
                              "stats": {"gxw": {"0": "scores/grad_x_weight/seed0/4444444444/stats.parquet"}},
                              "agreement": {}, "rerun": None}, VERDICTS, mtime=2_000_000_000)
    old = _report(root, OLD, {"baseline": "baseline/2222222222/metrics.json",
                              "baseline_config": "baseline/2222222222/config.json", "super_weights": None,
                              "stats": {}, "agreement": {}}, [], mtime=1_000_000_000)
    return root, new, old


NEW_BLOCK = ("baseline: PPL 12.35  loss 2.5133 +- 0.012  (186 tokens, 6 windows, finite)\n"
             "super weights: 1 confirmed of 2 tested\n"
             "  model.layers.1.mlp.down_proj.weight[3, 7]  w=-1.5  PPL 12.35 -> 250 (x20.3)"
             "  top-N of grad_x_weight, activation_magnitude\n"
             "verdicts: 1 good, 1 warn, 1 bad\n"
             "  BAD top_beats_random [gxw]: top dPPL 0.1 <= random 0.2\n")
OLD_BLOCK = ("baseline: PPL 9.877  loss 2.2900 +- 0.012  (186 tokens, 6 windows, finite)\n"
             "super weights: not run\n"
             "verdicts: 0 good, 0 warn, 0 bad\n")


def test_missing_results_directory_is_one_error_line(tmp_path, capsys):
    """A mistyped path used to print three "not run" lines and exit 0."""
    missing, stray = tmp_path / "results" / "smolm2", tmp_path / "report.html"
    stray.write_text("<html></html>")
    for path, state in ((missing, "does not exist"), (stray, "is not a directory")):
        assert main(["summary", str(path)]) == 2
        assert capsys.readouterr() == ("", f"esa: error: results directory {str(path)!r} {state} (esa summary "
                                           f"reads results/MODEL, the folder a study writes for each model, "
                                           f"or one of its report/KEY folders)\n")


def test_results_directory_without_results_yet_is_not_run(tmp_path, capsys):
    assert main(["summary", str(tmp_path)]) == 0
    assert capsys.readouterr() == (f"ESA summary: {tmp_path}\nbaseline: not run\nsuper weights: not run\n"
                                   f"verdicts: not run\n", "")


def test_a_report_directory_is_summarised_from_the_files_it_read(tmp_path, capsys):
    """The files a report names in inputs.json, not the other baseline of the same model."""
    _, new, old = _study(tmp_path)
    assert main(["summary", str(new)]) == 0
    assert capsys.readouterr() == (f"ESA summary: {new}\n{NEW_BLOCK}", "")
    assert main(["summary", str(old), str(new)]) == 0  # in the order given
    assert capsys.readouterr() == (f"ESA summary: {old}\n{OLD_BLOCK}\nESA summary: {new}\n{NEW_BLOCK}", "")


def test_a_results_directory_gives_one_block_per_report_newest_first(tmp_path, capsys):
    root, new, old = _study(tmp_path)
    assert main(["summary", str(root)]) == 0
    assert capsys.readouterr() == (f"ESA summary: {new}\n{NEW_BLOCK}\nESA summary: {old}\n{OLD_BLOCK}", "")
    now = 3_000_000_000  # the older config's report is written again: now it is the newest
    os.utime(old / REPORT_FILES["inputs"], (now, now))
    assert main(["summary", str(root)]) == 0
    assert capsys.readouterr() == (f"ESA summary: {old}\n{OLD_BLOCK}\nESA summary: {new}\n{NEW_BLOCK}", "")


def test_a_file_a_report_read_that_is_gone_is_not_run(tmp_path, capsys):
    """A baseline deleted after the report was written: its line says so, the rest stands."""
    root, new, _ = _study(tmp_path)
    (root / "baseline/1111111111/metrics.json").unlink()
    assert main(["summary", str(new)]) == 0
    assert capsys.readouterr() == (f"ESA summary: {new}\nbaseline: not run\n{NEW_BLOCK.split(chr(10), 1)[1]}", "")
