"""The optimised model cached per device under the state folder: keyed, verified before use, rebuilt when damaged."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from agent.config.profile import RuntimeConfig
from agent.device.autotune import model_digest
from agent.device.graphcache import graph_cache
from agent.device.providers import CPU, OPENVINO
from agent.device.session import open_session
from agent.util.hashing import checksum_file
from tests.helpers.models import linear_model, save

pytestmark = pytest.mark.arm64
X = {"x": np.arange(6, dtype=np.float32).reshape(2, 3)}


def model(tmp_path: Path, weight: float = 1.0) -> Path:
    return save(linear_model(np.full((3, 1), weight)), tmp_path / f"m{weight}.onnx")


def entries(state: Path) -> list[Path]:
    return sorted((state / "cache" / "optimized").glob("*.onnx"))


def test_the_first_start_writes_the_optimised_model_and_the_next_loads_it(tmp_path: Path) -> None:
    state, path = tmp_path / "state", model(tmp_path)
    first = open_session(path, RuntimeConfig(), state)
    second = open_session(path, RuntimeConfig(), state)
    assert (first.cache, second.cache) == ("written", "hit")
    (entry,) = entries(state)
    record = json.loads(entry.with_suffix(".json").read_text())
    assert record["key"] == entry.stem and record["checksum"] == checksum_file(entry)
    np.testing.assert_array_equal(first.session.run(None, X)[0], second.session.run(None, X)[0])


def test_a_new_level_model_or_option_set_never_reuses_an_entry(tmp_path: Path) -> None:
    state = tmp_path / "state"
    open_session(model(tmp_path), RuntimeConfig(), state)
    assert open_session(model(tmp_path), RuntimeConfig(optimization="basic"), state).cache == "written"
    assert open_session(model(tmp_path, 2.0), RuntimeConfig(), state).cache == "written"
    assert len(entries(state)) == 3
    args = (state, b"model", "d" * 64, CPU)
    keys = {
        graph_cache(*args, {}, "all", "fp", "1.32.0"),
        graph_cache(*args, {"x": "1"}, "all", "fp", "1.32.0"),
        graph_cache(*args, {}, "all", "other-device", "1.32.0"),
        graph_cache(*args, {}, "all", "fp", "1.33.0"),
    }
    assert len({k.key for k in keys if k is not None}) == 4


def test_nothing_is_cached_without_optimisation_for_compiling_providers_or_when_switched_off(tmp_path: Path) -> None:
    state = tmp_path / "state"
    assert open_session(model(tmp_path), RuntimeConfig(optimization="disabled"), state).cache == "off"
    assert open_session(model(tmp_path), RuntimeConfig(cache=False), state).cache == "off"
    # ... also when the caller has the model's digest already, as the session pool does
    path = model(tmp_path)
    assert open_session(path, RuntimeConfig(cache=False), state, digest=model_digest(path)).cache == "off"
    assert entries(state) == []
    assert graph_cache(state, b"m", "d" * 64, OPENVINO, {}, "all", "fp", "1.32.0") is None
    assert graph_cache(state, b"xxxxORTMrest", "d" * 64, CPU, {}, "all", "fp", "1.32.0") is None  # an .ort model


@pytest.mark.parametrize(
    "damage", ["truncated", "flipped", "record missing", "record garbage", "record a fifo", "not a model"]
)
def test_a_damaged_entry_is_dropped_and_rebuilt_never_used(tmp_path: Path, damage: str) -> None:
    state, path = tmp_path / "state", model(tmp_path)
    good = open_session(path, RuntimeConfig(), state).session.run(None, X)[0]
    (entry,) = entries(state)
    record = entry.with_suffix(".json")
    data = entry.read_bytes()
    if damage == "truncated":
        entry.write_bytes(data[: len(data) // 2])
    elif damage == "flipped":
        entry.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    elif damage == "record missing":
        record.unlink()
    elif damage == "record garbage":
        record.write_text("{not json")
    elif damage == "record a fifo":  # read as it stood, it held up the start for good
        record.unlink()
        os.mkfifo(record)
    else:  # the checksum matches, but the bytes are no model: the load fails and the entry is rebuilt
        entry.write_bytes(b"garbage")
        meta = json.loads(record.read_text())
        meta["checksum"] = checksum_file(entry)
        record.write_text(json.dumps(meta))
    again = open_session(path, RuntimeConfig(), state)
    assert again.cache == "written"
    np.testing.assert_array_equal(again.session.run(None, X)[0], good)
    assert open_session(path, RuntimeConfig(), state).cache == "hit"


def test_only_the_most_recently_used_entries_are_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("agent.device.graphcache.KEPT", 2)
    state = tmp_path / "state"
    first = model(tmp_path, 1.0)
    open_session(first, RuntimeConfig(), state)
    for weight in (2.0, 3.0):
        time.sleep(0.02)  # distinct modification times
        open_session(model(tmp_path, weight), RuntimeConfig(), state)
    assert len(entries(state)) == 2
    assert open_session(first, RuntimeConfig(), state).cache == "written"  # the oldest was pruned
