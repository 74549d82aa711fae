"""The device tests of bench/gpu_check.sh: every library phase on ``ESA_TEST_DEVICE`` (default
cpu) in fp32, bf16 and fp16 on tiny models, bit-exact restores there, CPU vs device scores, and
the DAG with ``device:`` set. Marked ``device``: the suite deselects them (pyproject's addopts);
``bash bench/gpu_check.sh`` runs them on CUDA, ``--cpu-smoke`` (CI) on the CPU."""

import json
import math
import os

import pandas as pd
import pytest
import torch
from conftest import bit_identical, bits, make_tiny_llama, snakemake, snapshot, study_layout, unigram_text

from esa.confirm import zero_each
from esa.culprits import find_culprits
from esa.damage import Baseline, DamageMeter
from esa.determinism import use_deterministic_kernels
from esa.evaluation import evaluate
from esa.mechanism import super_weight_mechanism
from esa.perturb import perturbed
from esa.quantize import Scheme, quantized
from esa.scores import compute_scores
from esa.targets import find_targets

DEVICE = os.environ.get("ESA_TEST_DEVICE", "cpu")
pytestmark = pytest.mark.device
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
METRICS = ["grad_x_weight", "grad_squared", "hutchinson_diag", "activation_magnitude"]
DOWN = "model.layers.1.mlp.down_proj.weight"



@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_every_phase_runs_on_the_device_and_restores_bit_exactly(dtype):
    """Baseline, the four metrics, a perturbation measured with KL and its interval, confirm,
    quantize, culprits and the mechanism on one tiny Llama on the device: finite numbers, scores
    and accumulators in fp32 on the device, and every weight bit-identical afterwards."""
    model = make_tiny_llama(layers=2).to(device=DEVICE, dtype=DTYPES[dtype])
    windows = unigram_text(4, seed=2, length=16)
    before = snapshot(model)
    baseline = Baseline.of(evaluate(model, windows, 2))
    assert math.isfinite(baseline.loss)

    targets = find_targets(model)
    scores = compute_scores(model, targets, unigram_text(2, seed=1, length=16), METRICS, 1, 0, probes=2,
                            progress=False)
    for metric, result in scores.items():
        for name, score in result.score.items():
            assert score.device.type == torch.device(DEVICE).type and score.dtype == torch.float32, (metric, name)
            assert torch.isfinite(score).all(), (metric, name)

    edit = pd.DataFrame({"tensor": DOWN, "flat_index": range(0, 64, 4)})
    meter = DamageMeter(model, windows, 2, baseline, start_layers={1})
    with perturbed(model, edit, "sign_flip", 2.0):
        measured = meter.measure(1)
    assert measured["kl"] > 0 and measured["delta_ppl_lo"] <= measured["delta_ppl"] <= measured["delta_ppl_hi"]

    weights = pd.DataFrame({"tensor": DOWN, "layer": 1, "module": "mlp.down_proj", "expert": -1, "part": "",
                            "row": [0], "col": [3], "flat_index": [3], "weight": [0.0], "score": [1.0]})
    confirmation = zero_each(model, weights, windows, 2, baseline, factor=0.0)  # any ratio confirms
    assert confirmation.super_weights["confirmed"].all()
    assert torch.equal(torch.from_numpy(confirmation.rerun.nll), torch.from_numpy(baseline.nll))

    with quantized(model, targets, Scheme(3, 16)):
        assert not bit_identical(model, before)
    search = find_culprits(model, edit.assign(layer=1, module="mlp.down_proj", row=0, col=edit["flat_index"]),
                           meter, "zero", 1.0, 0.0, budget=3)  # factor 0: every group destructive
    assert search.evaluations == 3 and search.culprits["kind"].tolist() == ["budget", "budget"]
    mechanism = super_weight_mechanism(model, confirmation.super_weights.assign(confirmed=True), windows, 2,
                                       baseline, [0, 2], 0.5, windows)
    assert len(mechanism.sweep) == 2 and mechanism.restore["reason"].iloc[0] == ""
    assert bit_identical(model, before)


def test_deterministic_kernels_repeat_the_scores_bit_for_bit():
    """``deterministic: true`` (cuBLAS workspace, SDPA's and index_add's deterministic backward):
    two runs of the gradient and Hutchinson scores in bf16 on the device give the same bits."""
    use_deterministic_kernels(True)
    try:
        model = make_tiny_llama(layers=2).to(device=DEVICE, dtype=torch.bfloat16)
        sample = unigram_text(4, seed=3, length=16)
        first, second = (compute_scores(model, find_targets(model), sample, METRICS[:3], 2, 0, probes=2,
                                        progress=False) for _ in range(2))
    finally:
        torch.use_deterministic_algorithms(False)
    for metric in METRICS[:3]:
        for name, stat in first[metric].stat.items():
            assert torch.equal(bits(stat), bits(second[metric].stat[name])), (metric, name)


@pytest.mark.skipif(DEVICE == "cpu", reason="compares the CPU with a device: runs with ESA_TEST_DEVICE=cuda")
def test_device_scores_match_the_cpu():
    """fp32 scores of the same model and text on the CPU and on the device: the same numbers up
    to summation order (relative 1e-4 of each tensor's largest score)."""
    windows = unigram_text(2, seed=1, length=16)
    cpu = make_tiny_llama(layers=2)
    device = make_tiny_llama(layers=2).to(DEVICE)
    on_cpu = compute_scores(cpu, find_targets(cpu), windows, METRICS, 1, 0, probes=2, progress=False)
    on_device = compute_scores(device, find_targets(device), windows, METRICS, 1, 0, probes=2, progress=False)
    for metric in METRICS:
        for name, score in on_cpu[metric].score.items():
            other = on_device[metric].score[name].cpu()
            assert torch.allclose(other, score, rtol=1e-4, atol=1e-4 * float(score.abs().max())), (metric, name)


def test_the_dag_runs_on_the_device(tmp_path, tiny_model_dir):
    """`device:` through Snakemake on a tiny model directory: every model step runs there and
    says so in its manifest."""
    config = {"model": {"name": "tiny", "source": str(tiny_model_dir)}, "device": DEVICE, "plots": False,
              "data": {"source": "builtin:pydoc", "seq_len": 32, "eval_windows": 2}, "seeds": [0],
              "scoring": {"max_samples": 2, "batch_size": 2, "candidates": 20, "hutchinson": {"probes": 1}},
              "confirm": {"top_n": 2},
              "experiments": [{"name": "g", "metric": "grad_x_weight", "mode": "global", "topk": 10,
                               "perturb": "zero", "controls": ["random_k"]}]}
    result = snakemake(tmp_path, config)
    assert result.returncode == 0, result.stdout[-4000:]
    layout = study_layout(config)
    perturbed = layout.perturb_files("grad_x_weight", "global", 10, "zero_1")
    manifest = json.loads((tmp_path / perturbed["manifest"]).read_text())
    assert str(manifest["device"]).startswith(DEVICE)
    assert (tmp_path / layout.report_files()["index"]).exists()
