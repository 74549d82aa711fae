"""``config/README.md``: every configuration key, generated from ``config/schema.yaml``.

The Snakemake workflow catalog expects a ``config/README.md`` that describes the config. Written
by hand it drifts from the schema that validates the config; generated, it cannot:
``python -m esa.config_docs > config/README.md``, and a test compares the file with the output.

One row per key in schema order, dotted (``confirm.joint.top_n``; a list's items as
``experiments[].topk``): its type with the schema's bounds, its default, its description. An
object whose keys all take one shared definition (``resources``) is written once, as
``resources.<name>``, naming the keys.
"""

from __future__ import annotations

import json
import sys

from .config import load_schema

HEADER = """# Configuration

Every key of an ESA config, generated from [`schema.yaml`](schema.yaml) by
`python -m esa.config_docs > config/README.md` (a test keeps the two equal). A config file is
read as written: keys it leaves out take the default below, and an unknown key is an error.
`esa check FILE...` validates files without running anything.

The configs here: [`config.yaml`](config.yaml), the embedded default (the bundled model on the
Python docs, sized for 2 CPU cores; it applies when no `--configfile` is given);
[`full.yaml`](full.yaml) and [`beyond.yaml`](beyond.yaml), laid over it, its full size and the
analyses beyond the runbook; [`runbook-llama31-8b.yaml`](runbook-llama31-8b.yaml), the runbook
on Llama-3.1-8B on a GPU node.

| key | type | default | description |
|---|---|---|---|
"""


def _resolved(node: dict, definitions: dict) -> dict:
    """``node`` with its ``$ref`` replaced by the definition's keys (its own keys win)."""
    if "$ref" not in node:
        return node
    return {**definitions[node["$ref"].rsplit("/", 1)[1]], **{k: v for k, v in node.items() if k != "$ref"}}


def _bounds(node: dict) -> str:
    parts = [f"{sign} {node[key]}" for key, sign in (("minimum", ">="), ("exclusiveMinimum", ">"),
                                                      ("maximum", "<="), ("exclusiveMaximum", "<"))
             if key in node]
    return f" ({', '.join(parts)})" if parts else ""


def type_of(node: dict, definitions: dict) -> str:
    """The key's type in words: ``one of a, b``, ``integer or null (>= 1)``, ``list of string``."""
    node = _resolved(node, definitions)
    if "anyOf" in node or "oneOf" in node:
        return " or ".join(type_of(choice, definitions) for choice in node.get("anyOf", node.get("oneOf")))
    if "enum" in node:
        return "one of " + ", ".join(v if isinstance(v, str) else json.dumps(v) for v in node["enum"])
    types = node.get("type", "any")
    types = types if isinstance(types, list) else [types]
    words = []
    for kind in types:
        if kind == "array" and isinstance(node.get("items"), dict):
            words.append(f"list of {type_of(node['items'], definitions)}")
        else:
            words.append(kind)
    return " or ".join(words) + _bounds(node)


def _cell(text: str) -> str:
    """Text for a table cell: its pipes escaped, and its angle brackets (``<key>``), which
    Markdown would take for HTML."""
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;").strip()


def key_rows(node: dict, definitions: dict, prefix: str = "", required: tuple = ()) -> list[tuple[str, ...]]:
    """(key, type, default, description) of every key under ``node``'s properties, in order."""
    rows = []
    properties = node.get("properties", {})
    refs = {value.get("$ref") for value in properties.values()}
    if len(properties) > 1 and len(refs) == 1 and None not in refs:  # one shared definition: written once
        shared = _resolved(next(iter(properties.values())), definitions)
        key = f"{prefix}.<name>"
        rows.append((key, "object", "{}", f"name: one of {', '.join(properties)}; each takes the keys below"))
        return rows + key_rows(shared, definitions, key)
    for name, child in properties.items():
        child = _resolved(child, definitions)
        key = f"{prefix}.{name}" if prefix else name
        if "default" in child:
            default = json.dumps(child["default"])
        else:
            default = "(required)" if name in required else ""
        rows.append((key, type_of(child, definitions), default, _cell(" ".join(child.get("description", "").split()))))
        rows += key_rows(child, definitions, key, tuple(child.get("required", ())))
        items = child.get("items")
        if isinstance(items, dict) and "properties" in _resolved(items, definitions):
            shared = _resolved(items, definitions)
            rows += key_rows(shared, definitions, f"{key}[]", tuple(shared.get("required", ())))
    return rows


def config_reference() -> str:
    """The whole of ``config/README.md``."""
    schema = load_schema()
    rows = key_rows(schema, schema.get("$defs", {}), required=tuple(schema.get("required", ())))
    table = "".join(f"| `{key}` | {kind} | {f'`{default}`' if default and default != '(required)' else default} | "
                    f"{text} |\n" for key, kind, default, text in rows)
    return HEADER + table


def main() -> int:
    sys.stdout.write(config_reference())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
