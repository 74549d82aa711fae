"""Memory levers for large models: layer-split scoring and activation checkpointing."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from esa import model_steps, steps
from esa.data import windows_frame
from esa.evaluation import mean_token_loss
from esa.io import write_json_atomic, write_parquet_atomic
from esa.scores import _scoring_mode, compute_scores
from esa.step_specs import typed_spec
from esa.targets import find_targets, split_targets, target_parameter

from conftest import make_tiny_llama, study_layout


def test_split_targets_keeps_order_and_layer_blocks():
    model = make_tiny_llama(layers=5)
    targets = find_targets(model, include=["embed_tokens"])
    parts = split_targets(targets, 3)
    assert [t for part in parts for t in part] == targets
    layers = [[t.layer for t in part] for part in parts]
    for part in layers:  # a layer never straddles two parts
        assert all(layer not in other for other in layers if other is not part for layer in part)
    with pytest.raises(ValueError, match="layer_groups 7 must be between 1 and the 6 layer blocks"):
        split_targets(targets, 7)


@pytest.fixture
def scoring_inputs(tmp_path, tiny_model_dir):
    calib = tmp_path / "calib.parquet"
    windows = np.random.default_rng(0).integers(0, 1000, size=(6, 16)).astype(np.int32)
    write_parquet_atomic(windows_frame(windows), calib)
    ref = tmp_path / "model.json"
    write_json_atomic({"source": "test", "kind": "dir", "path": str(tiny_model_dir)}, ref)
    spec = {"model": "tiny", "data": {}, "device": "cpu", "dtype": "fp32", "attn_implementation": "eager",
            "loss_chunk": 8, "seed": 1, "max_samples": 4, "batch_size": 2, "probes": 2, "weighting": "product",
            "candidates": 7, "targets": {"include": [], "exclude": []}, "save_full_scores": False,
            "gradient_checkpointing": False, "layer_group": [0, 1], "device_map": None}
    return spec, str(ref), str(calib)


@pytest.mark.parametrize("metrics", [["grad_x_weight", "grad_squared"], ["activation_magnitude"]])
def test_layer_split_scoring_equals_unsplit(tmp_path, scoring_inputs, metrics):
    """Two layer-group jobs merged give exactly the candidates, stats and full scores of one job."""
    spec, model, calib = scoring_inputs
    spec = {**spec, "metrics": metrics, "save_full_scores": True}

    # the files of a study that saves full scores (activation_magnitude's include its trace), one
    # copy per job under tmp_path / where
    layout = study_layout({"model": {"name": "tiny", "source": model}, "data": {"source": "builtin:pydoc"},
                           "scoring": {"save_full_scores": True}})

    def files(where):
        return {m: {name: str(tmp_path / where / path) for name, path in layout.score_files(m, 1).items()}
                for m in metrics}

    model_steps.step_scores(typed_spec("scores", spec), model=model, calib=calib, **files("whole"))
    for group in (0, 1):
        model_steps.step_scores(typed_spec("scores", {**spec, "layer_group": [group, 2]}), model=model, calib=calib,
                                **files(f"part{group}"))
    steps.step_merge_scores(typed_spec("merge_scores", {"metrics": metrics, "layer_groups": 2}),
                            parts={"0": files("part0"), "1": files("part1")}, **files("merged"))
    whole, merged = files("whole"), files("merged")
    for m in metrics:
        for name in ("candidates", "stats"):
            pd.testing.assert_frame_equal(pd.read_parquet(merged[m][name]), pd.read_parquet(whole[m][name]))
        whole_scores, merged_scores = load_file(whole[m]["full_scores"]), load_file(merged[m]["full_scores"])
        assert whole_scores.keys() == merged_scores.keys() and len(whole_scores) == 14
        for name, score in whole_scores.items():
            assert torch.equal(merged_scores[name], score)
        if m == "activation_magnitude":
            pd.testing.assert_frame_equal(pd.read_parquet(merged[m]["activations"]),
                                          pd.read_parquet(whole[m]["activations"]))
        manifest = json.loads(Path(merged[m]["manifest"]).read_text())
        assert len(manifest["parts"]) == 2 and manifest["targets"] == 14


def test_checkpointing_gives_identical_scores_with_less_saved_activation():
    model = make_tiny_llama(layers=4, hidden=64, intermediate=256)
    windows = torch.randint(0, 64, (4, 64), generator=torch.Generator().manual_seed(0))
    targets = find_targets(model)
    params = [target_parameter(model, t) for t in targets]
    saved = {}
    for checkpointing in (False, True):
        total = [0]

        def pack(tensor):
            total[0] += tensor.numel() * tensor.element_size()
            return tensor

        with _scoring_mode(model, params, checkpointing):
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
                loss = mean_token_loss(model, windows)
            loss.backward()
        model.zero_grad()
        saved[checkpointing] = total[0]
    assert saved[True] < saved[False] / 5
    plain, ckpt = (compute_scores(model, targets, windows, ["grad_squared", "hutchinson_diag"], 2, 0, probes=2,
                                  progress=False, gradient_checkpointing=c) for c in (False, True))
    for metric in ("grad_squared", "hutchinson_diag"):
        for name in plain[metric].stat:
            assert torch.equal(plain[metric].stat[name], ckpt[metric].stat[name])
    assert not model.training and not any(layer.training for layer in model.model.layers)
