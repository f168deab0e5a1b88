"""Model outputs as plain JSON: tensors as nested lists, ZipMap sequences of maps as objects.

numpy is imported on first use (see `lazy`): the raw post-processor that needs this is imported by
every profile check.
"""

from __future__ import annotations

from typing import Any

from agent.inference.processing.lazy import np


def to_json(value: object, digits: int | None = 6) -> Any:
    """`value` with numpy arrays and scalars turned into lists and numbers; NaN and infinity as null."""
    if isinstance(value, np.ndarray):
        if value.dtype.kind == "f":
            out = np.round(value.astype(np.float64), digits) if digits is not None else value
            if not np.isfinite(out).all():  # NaN and infinity are not JSON: null, as JSON.stringify does
                plain = out.astype(object)
                plain[~np.isfinite(out)] = None
                return plain.tolist()
            return out.tolist()
        return value.tolist()
    if isinstance(value, dict):
        return {str(k): to_json(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v, digits) for v in value]
    if isinstance(value, (np.floating, float)):
        if not np.isfinite(value):
            return None
        return round(float(value), digits) if digits is not None else float(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value
