"""Logging: quiet by default, one line per record, `key=value` text or JSON lines for log shippers."""

from __future__ import annotations

import json
import logging
import sys

from agent.util import redact
from agent.util.timefmt import utc_iso


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": utc_iso(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = record.exc_text or self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(level: str = "warning", fmt: str = "text") -> None:
    """Configure the root logger once, on stderr so that stdout stays free for results."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(redact.LogFilter())  # secrets masked in every line (agent.util.redact)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
