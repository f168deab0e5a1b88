"""Test vectors as files: every value a device can run is stored without pickle, and compared strictly."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest

from agent.models.vectors import JSON_KEY, VectorError, decode, encode, mismatch

pytestmark = pytest.mark.arm64


def round_trip(values: dict[str, object]) -> dict[str, object]:
    data = encode(values)
    with zipfile.ZipFile(io.BytesIO(data)) as z:  # plain .npy members only: numpy loads them without pickle
        for name in z.namelist():
            header = np.lib.format.read_magic(z.open(name))
            assert header[0] == 1, name
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        assert all(z[k].dtype.kind != "O" for k in z.files)
    return decode(data)


def test_tensors_strings_maps_and_sequences_of_maps_round_trip_without_pickle() -> None:
    zipmap = [{0: np.float32(0.25), 1: np.float32(0.75)}, {0: np.float32(1.0), 1: np.float32(0.0)}]
    values: dict[str, object] = {
        "y": np.arange(6, dtype=np.float32).reshape(2, 3),
        "label": np.array([1, 0], np.int64),
        "mask": np.array([True, False]),
        "name": np.array(["cat", "chien"], dtype=object),  # what onnxruntime returns for a string tensor
        "probabilities": zipmap,
        "scores": {"a": 0.5, "b": 0.25},
        "file": np.zeros(1, np.float32),  # a name np.savez would take for its own argument
    }
    got = round_trip(values)
    assert round_trip({"p": np.array(zipmap, dtype=object)})["p"] == got["probabilities"]
    assert set(got) == set(values)
    assert got["name"].tolist() == ["cat", "chien"] and got["name"].dtype.kind == "U"
    assert got["probabilities"] == [{"0": 0.25, "1": 0.75}, {"0": 1.0, "1": 0.0}]
    assert got["y"].dtype == np.float32 and got["y"].shape == (2, 3)
    for name, value in values.items():
        assert mismatch(name, value, got[name], rtol=0, atol=0) is None, name


def test_values_that_cannot_be_stored_are_refused_in_one_line() -> None:
    with pytest.raises(VectorError) as info:
        encode({"seq": [np.zeros(2, np.float32), np.ones(3, np.float32)]})
    assert str(info.value) == (
        "output 'seq' is a sequence of tensors; test vectors hold tensors, maps and sequences of maps"
    )
    with pytest.raises(VectorError, match="output 'o' is an object array of NoneType, dict;"):
        encode({"o": np.array([{"a": 1}, None], dtype=object)})
    with pytest.raises(VectorError, match=f"{JSON_KEY!r} is a reserved name"):
        encode({JSON_KEY: np.zeros(1)})


def test_damaged_or_pickled_data_is_an_error_not_a_crash() -> None:
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    pickled = io.BytesIO()
    with zipfile.ZipFile(pickled, "w") as z:
        z.writestr("y.npy", buf.getvalue())
    with pytest.raises(VectorError, match="cannot be read"):
        decode(pickled.getvalue())
    with pytest.raises(VectorError, match="cannot be read"):
        decode(b"not a zip file")


def test_nan_fails_unless_nan_is_expected_at_that_position() -> None:
    nan = np.float32("nan")
    expected = np.array([[1.0, nan, 3.0]], np.float32)
    assert mismatch("y", np.array([[1.0, nan, 3.0]], np.float32), expected, rtol=1e-3, atol=1e-3) is None
    assert mismatch("y", np.full((1, 3), nan, np.float32), expected, rtol=1e-3, atol=1e-3) == (
        "output 'y' is NaN at 2 of 3 positions where a number is expected"
    )
    assert mismatch("y", np.array([[1.0, 2.0, 3.0]], np.float32), expected, rtol=1e-3, atol=1e-3) == (
        "output 'y' is a number at 1 of 3 positions where NaN is expected"
    )
    assert mismatch("y", np.array([[1.0, nan, 3.5]], np.float32), expected, rtol=1e-3, atol=1e-3) == (
        "output 'y' differs by up to 0.5 (atol 0.001, rtol 0.001)"
    )
    inf = np.array([np.inf], np.float32)
    assert mismatch("y", inf, inf, rtol=0, atol=0) is None
    assert mismatch("y", inf, np.array([1.0], np.float32), rtol=0, atol=0) is not None
    assert mismatch("y", [{"a": float("nan")}], [{"a": 1.0}], rtol=0, atol=0) == (
        "output 'y' differs from what is expected at [0]['a']: nan, expected 1.0"
    )


def test_shapes_kinds_and_maps_must_agree() -> None:
    assert mismatch("y", np.zeros((1, 2)), np.zeros((2, 1)), rtol=0, atol=0) == (
        "output 'y' has shape [1, 2], expected [2, 1]"
    )
    assert mismatch("y", [{0: 0.5}], np.zeros(1), rtol=0, atol=0) == "output 'y' is a list, expected a tensor"
    assert mismatch("y", [{0: 0.5}], [{"1": 0.5}], rtol=0, atol=0) == (
        "output 'y' differs from what is expected at [0]: keys ['0'], expected ['1']"
    )
    assert mismatch("y", [{0: 0.5}], [{"0": 0.5004}], rtol=0, atol=1e-3) is None
    assert mismatch("s", np.array(["a"], dtype=object), np.array(["b"]), rtol=0, atol=0) == (
        "output 's' differs at 1 of 1 positions"
    )
