"""The runbook's Phase 2-3 commands as DAGs, and configs that coexist in one project (apart from
test_study.py's module fixture, so that pytest-xdist runs these beside it)."""

import json
import shlex

import pytest
import yaml
from conftest import REPO, scheduled, snakemake, study_layout

RUNBOOK = REPO / "docs" / "runbook.md"  # a copy of ../shared/runbook.md


def runbook_commands():
    """The runbook's phase1_runner_enhanced.py commands, as argument lists."""
    text = RUNBOOK.read_text()
    blocks = [b.split("```")[0] for b in text.split("```bash")[1:]]
    commands = [shlex.split(b.replace("\\\n", " ")) for b in blocks]
    return [c[2:] for c in commands if c[1] == "phase1_runner_enhanced.py"]


def test_runbook_has_all_phase_commands():
    """Commands 2-8 of the runbook: 4 holds three metrics, so nine phase1_runner lines."""
    assert len(runbook_commands()) == 9


@pytest.mark.parametrize("argv", runbook_commands(), ids=lambda a: a[a.index("--out-dir") + 1].split("/")[-1])
def test_runbook_command_resolves_to_its_dag_targets(argv, tmp_path):
    """Each runbook command (model swapped for the bundled one, device for cpu) builds the right DAG."""
    from esa.runbook import phase_config, phase_parser

    argv = list(argv)
    argv[argv.index("--model") + 1] = "builtin:smollm2-135m"
    argv[argv.index("--device") + 1] = "cpu"
    argv[argv.index("--out-dir") + 1] = str(tmp_path / argv[argv.index("--out-dir") + 1])
    args = phase_parser().parse_args(argv)
    config, name = phase_config(args)
    e = config["experiments"][0]
    assert (e["metric"], e["mode"], e["topk"]) == (args.metric, args.mode, args.topk)
    result = snakemake(tmp_path, config, "-n", "--quiet", "rules")
    assert result.returncode == 0, result.stdout[-3000:]
    jobs = result.stdout
    assert "scores_" in jobs and "topk" in jobs and "baseline" in jobs
    assert ("perturb" in jobs) == (args.perturb is not None)
    assert ("stability" in jobs) == args.stability_check
    assert ("plots" in jobs) == args.save_plots
    assert not {"quantize", "culprits", "mechanism"} & set(scheduled(result))  # the default's, not the phase's


def test_runbook_commands_share_one_evaluation_and_baseline(tmp_path, offline_hub):
    """The runbook's nine Phase 2-3 commands on one model name one set of evaluation windows and
    one baseline (they differ in metric, k, seeds and calibration windows only), and the
    commands that agree on a metric's scoring settings name the same scores (device cpu: no GPU here)."""
    from esa.runbook import phase_config, phase_parser

    _pin_runbook_sources(offline_hub)
    layouts, scores = [], {}
    for argv in runbook_commands():
        argv = list(argv)
        argv[argv.index("--device") + 1] = "cpu"
        argv[argv.index("--out-dir") + 1] = str(tmp_path / argv[argv.index("--out-dir") + 1])
        config, name = phase_config(phase_parser().parse_args(argv))
        layout = study_layout(config)
        layouts.append(layout)
        e = layout.experiments[name]
        for seed in e["seeds"]:
            scores.setdefault((e["metric"], seed, json.dumps(config["scoring"], sort_keys=True)), set()).add(
                layout.score_files(e["metric"], seed)["candidates"])
    assert len({(lay.data_files("eval")["windows"], lay.baseline_files()["metrics"]) for lay in layouts}) == 1
    assert len({lay.model_ref for lay in layouts}) == 1
    assert all(len(paths) == 1 for paths in scores.values())


def _pin_runbook_sources(offline_hub) -> None:
    """The runbook's hub model and dataset, as a hub cache that downloaded them would know them."""
    offline_hub("meta-llama/Llama-3.1-8B", "d04e592bb4f6aa9cfee91e2e20afa771667e1d4b")
    offline_hub("wikitext", "b08601e04326c79dfdd32d625aee71d232d685c3", "dataset")


