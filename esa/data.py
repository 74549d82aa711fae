"""Text sources, token windows, and the calibration / evaluation split.

A text source is one of:
  * ``hf:NAME`` (``hf:wikitext`` with ``hf_config: wikitext-2-raw-v1``): a hub dataset (or a
    local dataset folder, ``hf:/path``); calibration text from ``calib_split`` (train),
    evaluation text from ``eval_split`` (test);
  * a local ``.txt``, ``.jsonl`` (field ``text_field`` of each line's object), ``.json`` (one
    object: one document, its ``text_field``; a list: one document per object, or per string),
    ``.parquet``/``.csv`` (column ``text_field``, one document per row);
  * ``builtin:pydoc``: the reference documentation every CPython ships as ``pydoc_data.topics``.

Text files (.txt, .jsonl, .json, .csv) are read as UTF-8 (a leading byte-order mark is dropped);
any other bytes are an error naming the file and the offset of the first one.

The documents of a ``.txt`` are its blank-line blocks when it has a blank line between two
non-blank lines, otherwise its non-blank lines (one document per line).

Single-source text is split by document, deterministically: document i (in source order)
goes to evaluation when floor((i+1)*f) > floor(i*f), f = ``eval_fraction``, so the two parts
share no text. A source of a single document is split by tokens instead: of its n tokens
(the model's tokenizer), the last floor(n*f) go to evaluation, the text cut where the first
of them starts. The log says which rule applied and how many documents each part got.
Each part is tokenised once as a stream (documents joined by a blank line) and cut into
non-overlapping windows of ``seq_len`` tokens; a tokenizer that prepends BOS gets BOS at the
start of every window. Seed s draws the calibration sample from the pool.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import ESAError
from .io import read_parquet

log = logging.getLogger(__name__)

BUILTIN_TEXTS = ("builtin:pydoc",)
FILE_TYPES = (".txt", ".jsonl", ".json", ".parquet", ".csv")
SEPARATOR = "\n\n"
BLANK_LINE_BLOCKS = "blank-line blocks"
ONE_PER_LINE = "one document per line"
SINGLE_DOCUMENT = "single document split by tokens"
ALLOWED = f"hf:NAME, {', '.join(BUILTIN_TEXTS)}, or a file ending {', '.join(FILE_TYPES)}"
JSON_TYPES = {str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}


def _column(texts) -> list[str]:
    return [str(t) for t in texts if isinstance(t, str)]


def _split_text(text: str) -> tuple[list[str], str]:
    """The documents of a plain text and the rule that found them (see the module docstring)."""
    # whitespace-only lines count as blank, and \r\n as \n
    text = "\n".join(line.rstrip() for line in text.splitlines()).strip()
    blocks = text.split(SEPARATOR)
    if len(blocks) > 1:
        return blocks, BLANK_LINE_BLOCKS
    return text.splitlines(), ONE_PER_LINE


def _records(rows: list, source: str, field: str) -> list[str]:
    """The ``field`` of every record (a bare string is its own text); a source where no record
    has the field is an error naming it, not an empty text."""
    texts = [row.get(field) if isinstance(row, dict) else row for row in rows]
    if rows and all(text is None for text in texts):
        raise ESAError(f"text source {source!r}: none of its {len(rows)} records has the field "
                       f"{field!r} (set data.text_field)")
    return _column(texts)


def _read_text(path: Path) -> str:
    """A text file's content as UTF-8; a file in another encoding (latin-1) or with binary bytes is
    an error naming it and where its first undecodable byte is, not a UnicodeDecodeError traceback."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ESAError(f"text source {str(path)!r} is not UTF-8: byte 0x{data[err.start]:02x} at offset "
                       f"{err.start} (line {line}); text files must be UTF-8 (convert it first, e.g. "
                       f"iconv -f latin1 -t utf-8)") from None
    # decoded as plain utf-8, not utf-8-sig, so that an error's offset counts the mark's bytes too
    return text.removeprefix("\ufeff")


