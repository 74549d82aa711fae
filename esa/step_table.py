"""Every workflow step, once: its module, whether it runs the model (torch) and whether it asks
for a GPU. Torch-free: the rules, ``esa run``, the code versions and the config schema's
``resources`` keys all read it.

A step's resources key (``resources.<step>`` in the config) is its own name; the Snakemake rules
of one step (``scores_gradients``, ``scores_hutchinson``, ...) share it.
"""

from __future__ import annotations

from dataclasses import dataclass

MODEL_MODULE, TABLE_MODULE = "esa.model_steps", "esa.steps"


@dataclass(frozen=True)
class Step:
    name: str
    torch: bool  # runs the model (esa.model_steps); a table step never imports torch (esa.steps)
    gpu: bool = False  # asks the scheduler for a GPU (resources.gpu)

    @property
    def module(self) -> str:
        return MODEL_MODULE if self.torch else TABLE_MODULE


STEPS = {step.name: step for step in (
    Step("model", torch=True),
    Step("data", torch=True),
    Step("baseline", torch=True, gpu=True),
    Step("scores", torch=True, gpu=True),
    Step("perturb", torch=True, gpu=True),
    Step("confirm", torch=True, gpu=True),
    Step("mechanism", torch=True, gpu=True),
    Step("behaviour", torch=True, gpu=True),
    Step("culprits", torch=True, gpu=True),
    Step("quantize", torch=True, gpu=True),
    Step("merge_scores", torch=False),
    Step("topk", torch=False),
    Step("protect_mask", torch=False),
    Step("plots", torch=False),
    Step("activation_plot", torch=False),
    Step("stability", torch=False),
    Step("agreement", torch=False),
    Step("published", torch=False),
    Step("report", torch=False),
    Step("comparison", torch=False),
)}
GPU_STEPS = tuple(name for name, step in STEPS.items() if step.gpu)
TABLE_STEPS = tuple(name for name, step in STEPS.items() if not step.torch)
