"""The one pattern for names that arrive from outside and become folder or topic names.

Models, channels, pipelines, devices and versions name folders in the state directory and levels of
MQTT topics: a name from a command, a deployment order, a manifest or a profile is checked here before
it touches a path. No separator, no leading dot: never `..`, never absolute (issue 17, item 2).
"""

from __future__ import annotations

import json
import re

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
# Versions also allow '+' (build metadata); still no separator and no leading dot.
VERSION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$"
NAME_WORDS = "a name of letters, digits, '_', '.' and '-' (up to 64, starting with a letter or digit)"
VERSION_WORDS = "a version of letters, digits, '_', '.', '+' and '-' (up to 64, starting with a letter or digit)"
WORDS = {NAME_PATTERN: NAME_WORDS, VERSION_PATTERN: VERSION_WORDS}
_COMPILED = {pattern: re.compile(pattern) for pattern in WORDS}
ECHO_CHARS = 80  # how much of a refused value a message repeats


class UnsafeNameError(ValueError):
    """A name that must not become a path; the message says what was expected and what came."""


def check(value: object, what: str, pattern: str = NAME_PATTERN) -> str:
    """`value` when it matches `pattern`, else UnsafeNameError naming `what`, the expectation and the value."""
    if isinstance(value, str) and _COMPILED[pattern].fullmatch(value) is not None:
        return value
    raise UnsafeNameError(f"{what}: expected {WORDS[pattern]}, got {json.dumps(value, default=str)[:ECHO_CHARS]}")
