"""``esa_cloze``: a next-word multiple-choice task built from the study's own held-out text, so
that lm-eval-harness runs offline on whatever text the study reads (``builtin:pydoc`` in the
embedded default).

Item i comes from the evaluation windows (token ids). Its answer is a *word token* at position
p of a window: one token that decodes to a space and at least three ASCII letters and encodes
back to itself alone. Its context is the decoded ``context_tokens`` tokens before p, special
tokens dropped, and a position whose context ends in whitespace is skipped (lm-eval would move
that whitespace into the continuation). Its three distractors are other word tokens of the same windows, drawn with
``seed``. The answer's index is i mod 4, so the items' answers are spread evenly over the four
positions: a model that scores every choice alike (a destroyed one) picks choice 0 each time
and scores exactly 1/4 on a multiple of four items. Every choice is one token, so its
log-likelihood is one logit read after the shared context, and lm-eval runs one forward pass
per item (its ``logits_cache``).

lm-eval scores choice c as log p(" " + c | context) and ``acc`` is the share of items whose
answer has the highest score.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from .errors import ESAError

TASK = "esa_cloze"
CHOICES = 4
CLOZE_COLUMNS = ["context", "choices", "gold", "window", "position"]
WORD = re.compile(r"^ [A-Za-z]{3,}$")


def word_tokens(tokenizer, ids: set[int]) -> dict[int, str]:
    """Of ``ids``, the word tokens (module docstring): id -> the word without its space."""
    found = {}
    for token in sorted(ids):
        text = tokenizer.decode([token])
        if WORD.match(text) and tokenizer(text, add_special_tokens=False).input_ids == [token]:
            found[token] = text[1:]
    return found


def cloze_items(windows: np.ndarray, tokenizer, n_items: int, context_tokens: int, seed: int) -> list[dict]:
    """``n_items`` items (context, choices, gold) from ``windows`` ([W, T] token ids)."""
    words = word_tokens(tokenizer, set(np.unique(windows[:, context_tokens:]).tolist()))

    def context(w: int, p: int) -> str:
        return tokenizer.decode(windows[w, p - context_tokens:p].tolist(), skip_special_tokens=True)

    positions = [(w, p) for w in range(len(windows)) for p in range(context_tokens, windows.shape[1])
                 if int(windows[w, p]) in words and not context(w, p)[-1:].isspace()]
    vocabulary = sorted(words)
    if len(positions) < n_items or len(vocabulary) < CHOICES:
        raise ESAError(f"behaviour.lm_eval.cloze: the evaluation text has {len(positions)} word positions after "
                       f"{context_tokens} tokens of context and {len(vocabulary)} distinct words; n_items {n_items} "
                       f"needs {n_items} positions and {CHOICES} words (lower n_items or context_tokens, or add text)")
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(len(positions), size=n_items, replace=False))
    items = []
    for i, at in enumerate(chosen):
        w, p = positions[at]
        answer = int(windows[w, p])
        others = [t for t in vocabulary if t != answer]
        choices = [words[int(t)] for t in rng.choice(others, size=CHOICES - 1, replace=False)]
        gold = i % CHOICES
        choices.insert(gold, words[answer])
        items.append({"context": context(w, p), "choices": choices, "gold": gold, "window": int(w), "position": int(p)})
    return items


def write_cloze_task(directory: str | Path, items: list[dict]) -> Path:
    """Write ``items`` (:func:`cloze_items`, or the rows of the behaviour step's cloze.parquet)
    and the lm-eval task config that reads them into ``directory``; returns it (an lm-eval
    ``include_path``)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / f"{TASK}.jsonl"
    data.write_text("".join(json.dumps({"context": str(item["context"]), "choices": [str(c) for c in item["choices"]],
                                        "gold": int(item["gold"])}) + "\n" for item in items))
    config = {
        "task": TASK, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data.resolve())}},
        "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{context}}",
        "doc_to_choice": "{{choices}}", "doc_to_target": "{{gold}}",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }
    (directory / f"{TASK}.yaml").write_text(json.dumps(config, indent=1) + "\n")  # JSON is YAML
    return directory
