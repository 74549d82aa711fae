"""Text sources, windows, BOS convention, the disjoint split and seeded calibration draws."""

import json

import numpy as np
import pandas as pd
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from esa.data import draw_calibration, load_documents, make_windows, read_windows, windows_frame
from esa.errors import ESAError
from esa.io import write_parquet_atomic

DOCS = [f"document {i} " + " ".join(f"w{i}x{j}" for j in range(5)) for i in range(10)]


def word_tokenizer(words, bos: bool):
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture
def text_files(tmp_path):
    files = {}
    files["txt"] = tmp_path / "t.txt"
    files["txt"].write_text("\n\n".join(DOCS))
    files["jsonl"] = tmp_path / "t.jsonl"
    files["jsonl"].write_text("\n".join(json.dumps({"text": d}) for d in DOCS))
    files["json"] = tmp_path / "t.json"
    files["json"].write_text(json.dumps([{"text": d} for d in DOCS]))
    files["parquet"] = tmp_path / "t.parquet"
    pd.DataFrame({"text": DOCS}).to_parquet(files["parquet"])
    files["csv"] = tmp_path / "t.csv"
    pd.DataFrame({"text": DOCS}).to_csv(files["csv"], index=False)
    return files


@pytest.mark.parametrize("kind", ["txt", "jsonl", "json", "parquet", "csv"])
def test_every_file_type_loads_and_splits_disjointly(text_files, kind):
    calib, evaluation = load_documents(str(text_files[kind]), eval_fraction=0.2)
    # f = 0.2: documents 4 and 9 go to evaluation (floor((i+1)f) > floor(i f))
    assert evaluation == [DOCS[4], DOCS[9]]
    assert calib == [d for i, d in enumerate(DOCS) if i not in (4, 9)]


def test_builtin_pydoc_split_is_disjoint_and_deterministic():
    calib, evaluation = load_documents("builtin:pydoc", eval_fraction=0.2)
    from pydoc_data.topics import topics

    assert len(calib) + len(evaluation) == len([t for t in topics.values() if t.strip()])
    assert not set(calib) & set(evaluation)
    assert load_documents("builtin:pydoc", eval_fraction=0.2) == (calib, evaluation)


def test_hub_dataset_reads_named_splits(tmp_path):
    """hf:NAME goes through datasets.load_dataset; a local dataset folder stands in for the hub."""
    folder = tmp_path / "mydataset"
    folder.mkdir()
    pd.DataFrame({"text": DOCS[:6] + [""]}).to_parquet(folder / "train.parquet")
    pd.DataFrame({"text": DOCS[6:]}).to_parquet(folder / "test.parquet")
    calib, evaluation = load_documents(f"hf:{folder}", calib_split="train", eval_split="test")
    assert calib == DOCS[:6] and evaluation == DOCS[6:]


def test_windows_follow_bos_convention():
    words = " ".join(DOCS).split()
    plain = word_tokenizer(words, bos=False)
    with_bos = word_tokenizer(words, bos=True)
    w = make_windows(plain, DOCS[:2], seq_len=4)
    ids = plain("\n\n".join(DOCS[:2]), add_special_tokens=False).input_ids
    assert w.shape == (len(ids) // 4, 4) and w.dtype == np.int32
    assert w.ravel().tolist() == ids[: w.size]
    b = make_windows(with_bos, DOCS[:2], seq_len=4)
    assert (b[:, 0] == 1).all()
    assert b[:, 1:].ravel().tolist() == ids[: b.shape[0] * 3]


def test_windows_roundtrip_parquet(tmp_path):
    windows = np.arange(12, dtype=np.int32).reshape(3, 4)
    write_parquet_atomic(windows_frame(windows), tmp_path / "w.parquet")
    assert (read_windows(tmp_path / "w.parquet") == windows).all()


def test_calibration_draw_is_seeded():
    a, b, c = draw_calibration(100, 10, 0), draw_calibration(100, 10, 0), draw_calibration(100, 10, 1)
    assert (a == b).all() and not (a == c).all()
    assert len(set(a.tolist())) == 10 and (np.diff(a) > 0).all()


def test_max_samples_beyond_pool_names_both_numbers():
    with pytest.raises(ESAError, match="max_samples 11 .* pool of 10 windows"):
        draw_calibration(10, 11, 0)


def test_source_without_text_is_an_error(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"text": "   "}) + "\n")
    with pytest.raises(ESAError, match="yields no calibration text"):
        load_documents(str(empty))
    with pytest.raises(ESAError, match="has no column 'body'"):
        pd.DataFrame({"text": DOCS}).to_csv(tmp_path / "a.csv", index=False)
        load_documents(str(tmp_path / "a.csv"), text_field="body")
    with pytest.raises(ESAError, match="does not exist"):
        load_documents(str(tmp_path / "missing.txt"))
    with pytest.raises(ESAError, match="unsupported type"):
        load_documents(str(tmp_path / "x.docx"))
