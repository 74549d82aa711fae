"""Text sources, windows, BOS convention, the disjoint split and seeded calibration draws; a source
the data step cannot read (a .json of another shape, bytes that are not UTF-8, a directory) is one
error line naming it."""

import json
import logging

import numpy as np
import pandas as pd
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import LlamaConfig, PreTrainedTokenizerFast

from esa.cli import main
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
    with pytest.raises(ESAError, match="empty.jsonl' holds no text"):
        load_documents(str(empty))
    with pytest.raises(ESAError, match="has no column 'body'"):
        pd.DataFrame({"text": DOCS}).to_csv(tmp_path / "a.csv", index=False)
        load_documents(str(tmp_path / "a.csv"), text_field="body")
    with pytest.raises(ESAError, match="does not exist"):
        load_documents(str(tmp_path / "missing.txt"))
    with pytest.raises(ESAError, match="unsupported type"):
        load_documents(str(tmp_path / "x.docx"))


def _rule_logged(caplog, rule: str, calib: int, evaluation: int) -> bool:
    wanted = f"{rule}; calibration {calib} document(s), evaluation {evaluation} document(s)"
    return any(wanted in record.getMessage() for record in caplog.records)


def test_txt_without_blank_lines_is_one_document_per_line(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="esa.data")
    lines = tmp_path / "lines.txt"
    lines.write_text("\n".join(DOCS) + "\n")
    calib, evaluation = load_documents(str(lines), eval_fraction=0.2)
    assert evaluation == [DOCS[4], DOCS[9]]
    assert calib == [d for i, d in enumerate(DOCS) if i not in (4, 9)]
    assert _rule_logged(caplog, "one document per line", 8, 2)


def test_txt_with_blank_lines_is_blank_line_blocks(tmp_path, caplog):
    """Blocks may span lines; a whitespace-only line and \\r\\n line ends count as blank lines."""
    caplog.set_level(logging.INFO, logger="esa.data")
    blocks = [f"{d}\r\nsecond line of {i}" for i, d in enumerate(DOCS)]
    text = tmp_path / "blocks.txt"
    text.write_bytes(("\r\n \t\r\n".join(blocks)).encode())
    calib, evaluation = load_documents(str(text), eval_fraction=0.2)
    expected = [b.replace("\r\n", "\n") for b in blocks]
    assert evaluation == [expected[4], expected[9]]
    assert calib == [b for i, b in enumerate(expected) if i not in (4, 9)]
    assert _rule_logged(caplog, "blank-line blocks", 8, 2)


def test_single_document_is_split_by_tokens(tmp_path, caplog):
    """One document: the last floor(n f) of its n tokens go to evaluation, no text shared."""
    caplog.set_level(logging.INFO, logger="esa.data")
    words = [f"w{i}" for i in range(60)]
    single = tmp_path / "single.txt"
    single.write_text(" ".join(words) + "\n")
    tokenizer = word_tokenizer(words, bos=False)
    calib, evaluation = load_documents(str(single), eval_fraction=0.25, tokenizer=tokenizer)
    n_eval = int(len(words) * 0.25)  # 60 words, 15 to evaluation
    assert calib == [" ".join(words[:-n_eval])] and evaluation == [" ".join(words[-n_eval:])]
    assert _rule_logged(caplog, "single document split by tokens (the last 15 of 60 tokens to "
                                "evaluation)", 1, 1)
    pool, held_out = make_windows(tokenizer, calib, 5), make_windows(tokenizer, evaluation, 5)
    assert pool.shape == (9, 5) and held_out.shape == (3, 5)
    assert not set(pool.ravel().tolist()) & set(held_out.ravel().tolist())  # every word differs
    with pytest.raises(ESAError, match="single.txt' is a single document; splitting it by tokens "
                                       "needs the model's tokenizer"):
        load_documents(str(single))


def test_json_without_the_text_field_names_field_and_file(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps({"body": d}) for d in DOCS[:3]))
    with pytest.raises(ESAError, match="rows.jsonl': none of its 3 records has the field 'text'"):
        load_documents(str(rows))
    records = tmp_path / "records.json"
    records.write_text(json.dumps([{"body": d} for d in DOCS[:4]]))
    with pytest.raises(ESAError, match="records.json': none of its 4 records has the field 'content'"):
        load_documents(str(records), text_field="content")


def test_malformed_json_names_file_and_line(tmp_path):
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({"text": DOCS[0]}) + "\n\n" + '{"text": "unterminated\n')
    with pytest.raises(ESAError) as err:
        load_documents(str(broken))
    assert str(err.value) == (f"text source {str(broken)!r}, line 3: not valid JSON "
                              f"(Unterminated string starting at, column 10)")
    whole = tmp_path / "whole.json"
    whole.write_text('[{"text": "a"},\n {"text": }]')
    with pytest.raises(ESAError, match=r"whole.json': not valid JSON \(Expecting value, line 2 column 11\)"):
        load_documents(str(whole))


WORDS = [f"w{i}" for i in range(1200)]  # token ids 3..1202 under word_tokenizer(WORDS)


@pytest.fixture(scope="module")
def model_ref(tmp_path_factory):
    """A model.json for `esa run data`: a word-level tokenizer over WORDS and a tiny Llama config
    (the data step reads no weights)."""
    out = tmp_path_factory.mktemp("model")
    word_tokenizer(WORDS, bos=False).save_pretrained(out / "checkpoint")
    LlamaConfig(vocab_size=len(WORDS) + 3, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=128).save_pretrained(out / "checkpoint")
    (out / "model.json").write_text(json.dumps({"source": "test", "kind": "dir", "path": "checkpoint"}))
    return out / "model.json"


