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

`decode` reads what a signed manifest names, and a stolen key signs anything: before numpy allocates
a byte, the archive's directory, its member count, the bytes its members inflate to, and each .npy
header's shape and dtype are checked against the bounds below (a 1 MB zip bomb inflated to 1 GiB; a
header claiming 8 TiB raised MemoryError out of the pull, a void dtype ValueError out of `mismatch`).
"""

from __future__ import annotations

import io
import json
import math
import os
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any, BinaryIO

import numpy as np

from agent.util import jsonlimits

JSON_KEY = "__json__"  # a unicode array holding the JSON list of members stored as JSON text
SCALARS = (str, int, float, bool)
# The arrays of one test-vector file, inflated: a 4K float32 RGB frame is 100 MB, and inputs, expected
# outputs and the model's own outputs are in memory together.
MAX_VECTOR_BYTES = 256 << 20
MAX_MEMBERS = 1024  # arrays in one file: a model's inputs or its outputs (a KV cache is a few hundred)
# zipfile reads the central directory whole and parses every entry in it (about 600 bytes of memory each)
# before one can be counted: 2 KiB an entry is a name of 512 characters with its zip64 fields.
MAX_DIRECTORY_BYTES = MAX_MEMBERS * 2048
# Compressions zipfile stops at the member's size as it inflates (numpy writes these two): bzip2 and LZMA
# inflate each read whole first, and 1,749 bytes of bzip2 claiming 100 bytes took 4 GiB.
INFLATE = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)
KINDS = "biufcUS"  # what `encode` stores: booleans, numbers, text; never objects, records, raw bytes or dates
_END = b"PK\x05\x06"  # the end of central directory record (APPNOTE 4.3.16): 22 bytes, then a comment
_END_SIZE = 22
_ZIP64_LOCATOR = b"PK\x06\x07"  # 20 bytes right before it in a zip64 archive


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
    """The values `encode` stored: arrays, and plain JSON values (maps with string keys) for maps; VectorError
    for anything else, and for files beyond the bounds above, before they are inflated."""
    try:
        with io.BytesIO(data) if isinstance(data, bytes) else open(data, "rb") as f:
            values: dict[str, Any] = _arrays(f)
        as_json = _json(JSON_KEY, values.pop(JSON_KEY)) if JSON_KEY in values else []
        for name in as_json:
            values[name] = _json(name, values[name])
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile, EOFError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise VectorError(f"test data cannot be read: {first[:200]}") from None
    return values


def _arrays(f: BinaryIO) -> dict[str, np.ndarray]:
    """Each member of the .npz in `f`, read as numpy's own `load` would, once proven within the bounds."""
    _check_directory(f)
    with zipfile.ZipFile(f) as z:
        members = z.infolist()
        if len(members) > MAX_MEMBERS:
            raise VectorError(f"{len(members)} members, more than the {MAX_MEMBERS} test data may have")
        # zipfile stops each member at its file_size (and checks its CRC): these are the bytes it inflates to.
        total = sum(m.file_size for m in members)
        if total > MAX_VECTOR_BYTES:
            raise VectorError(f"{total} bytes inflated, more than the {MAX_VECTOR_BYTES} bytes test data may hold")
        arrays = {}
        for member in members:
            if member.flag_bits & 0x1:
                raise VectorError(f"member {member.filename!r} is encrypted; test data is not")
            if member.compress_type not in INFLATE:
                raise VectorError(
                    f"member {member.filename!r} is compressed with zip method {member.compress_type}; "
                    "test data is stored or deflated (0 or 8)"
                )
            with z.open(member) as raw:
                _check_header(member, raw)
            with z.open(member) as raw:
                arrays[member.filename.removesuffix(".npy")] = np.lib.format.read_array(raw, allow_pickle=False)
        return arrays


def _check_directory(f: BinaryIO) -> None:
    """The central directory's size, from the end record zipfile will use (found as zipfile finds it: the
    record ending the file, else the last one within a comment's reach), refused beyond MAX_DIRECTORY_BYTES."""
    size = f.seek(0, os.SEEK_END)
    window = max(0, size - (1 << 16) - _END_SIZE)
    f.seek(window)
    tail = f.read()
    no_comment = tail[-_END_SIZE:].startswith(_END) and tail.endswith(b"\0\0")
    at = len(tail) - _END_SIZE if no_comment else tail.rfind(_END)
    if at < 0 or len(tail) < at + _END_SIZE:
        raise VectorError("not an .npz file (no zip end record)")
    if window + at >= 20:
        f.seek(window + at - 20)
        if f.read(4) == _ZIP64_LOCATOR:  # only an archive of 65,535 members or 4 GiB needs one
            raise VectorError(
                f"a zip64 archive; test data has at most {MAX_MEMBERS} members and {MAX_VECTOR_BYTES} bytes"
            )
    directory = int.from_bytes(tail[at + 12 : at + 16], "little")
    if directory > MAX_DIRECTORY_BYTES:
        raise VectorError(f"its zip directory is {directory} bytes, more than {MAX_MEMBERS} members take")
    f.seek(0)


def _check_header(member: zipfile.ZipInfo, raw: IO[bytes]) -> None:
    """The member's .npy header names a kind `encode` stores, and exactly as many bytes as the member holds:
    numpy allocates the shape the header claims before it reads a byte of data."""
    name = member.filename
    version = np.lib.format.read_magic(raw)  # ValueError when it is no .npy file
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(raw)
    elif version == (2, 0):
        shape, _, dtype = np.lib.format.read_array_header_2_0(raw)
    else:  # 3.0 is for record field names beyond latin-1: records are refused anyway
        raise VectorError(f"member {name!r} is .npy format {version[0]}.{version[1]}; test data is 1.0 or 2.0")
    if dtype.kind not in KINDS:
        raise VectorError(f"member {name!r} holds {dtype}, not numbers, booleans or text")
    claimed, holds = math.prod(shape) * dtype.itemsize, member.file_size - raw.tell()
    if claimed != holds:
        raise VectorError(f"member {name!r}: its header says {claimed} bytes of data; the member holds {holds}")


def _json(name: str, value: Any) -> Any:
    """A member stored as JSON text, bounded in size and nesting (json.loads recurses per level)."""
    try:
        return jsonlimits.loads(str(value), max_bytes=MAX_VECTOR_BYTES)
    except jsonlimits.JSONLimitError as exc:
        raise VectorError(f"{name!r} is not JSON test vectors hold: {exc}") from None


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
