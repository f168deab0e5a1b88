"""Real models through publish -> HTTP -> pull: the PP-OCR text detector and Silero VAD's three exports."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from agent.config.profile import RuntimeConfig
from agent.device.compat import caps_for
from agent.device.session import open_session
from agent.models.store import Store
from agent.transport.events import Event
from tests.helpers.registry import Registry

CAPS = caps_for("1.32.0")


@pytest.fixture
def vad_inputs(tmp_path: Path) -> Path:
    path = tmp_path / "vad-inputs.npz"
    rng = np.random.default_rng(1)
    np.savez(
        path,
        input=(rng.standard_normal((1, 576)) * 0.1).astype(np.float32),
        state=np.zeros((2, 1, 128), np.float32),
        sr=np.array(16000, dtype=np.int64),
    )
    return path


def test_ppocr_detector_round_trips_and_runs(
    registry: Registry, tmp_path: Path, sample_model: Callable[[str], Path]
) -> None:
    source = sample_model("ppocr-det")
    published = registry.publish("text-detector", "1.4.0", source)
    v = published.manifest.variants[0]
    assert (v.id, v.ir_version, v.opsets, v.min_runtime, v.precision) == ("fp32", 8, {"ai.onnx": 12}, "1.10", "fp32")
    assert v.inputs[0].name == "x" and v.inputs[0].shape[1] == 3 and v.blob.size == source.stat().st_size
    events: list[Event] = []
    result = registry.client(tmp_path / "state", events, caps=CAPS).check_and_pull("text-detector")
    assert (result.status, result.version, result.variant) == ("activated", "1.4.0", "fp32")
    active = Store(tmp_path / "state").active("text-detector")
    assert active is not None and active.path.read_bytes() == source.read_bytes()
    opened = open_session(active.path, RuntimeConfig(), tmp_path / "state")
    (out,) = opened.session.run(None, {"x": np.zeros((1, 3, 64, 96), np.float32)})
    assert out.shape == (1, 1, 64, 96)


def test_ppocr_int8_variant_is_derived_and_pulled_when_it_is_the_only_fit(
    registry: Registry, tmp_path: Path, sample_model: Callable[[str], Path]
) -> None:
    pytest.importorskip("onnx")
    published = registry.publish("text-detector", "1.4.0", sample_model("ppocr-det"), derive=("int8",))
    fp32, int8 = published.manifest.variants
    assert (fp32.id, int8.id, int8.precision) == ("fp32", "int8", "int8")
    assert int8.blob.size < fp32.blob.size / 2
    assert set(int8.opsets) <= {"ai.onnx", "com.microsoft"}  # no unused domains a device would refuse
    # A device that only takes the int8 variant (here: fp32 restricted to a provider it lacks).
    registry.resign(
        "text-detector", "1.4.0", lambda doc: doc["variants"][0].update(providers=["TensorrtExecutionProvider"])
    )
    result = registry.client(tmp_path / "state", caps=CAPS).check_and_pull("text-detector")
    assert (result.status, result.variant) == ("activated", "int8")


@pytest.mark.parametrize("cap,want", [(None, "op18"), (17, "op16"), (15, "op15")])
def test_silero_variant_follows_the_runtime(
    registry: Registry,
    tmp_path: Path,
    sample_model: Callable[[str], Path],
    vad_inputs: Path,
    cap: int | None,
    want: str,
) -> None:
    for name, vid in (("silero-vad-op18", "op18"), ("silero-vad", "op16"), ("silero-vad-op15", "op15")):
        registry.publish("vad", "6.2.3", sample_model(name), variant_id=vid, test_inputs=vad_inputs)
    caps = CAPS if cap is None else CAPS.with_limits(ai_onnx=cap)
    result = registry.client(tmp_path / "state", caps=caps).check_and_pull("vad")
    assert (result.status, result.variant) == ("activated", want)
    active = Store(tmp_path / "state").active("vad")
    assert active is not None and active.variant.id == want
    file = {"op18": "silero-vad-op18", "op16": "silero-vad", "op15": "silero-vad-op15"}[want]
    assert active.path.read_bytes() == sample_model(file).read_bytes()


def test_custom_op_model_needs_no_tests_and_a_registered_library(registry: Registry, tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    from dataclasses import replace

    from agent.cloud.publish import PublishError
    from tests.helpers.models import custom_domain_model, save

    path = save(custom_domain_model(), tmp_path / "custom.onnx")
    with pytest.raises(PublishError, match="cannot compute test vectors with onnxruntime .*--no-tests for custom ops"):
        registry.publish("m", "1.0.0", path)
    published = registry.publish("m", "1.0.0", path, no_tests=True)
    assert published.manifest.tests == () and published.notes == ("variant fp32: published without test vectors",)
    plain = registry.client(tmp_path / "a", caps=CAPS).check_and_pull("m")
    assert plain.status == "refused" and "custom domain 'com.example.vision'" in (plain.reason or "")
    # A device that says it has the library gets past the manifest check; loading still proves it.
    claimed = replace(CAPS, custom_domains=frozenset({"com.example.vision"}))
    result = registry.client(tmp_path / "b", caps=claimed).check_and_pull("m")
    assert result.status == "refused" and (result.reason or "").startswith("variant fp32 does not load here:")
    assert Store(tmp_path / "b").active("m") is None