def run_data(model_ref, source, out, part: str = "calib") -> int:
    """`esa run data` as rules/data.smk runs it, writing ``out/windows.parquet`` and ``out/summary.json``."""
    spec = {"model": "test", "source": str(source), "text_field": "text", "hf_config": None, "calib_split": None,
            "eval_split": None, "eval_fraction": 0.2, "seq_len": 8, "part": part}
    return main(["run", "data", "--spec", json.dumps(spec), f"model={model_ref}",
                 f"windows={out / 'windows.parquet'}", f"summary={out / 'summary.json'}"])


def test_json_object_is_one_document(tmp_path, model_ref, caplog):
    """`{"text": "..."}` is one document, split by tokens (it was read character by character)."""
    caplog.set_level(logging.INFO, logger="esa.data")
    source = tmp_path / "one.json"
    source.write_text(json.dumps({"text": " ".join(WORDS), "title": "ignored"}))
    for part, name, first, windows in (("calib", "calibration", 3, 120), ("eval", "evaluation", 963, 30)):
        out = tmp_path / part
        assert run_data(model_ref, source, out, part) == 0
        assert json.loads((out / "summary.json").read_text()) == {
            "part": name, "source": str(source), "seq_len": 8, "bos_id": None, "documents": 1, "windows": windows}
        assert read_windows(out / "windows.parquet").ravel().tolist() == list(range(first, first + 8 * windows))
    assert _rule_logged(caplog, "single document split by tokens (the last 240 of 1200 tokens to evaluation)", 1, 1)


def test_json_list_of_strings_is_one_document_each(tmp_path):
    strings = tmp_path / "strings.json"
    strings.write_text(json.dumps(DOCS))
    assert load_documents(str(strings), eval_fraction=0.2) == ([d for i, d in enumerate(DOCS) if i not in (4, 9)],
                                                              [DOCS[4], DOCS[9]])


@pytest.mark.parametrize("content, found", [
    ('"one long string"', "a JSON string"),
    ("42", "a JSON number"),
    ("true", "a JSON boolean"),
    ("null", "a JSON null"),
    ('{"body": "a b c"}', "one JSON object without a string field 'text' (set data.text_field)"),
    ('{"text": ["a", "b"]}', "one JSON object without a string field 'text' (set data.text_field)"),
], ids=["string", "number", "boolean", "null", "object without the field", "object with a list"])
def test_json_of_another_shape_is_one_line_naming_the_shapes(tmp_path, model_ref, capsys, content, found):
    source = tmp_path / "other.json"
    source.write_text(content)
    assert run_data(model_ref, source, tmp_path / "out") == 2
    assert capsys.readouterr().err == (
        f"esa: error: text source {str(source)!r} holds {found}; a .json source holds one object with a "
        f"string field 'text' (one document) or a list of such objects or of strings (one document each)\n")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name, content, byte, offset, line", [
    ("binary.txt", b"hello world\n\nabc \xff\xfe\x00 bytes\n\nmore", 0xff, 17, 3),
    ("latin1.txt", "first document\n\ncaf\u00e9 au lait\n".encode("latin-1"), 0xe9, 19, 3),
    ("latin1.jsonl", '{"text": "ok"}\n{"text": "na\u00efve"}\n'.encode("latin-1"), 0xef, 27, 2),
    ("latin1.json", '[{"text": "caf\u00e9"}]'.encode("latin-1"), 0xe9, 14, 1),
    ("latin1.csv", "text\nplain\ncr\u00e8me\n".encode("latin-1"), 0xe8, 13, 3),
    ("bom.txt", b"\xef\xbb\xbfab\n\nc\xffd", 0xff, 8, 3),  # the offset counts the byte-order mark
], ids=["binary.txt", "latin1.txt", "latin1.jsonl", "latin1.json", "latin1.csv", "bom.txt"])
def test_text_not_utf8_is_one_line_naming_file_and_offset(tmp_path, model_ref, capsys, name, content, byte,
                                                          offset, line):
    source = tmp_path / name
    source.write_bytes(content)
    assert run_data(model_ref, source, tmp_path / "out") == 2
    assert capsys.readouterr().err == (
        f"esa: error: text source {str(source)!r} is not UTF-8: byte 0x{byte:02x} at offset {offset} (line {line}); "
        f"text files must be UTF-8 (convert it first, e.g. iconv -f latin1 -t utf-8)\n")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["txt", "json"])
def test_utf8_byte_order_mark_is_not_text(text_files, kind):
    path = text_files[kind]
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    calib, evaluation = load_documents(str(path), eval_fraction=0.2)
    assert evaluation == [DOCS[4], DOCS[9]]
    assert calib == [d for i, d in enumerate(DOCS) if i not in (4, 9)]


@pytest.mark.parametrize("name", ["corpus", "corpus.txt"])
def test_directory_source_says_it_is_a_directory(tmp_path, model_ref, capsys, name):
    """Not "does not exist" (corpus.txt/) nor "unsupported type" (corpus/)."""
    folder = tmp_path / name
    folder.mkdir()
    (folder / "a.txt").write_text("\n\n".join(DOCS))
    assert run_data(model_ref, folder, tmp_path / "out") == 2
    assert capsys.readouterr().err == (
        f"esa: error: text source {str(folder)!r} is a directory; allowed: hf:NAME, builtin:pydoc, or a file "
        f"ending .txt, .jsonl, .json, .parquet, .csv (a local dataset folder is hf:PATH)\n")
    assert not (tmp_path / "out").exists()
