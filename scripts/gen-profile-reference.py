#!/usr/bin/env python3
"""Write docs/profile-reference.md from the profile's JSON Schema (the validator's own, `profile_schema()`).

    .venv/bin/python scripts/gen-profile-reference.py           # rewrite docs/profile-reference.md
    .venv/bin/python scripts/gen-profile-reference.py --check   # exit 1 when the file is stale
    .venv/bin/python scripts/gen-profile-reference.py --stdout  # print it instead

Every key, per section and per source and post-processor type, with its type, default and description.
tests/test_docs.py regenerates it and compares, so the reference cannot drift from the schema: a new
key, a changed default or a new plug-in type means running this script in the same commit.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
TARGET = REPO / "docs" / "profile-reference.md"
sys.path.insert(0, str(REPO))

Schema = dict[str, Any]

DURATION_HINT = "(ms|s|sec|m|min|h|d)"
SIZE_HINT = "[kKmMgGtT]i?[bB]"
LONG_ENUM = 8  # enums longer than this are listed under the table instead of in the cell

SECTION_INTRO = {
    "device": "Who this device is. Required.",
    "registry": "Where registry models come from. Leave it out when every pipeline uses a model file.",
    "mqtt": "The broker. Leave it out and results go to stdout as JSON lines (logs and events to stderr).",
    "runtime": "ONNX Runtime settings shared by every pipeline (see [providers.md](providers.md)).",
    "health": "Health reports on `<prefix>/<device>/health` (see [mqtt.md](mqtt.md)).",
    "pipelines": "A list of inference loops (see [pipelines.md](pipelines.md)). Keys of one entry:",
}


def resolve(schema: Schema, node: Schema) -> Schema:
    ref = node.get("$ref")
    if ref:
        return schema["$defs"][ref.rsplit("/", 1)[-1]]
    return node


def ref_name(node: Schema) -> str | None:
    if "$ref" in node:
        return str(node["$ref"]).rsplit("/", 1)[-1]
    for alt in node.get("anyOf", []):
        if "$ref" in alt:
            return str(alt["$ref"]).rsplit("/", 1)[-1]
    return None


def number_bounds(node: Schema) -> str:
    low = (
        ("(", node["exclusiveMinimum"])
        if "exclusiveMinimum" in node
        else ("[", node["minimum"])
        if "minimum" in node
        else None
    )
    high = (
        (")", node["exclusiveMaximum"])
        if "exclusiveMaximum" in node
        else ("]", node["maximum"])
        if "maximum" in node
        else None
    )
    if low and high:
        return f"in {low[0]}{low[1]}, {high[1]}{high[0]}"
    parts = []
    if "exclusiveMinimum" in node:
        parts.append(f"> {node['exclusiveMinimum']}")
    if "minimum" in node:
        parts.append(f">= {node['minimum']}")
    if "exclusiveMaximum" in node:
        parts.append(f"< {node['exclusiveMaximum']}")
    if "maximum" in node:
        parts.append(f"<= {node['maximum']}")
    return " ".join(parts)


def type_of(schema: Schema, node: Schema, long_enums: list[tuple[str, list[Any]]], key: str) -> str:
    """A short human type: `duration`, `size`, `integer > 0`, `list of 2 integers`, `one of ...`."""
    alts = node.get("anyOf") or node.get("oneOf")
    if alts:
        strings = [a for a in alts if a.get("type") == "string" and "pattern" in a]
        if any(DURATION_HINT in a["pattern"] for a in strings):
            return "duration"
        if any(SIZE_HINT in a["pattern"] for a in strings):
            return "size"
        parts = [type_of(schema, a, long_enums, key) for a in alts if a.get("type") != "null"]
        nullable = any(a.get("type") == "null" for a in alts)
        seen: list[str] = []
        for p in parts:
            if p not in seen:
                seen.append(p)
        if "integer" in seen and "number" in seen:
            seen.remove("integer")
        return " or ".join(seen) + (" or null" if nullable and not seen else "")
    if "$ref" in node:
        target = resolve(schema, node)
        return "object" if target.get("type") == "object" else type_of(schema, target, long_enums, key)
    if "const" in node:
        return f"`{json.dumps(node['const'])}`"
    if "enum" in node:
        values = node["enum"]
        if len(values) > LONG_ENUM:
            long_enums.append((key, values))
            return "a name listed below"
        return "one of " + ", ".join(f"`{v}`" for v in values)
    kind = node.get("type")
    if isinstance(kind, list):
        return " or ".join(kind)
    if kind == "array":
        if "prefixItems" in node:
            items = node["prefixItems"]
            inner = {type_of(schema, i, long_enums, key) for i in items}
            word = inner.pop() if len(inner) == 1 else "values"
            return f"list of {len(items)} {word}s"
        inner_type = type_of(schema, node.get("items", {}), long_enums, key) if node.get("items") else "values"
        count = f" (at least {node['minItems']})" if node.get("minItems", 0) > 1 else ""
        if node.get("minItems") == 1:
            count = " (not empty)"
        if " or " in inner_type:
            return f"list{count} of: {inner_type.replace(' or ', ', ')}"
        if inner_type.startswith(("list", "object", "map", "a ", "`")):
            return f"list of {inner_type}{count}"
        return f"list of {inner_type}s{count}"
    if kind == "object":
        extra = node.get("additionalProperties")
        if isinstance(extra, dict):
            if "propertyNames" in node and node.get("maxProperties") == 1:
                return "`{name: options}`"
            return f"map of name to {type_of(schema, extra, long_enums, key)}"
        if node.get("properties"):
            return "`{" + ", ".join(node["properties"]) + "}`"
        return "object"
    if kind in ("integer", "number"):
        bounds = number_bounds(node)
        return f"{kind} {bounds}".strip()
    if kind == "string":
        if node.get("format") == "password":
            return "string (secret)"
        return "string"
    if kind == "boolean":
        return "boolean"
    return "any"


def human_seconds(value: float) -> str:
    if value == 0:
        return "0s"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60), ("s", 1)):
        if value >= size and value % size == 0:
            return f"{int(value // size)}{unit}"
    if value < 1:
        return f"{value * 1000:g}ms"
    return f"{value:g}s"


def human_bytes(value: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if value >= size and value % size == 0:
            return f"{value // size}{unit}"
    return str(value)


def default_of(node: Schema, kind: str, required: bool) -> str:
    if required:
        return "required"
    if "default" not in node:
        return "defaults" if kind == "object" else "empty" if kind.startswith("map") else ""
    value = node["default"]
    if value is None:
        return "unset"
    if kind == "duration" and isinstance(value, (int, float)):
        return f"`{human_seconds(float(value))}`"
    if kind == "size" and isinstance(value, int):
        return f"`{human_bytes(value)}`"
    if value == [] or value == {}:
        return "empty"
    if isinstance(value, str):
        return f"`{value}`"
    return f"`{json.dumps(value)}`"


def escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def description_of(node: Schema) -> str:
    text = node.get("description", "")
    pattern = node.get("pattern")
    if pattern == "^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$":
        text += " (1 to 64 letters, digits, `_ . -`; starts with a letter or digit)" if "letters" not in text else ""
    refused = node.get("not", {}).get("enum")
    if refused:
        text += " (not " + ", ".join(f"`{word}`" for word in refused) + ": the agent's own topic levels)"
    for alt in node.get("anyOf", []):
        if alt.get("maxLength") and alt.get("type") == "string":
            text += f" (at most {alt['maxLength']} characters)"
    return escape(text)


class Writer:
    def __init__(self, schema: Schema) -> None:
        self.schema = schema
        self.out: list[str] = []

    def table(self, obj: Schema, prefix: str, skip: tuple[str, ...] = ()) -> list[tuple[str, Schema, str]]:
        """One table of the object's keys; returns the nested objects to document after it."""
        required = set(obj.get("required", []))
        long_enums: list[tuple[str, list[Any]]] = []
        nested: list[tuple[str, Schema, str]] = []
        rows = ["| key | type | default | description |", "|---|---|---|---|"]
        for key, node in obj.get("properties", {}).items():
            if key in skip:
                continue
            path = f"{prefix}.{key}" if prefix else key
            kind = type_of(self.schema, node, long_enums, path)
            name = ref_name(node)
            described = description_of(node)
            if (
                name
                and resolve(self.schema, {"$ref": f"#/$defs/{name}"}).get("type") == "object"
                and "discriminator" not in node
            ):
                nested.append((path, resolve(self.schema, {"$ref": f"#/$defs/{name}"}), node.get("description", "")))
                described += f" (see [`{path}`](#{anchor(path)}))"
            if "discriminator" in node:
                described += f" (see [`{path}`](#{anchor(path)}))"
            if node.get("type") == "array" and "$ref" in node.get("items", {}):
                described += f" (see [`{path}[]`](#{anchor(path + '[]')}))"
                kind = "list of objects"
            rows.append(f"| `{key}` | {kind} | {default_of(node, kind, key in required)} | {described} |")
        self.out.extend(rows)
        self.out.append("")
        for path, values in long_enums:
            self.out.append(f"`{path}` names: " + ", ".join(f"`{v}`" for v in values) + ".")
            self.out.append("")
        return nested

    def section(
        self, title: str, obj: Schema, prefix: str, intro: str, level: int = 3, skip: tuple[str, ...] = ()
    ) -> None:
        self.out.append(f"{'#' * level} `{title}`")
        self.out.append("")
        if intro:
            self.out.append(intro[0].upper() + intro[1:] + ("" if intro.endswith((".", ":")) else "."))
            self.out.append("")
        for path, child, description in self.table(obj, prefix, skip):
            self.section(path, child, path, description, level=min(level + 1, 4))

    def plugins(self, path: str, node: Schema, what: str) -> None:
        mapping = node["discriminator"]["mapping"]
        self.out.append(f"### `{path}`")
        self.out.append("")
        self.out.append(
            escape(node.get("description", "")).capitalize()
            + f". `{path}.type` picks the {what}; each type has its own keys:"
        )
        self.out.append(" " + ", ".join(f"[`{t}`](#{anchor(f'{path}.type: {t}')})" for t in mapping) + ".")
        self.out.append("")
        for type_name, ref in mapping.items():
            obj = resolve(self.schema, {"$ref": ref})
            self.out.append(f"#### `{path}.type: {type_name}`")
            self.out.append("")
            doc = obj.get("description")
            if doc:
                self.out.append(escape(doc))
                self.out.append("")
            self.table(obj, path, skip=("type",))


