"""`esa summary RESULTS_DIR`: a path that is not a results directory is one error line."""

from esa.cli import main


def test_missing_results_directory_is_one_error_line(tmp_path, capsys):
    """A mistyped path used to print three "not run" lines and exit 0."""
    missing, stray = tmp_path / "results" / "smolm2", tmp_path / "report.html"
    stray.write_text("<html></html>")
    for path, state in ((missing, "does not exist"), (stray, "is not a directory")):
        assert main(["summary", str(path)]) == 2
        assert capsys.readouterr() == ("", f"esa: error: results directory {str(path)!r} {state} (esa summary "
                                           f"reads results/MODEL, the folder a study writes for each model)\n")


def test_results_directory_without_results_yet_is_not_run(tmp_path, capsys):
    assert main(["summary", str(tmp_path)]) == 0
    assert capsys.readouterr() == (f"ESA summary: {tmp_path}\nbaseline: not run\nsuper weights: not run\n"
                                   f"verdicts: not run\n", "")
