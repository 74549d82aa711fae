"""Pinned hub revisions (esa.revisions): resolved offline from a hub cache the tests lay out
(``<type>s--org--name/refs/<revision>``, ``snapshots/<commit>/``), entering the model and data
keys, recorded in model.json and the manifests; a moved main plans new steps and loads the new
weights, while a pinned commit keeps the old ones."""

import json
import shutil

import pytest
from conftest import scheduled, snakemake, study_layout
from safetensors.torch import load_file, save_file

from esa.errors import ESAError
from esa.revisions import cached_commit, resolve_revision

A, B = "a" * 40, "b" * 40
REPO_ID = "org/tiny"


def test_a_revision_resolves_to_the_commit_the_cache_recorded(offline_hub):
    offline_hub(REPO_ID, A)
    offline_hub(REPO_ID, B, revision="v1.0")
    offline_hub("wikitext", B, "dataset")

    assert resolve_revision(REPO_ID, None, "model") == A  # None is main
    assert resolve_revision(REPO_ID, "v1.0", "model") == B
    assert resolve_revision("wikitext", "main", "dataset") == B
    assert resolve_revision("org/elsewhere", "c" * 40, "model") == "c" * 40  # a commit is itself
    assert cached_commit(REPO_ID, "v2.0", "model") is None


def test_an_unresolvable_revision_is_one_line_naming_it(offline_hub):
    with pytest.raises(ESAError) as err:
        resolve_revision(REPO_ID, "v2.0", "model")
    assert str(err.value) == (
        f"model {REPO_ID!r} revision 'v2.0': cannot resolve it to a commit: the hub cannot be reached and "
        f"the hub cache {offline_hub.cache} holds no ref for it; give the commit hash, or run where either can answer")


def _config(model_source: str, **data) -> dict:
    return {"model": {"name": "tiny", "source": model_source}, "device": "cpu", "seeds": [0], "plots": False,
            "report": False, "data": {"source": "builtin:pydoc", "seq_len": 32, "eval_windows": 4, **data},
            "baseline": {"batch_size": 2}}


def test_the_commit_enters_the_keys_and_a_moved_main_changes_them(offline_hub):
    """The model step's spec holds the commit main names, the data steps' the dataset's; every
    model step's spec records both (its manifest); moving main moves the model, data and
    baseline keys. A local model and local text send no revision: their keys are as before."""
    offline_hub(REPO_ID, A)
    offline_hub("wikitext", B, "dataset")
    config = _config(REPO_ID, source="hf:wikitext", hf_config="wikitext-2-raw-v1")
    layout = study_layout(config)
    from esa.specs import step_spec

    assert step_spec(layout, "model") == {"source": REPO_ID, "revision": A}
    assert step_spec(layout, "data", part="eval")["revision"] == B
    baseline = step_spec(layout, "baseline")
    assert (baseline["model_revision"], baseline["data_revision"]) == (A, B)
    before = (layout.model_ref, layout.data_files("eval")["windows"], layout.baseline_files()["metrics"])

    offline_hub(REPO_ID, B)  # main moved on the hub
    moved = study_layout(config)
    after = (moved.model_ref, moved.data_files("eval")["windows"], moved.baseline_files()["metrics"])
    assert all(old != new for old, new in zip(before, after))

    local = study_layout(_config("/some/local/dir"))
    assert step_spec(local, "model") == {"source": "/some/local/dir"}
    assert "revision" not in step_spec(local, "data", part="eval")
    assert not {"model_revision", "data_revision"} & set(step_spec(local, "baseline"))


def _snapshot(cache, commit: str, checkpoint, scale: float) -> None:
    """``checkpoint``'s files as snapshot ``commit`` of org/tiny, its weights times ``scale``."""
    folder = cache / "models--org--tiny" / "snapshots" / commit
    shutil.copytree(checkpoint, folder)
    weights = load_file(folder / "model.safetensors")
    save_file({name: tensor * scale for name, tensor in weights.items()}, folder / "model.safetensors",
              metadata={"format": "pt"})


def test_the_workflow_loads_the_pinned_commit_and_reruns_when_main_moves(offline_hub, tmp_path, tiny_model_dir):
    """Through the DAG, offline: main names snapshot A, the study runs on A's weights (model.json
    and the baseline's manifest record A); main moves to B (other weights): the model, data and
    baseline are planned again and the baseline is B's; a config pinning A plans nothing new, and
    its baseline made again is A's."""
    _snapshot(offline_hub.cache, A, tiny_model_dir, 1.0)
    _snapshot(offline_hub.cache, B, tiny_model_dir, 0.5)
    offline_hub(REPO_ID, A)
    config = _config(REPO_ID)
    work = tmp_path / "work"
    work.mkdir()

    first = snakemake(work, config)
    assert first.returncode == 0, first.stdout[-3000:]
    layout = study_layout(config)
    ref = json.loads((work / layout.model_ref).read_text())
    assert (ref["kind"], ref["path"], ref["revision"]) == ("hub", REPO_ID, A)
    manifest = json.loads((work / layout.baseline_files()["manifest"]).read_text())
    assert (manifest["model_revision"], manifest["data_revision"]) == (A, None)
    on_a = json.loads((work / layout.baseline_files()["metrics"]).read_text())["loss"]

    offline_hub(REPO_ID, B)
    assert scheduled(snakemake(work, config, "-n", "--quiet", "rules")) == {"model": 1, "data": 1, "baseline": 1}
    assert snakemake(work, config).returncode == 0
    moved = study_layout(config)
    on_b = json.loads((work / moved.baseline_files()["metrics"]).read_text())["loss"]
    assert on_b != on_a

    pinned = {**config, "model": {**config["model"], "revision": A}}
    assert "Nothing to be done" in snakemake(work, pinned, "-n").stdout
    # with main at B, A's baseline made again loads A's weights: model.json's commit, not main
    shutil.rmtree(work / layout.baseline_files()["metrics"].rpartition("/")[0])
    assert snakemake(work, pinned).returncode == 0
    assert json.loads((work / layout.baseline_files()["metrics"]).read_text())["loss"] == on_a
