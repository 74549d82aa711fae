"""Model sources, device/dtype resolution, and the bundled model end to end."""

import json
import os
import subprocess
import sys

import pytest
import torch

from esa import models
from esa.cli import main
from esa.errors import ESAError
from esa.evaluation import evaluate


def test_device_resolution():
    assert models.resolve_device("cpu") == torch.device("cpu")
    assert models.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ESAError, match="unknown device 'gpu'; allowed: cpu, cuda, cuda:N, auto"):
        models.resolve_device("gpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_cuda_without_gpu_is_an_error():
    with pytest.raises(ESAError, match="device 'cuda' requested but no CUDA GPU is available"):
        models.resolve_device("cuda")


def test_dtype_resolution():
    assert models.resolve_dtype("bf16") is torch.bfloat16
    with pytest.raises(ESAError, match="unknown dtype 'float32'; allowed: fp32, bf16, fp16"):
        models.resolve_dtype("float32")


def test_source_classification(tmp_path):
    assert models.resolve_source("meta-llama/Llama-3.1-8B") == models.ModelSource("hub", "meta-llama/Llama-3.1-8B")
    assert models.resolve_source(str(tmp_path)).kind == "dir"
    builtin = models.resolve_source("builtin:smollm2-135m")
    assert builtin.kind == "gguf" and builtin.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    with pytest.raises(ESAError, match="does not exist"):
        models.resolve_source(str(tmp_path / "missing.gguf"))
    with pytest.raises(ESAError, match="neither an existing directory"):
        models.resolve_source(str(tmp_path / "missing_dir"))
    with pytest.raises(ESAError, match="unknown builtin model 'builtin:gpt5'"):
        models.resolve_source("builtin:gpt5")


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "esa.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


@pytest.mark.parametrize("source", ["nonexistent-org/nonexistent-model", "/nonexistent/model/dir"])
def test_nonexistent_model_one_line_error_no_output(tmp_path, source):
    ref = tmp_path / "model" / "model.json"
    result = run_cli("run", "model", "--spec", json.dumps({"source": source}), f"ref={ref}",
                     env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and result.stderr.startswith("esa: error: ")
    assert source in result.stderr
    assert not ref.exists()


def test_corrupt_gguf_is_an_error(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(256))
    ref = tmp_path / "out" / "model.json"
    with pytest.raises(ESAError, match="cannot load .*broken.gguf"):
        models.materialize(str(bad), ref.parent)
    assert not ref.exists() and not (ref.parent / "checkpoint").exists()
    assert main(["run", "model", "--spec", json.dumps({"source": str(bad)}), f"ref={ref}"]) == 2


def test_bundled_model_materialises_exactly_and_gives_finite_ppl(bundled_checkpoint):
    """The safetensors checkpoint equals the GGUF de-quantisation and evaluates to a finite PPL."""
    from transformers import AutoModelForCausalLM

    gguf = models.resolve_source("builtin:smollm2-135m")
    direct = AutoModelForCausalLM.from_pretrained(gguf.path, gguf_file=gguf.gguf_file, dtype=torch.float32)
    loaded = models.load_model(bundled_checkpoint, "cpu", "fp32", "eager")
    direct_state = direct.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, direct_state[name]), name
    tokenizer = models.load_tokenizer(bundled_checkpoint)
    ids = tokenizer("def add(a, b):\n    return a + b\n" * 4, return_tensors="pt").input_ids
    result = evaluate(loaded, ids, batch_size=1)
    assert result.finite and 1.0 < result.ppl < 50.0
    assert models.context_length(models.load_config(bundled_checkpoint)) == 8192


def test_device_map_auto_loads_and_evaluates_like_a_plain_load(tiny_model_dir, tiny_windows):
    """device_map=auto (accelerate's placement; here everything lands on the CPU) gives the same PPL."""
    source = models.resolve_source(str(tiny_model_dir))
    plain = models.load_model(source, "cpu", "fp32", "eager")
    sharded = models.load_model(source, "cpu", "fp32", "eager", device_map="auto")
    windows = tiny_windows * 7  # ids spread over the real vocabulary
    assert evaluate(plain, windows, 3).ppl == evaluate(sharded, windows, 3).ppl


def test_results_directory_is_relocatable(tmp_path, monkeypatch, tiny_windows):
    """model.json names the de-quantised checkpoint relative to itself: move results/, load."""
    from tokenizers import Tokenizer, models as tokenizer_models
    from transformers import PreTrainedTokenizerFast

    from conftest import make_tiny_llama

    stand_in = tmp_path / "stand_in"  # what de-quantising the GGUF gives, without a real GGUF
    make_tiny_llama().save_pretrained(stand_in)
    vocab = {"<unk>": 0, **{f"w{i}": i + 1 for i in range(63)}}
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(tokenizer_models.WordLevel(vocab, unk_token="<unk>")),
                            unk_token="<unk>").save_pretrained(stand_in)
    load = models._from_pretrained
    monkeypatch.setattr(models, "_from_pretrained", lambda cls, source, what, **kw: load(
        cls, models.ModelSource("dir", str(stand_in)) if source.kind == "gguf" else source, what, **kw))
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF")
    ref = models.materialize(str(gguf), tmp_path / "old/results/tiny/model")
    written = json.loads((tmp_path / "old/results/tiny/model/model.json").read_text())
    assert ref["path"] == written["path"] == "checkpoint"

    (tmp_path / "old/results").rename(tmp_path / "moved")
    source = models.source_from_ref(tmp_path / "moved/tiny/model/model.json")
    assert source == models.ModelSource("dir", str(tmp_path / "moved/tiny/model/checkpoint"))
    moved = models.load_model(source, "cpu", "fp32", "eager")
    original = models.load_model(models.ModelSource("dir", str(stand_in)), "cpu", "fp32", "eager")
    assert evaluate(moved, tiny_windows, 3).ppl == evaluate(original, tiny_windows, 3).ppl

    hub = tmp_path / "hub.json"  # a hub id is not a path
    hub.write_text(json.dumps({"source": "org/model", "kind": "hub", "path": "org/model"}))
    assert models.source_from_ref(hub) == models.ModelSource("hub", "org/model")
    local = models.materialize(str(stand_in), tmp_path / "local")  # a local checkpoint stays where it is
    assert local["path"] == str(stand_in.resolve())
    assert models.source_from_ref(tmp_path / "local/model.json").path == str(stand_in.resolve())
