"""YAML read with positions, so that every profile error can name its line.

PyYAML's composer keeps a mark on each node; walking the node tree along an error's key path gives the
line. Duplicate keys, which PyYAML silently resolves to the last one, are reported instead. Aliases are
bounded before anything walks the data: a few lines of nested aliases ("billion laughs") would expand to
millions of nodes, and a recursive alias to an endless one; both are located errors instead.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.util.files import read_small
from agent.util.redact import ENV_REFERENCE

if TYPE_CHECKING:  # imported where a document is parsed: a start from a validated snapshot parses none
    import yaml

KeyPath = tuple[str | int, ...]

# A real profile has a few hundred nodes; 10,000 leaves room for generous use of anchors.
MAX_EXPANDED_NODES = 10_000
MAX_DEPTH = 64  # profiles nest 5-6 levels; the bound keeps every walk below Python's recursion limit
MAX_BYTES = 1 << 20
# Python refuses to read longer integers (ValueError from inside PyYAML, with no line); no profile needs one.
MAX_INT_DIGITS = 100
INT_TAG = "tag:yaml.org,2002:int"  # profiles are hand-written; a megabyte is far beyond any real one


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
    # id(mapping node) -> its keys' (key node, value node), the first of duplicates: a profile with
    # thousands of problems locates each in one lookup, not a scan of its mapping (quadratic before).
    _keys: dict[int, dict[str, tuple[yaml.Node, yaml.Node]]] = field(default_factory=dict, repr=False)

    def line_of(self, path: KeyPath) -> int:
        """The line of the deepest node along `path` that exists (1-based)."""
        node = self.root
        if node is None:
            return 1
        line = node.start_mark.line + 1
        for part in path:
            child = self._child(node, part)
            if child is None:
                break
            key_node, node = child
            line = (key_node or node).start_mark.line + 1
        return line

    def _child(self, node: yaml.Node, part: str | int) -> tuple[yaml.Node | None, yaml.Node] | None:
        import yaml

        if isinstance(node, yaml.MappingNode):
            keys = self._keys.get(id(node))
            if keys is None:
                keys = self._keys[id(node)] = {}
                for key_node, value_node in node.value:
                    if isinstance(key_node, yaml.ScalarNode):
                        keys.setdefault(str(key_node.value), (key_node, value_node))
            return keys.get(str(part))
        if isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
            return None, node.value[part]
        return None


def _find_duplicates(node: yaml.Node | None, path: KeyPath, out: list[tuple[KeyPath, int]]) -> None:
    import yaml

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


def _check_expansion(root: yaml.Node) -> None:
    """Raise a located YamlSyntaxError when aliases make the document recursive or too large once expanded.

    Sizes are memoised per node, so this costs one visit per distinct node however the aliases multiply."""
    import yaml

    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()
    aliased = False  # a node met twice: only an alias shares one

    def size(node: yaml.Node, depth: int) -> int:
        nonlocal aliased
        key = id(node)
        if key in sizes:
            aliased = True
            return sizes[key]
        line = node.start_mark.line + 1
        if depth > MAX_DEPTH:
            raise YamlSyntaxError(line, f"nested deeper than {MAX_DEPTH} levels")
        if key in open_nodes:
            raise YamlSyntaxError(line, "recursive alias: the node anchored on this line contains itself")
        if isinstance(node, yaml.ScalarNode) and node.tag == INT_TAG and len(node.value) > MAX_INT_DIGITS:
            raise YamlSyntaxError(line, f"a number of {len(node.value)} digits (at most {MAX_INT_DIGITS})")
        children: list[yaml.Node] = []
        if isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        open_nodes.add(key)
        total = 1
        for child in children:
            total += size(child, depth + 1)
            if total > MAX_EXPANDED_NODES:
                raise YamlSyntaxError(
                    line,
                    f"aliases expand this node to more than {MAX_EXPANDED_NODES} nodes "
                    "(nested aliases, a 'billion laughs'); write the values out or use fewer aliases"
                    if aliased
                    else f"more than {MAX_EXPANDED_NODES} keys and values; a profile is a short hand-written file",
                )
        open_nodes.discard(key)
        sizes[key] = total
        return total

    size(root, 0)


def parse_yaml(text: str) -> YamlDoc:
    import yaml

    if len(text) > MAX_BYTES:
        raise YamlSyntaxError(1, f"larger than {MAX_BYTES} bytes; a profile is a short hand-written file")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)(text)
    try:
        root = loader.get_single_node()
        if root is not None:
            _check_expansion(root)
        data = loader.construct_document(root) if root is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        raise YamlSyntaxError(line, _one_line(str(exc.problem or exc.context))) from None
    except yaml.YAMLError as exc:
        raise YamlSyntaxError(1, _one_line(str(exc))) from None
    except (ValueError, OverflowError, TypeError) as exc:  # a scalar PyYAML's constructors cannot build
        raise YamlSyntaxError(1, f"a value that cannot be read ({_one_line(str(exc))})") from None
    finally:
        loader.dispose()
    doc = YamlDoc(data, root)
    _find_duplicates(root, (), doc.duplicates)
    return doc


def _one_line(text: str) -> str:
    """A parser's message as one bounded line: it may quote the input over several lines."""
    text = " ".join(text.split())
    return text if len(text) <= 200 else text[:197] + "..."


def read_bytes(path: Path) -> bytes:
    """A profile's bytes, read as `read_small` reads (a regular file, no more than the bound: at most
    MAX_BYTES + 1, which `parse_bytes` refuses)."""
    return read_small(path, MAX_BYTES)


def parse_bytes(data: bytes) -> YamlDoc:
    """A profile's bytes as a document (UnicodeDecodeError where they are not UTF-8)."""
    if len(data) > MAX_BYTES:
        raise YamlSyntaxError(1, f"larger than {MAX_BYTES} bytes; a profile is a short hand-written file")
    return parse_yaml(data.decode("utf-8"))


@dataclass
class Expanded:
    data: Any
    missing: list[tuple[KeyPath, str]] = field(default_factory=list)
    secret_paths: set[KeyPath] = field(default_factory=set)


def expand_env(data: Any, environ: Mapping[str, str] | None = None) -> Expanded:
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
            return ENV_REFERENCE.sub(sub, value)
        return value

    result.data = walk(data, ())
    return result
