"""Model sources, device/dtype resolution, and the bundled model end to end."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

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
    with pytest.raises(ESAError, match=f"model file {bad} is not a valid GGUF file \\(truncated or corrupt: "):
        models.materialize(str(bad), ref.parent)
    assert not ref.exists() and not (ref.parent / "checkpoint").exists()
    assert main(["run", "model", "--spec", json.dumps({"source": str(bad)}), f"ref={ref}"]) == 2


def test_bundled_model_materialises_exactly_and_gives_finite_ppl(bundled_checkpoint):
    """The safetensors checkpoint (written with the GGUF parsed once) equals transformers' own
    de-quantisation and tokenizer, and evaluates to a finite PPL."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = models.resolve_source("builtin:smollm2-135m")
    direct = AutoModelForCausalLM.from_pretrained(gguf.path, gguf_file=gguf.gguf_file, dtype=torch.float32)
    loaded = models.load_model(bundled_checkpoint, "cpu", "fp32", "eager")
    direct_state = direct.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, direct_state[name]), name
    tokenizer = models.load_tokenizer(bundled_checkpoint)
    direct_tokenizer = AutoTokenizer.from_pretrained(gguf.path, gguf_file=gguf.gguf_file)
    assert tokenizer.backend_tokenizer.to_str() == direct_tokenizer.backend_tokenizer.to_str()
    ids = tokenizer("def add(a, b):\n    return a + b\n" * 4, return_tensors="pt").input_ids
    result = evaluate(loaded, ids, batch_size=1)
    assert result.finite and 1.0 < result.ppl < 50.0
    assert models.context_length(models.load_config(bundled_checkpoint)) == 8192


def test_gguf_parsed_once_shares_one_reader_and_puts_gguf_back(monkeypatch):
    import gguf

    parsed = []
    monkeypatch.setattr(gguf, "GGUFReader", lambda path, mode="r": parsed.append(path) or object())
    reader_class, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    with models.gguf_parsed_once():
        first = gguf.GGUFReader("a.gguf")
        with models.gguf_parsed_once():  # nested: the outer one's readers
            assert gguf.GGUFReader("a.gguf") is first
        assert gguf.GGUFReader("b.gguf") is not first
        assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2) is gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    assert parsed == ["a.gguf", "b.gguf"]
    assert (gguf.GGUFReader, gguf.get_tensor_name_map) == (reader_class, name_map)
    assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2) is not gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)


def test_device_map_auto_loads_and_evaluates_like_a_plain_load(tiny_model_dir, tiny_windows):
    """device_map=auto (accelerate's placement; here everything lands on the CPU) gives the same PPL."""
    source = models.resolve_source(str(tiny_model_dir))
    plain = models.load_model(source, "cpu", "fp32", "eager")
    sharded = models.load_model(source, "cpu", "fp32", "eager", device_map="auto")
    windows = tiny_windows * 7  # ids spread over the real vocabulary
    assert evaluate(plain, windows, 3).ppl == evaluate(sharded, windows, 3).ppl


@pytest.fixture
def stand_in_gguf(tmp_path, monkeypatch):
    """A 4-byte ``tiny.gguf`` that loads as a tiny Llama (what de-quantising a GGUF gives,
    without a real GGUF): the GGUF path of :func:`models.materialize` on a tiny model."""
    from tokenizers import Tokenizer, models as tokenizer_models
    from transformers import PreTrainedTokenizerFast

    from conftest import make_tiny_llama

    stand_in = tmp_path / "stand_in"
    make_tiny_llama().save_pretrained(stand_in)
    vocab = {"<unk>": 0, **{f"w{i}": i + 1 for i in range(63)}}
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(tokenizer_models.WordLevel(vocab, unk_token="<unk>")),
                            unk_token="<unk>").save_pretrained(stand_in)
    load = models._from_pretrained
    monkeypatch.setattr(models, "_from_pretrained", lambda cls, source, what, **kw: load(
        cls, models.ModelSource("dir", str(stand_in)) if source.kind == "gguf" else source, what, **kw))
    monkeypatch.setattr(models, "check_weights", lambda source: None)  # the stand-in GGUF is 4 bytes
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF")
    return gguf, stand_in


