"""Shared fixtures: tiny random Llama models built from a config (no hub access), and the
workflow run as a Snakemake subprocess."""

import copy
import fcntl
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

from esa.heap import keep_freed_memory

REPO = Path(__file__).resolve().parents[1]

keep_freed_memory()  # the tests' own model work, as every `esa run` step (esa/heap.py)

# Under pytest-xdist (`-n auto` in pyproject's addopts) each worker takes its share of the cores, in
# its own torch and in the Snakemake runs it starts: one thread per core in every worker would
# oversubscribe the machine, and OpenMP's waiting threads spin on the cores the other worker needs.
WORKER_CORES = max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
torch.set_num_threads(WORKER_CORES)


# The files that take longest, or mostly wait (Slurm), dispatched first: `--dist loadfile` hands
# each file whole to the next free worker in collection order, so a long file collected last
# would be the suite's tail while the other worker idles.
LONG_FILES = ["test_slurm_cluster.py", "test_study.py", "test_workflow.py", "test_jobserver.py",
              "test_runbook_commands.py", "test_models.py", "test_recovery.py", "test_multimodel.py"]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FILES)))  # stable: the rest keep their order


def snakemake(workdir, config, *args, timeout=900):
    """Run the project's Snakefile in ``workdir`` with ``config`` (written to config.yaml)."""
    cfg = workdir / "config.yaml"
    cfg.write_text(yaml.safe_dump(config))
    return subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"),
                           "--directory", str(workdir), "--configfile", str(cfg), "--cores", str(WORKER_CORES), *args],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)


def scheduled(result) -> dict[str, int]:
    """Jobs per rule of a `snakemake -n --quiet rules` run (`all` left out)."""
    jobs = {}
    for line in result.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit() and parts[0] not in ("all", "total"):
            jobs[parts[0]] = int(parts[1])
    return jobs


def study_layout(config: dict, model: str | None = None):
    """The results paths (relative to the workdir) of a test study run with ``config``, as the
    Snakefile keys them: ``study_layout(config).baseline_files()["metrics"]``. ``model``: one of
    the study's models (default: the first)."""
    from esa.config import validate_config
    from esa.layout import Layout

    layout = Layout(validate_config(copy.deepcopy(config)))
    return layout.of(model or layout.models[0])


INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    """A tensor's bit pattern (NaN equals NaN, -0.0 differs from 0.0)."""
    return t.detach().view(INT_OF_SIZE[t.element_size()]).clone()


def snapshot(model) -> dict[str, torch.Tensor]:
    """The bit patterns of every parameter and buffer."""
    return {name: bits(value) for name, value in model.state_dict().items()}


def bit_identical(model, before: dict[str, torch.Tensor]) -> bool:
    after = snapshot(model)
    return after.keys() == before.keys() and all(torch.equal(after[name], before[name]) for name in before)


def assert_bit_identical(model, before: dict[str, torch.Tensor]) -> None:
    after = snapshot(model)
    assert after.keys() == before.keys()
    for name in before:
        assert torch.equal(after[name], before[name]), name


