"""config/README.md (esa.config_docs): generated from the schema, every key described, the
types and defaults written as the schema gives them."""

from pathlib import Path

from esa.config_docs import config_reference, key_rows, type_of

CONFIG_README = Path(__file__).resolve().parents[1] / "config" / "README.md"


def test_config_readme_is_the_generated_one():
    assert CONFIG_README.read_text() == config_reference(), "python -m esa.config_docs > config/README.md"


def test_every_key_has_a_description():
    from esa.config import load_schema

    schema = load_schema()
    rows = key_rows(schema, schema["$defs"], required=tuple(schema["required"]))
    assert [key for key, _, _, text in rows if not text] == []
    assert len(rows) > 100


def test_types_defaults_and_rows_as_the_schema_gives_them():
    definitions = {"thing": {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1,
                                                                    "description": "how many"}}}}
    assert type_of({"type": ["integer", "null"], "minimum": 1}, {}) == "integer or null (>= 1)"
    assert type_of({"enum": ["auto", "no", False, None]}, {}) == "one of auto, no, false, null"
    assert type_of({"type": "number", "exclusiveMinimum": 0, "maximum": 1}, {}) == "number (> 0, <= 1)"
    assert type_of({"type": "array", "items": {"anyOf": [{"type": "integer"}, {"type": "string"}]}}, {}) == (
        "list of integer or string")
    shared = {"properties": {"a": {"$ref": "#/$defs/thing"}, "b": {"$ref": "#/$defs/thing"}}}
    assert key_rows(shared, definitions, "res") == [
        ("res.<name>", "object", "{}", "name: one of a, b; each takes the keys below"),
        ("res.<name>.n", "integer (>= 1)", "", "how many")]
    lines = config_reference().splitlines()
    assert ("| `confirm.innocent.samples` | integer (>= 0) | `8` | innocent draws per tested tensor and per group "
            "reaching the factor without a confirmed member (0: no null) |") in lines
    assert ("| `data.source` | string | (required) | hf:NAME, a .txt/.jsonl/.json/.parquet/.csv file, or "
            "builtin:pydoc |") in lines
    assert any(line.startswith("| `report` |") and "report/&lt;key&gt;/index.html" in line for line in lines)