def anchor(title: str) -> str:
    """GitHub's heading anchor for a heading that is the title in backquotes."""
    text = title.lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def render(schema: Schema | None = None) -> str:
    if schema is None:
        from agent.config.profile import profile_schema

        schema = profile_schema()
    w = Writer(schema)
    w.out += [
        "# Profile reference",
        "",
        "<!-- Generated by scripts/gen-profile-reference.py from the profile's JSON Schema; do not edit by hand.",
        "     tests/test_docs.py fails when this file and the schema disagree: run the script again. -->",
        "",
        "Every key of a device profile, generated from the JSON Schema the validator itself uses",
        "([configs/profile.schema.json](../configs/profile.schema.json), `edge-agent check --schema`). How",
        "profiles are checked, and how values are written, is in [profile.md](profile.md).",
        "",
        "Types:",
        "",
        "- **duration**: a number of seconds, or a number with a unit: `250ms`, `30s`, `5min`, `2h`, `7d`.",
        "- **size**: a number of bytes, or a number with a unit: `64KiB`, `256MiB`, `1GiB`, `500MB`.",
        "- **unset** means the key may be left out (or set to `null`); the description says what happens then.",
        "- Paths are relative to the profile's folder; `~` and `${VAR}` / `${VAR:-default}` are expanded.",
        "- Unknown keys are errors (with a did-you-mean), in every section and every plug-in.",
        "",
        "Sections: " + ", ".join(f"[`{k}`](#{anchor(k)})" for k in schema["properties"]) + ".",
        "",
        "## Top level",
        "",
    ]
    w.table({"properties": schema["properties"], "required": schema.get("required", [])}, "")
    w.out.append("## Sections")
    w.out.append("")
    for key, node in schema["properties"].items():
        target = node.get("items", node) if node.get("type") == "array" else node
        obj = resolve(schema, target) if "$ref" in target else resolve(schema, {"$ref": f"#/$defs/{ref_name(target)}"})
        path = f"{key}[]" if node.get("type") == "array" else key
        plugin_keys = tuple(k for k, v in obj.get("properties", {}).items() if "discriminator" in v)
        w.section(path, obj, path, SECTION_INTRO.get(key, node.get("description", "")), skip=())
        for pk in plugin_keys:
            what = "plug-in"
            w.plugins(f"{path}.{pk}", obj["properties"][pk], what)
    text = "\n".join(w.out).rstrip() + "\n"
    return re.sub(r"\n{3,}", "\n\n", text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when docs/profile-reference.md is stale")
    parser.add_argument("--stdout", action="store_true", help="print instead of writing")
    args = parser.parse_args()
    text = render()
    if args.stdout:
        sys.stdout.write(text)
        return 0
    if args.check:
        current = TARGET.read_text() if TARGET.exists() else ""
        if current != text:
            print(f"{TARGET.relative_to(REPO)} is stale: run scripts/gen-profile-reference.py", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(text)
    print(f"wrote {TARGET.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