def make_tiny_llama(seed: int = 0, layers: int = 2, hidden: int = 16, intermediate: int = 32,
                    vocab: int = 64, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """A deterministic random Llama small enough for brute-force reference computations."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=128, attn_implementation="eager")
    return LlamaForCausalLM(config).to(dtype).eval()


# text of i.i.d. tokens from a geometric unigram over 64 tokens (entropy 2.04 nats): a planted
# super weight writes its log-probabilities, so the model is good exactly while it stands
UNIGRAM = 0.7 ** torch.arange(64, dtype=torch.float32)
UNIGRAM /= UNIGRAM.sum()


def shared_sign_direction(model, row: int) -> torch.Tensor:
    """Add one +-1 direction s (0 at residual channel ``row``) to every token embedding and
    return s: the MLP rows a planted super weight reads point along it, so its input channel
    is a massive activation on every token."""
    embedding = model.get_input_embeddings().weight
    signs = torch.randint(0, 2, (embedding.shape[1],), generator=torch.Generator().manual_seed(3)).float() * 2 - 1
    signs[row] = 0
    with torch.no_grad():
        embedding += signs
    return signs


def unigram_text(windows: int, seed: int, length: int = 32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.multinomial(UNIGRAM.expand(windows, len(UNIGRAM)), length, replacement=True, generator=generator)


def confirm_by_activation(model, top_n: int = 5):
    """Score ``model`` by activation_magnitude on one unigram text and confirm its global
    top-``top_n`` on another: ``(Confirmation, its esa.damage.Baseline)``."""
    from esa.candidates import build_candidates
    from esa.confirm import confirm_super_weights
    from esa.damage import Baseline
    from esa.evaluation import evaluate
    from esa.scores import compute_scores
    from esa.targets import find_targets, target_table

    calib, evaluation = unigram_text(8, seed=1), unigram_text(8, seed=2)  # scored on one, judged on another
    baseline = Baseline.of(evaluate(model, evaluation, batch_size=4))
    targets = find_targets(model)
    scores = compute_scores(model, targets, calib, ["activation_magnitude"], batch_size=4, seed=0,
                            progress=False)["activation_magnitude"]
    candidates = build_candidates(targets, scores.weights, scores.stat, scores.score, m=top_n)
    return confirm_super_weights(model, {"activation_magnitude": candidates},
                                 {"activation_magnitude": target_table(targets)}, evaluation, batch_size=4,
                                 baseline=baseline, top_n=top_n, factor=1.5), baseline


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty hub cache under ``tmp_path``, offline (esa.revisions resolves every hub revision
    from it, in this process and in the Snakemake runs it starts): ``pin(repo_id, commit,
    repo_type="model", revision="main")`` records that ``revision`` names ``commit``."""
    from esa.revisions import resolve_revision

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    resolve_revision.cache_clear()

    def pin(repo_id: str, commit: str, repo_type: str = "model", revision: str = "main") -> None:
        refs = cache / f"{repo_type}s--{repo_id.replace('/', '--')}" / "refs"
        refs.mkdir(parents=True, exist_ok=True)
        (refs / revision).write_text(commit)
        resolve_revision.cache_clear()

    pin.cache = cache
    yield pin
    resolve_revision.cache_clear()


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
    """The bundled SmolLM2-135M, materialised once per test run (GGUF -> safetensors, ~15 s): under
    pytest-xdist the workers share one copy in their common base directory, the first one to
    take the lock writing it. Tests only read it."""
    from esa.models import materialize, source_from_ref

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if "PYTEST_XDIST_WORKER" in os.environ else base
    out = shared / "bundled"
    with open(shared / "bundled.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "model.json").exists():
            out.mkdir(exist_ok=True)
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


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium, installed with apt-get if missing; CI=true fails rather than skips."""
    path = shutil.which("chromium")
    if path is None and shutil.which("apt-get") and os.geteuid() == 0:
        policy = subprocess.run(["apt-cache", "policy", "chromium"], capture_output=True, text=True)
        if re.search(r"Candidate: (?!\(none\))", policy.stdout):
            subprocess.run(["apt-get", "install", "-y", "chromium"], capture_output=True, timeout=1200,
                           env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
            path = shutil.which("chromium")
    if path is None:
        message = "headless chromium is not installed and `apt-get install -y chromium` did not work"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


def run_chromium(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    command = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--hide-scrollbars", f"--user-data-dir={profile}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=True)


def chromium_dom(binary: str, page: Path, tmp_path: Path) -> str:
    """The DOM of ``page`` after headless Chromium has loaded and laid it out."""
    return run_chromium(binary, tmp_path / "profile", "--virtual-time-budget=5000", "--window-size=1280,800",
                        "--dump-dom", page.as_uri()).stdout
