"""A rollout's plan: what it asks for (`RolloutSpec`), how many devices each wave reaches, and which.

Waves are cumulative: `1%,10%,50%,100%` reaches 1% of the group, then up to 10%, and so on; items may
be counts (`10,100,all`), and `exp:START,FACTOR` grows by FACTOR from START devices (AWS IoT Jobs'
exponential rate). The first wave is at least as large as the number of hardware kinds in the group.

Devices are ordered once, when the rollout is planned, and the order is kept: deterministic (a hash of
the rollout id and the device id), and spread over what `probe` reports (architecture and the provider
that runs the model), so that the first wave has one device of every kind, and every later prefix of
the order holds each kind in its share of the group.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import datetime, time, timezone

_WINDOW = re.compile(r"^(\d{2}):(\d{2})-(\d{2}):(\d{2})$")


@dataclass(frozen=True)
class RolloutSpec:
    """Everything `fleet rollout start` was asked; stored with the rollout, so a restart reads the same."""

    model: str
    version: str
    group: str
    waves: tuple[str, ...] = ("1%", "10%", "50%", "100%")
    soak_s: float = 0.0  # after a wave has settled, how long it is watched before the next one starts
    device_timeout_s: float = 600.0  # a device that has not reached an outcome by then counts as timed out
    abort_percent: float = 5.0  # abort when more than this share of the devices reached failed...
    abort_min: int = 1  # ...once at least this many were reached
    abort_count: int | None = None  # or when this many failed, whatever the share
    max_p95_ratio: float = 1.5  # inference p95 against the same device's previous version...
    min_p95_increase_ms: float = 1.0  # ...and at least this much slower: sub-ms jitter is no regression
    allow_fallback: bool = False  # a provider that ranks below the previous version's on the device fails
    max_error_rate: float = 0.01  # failed inferences, and NaN outputs, per inference
    max_drop_rate: float = 0.05  # dropped frames per frame
    min_inferences: int = 20  # a device's vitals count once it ran this many inferences on the version
    windows: tuple[str, ...] = ()  # UTC "HH:MM-HH:MM": a wave starts only inside one (empty: any time)
    expires_s: float = 7 * 86400.0  # the orders' lifetime

    def to_json(self) -> dict[str, object]:
        return asdict(self)

    @staticmethod
    def from_json(doc: Mapping[str, object]) -> RolloutSpec:
        fields = dict(doc)
        for key in ("waves", "windows"):
            fields[key] = tuple(fields.get(key, ()) or ())  # type: ignore[arg-type]  # JSON lists of strings
        return RolloutSpec(**fields)  # type: ignore[arg-type]  # written by to_json: the same fields


def check_spec(spec: RolloutSpec) -> None:
    """ValueError (one line) for a spec that cannot run."""
    wave_ends(spec.waves, 100)
    for window in spec.windows:
        parse_window(window)
    if not 0 <= spec.abort_percent <= 100:
        raise ValueError("--abort-percent: expected 0 to 100")
    if spec.abort_min < 0:
        raise ValueError("--abort-min: expected a count, 0 or more")
    if spec.abort_count is not None and spec.abort_count < 1:
        raise ValueError("--abort-count: expected a count, 1 or more")
    if spec.min_inferences < 1:
        raise ValueError("--min-inferences: expected a count, 1 or more")
    # Each limit is checked so that NaN fails too: a NaN limit compares false and would switch its gate off.
    if not (math.isfinite(spec.max_p95_ratio) and spec.max_p95_ratio > 1):
        raise ValueError("--max-p95-ratio: expected a ratio above 1")
    if not 0 <= spec.max_error_rate <= 1:
        raise ValueError("--max-error-rate: expected a rate from 0 to 1")
    if not 0 <= spec.max_drop_rate <= 1:
        raise ValueError("--max-drop-rate: expected a rate from 0 to 1")
    if not 0 <= spec.min_p95_increase_ms < 1e6:
        raise ValueError("--min-p95-increase: expected milliseconds, 0 or more")
    if spec.device_timeout_s <= 0 or spec.soak_s < 0:
        raise ValueError("--device-timeout must be > 0 and --soak >= 0")


def wave_ends(waves: tuple[str, ...], n: int, kinds: int = 1) -> list[int]:
    """The cumulative number of devices reached after each wave, of `n` (the last is always n)."""
    ends: list[int] = []
    for item in waves:
        if item.startswith("exp:"):
            try:
                start_s, factor_s = item[4:].split(",")
                start, factor = int(start_s), float(factor_s)
            except ValueError:
                raise ValueError(f"wave {item!r}: expected exp:START,FACTOR (e.g. exp:10,2)") from None
            if start < 1 or not 1 < factor < math.inf:  # NaN fails too; inf overflowed the sizes below
                raise ValueError(f"wave {item!r}: START must be >= 1 and FACTOR a number > 1")
            size, total = float(start), 0
            while total < n:
                total = min(n, total + math.ceil(size))
                ends.append(total)
                size *= factor
            continue
        if item == "all":
            ends.append(n)
        elif item.endswith("%"):
            try:
                share = float(item[:-1])
            except ValueError:
                raise ValueError(f"wave {item!r}: expected a count, a percentage, all or exp:START,FACTOR") from None
            if not 0 < share <= 100:
                raise ValueError(f"wave {item!r}: a percentage from above 0 to 100")
            ends.append(min(n, math.ceil(n * share / 100)))
        elif item.isdigit() and int(item) > 0:
            ends.append(min(n, int(item)))
        else:
            raise ValueError(f"wave {item!r}: expected a count, a percentage, all or exp:START,FACTOR")
    if ends and ends[0] < min(kinds, n):
        ends[0] = min(kinds, n)
    out: list[int] = []
    for end in [*ends, n]:
        if end > (out[-1] if out else 0):
            out.append(end)
    return out


def order_devices(rollout_id: str, kinds: Mapping[str, str]) -> list[str]:
    """`kinds`: device -> its kind. One device of each kind first, then every kind in its share."""
    by_kind: dict[str, list[str]] = defaultdict(list)
    for device, kind in kinds.items():
        by_kind[kind].append(device)

    def rank(device: str) -> str:
        return hashlib.sha256(f"{rollout_id}/{device}".encode()).hexdigest()

    first: list[str] = []
    rest: list[tuple[float, str, str]] = []
    for kind, devices in sorted(by_kind.items()):
        devices.sort(key=rank)
        first.append(devices[0])
        others = devices[1:]
        rest += [((i + 0.5) / len(others), kind, d) for i, d in enumerate(others)]
    return first + [d for _, _, d in sorted(rest)]


def parse_window(text: str) -> tuple[time, time]:
    match = _WINDOW.match(text)
    if not match:
        raise ValueError(f"window {text!r}: expected HH:MM-HH:MM (UTC)")
    h1, m1, h2, m2 = (int(g) for g in match.groups())
    if h1 > 23 or h2 > 23 or m1 > 59 or m2 > 59:
        raise ValueError(f"window {text!r}: not a time of day")
    return time(h1, m1), time(h2, m2)


def in_window(windows: tuple[str, ...], now: datetime | None = None) -> bool:
    """Whether `now` (UTC) lies in one of the windows (a window may wrap midnight); no windows: always."""
    if not windows:
        return True
    t = (now or datetime.now(timezone.utc)).astimezone(timezone.utc).time()
    for window in windows:
        start, end = parse_window(window)
        if (start <= t < end) if start <= end else (t >= start or t < end):
            return True
    return False