def test_results_directory_is_relocatable(tmp_path, stand_in_gguf, tiny_windows):
    """model.json names the de-quantised checkpoint relative to itself: move results/, load."""
    from conftest import study_layout

    gguf, stand_in = stand_in_gguf
    config = {"model": {"name": "tiny", "source": str(gguf)}, "data": {"source": "builtin:pydoc"}}
    model_ref = Path(study_layout(config).model_ref)  # results/tiny/model/<key>/model.json
    assert model_ref.parts[0] == "results"
    ref = models.materialize(str(gguf), (tmp_path / "old" / model_ref).parent)
    written = json.loads((tmp_path / "old" / model_ref).read_text())
    assert ref["path"] == written["path"] == "checkpoint"

    (tmp_path / "old/results").rename(tmp_path / "moved")
    moved_ref = tmp_path / "moved" / model_ref.relative_to("results")
    source = models.source_from_ref(moved_ref)
    assert source == models.ModelSource("dir", str(moved_ref.parent / "checkpoint"))
    moved = models.load_model(source, "cpu", "fp32", "eager")
    original = models.load_model(models.ModelSource("dir", str(stand_in)), "cpu", "fp32", "eager")
    assert evaluate(moved, tiny_windows, 3).ppl == evaluate(original, tiny_windows, 3).ppl

    hub = tmp_path / "hub.json"  # a hub id is not a path
    hub.write_text(json.dumps({"source": "org/model", "kind": "hub", "path": "org/model"}))
    assert models.source_from_ref(hub) == models.ModelSource("hub", "org/model")
    local = models.materialize(str(stand_in), tmp_path / "local")  # a local checkpoint stays where it is
    assert local["path"] == str(stand_in.resolve())
    assert models.source_from_ref(tmp_path / "local/model.json").path == str(stand_in.resolve())


def _bundled_gguf():
    source = models.resolve_source("builtin:smollm2-135m")
    return os.path.join(source.path, source.gguf_file)


def test_dequantised_checkpoint_has_the_umask_mode(tmp_path, stand_in_gguf):
    """Before: model.safetensors kept safetensors' own 0600 temporary mode under umask 022."""
    old = os.umask(0o022)
    try:
        models.materialize(str(stand_in_gguf[0]), tmp_path / "model")
    finally:
        os.umask(old)
    checkpoint = tmp_path / "model/checkpoint"
    assert {p.name: p.stat().st_mode & 0o777 for p in [checkpoint, *checkpoint.iterdir()]} == {
        "checkpoint": 0o755, "model.safetensors": 0o644, "config.json": 0o644, "tokenizer.json": 0o644,
        "tokenizer_config.json": 0o644}


def test_full_disk_while_dequantising_is_one_line_and_leaves_nothing(tmp_path, stand_in_gguf, monkeypatch):
    import safetensors.torch

    def full(model, filename, metadata=None):
        Path(filename).write_bytes(b"half")
        raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_model", full)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=3_000_000))
    with pytest.raises(ESAError) as err:
        models.materialize(str(stand_in_gguf[0]), tmp_path / "model")
    mount = subprocess.run(["df", "--output=target", str(tmp_path)], capture_output=True, text=True,
                           check=True).stdout.split()[-1]
    assert str(err.value) == f"no space left on device writing {tmp_path / 'model/checkpoint'} (3.0 MB free on {mount})"
    assert os.listdir(tmp_path / "model") == []


