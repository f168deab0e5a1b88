"""JSON from outside the process, bounded in size and nesting before the parser sees it.

`json.loads` recurses once per nesting level: a 60 KB payload of brackets raises RecursionError, which
is not a ValueError, so it escaped every `except ValueError` of a parser of untrusted input (issue 17,
item 4). `loads` counts the nesting first (strings skipped, so a bracket inside a string does not
count) and refuses too deep or too large input with a `JSONLimitError`, a ValueError whose message
says what was expected; every parser of commands, deployment orders, manifests and sensor rows calls
it instead of `json.loads`.
"""

from __future__ import annotations

import json
import re
from typing import Any

MAX_DEPTH = 32  # no document of the agent's nests deeper than a handful of levels
# The largest message of the wire contract read (agent.transport.contract): none comes near; a larger one
# is refused unread. Here, not in the contract, so that the broker connection bounds its packets without
# importing the contract's models (pydantic) on the way to a start's first result.
MAX_PAYLOAD_BYTES = 1 << 20
# A string token (with escapes) or one bracket: what the depth count needs, in C speed. A string left open
# runs to the end of the input (`"?`): with the quote required, every escaped quote of an unterminated
# string restarted a match that backtracked to the end, quadratic time (a 128 KB health took 75 s).
_TOKENS = re.compile(rb'"(?:[^"\\]|\\.)*"?|[\[\]{}]', re.DOTALL)
_OPEN = frozenset(b"[{")


class JSONLimitError(ValueError):
    """Input refused before parsing: too large, too deeply nested, or not JSON at all."""


def bounded(raw: bytes | str, *, max_bytes: int, max_depth: int = MAX_DEPTH) -> bytes:
    """`raw` as bytes once it is known to be within both limits (JSONLimitError otherwise), for a parser
    that bounds nothing itself (pydantic's `model_validate_json` nests up to 200 levels)."""
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else bytes(raw)
    if len(data) > max_bytes:
        raise JSONLimitError(f"{len(data)} bytes, more than the {max_bytes} allowed")
    if data.count(b"[") + data.count(b"{") > max_depth:  # else it cannot nest deeper: no scan needed
        _check_depth(data, max_depth)
    return data


def loads(raw: bytes | str, *, max_bytes: int, max_depth: int = MAX_DEPTH) -> Any:
    """`raw` parsed as JSON, or JSONLimitError (a ValueError) naming the limit it broke."""
    data = bounded(raw, max_bytes=max_bytes, max_depth=max_depth)
    try:
        text = data.decode("utf-8")  # JSON on the wire is UTF-8 (RFC 8259, 8.1); no guessing UTF-16/32
    except UnicodeDecodeError as exc:
        raise JSONLimitError(f"not JSON: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise JSONLimitError(f"not JSON ({str(exc)[:200]})") from None


def _check_depth(data: bytes, max_depth: int) -> None:
    """JSONLimitError when brackets outside strings nest deeper than `max_depth`."""
    depth = 0
    for match in _TOKENS.finditer(data):
        first = match.group()[0]
        if first == 0x22:  # a string: brackets inside it are text
            continue
        if first in _OPEN:
            depth += 1
            if depth > max_depth:
                raise JSONLimitError(f"nested more than {max_depth} levels deep")
        else:
            depth -= 1
