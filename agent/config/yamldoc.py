"""YAML read with positions, so that every profile error can name its line.

PyYAML's composer keeps a mark on each node; walking the node tree along an error's key path gives the
line. Duplicate keys, which PyYAML silently resolves to the last one, are reported instead.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
KeyPath = tuple[str | int, ...]

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class YamlSyntaxError(Exception):
    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line = line
        self.message = message


@dataclass
class YamlDoc:
    data: Any
    root: yaml.Node | None
    duplicates: list[tuple[KeyPath, int]] = field(default_factory=list)

    def line_of(self, path: KeyPath) -> int:
        """The line of the deepest node along `path` that exists (1-based)."""
        node = self.root
        if node is None:
            return 1
        line = node.start_mark.line + 1
        for part in path:
            child = _child(node, part)
            if child is None:
                break
            key_node, node = child
            line = (key_node or node).start_mark.line + 1
        return line


def _child(node: yaml.Node, part: str | int) -> tuple[yaml.Node | None, yaml.Node] | None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.value == str(part):
                return key_node, value_node
    elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
        return None, node.value[part]
    return None


def _find_duplicates(node: yaml.Node | None, path: KeyPath, out: list[tuple[KeyPath, int]]) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = str(key_node.value)
            if key in seen:
                out.append((path + (key,), key_node.start_mark.line + 1))
            seen.add(key)
            _find_duplicates(value_node, path + (key,), out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _find_duplicates(item, path + (i,), out)


def parse_yaml(text: str) -> YamlDoc:
    loader = Loader(text)
    try:
        root = loader.get_single_node()
        data = loader.construct_document(root) if root is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        raise YamlSyntaxError(line, f"{exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise YamlSyntaxError(1, str(exc)) from None
    finally:
        loader.dispose()
    doc = YamlDoc(data, root)
    _find_duplicates(root, (), doc.duplicates)
    return doc


def read_yaml(path: Path) -> YamlDoc:
    return parse_yaml(path.read_text(encoding="utf-8"))


@dataclass
class Expanded:
    data: Any
    missing: list[tuple[KeyPath, str]] = field(default_factory=list)
    secret_paths: set[KeyPath] = field(default_factory=set)


def expand_env(data: Any, environ: dict[str, str] | None = None) -> Expanded:
    """Replace `${VAR}` and `${VAR:-default}` in strings; remember where, so errors never echo them."""
    env = os.environ if environ is None else environ
    result = Expanded(None)

    def walk(value: Any, path: KeyPath) -> Any:
        if isinstance(value, dict):
            return {k: walk(v, path + (k,)) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v, path + (i,)) for i, v in enumerate(value)]
        if isinstance(value, str) and "${" in value:

            def sub(match: re.Match[str]) -> str:
                name, default = match.group(1), match.group(2)
                if name in env:
                    return env[name]
                if default is not None:
                    return default
                result.missing.append((path, name))
                return ""

            result.secret_paths.add(path)
            return _ENV.sub(sub, value)
        return value

    result.data = walk(data, ())
    return result