@pytest.mark.parametrize("keep, reason", [
    (1000, "the header runs past the end of the file at 1000 bytes"),
    (-100, "98362332 bytes, its tensors need 98362432"),  # the last tensor's data cut short
])
def test_truncated_gguf_is_one_line_and_leaves_nothing(tmp_path, keep, reason):
    full = open(_bundled_gguf(), "rb").read()
    assert len(full) == 98362432
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(full[:keep])
    ref = tmp_path / "model" / "model.json"
    result = run_cli("run", "model", "--spec", json.dumps({"source": str(cut)}), f"ref={ref}")
    assert (result.returncode, result.stderr) == (
        2, f"esa: error: model file {cut} is not a valid GGUF file (truncated or corrupt: {reason})\n")
    assert not ref.parent.exists() or sorted(p.name for p in ref.parent.iterdir()) == []


def test_truncated_safetensors_is_one_line_and_leaves_nothing(tmp_path):
    from conftest import make_tiny_llama

    checkpoint = tmp_path / "tiny"
    make_tiny_llama().save_pretrained(checkpoint)
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    line = (f"model file {weights} is not a valid safetensors file (truncated or corrupt: Error while "
            f"deserializing header: incomplete metadata, file not fully covered)")
    ref = tmp_path / "model" / "model.json"
    result = run_cli("run", "model", "--spec", json.dumps({"source": str(checkpoint)}), f"ref={ref}")
    assert (result.returncode, result.stderr) == (2, f"esa: error: {line}\n")
    assert not ref.exists()
    with pytest.raises(ESAError) as err:  # a later job on a checkpoint broken since
        models.load_model(models.ModelSource("dir", str(checkpoint)), "cpu")
    assert str(err.value) == line


def _saved(model, path):
    model.save_pretrained(path)
    return models.ModelSource("dir", str(path))


def test_auto_attention_is_sdpa_where_the_class_has_it_else_eager(tmp_path):
    """Llama has SDPA: auto gives it; BLOOM has none: auto gives eager, and an explicit sdpa
    is one line naming the class and what it allows (not transformers' traceback)."""
    from transformers import BloomConfig, BloomForCausalLM

    from conftest import make_tiny_llama

    llama = _saved(make_tiny_llama(), tmp_path / "llama")
    assert models.attention_of(models.load_model(llama, "cpu")) == "sdpa"
    assert models.attention_of(models.load_model(llama, "cpu", attn_implementation="eager")) == "eager"
    bloom = _saved(BloomForCausalLM(BloomConfig(vocab_size=64, hidden_size=16, n_layer=2, n_head=2)),
                   tmp_path / "bloom")
    assert models.attention_of(models.load_model(bloom, "cpu", attn_implementation="auto")) == "eager"
    for requested in ("sdpa", "flash_attention_2"):
        with pytest.raises(ESAError) as err:
            models.load_model(bloom, "cpu", attn_implementation=requested)
        assert str(err.value) == (f"attn_implementation '{requested}' is not supported by BloomForCausalLM; "
                                  f"allowed: eager, auto")


def test_manifest_records_the_resolved_attention(tmp_path):
    """The baseline step with attn_implementation auto on a Llama writes attention sdpa."""
    import numpy as np

    from conftest import make_tiny_llama
    from esa.data import windows_frame
    from esa.io import write_parquet_atomic
    from esa.model_steps import step_baseline
    from esa.step_specs import typed_spec

    make_tiny_llama().save_pretrained(tmp_path / "tiny")
    models.materialize(str(tmp_path / "tiny"), tmp_path / "model")
    write_parquet_atomic(windows_frame(np.arange(24, dtype=np.int32).reshape(2, 12) % 64), tmp_path / "eval.parquet")
    spec = {"model": "tiny", "device": "cpu", "dtype": "fp32", "attn_implementation": "auto",
            "device_map": None, "loss_chunk": 256, "batch_size": 2, "data": {"source": "test"}}
    step_baseline(typed_spec("baseline", spec), model=str(tmp_path / "model/model.json"),
                  eval=str(tmp_path / "eval.parquet"), metrics=str(tmp_path / "metrics.json"),
                  windows=str(tmp_path / "windows.parquet"),
                  manifest=str(tmp_path / "manifest.json"), config=str(tmp_path / "config.json"))
    assert json.loads((tmp_path / "manifest.json").read_text())["attn_implementation"] == "sdpa"
