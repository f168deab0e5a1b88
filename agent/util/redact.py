"""One redaction rule for secrets, applied wherever text leaves the process: the `config` reply, events,
log lines (a logging filter) and error messages.

What is secret: the userinfo of a URL (`rtsp://admin:pw@cam/` -> `rtsp://***@cam/`), query parameters
and mapping keys named like a secret (password, token, secret, ...), and every value this process was
told is secret (`remember`): the expansion of a `${VAR}` whose variable or key is named like a secret,
a password read from a file. Before this, a camera's password went out in every `source.lost` event
and in the log, and the registry URL's credentials in the `config` reply (issue 17, item 3).
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Mapping
from typing import Any

MASK = "***"
MIN_SECRET_CHARS = 4  # shorter remembered values would mask ordinary text ("1", "on")
_SECRET_WORDS = r"pass(?:word|wd|phrase)?|secret|token|api[_-]?key|auth(?:orization)?|credentials?|private[_-]?key"
SECRET_NAME = re.compile(rf"(?:^|[_.-])(?:{_SECRET_WORDS})(?:$|[_.-])", re.IGNORECASE)
# scheme://userinfo@ : the userinfo never holds '/', '@' or white space.
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s?#]+@")
_QUERY = re.compile(rf"(?P<key>[?&;](?:{_SECRET_WORDS})=)[^&#\s]+", re.IGNORECASE)
# A profile's environment reference, ${VAR} or ${VAR:-default}: the one pattern for expanding a profile
# (agent.config.yamldoc), keying its snapshot (agent.config.snapshot) and masking what it expanded (here).
ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")

_remembered: set[str] = set()
_lock = threading.Lock()


def secret_name(name: str) -> bool:
    """Is a key or variable named like a secret (`password`, `mqtt_password`, `REGISTRY_TOKEN`)?"""
    return SECRET_NAME.search(name) is not None


def remember(value: str) -> None:
    """Mask `value` wherever it appears from now on (for the life of the process)."""
    if len(value) >= MIN_SECRET_CHARS:
        with _lock:
            _remembered.add(value)


def remember_expanded(template: str, key: str, environ: Mapping[str, str]) -> None:
    """The values a `${VAR}` in `template` (at mapping key `key`) expands to, remembered when the
    variable or the key is named like a secret."""
    for match in ENV_REFERENCE.finditer(template):
        name = match.group(1)
        if name in environ and (secret_name(name) or secret_name(key)):
            remember(environ[name])


def text(value: str) -> str:
    """`value` with every secret masked."""
    out = _QUERY.sub(lambda m: m.group("key") + MASK, _USERINFO.sub(lambda m: m.group("scheme") + MASK + "@", value))
    with _lock:
        known = sorted(_remembered, key=len, reverse=True)  # longest first: a secret inside another
    for secret in known:
        if secret in out:
            out = out.replace(secret, MASK)
    return out


def doc(value: Any, key: str = "") -> Any:
    """A JSON-like value with secrets masked: strings by `text`, and any non-empty value under a key
    named like a secret."""
    if isinstance(value, dict):
        return {k: doc(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [doc(v, key) for v in value]
    if key and secret_name(key) and value not in (None, "", False):
        return MASK
    if isinstance(value, str):
        return text(value)
    return value


class LogFilter(logging.Filter):
    """Masks secrets in a record's message and traceback before any handler formats it."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = text(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if record.exc_info and not record.exc_text:
            record.exc_text = text(logging.Formatter().formatException(record.exc_info))
        return True
