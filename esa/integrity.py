"""Whether a finished result file is whole, checked without reading it all.

Snakemake takes an existing output as finished. Every ESA writer is atomic (``esa.io``), so a
damaged file comes from outside a step: a truncated copy, a full disk under another tool, a
filesystem fault. Such a file can never be read, so it is no result; :func:`damage` tells why
a file is damaged from its framing alone (a few bytes at each end, or a header):

- Parquet: at least 12 bytes, ``PAR1`` at both ends, and a footer length that fits the file;
- safetensors: an 8-byte little-endian header length that fits, a JSON header, and tensor
  data that ends exactly at the end of the file;
- JSON: the whole text parses (result JSON files are small);
- PNG: the 8-byte signature and an ``IEND`` chunk at the end.

Pure Python: checking a results tree must not import pyarrow or torch (every Snakemake start
does it, ``rules/common.smk``).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

PARQUET_MAGIC = b"PAR1"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_END = b"IEND\xaeB`\x82"
CHECKED = (".parquet", ".safetensors", ".json", ".png")


def damage(path: str | os.PathLike) -> str | None:
    """Why the file at ``path`` is damaged, or None when its framing is whole (or it is of a
    kind not checked)."""
    path = Path(path)
    size = path.stat().st_size
    kind = path.suffix
    with open(path, "rb") as handle:
        if kind == ".parquet":
            return _parquet_damage(handle, size)
        if kind == ".safetensors":
            return _safetensors_damage(handle, size)
        if kind == ".json":
            try:
                json.loads(handle.read().decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as err:
                return f"not valid JSON ({size} bytes: {str(err).splitlines()[0]})"
            return None
        if kind == ".png":
            head = handle.read(8)
            handle.seek(max(size - 8, 0))
            if head != PNG_SIGNATURE or handle.read(8) != PNG_END:
                return f"not a whole PNG image ({size} bytes)"
    return None


def _parquet_damage(handle, size: int) -> str | None:
    if size < 12:
        return f"{size} bytes, too short for Parquet"
    head = handle.read(4)
    handle.seek(size - 8)
    footer_length, tail = struct.unpack("<i4s", handle.read(8))
    if head != PARQUET_MAGIC or tail != PARQUET_MAGIC:
        return f"no Parquet magic at {'the start' if head != PARQUET_MAGIC else 'the end'} (truncated or not Parquet)"
    if not 0 < footer_length <= size - 12:
        return f"Parquet footer of {footer_length} bytes does not fit a {size}-byte file"
    return None


def _safetensors_damage(handle, size: int) -> str | None:
    if size < 8:
        return f"{size} bytes, too short for safetensors"
    (header_length,) = struct.unpack("<Q", handle.read(8))
    if header_length > size - 8:
        return f"safetensors header of {header_length} bytes does not fit a {size}-byte file (truncated)"
    try:
        header = json.loads(handle.read(header_length).decode("utf-8"))
        end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, IndexError):
        return "safetensors header is not valid JSON"
    if 8 + header_length + end != size:
        return f"safetensors data ends at byte {8 + header_length + end}, the file at {size} (truncated)"
    return None


def damaged_files(root: str | os.PathLike) -> dict[Path, str]:
    """Every damaged file under ``root`` (of the kinds checked) with why; temporary files of
    writes in progress (``.name.*.tmp``) are not results and are skipped."""
    found = {}
    for folder, _, names in os.walk(root):
        for name in sorted(names):
            if name.endswith(CHECKED) and not name.startswith("."):
                path = Path(folder, name)
                reason = damage(path)
                if reason:
                    found[path] = reason
    return found
