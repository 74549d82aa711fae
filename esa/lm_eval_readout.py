"""lm-evaluation-harness accuracy of the loaded, in-memory model, edited or not.

The harness is used as a library (its maintainers' advice for modified models,
lm-evaluation-harness #1570): one ``HFLM`` wraps the model object the step already loaded, and
``simple_evaluate`` runs the tasks on it for each condition while the condition's edit is in
place, so every number is read off the edited weights, with no second model load and no
subprocess. ``value`` and ``stderr`` are lm-eval's own: for ``acc``, the mean over the n items
of 1[the answer has the highest log-likelihood] and its standard error sqrt(var / n).

Tasks are looked up first in ESA's task directory (:mod:`esa.cloze`) and the user's
``include_path``, and only when some task is not there in lm-eval's own registry (its index
takes ~10 s to build, so the offline default does without it).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from .errors import ESAError

LM_EVAL_COLUMNS = ["condition", "kind", "task", "metric", "value", "stderr", "n"]
REGISTRY = "lm-eval's own task registry (lm_eval/tasks)"


def task_manager(tasks: list[str], include_paths: list[str | Path]):
    """An lm-eval ``TaskManager`` that knows every task of ``tasks``; ESAError naming the first
    unknown one and where tasks were looked up."""
    from lm_eval.tasks import TaskManager

    paths = [str(p) for p in include_paths]
    manager = TaskManager(include_path=paths, include_defaults=False)
    if not set(tasks) <= set(manager.all_tasks):
        manager = TaskManager(include_path=paths)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ESAError(f"behaviour.lm_eval.tasks: unknown task {unknown[0]!r}; looked up in "
                       f"{', '.join(paths + [REGISTRY])}")
    return manager


class Harness:
    """lm-eval's view of one loaded model: ``accuracy`` runs the tasks on its current weights."""

    def __init__(self, model, tokenizer, tasks: list[str], manager, limit: int | None, num_fewshot: int,
                 batch_size: int):
        from lm_eval.models.huggingface import HFLM

        self.lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        self.tasks, self.manager, self.limit, self.num_fewshot = tasks, manager, limit, num_fewshot

    def accuracy(self) -> pd.DataFrame:
        """Every metric of every task and group (rows: task, metric, value, stderr, n)."""
        from lm_eval import simple_evaluate

        out = simple_evaluate(model=self.lm, tasks=self.tasks, task_manager=self.manager, limit=self.limit,
                              num_fewshot=self.num_fewshot, log_samples=False)
        return metric_rows(out)


def metric_rows(out: dict) -> pd.DataFrame:
    """lm-eval's ``results`` as rows: metric ``acc`` for lm-eval's ``acc,none``, ``acc (f)`` for
    filter f; its ``*_stderr`` as ``stderr``; ``n`` the items evaluated."""
    samples = out.get("n-samples", {})
    rows = []
    for task, result in out["results"].items():
        for key, value in result.items():
            if "," not in key or "_stderr," in key:
                continue
            metric, kept = key.split(",", 1)
            stderr = result.get(f"{metric}_stderr,{kept}")
            rows.append({"task": task, "metric": metric if kept == "none" else f"{metric} ({kept})",
                         "value": float(value),
                         "stderr": float(stderr) if isinstance(stderr, (int, float)) else float("nan"),
                         "n": int(samples.get(task, {}).get("effective", -1))})
    return pd.DataFrame(rows, columns=["task", "metric", "value", "stderr", "n"])
