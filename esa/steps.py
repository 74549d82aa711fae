"""One function per workflow step: read the step's inputs, call the library, write outputs.

Each step takes ``spec``, the exact parameters its outputs depend on (the rule passes them
as Snakemake params, so a change reruns exactly the steps it invalidates), and the paths of
its inputs and outputs. Every file is written atomically.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import torch

from . import data, models
from .errors import ESAError
from .evaluation import evaluate
from .io import write_json_atomic, write_parquet_atomic
from .manifest import RunRecord

log = logging.getLogger(__name__)


def step_model(spec: dict, *, ref: str) -> None:
    """Materialise the model source once (GGUF -> safetensors) and write its reference file."""
    models.materialize(spec["source"], Path(ref).parent)


def step_data(spec: dict, *, model: str, calib: str, eval: str, summary: str) -> None:
    """Tokenise the text source into the calibration pool and the evaluation windows."""
    source = models.source_from_ref(model)
    seq_len = spec["seq_len"]
    context = models.context_length(models.load_config(source))
    if context is not None and seq_len > context:
        raise ESAError(f"seq_len {seq_len} exceeds the model's context of {context} tokens")
    tokenizer = models.load_tokenizer(source)
    calib_docs, eval_docs = data.load_documents(
        spec["source"], text_field=spec["text_field"], hf_config=spec["hf_config"],
        calib_split=spec["calib_split"], eval_split=spec["eval_split"],
        eval_fraction=spec["eval_fraction"])
    pool = data.make_windows(tokenizer, calib_docs, seq_len)
    evaluation = data.make_windows(tokenizer, eval_docs, seq_len)
    for part, windows in (("calibration", pool), ("evaluation", evaluation)):
        if len(windows) == 0:
            raise ESAError(f"the {part} text of {spec['source']!r} is shorter than one window "
                           f"of seq_len {seq_len} tokens")
    wanted = spec["eval_windows"]
    if wanted is not None:
        if wanted > len(evaluation):
            raise ESAError(f"eval_windows {wanted} is more than the {len(evaluation)} evaluation "
                           f"windows of seq_len {seq_len} the text holds")
        evaluation = evaluation[:wanted]
    write_parquet_atomic(data.windows_frame(pool), calib)
    write_parquet_atomic(data.windows_frame(evaluation), eval)
    write_json_atomic({"source": spec["source"], "seq_len": seq_len, "bos_id": data.bos_id(tokenizer),
                       "calib_documents": len(calib_docs), "eval_documents": len(eval_docs),
                       "calib_pool_windows": int(len(pool)), "eval_windows": int(len(evaluation))},
                      summary)


def step_baseline(spec: dict, *, model: str, eval: str, metrics: str, windows: str,
                  manifest: str, config: str) -> None:
    """Loss and perplexity of the unmodified model on the fixed evaluation windows."""
    device = models.resolve_device(spec["device"])
    record = RunRecord(spec, device, spec["dtype"], "baseline")
    lm = models.load_model(models.source_from_ref(model), spec["device"], spec["dtype"],
                           spec["attn_implementation"])
    result = evaluate(lm, torch.from_numpy(data.read_windows(eval)), spec["batch_size"],
                      chunk_size=spec["loss_chunk"], progress=True, desc="baseline")
    if not result.finite:
        log.warning("baseline loss is not finite: %s", result.loss)
    per_window = pd.DataFrame({"window": range(len(result.nll)), "nll": result.nll,
                               "tokens": result.tokens, "loss": result.window_loss})
    write_parquet_atomic(per_window, windows)
    write_json_atomic(spec, config)
    write_json_atomic(record.finish(model=spec["model"]), manifest)
    write_json_atomic(result.metrics(), metrics)
    log.info("baseline: loss %.6f ppl %.4f over %d tokens", result.loss, result.ppl,
             int(result.tokens.sum()))
