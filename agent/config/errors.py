"""Profile errors as users need them: `FILE:LINE: key.path: message`, all of them at once.

What a located problem is and how it prints; `agent.config.validate` maps pydantic's errors onto it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from agent.config.yamldoc import KeyPath


@dataclass(frozen=True)
class Issue:
    file: str
    line: int
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.path}: " if self.path else ""
        return f"{self.file}:{self.line}: {where}{self.message}"


MAX_ISSUES = 100  # printed of one profile: a hostile one can have thousands


class ProfileError(Exception):
    """A profile that cannot be used; carries every problem found, each located."""

    def __init__(self, issues: list[Issue]) -> None:
        if len(issues) > MAX_ISSUES:  # a hostile profile can have thousands: the first ones and a count
            last = issues[MAX_ISSUES - 1]
            more = Issue(last.file, last.line, "", f"... and {len(issues) - MAX_ISSUES + 1} more problems")
            issues = issues[: MAX_ISSUES - 1] + [more]
        super().__init__("\n".join(str(i) for i in issues))
        self.issues = issues


# Human words for the regular expressions the profile uses; filled in by the modules that own them.
PATTERN_WORDS: dict[str, str] = {}


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    import difflib  # here: only a mistake needs it, and every start imports this module before its first result

    matches = difflib.get_close_matches(str(word), list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {matches[0]!r}?)" if matches else ""


def format_path(path: KeyPath) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out