def test_llama_runbook_config_resolves(tmp_path, offline_hub):
    """The 8B config validates and plans every runbook experiment (dry run, no download),
    offline against a hub cache that knows which commits main names (esa.revisions); with an
    empty cache, planning stops on the one line naming the model's revision."""
    config = yaml.safe_load((REPO / "config/runbook-llama31-8b.yaml").read_text())
    work = tmp_path / "work"
    work.mkdir()
    unknown = snakemake(work, config, "-n", "--quiet", "rules")
    assert unknown.returncode != 0
    assert "model 'meta-llama/Llama-3.1-8B' revision 'main': cannot resolve it to a commit" in unknown.stdout
    _pin_runbook_sources(offline_hub)
    result = snakemake(work, config, "-n", "--quiet", "rules")
    assert result.returncode == 0, result.stdout[-3000:]
    for rule in ("model", "data", "baseline", "scores_gradients", "scores_hutchinson", "scores_activations",
                 "topk", "perturb", "stability", "agreement", "plots"):
        assert f"\n{rule} " in result.stdout or f"{rule} " in result.stdout, rule


def test_configs_coexist_and_share_what_they_agree_on(tmp_path, tiny_model_dir):
    """The default study, then a runbook command with other settings in the same project
    (device cpu against the study's auto, which is cpu here; twice the calibration windows):
    the command reuses the study's model, data and baseline and scores beside it; then neither
    the study nor the command has anything left to do. Before: the command replaced the
    study's baseline and scores, and the study's next run recomputed them."""
    from esa.runbook import model_name, phase_config, phase_main, phase_parser

    workdir = tmp_path / "project"
    workdir.mkdir()
    study = {"model": {"name": model_name(str(tiny_model_dir)), "source": str(tiny_model_dir)}, "device": "auto",
             "data": {"source": "builtin:pydoc", "seq_len": 32, "eval_windows": 4},
             "scoring": {"max_samples": 4, "batch_size": 2, "candidates": 20},
             "seeds": [0], "plots": False, "report": False,  # what the command could share, not more
             "experiments": [{"name": "gxw", "metric": "grad_x_weight", "mode": "global", "topk": 10}]}
    first = snakemake(workdir, study)
    assert first.returncode == 0, first.stdout[-3000:]
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(study))
    argv = ["--model", str(tiny_model_dir), "--metric", "grad_x_weight", "--mode", "global", "--topk", "10",
            "--max-samples", "8", "--device", "cpu", "--out-dir", str(tmp_path / "out" / "p2"),
            "--config", str(base), "--workdir", str(workdir)]
    command, name = phase_config(phase_parser().parse_args(argv))
    targets = study_layout(command).experiment_targets(name)
    assert scheduled(snakemake(workdir, command, "-n", "--quiet", "rules", "--", *targets)) == {
        "scores_gradients": 1, "topk": 1}
    assert phase_main(argv) == 0
    assert "Nothing to be done" in snakemake(workdir, study, "-n").stdout
    assert "Nothing to be done" in snakemake(workdir, command, "-n", "--", *targets).stdout
    # both scores, side by side: the study's 4 calibration windows and the command's 8
    drawn = {len(json.loads((workdir / study_layout(c).score_files("grad_x_weight", 0)["manifest"]).read_text())
                 ["calibration_windows"]) for c in (study, command)}
    assert drawn == {4, 8}
    # `esa path` names the files under a config as the workflow keys them
    from esa.cli import job_paths

    assert job_paths("scores", ["metric=grad_x_weight", "seed=0"], [str(base)], None) == list(
        study_layout(study).score_files("grad_x_weight", 0).values())
    # a path of no config's key is refused, naming both keys
    baseline = study_layout(study).baseline_files()["metrics"]
    key = baseline.split("/")[-2]
    wrong = snakemake(workdir, study, "-n", baseline.replace(key, "0123456789"))
    assert wrong.returncode != 0
    assert f"baseline results directory 0123456789 is not this config's ({key})" in wrong.stdout
