"""Shared fixtures: tiny random Llama models built from a config (no hub access), and the
workflow run as a Snakemake subprocess."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

REPO = Path(__file__).resolve().parents[1]


def snakemake(workdir, config, *args, timeout=900):
    """Run the project's Snakefile in ``workdir`` with ``config`` (written to config.yaml)."""
    cfg = workdir / "config.yaml"
    cfg.write_text(yaml.safe_dump(config))
    return subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"),
                           "--directory", str(workdir), "--configfile", str(cfg), "--cores", "2", *args],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)


def make_tiny_llama(seed: int = 0, layers: int = 2, hidden: int = 16, intermediate: int = 32,
                    vocab: int = 64, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """A deterministic random Llama small enough for brute-force reference computations."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=128, attn_implementation="eager")
    return LlamaForCausalLM(config).to(dtype).eval()


@pytest.fixture
def one_thread():
    """Tiny tensors: a second thread only adds overhead, and spins when the machine is busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_llama() -> LlamaForCausalLM:
    return make_tiny_llama()


@pytest.fixture
def tiny_windows() -> torch.Tensor:
    """Six windows of 12 tokens from the tiny vocabulary."""
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, 64, (6, 12), generator=generator)


BUNDLED = "builtin:smollm2-135m"


@pytest.fixture(scope="session")
def bundled_checkpoint(tmp_path_factory):
    """The bundled SmolLM2-135M, materialised once per test session (GGUF -> safetensors)."""
    from esa.models import materialize, source_from_ref

    out = tmp_path_factory.mktemp("bundled")
    materialize(BUNDLED, out)
    return source_from_ref(out / "model.json")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, bundled_checkpoint):
    """A tiny random Llama saved as a checkpoint directory with the bundled model's tokenizer."""
    from esa.models import load_tokenizer

    tokenizer = load_tokenizer(bundled_checkpoint)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=128, tie_word_embeddings=False)
    out = tmp_path_factory.mktemp("tiny_model")
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
