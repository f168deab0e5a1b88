"""Test vectors as files: named tensors, strings and maps in an .npz of plain arrays, read without pickle.

A manifest's test vector points at two blobs: the inputs and the expected outputs. Both are .npz files
(a zip of .npy members) that numpy reads with `allow_pickle=False`, so a registry cannot make a device
unpickle anything:

- tensors of numbers and booleans are stored as they are;
- string tensors (onnxruntime returns object arrays of `str`) as fixed-width unicode arrays;
- maps and sequences of maps (scikit-learn's ZipMap) as JSON text, and their names listed under
  `JSON_KEY`, so that a reader knows which members to parse.

Anything else (a sequence of tensors, an object array of arbitrary values) cannot be stored: `encode`
raises VectorError with one line, which publish reports. `mismatch` is the device's comparison: shapes
and kinds must agree, numbers within the tolerances, and NaN only where NaN is expected.
"""

from __future__ import annotations

import io
import json
import math
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

JSON_KEY = "__json__"  # a unicode array holding the JSON list of members stored as JSON text
SCALARS = (str, int, float, bool)


class VectorError(ValueError):
    """A value that cannot be stored as a test vector, or test data that cannot be read; one line."""


def encode(values: Mapping[str, object]) -> bytes:
    """Values (model inputs or outputs) as an .npz of plain arrays; VectorError for what cannot be stored."""
    arrays: dict[str, np.ndarray] = {}
    as_json: list[str] = []
    for name, value in values.items():
        if name == JSON_KEY:
            raise VectorError(f"{JSON_KEY!r} is a reserved name in test vectors; rename that output")
        if isinstance(value, np.ndarray) and value.dtype.kind == "O" and value.ndim == 1:
            if value.size and all(isinstance(v, dict) for v in value):  # a ZipMap result wrapped in an array
                value = value.tolist()
        array = _tensor(name, value)
        if array is None:
            arrays[name] = np.array(json.dumps(_plain(name, value)))
            as_json.append(name)
        else:
            arrays[name] = array
    if as_json:
        arrays[JSON_KEY] = np.array(json.dumps(as_json))
    buf = io.BytesIO()
    # Written member by member (what np.savez does) so that any output name works, "file" included.
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for name, array in arrays.items():
            with z.open(name + ".npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, array, allow_pickle=False)
    return buf.getvalue()


def decode(data: bytes | Path) -> dict[str, Any]:
    """The values `encode` stored: arrays, and plain JSON values (maps with string keys) for maps."""
    try:
        with np.load(io.BytesIO(data) if isinstance(data, bytes) else data, allow_pickle=False) as z:
            values: dict[str, Any] = {k: z[k] for k in z.files}
        as_json = json.loads(str(values.pop(JSON_KEY))) if JSON_KEY in values else []
        for name in as_json:
            values[name] = json.loads(str(values[name]))
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile, EOFError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise VectorError(f"test data cannot be read: {first[:200]}") from None
    return values


def mismatch(name: str, actual: object, expected: object, *, rtol: float, atol: float) -> str | None:
    """Why `actual` is not the `expected` output `name` (one line), or None when it passes."""
    what = f"output {name!r}"
    if isinstance(expected, np.ndarray):
        if not isinstance(actual, np.ndarray):
            return f"{what} is a {type(actual).__name__}, expected a tensor"
        if actual.shape != expected.shape:
            return f"{what} has shape {list(actual.shape)}, expected {list(expected.shape)}"
        if expected.dtype.kind in "US" or actual.dtype.kind in "USO":
            differ = int(np.count_nonzero(actual.astype(str) != expected.astype(str)))
            return f"{what} differs at {differ} of {expected.size} positions" if differ else None
        return _numbers(what, actual, expected, rtol, atol)
    if isinstance(actual, np.ndarray):
        return f"{what} is a tensor, expected a {type(expected).__name__}"
    try:
        plain = json.loads(json.dumps(_plain(name, actual)))
    except VectorError as exc:
        return str(exc)
    where = _diff(plain, expected, "", rtol, atol)
    return f"{what} differs from what is expected at {where}" if where else None


# ---- storing ----------------------------------------------------------------------------------


def _tensor(name: str, value: object) -> np.ndarray | None:
    """The array to store for a tensor value; None for a map or sequence of maps (stored as JSON)."""
    if isinstance(value, np.ndarray):
        if value.dtype.kind in "biufc?US":
            return value
        if value.dtype.kind == "O":
            items = value.ravel().tolist()
            if all(isinstance(v, str) for v in items):
                return value.astype(str)
            kinds = sorted({type(v).__name__ for v in items})
            raise VectorError(
                f"output {name!r} is an object array of {', '.join(kinds)}; test vectors hold tensors of numbers "
                "and strings, maps and sequences of maps"
            )
        raise VectorError(f"output {name!r} has dtype {value.dtype}, which test vectors cannot hold")
    if isinstance(value, np.generic):
        return np.asarray(value)
    if isinstance(value, (dict, list)):
        return None
    raise VectorError(f"output {name!r} is a {type(value).__name__}, which test vectors cannot hold")


def _plain(name: str, value: object) -> Any:
    """A map, or a sequence of maps, as plain JSON values; VectorError for any other structure."""
    if isinstance(value, dict):
        return {str(_scalar(name, k)): _scalar(name, v) for k, v in value.items()}
    if isinstance(value, list) and all(isinstance(v, dict) for v in value):
        return [_plain(name, v) for v in value]
    if isinstance(value, list) and any(isinstance(v, np.ndarray) for v in value):
        raise VectorError(
            f"output {name!r} is a sequence of tensors; test vectors hold tensors, maps and sequences of maps"
        )
    raise VectorError(f"output {name!r} is a {type(value).__name__} of values test vectors cannot hold")


def _scalar(name: str, value: object) -> str | int | float | bool:
    if isinstance(value, np.generic):
        value = value.item()
    if not isinstance(value, SCALARS):
        raise VectorError(f"output {name!r} holds a map with a {type(value).__name__}; maps of scalars only")
    return value


# ---- comparing --------------------------------------------------------------------------------


def _numbers(what: str, actual: np.ndarray, expected: np.ndarray, rtol: float, atol: float) -> str | None:
    got, want = actual.astype(np.float64), expected.astype(np.float64)
    got_nan, want_nan = np.isnan(got), np.isnan(want)
    if (got_nan & ~want_nan).any():
        n = int(np.count_nonzero(got_nan & ~want_nan))
        return f"{what} is NaN at {n} of {want.size} positions where a number is expected"
    if (want_nan & ~got_nan).any():
        n = int(np.count_nonzero(want_nan & ~got_nan))
        return f"{what} is a number at {n} of {want.size} positions where NaN is expected"
    close = np.isclose(got, want, rtol=rtol, atol=atol) | want_nan  # infinities match only themselves
    if close.all():
        return None
    with np.errstate(invalid="ignore"):
        err = np.abs(got - want)[~close]
    worst = float(np.max(err)) if np.isfinite(err).any() else math.inf
    return f"{what} differs by up to {worst:.3g} (atol {atol:g}, rtol {rtol:g})"


def _diff(actual: Any, expected: Any, where: str, rtol: float, atol: float) -> str | None:
    """The first place where two plain JSON values differ, described; None when they agree."""
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            return f"{where or 'top'}: {type(actual).__name__}, expected a map"
        if set(actual) != set(expected):
            return f"{where or 'top'}: keys {sorted(actual)}, expected {sorted(expected)}"
        return next((d for k in expected if (d := _diff(actual[k], expected[k], f"{where}[{k!r}]", rtol, atol))), None)
    if isinstance(expected, list):
        if not isinstance(actual, list) or len(actual) != len(expected):
            return f"{where or 'top'}: {_size(actual)}, expected {len(expected)} items"
        return next(
            (
                d
                for i, (a, e) in enumerate(zip(actual, expected, strict=True))
                if (d := _diff(a, e, f"{where}[{i}]", rtol, atol))
            ),
            None,
        )
    if isinstance(expected, float) and isinstance(actual, (int, float)) and not isinstance(actual, bool):
        same = (math.isnan(expected) and math.isnan(actual)) or math.isclose(
            actual, expected, rel_tol=rtol, abs_tol=atol
        )
        return None if same else f"{where}: {actual!r}, expected {expected!r}"
    return None if actual == expected else f"{where}: {actual!r}, expected {expected!r}"


def _size(value: Any) -> str:
    return f"{len(value)} items" if isinstance(value, list) else type(value).__name__
