"""mixed_precision (esa/precision.py): resolved torch-free, the decoder under autocast, the
weights and the loss as stored, scores within a stated tolerance of fp32."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import make_tiny_llama, snapshot, assert_bit_identical, study_layout
from esa import devices, precision
from esa.config import load_config
from esa.damage import Baseline, DamageMeter
from esa.errors import ESAError
from esa.evaluation import decoder_hidden, evaluate
from esa.perturb import perturbed
from esa.precision import mixed_precision_of, resolve_mixed_precision, use_mixed_precision
from esa.scores import compute_scores
from esa.targets import find_targets

import pandas as pd


def test_auto_is_bf16_exactly_where_torch_sees_fast_bf16_on_this_cpu():
    torch_sees = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert precision.fast_bf16("cpu") == torch_sees
    assert resolve_mixed_precision("auto", "cpu", "fp32") == ("bf16" if torch_sees else "no")


@pytest.mark.parametrize("flags, expected", [("fpu avx512f avx512_bf16 sse", "bf16"), ("fpu amx_bf16 amx_tile", "bf16"),
                                             ("fpu avx512f avx2", "no")])
def test_auto_on_a_cpu_reads_its_flags(tmp_path, monkeypatch, flags, expected):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    monkeypatch.setattr(devices, "CPUINFO", str(cpuinfo))
    assert resolve_mixed_precision("auto", "cpu", "fp32") == expected


@pytest.mark.parametrize("capability, expected", [((8, 0), "bf16"), ((9, 0), "bf16"), ((7, 5), "no"), (None, "no")])
def test_auto_on_cuda_reads_the_compute_capability(monkeypatch, capability, expected):
    asked = []
    monkeypatch.setattr(precision, "cuda_compute_capability", lambda index: asked.append(index) or capability)
    assert resolve_mixed_precision("auto", "cuda:1", "fp32") == expected
    assert asked == [1]


def test_settings_resolve_or_fail_with_one_line():
    assert resolve_mixed_precision(False, "cpu", "fp32") == "no"  # YAML's unquoted no
    assert resolve_mixed_precision("fp16", "cpu", "fp32") == "fp16"
    assert resolve_mixed_precision("auto", "cuda", "bf16") == "no"  # bf16 weights: nothing to mix
    with pytest.raises(ESAError, match="^mixed_precision bf16 needs dtype fp32 .*dtype is fp16"):
        resolve_mixed_precision("bf16", "cpu", "fp16")
    with pytest.raises(ESAError, match="^unknown mixed_precision 'yes'; allowed: auto, no, bf16, fp16$"):
        resolve_mixed_precision("yes", "cpu", "fp32")


def test_the_resolution_imports_no_torch():
    code = ("import sys; from esa.precision import resolve_mixed_precision; "
            "resolve_mixed_precision('auto', 'cpu', 'fp32'); print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.stdout == "False\n"


def test_an_unquoted_no_in_a_config_file_is_no(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("mixed_precision: no\n")
    config = load_config(None, yaml.safe_load(path.read_text()))
    assert config["mixed_precision"] is False
    assert study_layout(config).mixed_precision == "no"


def test_no_keeps_every_key_and_bf16_moves_only_the_model_steps():
    """'no' sends nothing (results made before the key existed are kept); bf16 reruns the model
    steps and nothing that does not run the model."""
    base = load_config()
    layouts = {mode: study_layout({**base, "mixed_precision": mode}).of("smollm2-135m") for mode in ("no", "bf16")}
    assert "mixed_precision" not in layouts["no"].job_spec("baseline", layouts["no"].key("baseline"))
    for step, wildcards in (("model", {}), ("data", {"part": "eval"})):
        assert layouts["no"].key(step, **wildcards) == layouts["bf16"].key(step, **wildcards)
    for step, wildcards in (("baseline", {}), ("scores", {"job": "gradients", "seed": 0})):
        assert layouts["no"].key(step, **wildcards) != layouts["bf16"].key(step, **wildcards)
        assert '"mixed_precision": "bf16"' in layouts["bf16"].job_spec(step, layouts["bf16"].key(step, **wildcards),
                                                                        **wildcards)


def _dtypes_seen(model, windows):
    seen = {}
    hooks = [model.model.layers[0].mlp.down_proj.register_forward_hook(
        lambda m, a, out: seen.update(down_proj=out.dtype))]
    hidden = decoder_hidden(model, windows)
    for hook in hooks:
        hook.remove()
    return seen["down_proj"], hidden.dtype


def test_the_decoder_runs_in_bf16_and_hands_fp32_to_the_head(tiny_windows):
    model = make_tiny_llama()
    assert _dtypes_seen(model, tiny_windows) == (torch.float32, torch.float32)
    use_mixed_precision(model, "bf16")
    assert mixed_precision_of(model) == "bf16"
    assert _dtypes_seen(model, tiny_windows) == (torch.bfloat16, torch.float32)
    assert model.model.layers[0].mlp.down_proj.weight.dtype == torch.float32


def test_mixed_precision_leaves_the_weights_bit_identical(tiny_windows):
    """Scoring (gradients and Hutchinson's double backward) and a perturb-and-measure in bf16
    change no stored bit."""
    model = use_mixed_precision(make_tiny_llama(), "bf16")
    before = snapshot(model)
    targets = find_targets(model)
    compute_scores(model, targets, tiny_windows, ["grad_x_weight", "hutchinson_diag", "activation_magnitude"],
                   batch_size=3, seed=0, probes=2, progress=False)
    assert_bit_identical(model, before)
    meter = DamageMeter(model, tiny_windows, 3, Baseline.of(evaluate(model, tiny_windows, 3)))
    zeroed = pd.DataFrame({"tensor": ["model.layers.1.mlp.down_proj.weight"] * 3, "flat_index": [0, 5, 9]})
    with perturbed(model, zeroed, "zero"):
        meter.measure(0)
    assert_bit_identical(model, before)


def _top(score: torch.Tensor, k: int) -> set[int]:
    return set(score.flatten().topk(k).indices.tolist())


def test_bf16_scores_agree_with_fp32_within_the_stated_tolerance():
    """On a tiny Llama (hidden 64, 2 layers, vocabulary 512) each metric's scores under bf16
    mixed precision against fp32. Measured: every tensor's scores within 1.0% (grad_x_weight) and
    1.5% (grad_squared) of its largest score, its top-20 sharing >= 19 of 20, the loss within
    3.2e-6 relative; the bounds below leave 2x to 30x of margin."""
    windows = torch.randint(0, 512, (8, 32), generator=torch.Generator().manual_seed(0))
    results = {}
    for mode in ("no", "bf16"):
        model = use_mixed_precision(make_tiny_llama(hidden=64, intermediate=128, vocab=512), mode)
        targets = find_targets(model)
        results[mode] = (compute_scores(model, targets, windows, ["grad_x_weight", "grad_squared"], batch_size=4,
                                        seed=0, progress=False), evaluate(model, windows, 4).loss)
    (fp32, loss32), (bf16, loss16) = results["no"], results["bf16"]
    assert abs(loss16 - loss32) / loss32 < 1e-4
    for metric in fp32:
        for name, exact in fp32[metric].score.items():
            mixed = bf16[metric].score[name]
            assert float((mixed - exact).abs().max() / exact.abs().max()) < 0.03, (metric, name)
            assert len(_top(mixed, 20) & _top(exact, 20)) >= 18, (metric, name)


def test_fp16_mixed_precision_scales_the_loss(tiny_windows):
    model = use_mixed_precision(make_tiny_llama(), "fp16")
    scores = compute_scores(model, find_targets(model), tiny_windows, ["grad_x_weight"], batch_size=3, seed=0,
                            progress=False)["grad_x_weight"]
    assert scores.extra["loss_scale"] == 2.0**16
