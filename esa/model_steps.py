"""The workflow steps that run the model: one function per step, reading the step's inputs,
calling the library and writing its outputs (the table steps are in :mod:`esa.steps`).

Each step takes ``spec``, the exact parameters its outputs depend on (the rule passes them
as Snakemake params, so a change reruns exactly the steps it invalidates; ``esa run`` hands
them over as the step's class of :mod:`esa.step_specs`), and the paths of its inputs and
outputs. Every file is written atomically.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd
import torch

from . import data, models
from .candidates import build_candidates
from .damage import Baseline, Bootstrap
from .determinism import use_deterministic_kernels
from .errors import ESAError
from .evaluation import evaluate
from .io import read_parquet, write_atomic, write_json_atomic, write_parquet_atomic
from .layout import by_seed
from .manifest import RunRecord
from .names import TABLE_COLUMNS, TOP
from .precision import use_mixed_precision
from .perturb import run_perturbations
from .score_stats import build_stats
from .scores import compute_scores
from .step_specs import (
    BaselineSpec,
    BehaviourSpec,
    ConfirmSpec,
    CulpritsSpec,
    DataSpec,
    MechanismSpec,
    ModelRun,
    ModelSpec,
    PerturbSpec,
    QuantizeSpec,
    ScoresSpec,
)
from .targets import find_targets, split_targets

log = logging.getLogger(__name__)


def step_model(spec: ModelSpec, *, ref: str) -> None:
    """Materialise the model source once (GGUF -> safetensors) and write its reference file (a
    hub model at its pinned ``spec.revision``)."""
    models.materialize(spec.source, Path(ref).parent, spec.revision)


def step_data(spec: DataSpec, *, model: str, windows: str, summary: str) -> None:
    """Tokenise one part (``spec.part``: calib or eval) of the text source into windows.

    The calibration pool and the evaluation windows are separate steps, so a change to the
    evaluation text never touches the pool (and never re-scores).
    """
    source = models.source_from_ref(model)
    seq_len, part = spec.seq_len, spec.part
    context = models.context_length(models.load_config(source))
    if context is not None and seq_len > context:
        raise ESAError(f"seq_len {seq_len} exceeds the model's context of {context} tokens")
    tokenizer = models.load_tokenizer(source)
    calib_docs, eval_docs = data.load_documents(
        spec.source, text_field=spec.text_field, hf_config=spec.hf_config,
        calib_split=spec.calib_split, eval_split=spec.eval_split,
        eval_fraction=spec.eval_fraction, tokenizer=tokenizer, revision=spec.revision)
    docs = calib_docs if part == "calib" else eval_docs
    cut = data.make_windows(tokenizer, docs, seq_len)
    name = {"calib": "calibration", "eval": "evaluation"}[part]
    if len(cut) == 0:
        raise ESAError(f"the {name} text of {spec.source!r} is shorter than one window "
                       f"of seq_len {seq_len} tokens")
    wanted = spec.eval_windows
    if wanted is not None:
        if wanted > len(cut):
            raise ESAError(f"eval_windows {wanted} is more than the {len(cut)} evaluation "
                           f"windows of seq_len {seq_len} the text holds")
        cut = cut[:wanted]
    write_parquet_atomic(data.windows_frame(cut), windows)
    write_json_atomic({"part": name, "source": spec.source, "seq_len": seq_len,
                       "bos_id": data.bos_id(tokenizer), "documents": len(docs),
                       "windows": int(len(cut))}, summary)


def _load(spec: ModelRun, model: str):
    """The step's model, its passes in the spec's mixed precision (:mod:`esa.precision`, which
    the manifest's spec records); ``attn_implementation: auto`` resolves per class, and each
    manifest records the implementation that ran (:func:`esa.models.attention_of`)."""
    use_deterministic_kernels(spec.deterministic)  # before the first CUDA kernel
    lm = models.load_model(models.source_from_ref(model), spec.device, spec.dtype,
                           spec.attn_implementation, spec.device_map)
    return use_mixed_precision(lm, spec.mixed_precision)


def step_baseline(spec: BaselineSpec, *, model: str, eval: str, metrics: str, windows: str,
                  manifest: str, config: str) -> None:
    """Loss and perplexity of the unmodified model on the fixed evaluation windows."""
    device = models.resolve_device(spec.device)
    record = RunRecord(spec.as_dict(), device, spec.dtype, "baseline")
    lm = _load(spec, model)
    result = evaluate(lm, torch.from_numpy(data.read_windows(eval)), spec.batch_size,
                      chunk_size=spec.loss_chunk, progress=True, desc="baseline")
    if not result.finite:
        log.warning("baseline loss is not finite: %s", result.loss)
    per_window = pd.DataFrame({"window": range(len(result.nll)), "nll": result.nll,
                               "tokens": result.tokens, "loss": result.window_loss})
    write_parquet_atomic(per_window, windows)
    write_json_atomic(spec.as_dict(), config)
    write_json_atomic(record.finish(model=spec.model, attn_implementation=models.attention_of(lm)), manifest)
    # V, the number of classes of the softmax: a loss of ln V is uniform output (verdicts: saturated)
    write_json_atomic({**result.metrics(), "vocab_size": lm.get_output_embeddings().weight.shape[0]}, metrics)
    log.info("baseline: loss %.6f ppl %.4f over %d tokens", result.loss, result.ppl,
             int(result.tokens.sum()))


def step_scores(spec: ScoresSpec, *, model: str, calib: str, **outputs: dict) -> None:
    """Score every target weight by each metric of ``spec.metrics`` on seed ``spec.seed``'s sample.

    ``outputs``: metric -> its files: candidates (top-M / bottom-M per tensor), stats (per
    tensor distribution), manifest, for activation_magnitude activations (the massive-activation
    trace of every MLP output projection), and with ``spec.save_full_scores`` full_scores.
    ``spec.layer_group`` = [g, G] scores only part g of G of the targets (see
    :func:`esa.targets.split_targets`).
    """
    if sorted(outputs) != sorted(spec.metrics):
        raise ESAError(f"expected the files of the metrics {spec.metrics}, got {sorted(outputs)}")
    device = models.resolve_device(spec.device)
    record = RunRecord(spec.as_dict(), device, spec.dtype, "scores")
    pool = data.read_windows(calib)
    sample = data.draw_calibration(len(pool), spec.max_samples, spec.seed)
    lm = _load(spec, model)
    targets = find_targets(lm, spec.targets["include"], spec.targets["exclude"])
    group, groups = spec.layer_group
    targets = split_targets(targets, groups)[group]
    results = compute_scores(lm, targets, torch.from_numpy(pool[sample]), spec.metrics,
                             spec.batch_size, spec.seed, probes=spec.probes,
                             weighting=spec.weighting, chunk_size=spec.loss_chunk,
                             gradient_checkpointing=spec.gradient_checkpointing)
    for metric, result in results.items():
        out = outputs[metric]
        scores = result.score
        write_parquet_atomic(build_stats(targets, scores), out["stats"])
        write_parquet_atomic(build_candidates(targets, result.weights, result.stat, scores,
                                              spec.candidates), out["candidates"])
        if "massive_activations" in result.extra:
            write_parquet_atomic(result.extra["massive_activations"], out["activations"])
        if spec.save_full_scores:
            from safetensors.torch import save_file

            write_atomic(out["full_scores"], lambda tmp: save_file(
                {name: scores[name].cpu().contiguous() for name in result.stat}, tmp))
        write_json_atomic(record.finish(metric=metric, calibration_windows=sample.tolist(), targets=len(targets),
                                        attn_implementation=models.attention_of(lm)), out["manifest"])


def read_baseline(metrics: str, windows: str) -> Baseline:
    """The baseline step's metrics.json and per-window windows.parquet, as :mod:`esa.damage` takes them."""
    return Baseline.from_frames(read_parquet(windows), json.loads(Path(metrics).read_text()))


def step_perturb(spec: PerturbSpec, *, model: str, eval: str, baseline: str, baseline_windows: str, masks: dict,
                 results: str, manifest: str) -> None:
    """Perturb the top-k and each control of every seed in place, evaluate, restore bit-exactly.

    ``masks``: seed -> path, one mask per seed of ``spec.seeds``; ``baseline`` and
    ``baseline_windows``: the baseline step's metrics and per-window NLL (each dPPL's paired
    bootstrap interval, with ``spec.bootstrap``).
    """
    device = models.resolve_device(spec.device)
    record = RunRecord(spec.as_dict(), device, spec.dtype, "perturb")
    masks_by_seed = {seed: read_parquet(path) for seed, path in by_seed(masks, spec.seeds).items()}
    reference = read_baseline(baseline, baseline_windows)
    lm = _load(spec, model)
    table = run_perturbations(lm, masks_by_seed, torch.from_numpy(data.read_windows(eval)),
                              spec.batch_size, reference, spec.perturb, spec.scale,
                              spec.noise, sets=(TOP, *spec.controls), chunk_size=spec.loss_chunk,
                              bootstrap=Bootstrap(**spec.bootstrap))
    write_parquet_atomic(table, results)
    write_json_atomic(record.finish(baseline_ppl=reference.ppl, attn_implementation=models.attention_of(lm)),
                      manifest)


def step_confirm(spec: ConfirmSpec, *, model: str, eval: str, baseline: str, baseline_windows: str,
                 candidates: dict[str, str], stats: dict[str, str], super_weights: str, super_experts: str,
                 activations: str, rerun: str, groups: str, group_members: str, null: str) -> None:
    """Zero each of every metric's global top-N weights alone, and each of its top-N experts by
    score mass whole; trace the massive activations.

    ``candidates`` and ``stats``: metric -> that metric's candidates.parquet / stats.parquet
    (the confirm seed's), for every metric of ``spec.metrics``; stats give the tensor table
    that makes each top-N exact (:func:`esa.confirm.global_top`) and the experts' score mass
    (:func:`esa.confirm.confirm_super_experts`, same top-N and factor; a dense model writes an
    empty table). A weight or expert in several metrics' top-N is evaluated once. The experts
    go first, so the re-evaluation of the unmodified model at the end (the
    baseline-identical-on-rerun check) follows every ablation. With ``spec.joint``'s top_n > 0
    the structural groups of every metric's global top-N are zeroed jointly and taken apart
    (:mod:`esa.joint`; ``groups`` and ``group_members``, empty tables otherwise). With
    ``spec.innocent``'s samples > 0 every tested tensor and every group reaching the factor
    without a confirmed member gets its calibrated null, which a confirmation must beat
    (:mod:`esa.null`; ``null``, one row per draw).
    """
    from .confirm import confirm_super_experts, confirm_super_weights
    from .joint import JointSettings
    from .null import NullSettings

    metrics = spec.metrics
    for name, paths in (("candidates", candidates), ("stats", stats)):
        if sorted(paths) != sorted(metrics):
            raise ESAError(f"confirm needs {name} of the metrics {metrics}, got {sorted(paths)}")
    lm = _load(spec, model)
    windows = torch.from_numpy(data.read_windows(eval))
    reference = read_baseline(baseline, baseline_windows)
    bootstrap = Bootstrap(**spec.bootstrap)
    tables = {m: read_parquet(stats[m], columns=[*TABLE_COLUMNS, "sum"]) for m in metrics}
    experts = confirm_super_experts(lm, tables, windows, spec.batch_size, reference, top_n=spec.top_n,
                                    factor=spec.factor, chunk_size=spec.loss_chunk, bootstrap=bootstrap)
    result = confirm_super_weights(lm, {m: read_parquet(candidates[m]) for m in metrics},
                                   {m: table[TABLE_COLUMNS] for m, table in tables.items()},
                                   windows, spec.batch_size, reference, top_n=spec.top_n,
                                   factor=spec.factor, chunk_size=spec.loss_chunk, bootstrap=bootstrap,
                                   joint=JointSettings(**spec.joint), null=NullSettings(**spec.innocent))
    write_parquet_atomic(result.super_weights, super_weights)
    write_parquet_atomic(experts, super_experts)
    write_parquet_atomic(result.activations, activations)
    write_parquet_atomic(result.groups, groups)
    write_parquet_atomic(result.group_members, group_members)
    write_parquet_atomic(result.null, null)
    write_json_atomic(result.rerun.metrics(), rerun)


def step_mechanism(spec: MechanismSpec, *, model: str, eval: str, calib: str, baseline: str, baseline_windows: str,
                   super_weights: str, groups: str, group_members: str, sweep: str, restore: str, control: str,
                   joint_mean: str) -> None:
    """How each confirmed super weight of confirm's ``super_weights`` and each joint one of its
    ``groups`` and ``group_members`` acts (:func:`esa.mechanism.super_weight_mechanism`): the
    scale sweep over ``spec.scales``, the massive-activation restore at
    ``spec.massive_fraction`` of the peak, the mean contribution over the calibration windows
    the confirm seed scored on (``spec.calib_samples`` drawn with ``spec.calib_seed`` from
    ``calib``), the matched-magnitude control. No confirmed super weight, single or joint: the
    four tables are written empty, the model not loaded.
    """
    from .mechanism import Mechanism, confirmed_weights, joint_super_weights, super_weight_mechanism

    table, group_table, member_table = (read_parquet(path) for path in (super_weights, groups, group_members))
    if confirmed_weights(table).empty and not joint_super_weights(group_table, member_table):
        log.info("mechanism: no confirmed super weight, single or joint")
        result = Mechanism.of([], [], [], [])
    else:
        pool = data.read_windows(calib)
        calib_windows = torch.from_numpy(pool[data.draw_calibration(len(pool), spec.calib_samples, spec.calib_seed)])
        result = super_weight_mechanism(_load(spec, model), table, torch.from_numpy(data.read_windows(eval)),
                                        spec.batch_size, read_baseline(baseline, baseline_windows),
                                        spec.scales, spec.massive_fraction, calib_windows, group_table, member_table,
                                        chunk_size=spec.loss_chunk, bootstrap=Bootstrap(**spec.bootstrap),
                                        progress=True)
    outputs = {"sweep": sweep, "restore": restore, "control": control, "joint_mean": joint_mean}
    for name, frame in result.tables().items():
        write_parquet_atomic(frame, outputs[name])


def step_behaviour(spec: BehaviourSpec, *, model: str, eval: str, super_weights: str, groups: str,
                   group_members: str, conditions: str, generation: str, sinks: str, lm_eval: str,
                   cloze: str, masks: dict[str, str] | None = None) -> None:
    """Behaviour beside perplexity (:mod:`esa.behaviour`) under every condition: the lm-eval
    tasks of ``spec.lm_eval`` on the in-memory model (``esa_cloze`` built from the evaluation
    windows, its items written to ``cloze``), the greedy continuations of ``spec.prompts``
    (``spec.max_new_tokens`` each) and the attention-sink mass per layer over the first
    ``spec.sink_windows`` evaluation windows. The conditions: the unmodified model, each confirmed
    single and joint super weight of confirm's tables zeroed, and the top set and random_k control
    of each of ``spec.experiments`` (its mask of that seed in ``masks``), perturbed."""
    import tempfile

    from .behaviour import behaviour_readouts, conditions as conditions_of
    from .cloze import CLOZE_COLUMNS, TASK, cloze_items, write_cloze_task
    from .lm_eval_readout import Harness, task_manager

    experiments = [e | {"mask": read_parquet((masks or {})[e["name"]])} for e in spec.experiments]
    found = conditions_of(*(read_parquet(path) for path in (super_weights, groups, group_members)), experiments)
    windows = data.read_windows(eval)
    source = models.source_from_ref(model)
    tokenizer = models.load_tokenizer(source)
    settings = spec.lm_eval
    tasks = settings["tasks"]
    items = (cloze_items(windows, tokenizer, **settings["cloze"]) if TASK in tasks else [])
    with tempfile.TemporaryDirectory(prefix="esa-tasks-") as built:
        manager = task_manager(tasks, [write_cloze_task(built, items)] + settings["include_path"]) if tasks else None
        lm = _load(spec, model)
        harness = (Harness(lm, tokenizer, tasks, manager, settings["limit"], settings["num_fewshot"],
                           settings["batch_size"]) if tasks else None)
        sink_windows = windows[:spec.sink_windows] if spec.sink_windows is not None else windows
        tables = behaviour_readouts(lm, tokenizer, found, torch.from_numpy(sink_windows), spec.batch_size,
                                    spec.prompts, spec.max_new_tokens, harness, progress=True)
    tables["cloze"] = pd.DataFrame(items, columns=CLOZE_COLUMNS)
    outputs = {"conditions": conditions, "generation": generation, "sinks": sinks, "lm_eval": lm_eval,
               "cloze": cloze}
    for name, frame in tables.items():
        write_parquet_atomic(frame, outputs[name])


def step_culprits(spec: CulpritsSpec, *, model: str, eval: str, baseline: str, baseline_windows: str, mask: str,
                  super_weights: str, culprits: str, search: str, summary: str) -> None:
    """Take the top set of one experiment's mask (seed ``spec.seed``) apart by adaptive group
    testing (:func:`esa.culprits.find_culprits`): the experiment's perturbation
    (``spec.perturb``, ``spec.scale``), destructive at ``spec.factor``, at most
    ``spec.budget`` evaluations, groups of ``spec.min_group`` weights not split. A set
    that is not destructive is evaluated once and written with no culprits. ``super_weights``:
    confirm's, for the summary's confirmed super weights in the set.
    """
    from .culprits import culprit_summary, find_culprits, search_layers
    from .damage import DamageMeter

    chosen = read_parquet(mask)
    top = chosen[chosen["set"] == TOP]
    lm = _load(spec, model)
    meter = DamageMeter(lm, torch.from_numpy(data.read_windows(eval)), spec.batch_size,
                        read_baseline(baseline, baseline_windows), spec.loss_chunk, search_layers(lm, top),
                        Bootstrap(**spec.bootstrap))
    result = find_culprits(lm, top, meter, spec.perturb, spec.scale, spec.factor, spec.budget,
                           spec.min_group, show_progress=True)
    facts = culprit_summary(result, read_parquet(super_weights))
    log.info("culprits of %s: %d weights, ppl ratio %.4g, %d evaluations, %d culprit weights", spec.experiment,
             facts["n_weights"], facts["set_ppl_ratio"], facts["evaluations"], facts["culprit_weights"])
    write_parquet_atomic(result.culprits, culprits)
    write_parquet_atomic(result.search, search)
    summary_keys = ("experiment", "seed", "perturb", "scale", "factor", "min_group")
    write_json_atomic({key: getattr(spec, key) for key in summary_keys} | facts, summary)


def step_quantize(spec: QuantizeSpec, *, model: str, eval: str, baseline: str, baseline_windows: str,
                  candidates: dict[str, str], super_weights: str, results: str, manifest: str) -> None:
    """Quantize every target with each scheme of ``spec.schemes`` (RTN, :mod:`esa.quantize`)
    under every protect condition (:mod:`esa.protect`: none, each metric's global top-k of
    ``candidates`` (metric -> path on the confirm seed, for every metric of ``spec.metrics``)
    at each k of ``spec.protect``, random_k drawn with ``spec.seed``, the confirmed super
    weights of ``super_weights``) and measure the damage against the unquantized baseline.
    """
    from .mechanism import confirmed_weights
    from .protect import protect_conditions
    from .quantize import Scheme, run_quantization
    from .targets import target_table

    metrics = spec.metrics
    if sorted(candidates) != sorted(metrics):
        raise ESAError(f"quantize needs candidates of the metrics {metrics}, got {sorted(candidates)}")
    device = models.resolve_device(spec.device)
    record = RunRecord(spec.as_dict(), device, spec.dtype, "quantize")
    lm = _load(spec, model)
    targets = find_targets(lm, spec.targets["include"], spec.targets["exclude"])
    schemes = [Scheme(s["bits"], s["group_size"]) for s in spec.schemes]
    conditions = protect_conditions({m: read_parquet(candidates[m]) for m in metrics}, target_table(targets),
                                    spec.protect, spec.seed, confirmed_weights(read_parquet(super_weights)))
    reference = read_baseline(baseline, baseline_windows)
    table = run_quantization(lm, targets, schemes, conditions, torch.from_numpy(data.read_windows(eval)),
                             spec.batch_size, reference, chunk_size=spec.loss_chunk,
                             bootstrap=Bootstrap(**spec.bootstrap))
    write_parquet_atomic(table, results)
    write_json_atomic(record.finish(baseline_ppl=reference.ppl, attn_implementation=models.attention_of(lm)),
                      manifest)