def _json_file(path: Path, field: str) -> tuple[list[str], str]:
    """The documents of a ``.json`` file: one object is one document (its ``field``), a list one
    document per item; any other JSON value is an error naming the shapes accepted."""
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as err:
        raise ESAError(f"text source {str(path)!r}: not valid JSON ({err.msg}, line {err.lineno} "
                       f"column {err.colno})") from None
    if isinstance(data, list):
        return _records(data, str(path), field), "one document per JSON record"
    if isinstance(data, dict) and isinstance(data.get(field), str):
        return [data[field]], "one JSON object"
    found = (f"one JSON object without a string field {field!r} (set data.text_field)" if isinstance(data, dict)
             else f"a JSON {JSON_TYPES[type(data)]}")
    raise ESAError(f"text source {str(path)!r} holds {found}; a .json source holds one object with a string "
                   f"field {field!r} (one document) or a list of such objects or of strings (one document each)")


def _json_lines(path: Path) -> list:
    rows = []
    for number, line in enumerate(_read_text(path).splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ESAError(f"text source {str(path)!r}, line {number}: not valid JSON "
                               f"({err.msg}, column {err.colno})") from None
    return rows


def _read_file(path: Path, field: str) -> tuple[list[str], str]:
    """The documents of a local file and the rule that found them."""
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return _split_text(_read_text(path))
    if suffix == ".jsonl":
        return _records(_json_lines(path), str(path), field), "one document per JSON line"
    if suffix == ".json":
        return _json_file(path, field)
    frame = read_parquet(path) if suffix == ".parquet" else pd.read_csv(io.StringIO(_read_text(path)))
    if field not in frame.columns:
        raise ESAError(f"text source {str(path)!r} has no column {field!r}; columns: {list(frame.columns)}")
    return _column(frame[field].tolist()), "one document per row"


def _hub_split(name: str, hf_config: str | None, split: str, field: str, revision: str | None) -> list[str]:
    import datasets

    try:
        dataset = datasets.load_dataset(name, hf_config, split=split, revision=revision)
    except Exception as err:  # datasets raises many types; all mean "cannot read this source"
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ESAError(f"cannot load dataset hf:{name} (config {hf_config}, split {split}): {first}") from err
    if field not in dataset.column_names:
        raise ESAError(f"dataset hf:{name} has no column {field!r}; columns: {dataset.column_names}")
    return _column(dataset[field])


def _clean(docs: list[str]) -> list[str]:
    return [d.strip() for d in docs if d and d.strip()]


def _source_documents(source: str, field: str) -> tuple[list[str], str]:
    """The documents of a single source (a file or a builtin) and the rule that found them."""
    if source == "builtin:pydoc":
        from pydoc_data.topics import topics

        return [topics[key] for key in sorted(topics)], "one document per pydoc topic"
    if source.startswith("builtin:"):
        raise ESAError(f"unknown builtin text {source!r}; allowed: {', '.join(BUILTIN_TEXTS)}")
    path = Path(source).expanduser()
    if path.is_dir():
        raise ESAError(f"text source {source!r} is a directory; allowed: {ALLOWED} "
                       f"(a local dataset folder is hf:PATH)")
    if path.suffix.lower() not in FILE_TYPES:
        raise ESAError(f"text source {source!r}: unsupported type; allowed: {ALLOWED}")
    if not path.is_file():
        raise ESAError(f"text file {source!r} does not exist")
    return _read_file(path, field)


def _split_by_tokens(doc: str, tokenizer, eval_fraction: float) -> tuple[list[str], list[str], str]:
    """One document cut at a token boundary: the last floor(n*f) of its n tokens go to evaluation."""
    offsets = tokenizer(doc, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    n_eval = int(len(offsets) * eval_fraction)
    cut = offsets[-n_eval][0] if n_eval else len(doc)
    detail = f"{SINGLE_DOCUMENT} (the last {n_eval} of {len(offsets)} tokens to evaluation)"
    return _clean([doc[:cut]]), _clean([doc[cut:]]), detail


def load_documents(source: str, *, text_field: str = "text", hf_config: str | None = None,
                   calib_split: str = "train", eval_split: str = "test",
                   eval_fraction: float = 0.2, tokenizer=None,
                   revision: str | None = None) -> tuple[list[str], list[str]]:
    """``(calibration_documents, evaluation_documents)`` of a text source, disjoint by construction.

    ``tokenizer`` (the model's) is needed only to split a single-document source by tokens;
    ``revision``: an ``hf:`` hub dataset's commit (:mod:`esa.revisions`; None: main).
    """
    if source.startswith("hf:"):
        name = source[3:]
        calib = _clean(_hub_split(name, hf_config, calib_split, text_field, revision))
        evaluation = _clean(_hub_split(name, hf_config, eval_split, text_field, revision))
        rule = f"hub splits {calib_split!r} and {eval_split!r}"
    else:
        docs, rule = _source_documents(source, text_field)
        docs = _clean(docs)
        if not docs:
            raise ESAError(f"text source {source!r} holds no text")
        if len(docs) == 1:
            if tokenizer is None:
                raise ESAError(f"text source {source!r} is a single document; splitting it by "
                               f"tokens needs the model's tokenizer")
            calib, evaluation, rule = _split_by_tokens(docs[0], tokenizer, eval_fraction)
        else:
            goes_to_eval = [int((i + 1) * eval_fraction) > int(i * eval_fraction) for i in range(len(docs))]
            calib = [d for d, e in zip(docs, goes_to_eval) if not e]
            evaluation = [d for d, e in zip(docs, goes_to_eval) if e]
    log.info("text source %r: %s; calibration %d document(s), evaluation %d document(s)",
             source, rule, len(calib), len(evaluation))
    for part, docs in (("calibration", calib), ("evaluation", evaluation)):
        if not docs:
            raise ESAError(f"text source {source!r} yields no {part} text ({rule}, "
                           f"eval_fraction {eval_fraction:g})")
    return calib, evaluation


def bos_id(tokenizer) -> int | None:
    """The BOS id when the tokenizer's own convention prepends it, else None."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    ids = tokenizer("a").input_ids
    return bos if ids and ids[0] == bos else None


def make_windows(tokenizer, docs: list[str], seq_len: int) -> np.ndarray:
    """Non-overlapping ``[W, seq_len]`` int32 windows of the tokenised document stream."""
    stream = tokenizer(SEPARATOR.join(docs), add_special_tokens=False).input_ids
    bos = bos_id(tokenizer)
    body = seq_len - (bos is not None)
    n = len(stream) // body
    windows = np.asarray(stream[: n * body], dtype=np.int32).reshape(n, body)
    if bos is not None:
        windows = np.concatenate([np.full((n, 1), bos, dtype=np.int32), windows], axis=1)
    return windows


def draw_calibration(pool_size: int, max_samples: int, seed: int) -> np.ndarray:
    """Sorted indices of the ``max_samples`` calibration windows seed ``seed`` draws from the pool."""
    if max_samples > pool_size:
        raise ESAError(f"max_samples {max_samples} is larger than the calibration pool of "
                       f"{pool_size} windows (lower max_samples, shorten seq_len or add text)")
    return np.sort(np.random.default_rng(seed).choice(pool_size, size=max_samples, replace=False))


def windows_frame(windows: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame({"window": np.arange(len(windows), dtype=np.int64), "tokens": list(windows)})


def read_windows(path: str | Path) -> np.ndarray:
    """``[W, T]`` int64 token windows from a windows Parquet file."""
    frame = read_parquet(path)
    return np.stack(frame["tokens"].to_numpy()).astype(np.int64)
