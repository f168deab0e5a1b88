"""Text from outside the process as a terminal or a log line may show it: cut short, and unable to move
the cursor, recolour the screen or forge a line (a device id in a topic once carried escape sequences
straight to the operator's terminal; a hostile name must not fill a log line)."""

from __future__ import annotations

SHOWN_CHARS = 200  # of one outside string on a terminal or in a log line (a reason may be 1 MiB long)


def printable(value: object, limit: int | None = SHOWN_CHARS) -> str:
    """`value` as text of at most `limit` characters (and a note of its length), every character that is not
    printable (ESC and the other controls, line breaks, bidirectional overrides) written as its escape."""
    text = value if isinstance(value, str) else str(value)
    if limit is not None and len(text) > limit:
        text = f"{text[:limit]}... ({len(text)} characters)"
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def quoted(value: object, limit: int) -> str:
    """`repr(value)` (quoted, escapes written out) cut to `limit` characters: a value named in a message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
