"""lm-eval-harness on the in-memory model (esa.lm_eval_readout) and ESA's offline cloze task
(esa.cloze): the items against the windows they come from, the accuracy and its stderr against a
hand computation of each choice's log-probability, a destroyed model at chance exactly, the
edit undone after, and an unknown task named with where it was looked up."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import assert_bit_identical, snapshot

from esa.behaviour import BASELINE, Condition, behaviour_readouts
from esa.cloze import CHOICES, cloze_items, write_cloze_task
from esa.data import load_documents, make_windows
from esa.errors import ESAError
from esa.lm_eval_readout import REGISTRY, Harness, task_manager
from esa.models import load_model, load_tokenizer, resolve_source

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    source = resolve_source(str(tiny_model_dir))
    tokenizer = load_tokenizer(source)
    _, docs = load_documents("builtin:pydoc")
    windows = make_windows(tokenizer, docs[:40], 48).astype(np.int64)
    return load_model(source, "cpu", "fp32", "sdpa"), tokenizer, windows


def test_cloze_items_are_words_of_the_windows_with_their_context(tiny):
    _, tokenizer, windows = tiny
    items = cloze_items(windows, tokenizer, n_items=12, context_tokens=16, seed=0)

    assert [item["gold"] for item in items] == [0, 1, 2, 3] * 3
    for item in items:
        w, p = item["window"], item["position"]
        assert item["choices"][item["gold"]] == tokenizer.decode([int(windows[w, p])])[1:]
        assert item["context"] == tokenizer.decode(windows[w, p - 16:p].tolist(), skip_special_tokens=True)
        assert len(set(item["choices"])) == CHOICES
        assert all(len(tokenizer(" " + c, add_special_tokens=False).input_ids) == 1 for c in item["choices"])
        assert not item["context"][-1].isspace()
    assert cloze_items(windows, tokenizer, 12, 16, 0) == items
    with pytest.raises(ESAError, match="n_items 100000 needs 100000 positions"):
        cloze_items(windows, tokenizer, 100000, 16, 0)


def _by_hand(model, tokenizer, items) -> list[bool]:
    """Each item: whether its answer's log p(" " + choice | context) is the highest."""
    right = []
    with torch.no_grad():
        for item in items:
            ids = torch.tensor([tokenizer.encode(item["context"])])
            scores = torch.log_softmax(model(ids).logits[0, -1].double(), -1)
            choices = [tokenizer.encode(" " + c)[0] for c in item["choices"]]
            right.append(int(torch.argmax(scores[choices])) == item["gold"])
    return right


def test_accuracy_is_the_hand_computed_one_and_a_destroyed_model_is_at_chance(tiny, tmp_path):
    """Baseline: acc = the share of items whose answer scores highest, stderr = the sample std
    over sqrt(n); the head zeroed: every choice scores alike, choice 0 wins, acc = 1/4 exactly
    (the answers are spread over the four positions); the model comes back bit-identical."""
    model, tokenizer, windows = tiny
    items = cloze_items(windows, tokenizer, n_items=16, context_tokens=16, seed=1)
    manager = task_manager(["esa_cloze"], [write_cloze_task(tmp_path, items)])
    harness = Harness(model, tokenizer, ["esa_cloze"], manager, None, 0, 8)
    head = model.lm_head.weight
    destroyed = Condition("head zeroed", "destroyed", pd.DataFrame(
        {"tensor": "lm_head.weight", "flat_index": np.arange(head.numel(), dtype=np.int64)}))
    baseline = Condition(BASELINE, BASELINE, pd.DataFrame({"tensor": [], "flat_index": np.array([], np.int64)}))
    before = snapshot(model)

    tables = behaviour_readouts(model, tokenizer, [baseline, destroyed], torch.from_numpy(windows[:2]), 2,
                                ["The"], 4, harness)

    right = _by_hand(model, tokenizer, items)
    acc = sum(right) / len(right)
    scores = tables["lm_eval"].set_index("condition")
    assert scores.loc[BASELINE, "value"] == acc and scores.loc[BASELINE, "n"] == 16
    assert scores.loc[BASELINE, "stderr"] == pytest.approx(np.std(right, ddof=1) / math.sqrt(16), rel=1e-12)
    assert scores.loc["head zeroed", "value"] == 0.25 and scores.loc["head zeroed", "task"] == "esa_cloze"
    assert_bit_identical(model, before)


def test_an_unknown_task_is_named_with_where_tasks_were_looked_up(tmp_path):
    """arc_easy is in lm-eval's registry, so only the made-up name is reported."""
    with pytest.raises(ESAError) as err:
        task_manager(["esa_cloze", "arc_easy", "no_such_task"], [write_cloze_task(tmp_path, [])])
    assert str(err.value) == (f"behaviour.lm_eval.tasks: unknown task 'no_such_task'; looked up in {tmp_path}, "
                              f"{REGISTRY}")


def test_an_edited_task_under_include_path_is_a_new_behaviour_key(tmp_path, monkeypatch):
    """include_path enters the spec absolute, with the digest of its files: a changed task file
    changes the key; a path that is not a directory is one line naming it."""
    from conftest import study_layout

    from esa.specs import behaviour_spec

    monkeypatch.chdir(tmp_path)
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "mine.yaml").write_text("task: mine\n")
    config = {"model": {"name": "m", "source": "builtin:smollm2-135m"}, "data": {"source": "builtin:pydoc"},
              "experiments": [{"name": "g", "metric": "grad_x_weight", "mode": "global", "topk": 5}],
              "behaviour": {"enabled": True, "lm_eval": {"tasks": ["mine"], "include_path": "tasks"}}}
    spec = behaviour_spec(study_layout(config))["lm_eval"]
    assert spec["include_path"] == [str(tmp_path / "tasks")] and len(spec["include_digest"]) == 1
    key = study_layout(config).behaviour_files()["lm_eval"]
    (tmp_path / "tasks" / "mine.yaml").write_text("task: mine\nnum_fewshot: 1\n")
    assert study_layout(config).behaviour_files()["lm_eval"] != key
    config["behaviour"]["lm_eval"]["include_path"] = "nowhere"
    with pytest.raises(ESAError, match="^invalid config at behaviour.lm_eval.include_path: 'nowhere' is not a "
                                       "directory$"):
        study_layout(config)
