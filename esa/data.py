"""Text sources, token windows, and the calibration / evaluation split.

A text source is one of:
  * ``hf:NAME`` (``hf:wikitext`` with ``hf_config: wikitext-2-raw-v1``): a hub dataset (or a
    local dataset folder, ``hf:/path``); calibration text from ``calib_split`` (train),
    evaluation text from ``eval_split`` (test);
  * a local ``.txt`` (documents separated by blank lines), ``.jsonl``/``.json`` (field
    ``text_field``), ``.parquet``/``.csv`` (column ``text_field``);
  * ``builtin:pydoc``: the reference documentation every CPython ships as ``pydoc_data.topics``.

Single-source text is split by document, deterministically: document i (in source order)
goes to evaluation when floor((i+1)*f) > floor(i*f), f = ``eval_fraction``, so the two parts
share no text. Each part is tokenised once as a stream (documents joined by a blank line)
and cut into non-overlapping windows of ``seq_len`` tokens; a tokenizer that prepends BOS
gets BOS at the start of every window. Seed s draws the calibration sample from the pool.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import ESAError

BUILTIN_TEXTS = ("builtin:pydoc",)
FILE_TYPES = (".txt", ".jsonl", ".json", ".parquet", ".csv")
SEPARATOR = "\n\n"


def _column(texts, source: str, field: str) -> list[str]:
    if texts is None:
        raise ESAError(f"text source {source!r} has no field {field!r}")
    return [str(t) for t in texts if isinstance(t, str)]


def _read_file(path: Path, field: str) -> list[str]:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return path.read_text(encoding="utf-8").split(SEPARATOR)
    if suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        return _column([r.get(field) for r in rows if isinstance(r, dict)], str(path), field)
    if suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        rows = data if isinstance(data, list) else data.get("data", data.get(field, []))
        return _column([r.get(field) if isinstance(r, dict) else r for r in rows], str(path), field)
    frame = pd.read_parquet(path) if suffix == ".parquet" else pd.read_csv(path)
    if field not in frame.columns:
        raise ESAError(f"text source {str(path)!r} has no column {field!r}; columns: {list(frame.columns)}")
    return _column(frame[field].tolist(), str(path), field)


def _hub_split(name: str, hf_config: str | None, split: str, field: str) -> list[str]:
    import datasets

    try:
        dataset = datasets.load_dataset(name, hf_config, split=split)
    except Exception as err:  # datasets raises many types; all mean "cannot read this source"
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ESAError(f"cannot load dataset hf:{name} (config {hf_config}, split {split}): {first}") from err
    if field not in dataset.column_names:
        raise ESAError(f"dataset hf:{name} has no column {field!r}; columns: {dataset.column_names}")
    return _column(dataset[field], f"hf:{name}", field)


def _clean(docs: list[str]) -> list[str]:
    return [d.strip() for d in docs if d and d.strip()]


def load_documents(source: str, *, text_field: str = "text", hf_config: str | None = None,
                   calib_split: str = "train", eval_split: str = "test",
                   eval_fraction: float = 0.2) -> tuple[list[str], list[str]]:
    """``(calibration_documents, evaluation_documents)`` of a text source, disjoint by construction."""
    if source.startswith("hf:"):
        name = source[3:]
        calib = _clean(_hub_split(name, hf_config, calib_split, text_field))
        evaluation = _clean(_hub_split(name, hf_config, eval_split, text_field))
    else:
        if source == "builtin:pydoc":
            from pydoc_data.topics import topics

            docs = [topics[key] for key in sorted(topics)]
        elif source.startswith("builtin:"):
            raise ESAError(f"unknown builtin text {source!r}; allowed: {', '.join(BUILTIN_TEXTS)}")
        else:
            path = Path(source).expanduser()
            if path.suffix.lower() not in FILE_TYPES:
                raise ESAError(f"text source {source!r}: unsupported type; allowed: hf:NAME, "
                               f"{', '.join(BUILTIN_TEXTS)}, or a file ending {', '.join(FILE_TYPES)}")
            if not path.is_file():
                raise ESAError(f"text file {source!r} does not exist")
            docs = _read_file(path, text_field)
        docs = _clean(docs)
        goes_to_eval = [int((i + 1) * eval_fraction) > int(i * eval_fraction) for i in range(len(docs))]
        calib = [d for d, e in zip(docs, goes_to_eval) if not e]
        evaluation = [d for d, e in zip(docs, goes_to_eval) if e]
    for part, docs in (("calibration", calib), ("evaluation", evaluation)):
        if not docs:
            raise ESAError(f"text source {source!r} yields no {part} text")
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
    frame = pd.read_parquet(path)
    return np.stack(frame["tokens"].to_numpy()).astype(np.int64)
