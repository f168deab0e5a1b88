"""What a runtime can load and what a model needs, read without the onnx package."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.device import compat
from agent.device.compat import (
    AI_ONNX,
    AI_ONNX_ML,
    ModelFormatError,
    caps_for,
    read_header,
    refusal,
    summarize,
)
from agent.device.onnxproto import identity_model

try:
    HAVE_ONNX = importlib.util.find_spec("onnx") is not None
except ImportError:
    HAVE_ONNX = False


@pytest.mark.arm64
@pytest.mark.parametrize(
    "ir,opsets",
    [
        (3, {AI_ONNX: 7}),
        (8, {AI_ONNX: 13}),
        (10, {AI_ONNX: 18, AI_ONNX_ML: 3}),
        (14, {AI_ONNX: 29}),  # newer than any runtime: the reader must not care
        (8, {AI_ONNX: 13, "com.example.vision": 1}),
    ],
)
def test_header_reader_reads_ir_and_opsets(ir: int, opsets: dict[str, int]) -> None:
    header = read_header(identity_model(ir, opsets))
    assert header.ir_version == ir and header.opsets == opsets and header.producer == "edge-agent"


@pytest.mark.arm64
def test_header_reader_skips_the_graph_in_a_file(tmp_path: Path) -> None:
    path = tmp_path / "big.onnx"
    path.write_bytes(identity_model(9, {AI_ONNX: 17}, doc=b"x" * 5_000_000))
    header = read_header(path)
    assert (header.ir_version, header.opsets) == (9, {AI_ONNX: 17})


@pytest.mark.arm64
@pytest.mark.parametrize(
    "data,message",
    [
        (b"", "no IR version"),
        (b"\x08\x08", "no opset imports"),
        (b"hello, this is not a model at all", "not an ONNX model"),
    ],
)
def test_header_reader_refuses_what_is_not_a_model(data: bytes, message: str) -> None:
    with pytest.raises(ModelFormatError, match=message):
        read_header(data)


@pytest.mark.arm64
def test_header_reader_notices_a_truncated_file() -> None:
    data = identity_model(8, {AI_ONNX: 13}, doc=b"d" * 1000)
    with pytest.raises(ModelFormatError, match="truncated|runs past"):
        read_header(data[:200])


@pytest.mark.arm64
@pytest.mark.parametrize(
    "release,ai_onnx,ir,ml",
    [
        ("1.10.0", 15, 8, 2),
        ("1.11.1", 16, 8, 2),
        ("1.13.1", 17, 8, 3),
        ("1.16.3", 19, 9, 3),
        ("1.20.1", 21, 10, 5),
        ("1.23.2", 23, 11, 5),
        ("1.31.1", 26, 13, 5),
        ("1.32.0", 28, 14, 5),
        ("1.40.0", 28, 14, 5),
    ],
)
def test_runtime_table(release: str, ai_onnx: int, ir: int, ml: int) -> None:
    caps = caps_for(release)
    assert (caps.opsets[AI_ONNX], caps.ir_version, caps.opsets[AI_ONNX_ML]) == (ai_onnx, ir, ml)


@pytest.mark.arm64
def test_installed_runtime_is_verified_by_loading_probe_models() -> None:
    import onnxruntime as ort

    table = caps_for(ort.__version__)
    proven = compat.verify_caps(table)
    assert proven.verified
    # The table was measured; the probe must agree with it on the installed release.
    assert (proven.opsets[AI_ONNX], proven.ir_version, proven.opsets[AI_ONNX_ML]) == (
        table.opsets[AI_ONNX],
        table.ir_version,
        table.opsets[AI_ONNX_ML],
    )


@pytest.mark.arm64
def test_probe_corrects_a_wrong_table_row() -> None:
    import onnxruntime as ort

    truth = compat.verify_caps(caps_for(ort.__version__))
    wrong = caps_for(ort.__version__).with_limits(ai_onnx=truth.opsets[AI_ONNX] - 3, ir_version=truth.ir_version + 2)
    fixed = compat.verify_caps(wrong)
    assert fixed.opsets[AI_ONNX] == truth.opsets[AI_ONNX] and fixed.ir_version == truth.ir_version


@pytest.mark.arm64
def test_refusal_reasons() -> None:
    caps = caps_for("1.31.1", arch="x86_64")
    assert refusal(caps, "fp32", 8, {AI_ONNX: 26}) is None
    assert refusal(caps, "fp32", 8, {AI_ONNX: 27}) == "variant fp32 needs ai.onnx opset 27; this runtime loads up to 26"
    assert refusal(caps, "fp32", 14, {AI_ONNX: 13}) == "variant fp32 needs IR version 14; this runtime loads up to 13"
    assert (
        refusal(caps, "m", 8, {AI_ONNX: 13, AI_ONNX_ML: 6})
        == "variant m needs ai.onnx.ml opset 6; this runtime loads up to 5"
    )
    assert refusal(caps, "x", 8, {AI_ONNX: 13, "com.example.vision": 1}) == (
        "variant x needs custom domain 'com.example.vision' (opset 1); no custom-op library for it is registered here"
    )
    assert refusal(caps, "x", 8, {AI_ONNX: 13, "com.microsoft": 1}) is None
    assert (
        refusal(caps, "arm", 8, {AI_ONNX: 13}, architectures=("aarch64",))
        == "variant arm is built for aarch64; this device is x86_64"
    )
    assert refusal(caps, "any", 8, {AI_ONNX: 13}, architectures=("amd64",)) is None
    assert (
        refusal(caps, "new", 8, {AI_ONNX: 13}, min_runtime_version="1.40")
        == "variant new needs onnxruntime 1.40 or newer; this is 1.31.1"
    )
    registered = caps_for("1.31.1", custom_domains=frozenset({"com.example.vision"}))
    assert refusal(registered, "x", 8, {AI_ONNX: 13, "com.example.vision": 1}) is None


@pytest.mark.arm64
def test_min_runtime() -> None:
    assert compat.min_runtime(8, {AI_ONNX: 12}) == "1.10"
    assert compat.min_runtime(8, {AI_ONNX: 16}) == "1.11"
    assert compat.min_runtime(10, {AI_ONNX: 18}) == "1.18"
    assert compat.min_runtime(8, {AI_ONNX: 13, AI_ONNX_ML: 4}) == "1.17"
    assert compat.min_runtime(15, {AI_ONNX: 13}) is None


@pytest.mark.arm64
def test_summary_of_a_identity_model() -> None:
    s = summarize(identity_model(8, {AI_ONNX: 13}, dims=(1, 3, 8, 8)))
    assert [(i.name, i.type, i.shape) for i in s.inputs] == [("x", "float32", (1, 3, 8, 8))]
    assert [o.name for o in s.outputs] == ["y"] and dict(s.ops) == {"Identity": 1}


@pytest.mark.parametrize(
    "name,ir,opset",
    [("ppocr-det", 8, 12), ("silero-vad", 8, 16), ("silero-vad-op15", 8, 15), ("silero-vad-op18", 10, 18)],
)
def test_sample_models_read_by_hand(sample_model: Callable[[str], Path], name: str, ir: int, opset: int) -> None:
    path = sample_model(name)
    header = read_header(path)
    assert header.ir_version == ir and header.opsets[AI_ONNX] == opset
    s = summarize(path)
    if name.startswith("silero"):
        assert {i.name for i in s.inputs} == {"input", "state", "sr"} and {o.name for o in s.outputs} == {
            "output",
            "stateN",
        }
        assert {i.name: i.type for i in s.inputs}["sr"] == "int64"
    else:
        assert [i.name for i in s.inputs] == ["x"] and s.inputs[0].shape[1] == 3 and s.ops["Conv"] > 10
    if HAVE_ONNX:
        import onnx

        m = onnx.load(str(path))
        assert m.ir_version == header.ir_version
        assert {(o.domain or AI_ONNX): o.version for o in m.opset_import} == header.opsets
        inits = {t.name for t in m.graph.initializer}
        assert [i.name for i in m.graph.input if i.name not in inits] == [i.name for i in s.inputs]
        assert [o.name for o in m.graph.output] == [o.name for o in s.outputs]
        top = {n.op_type for n in m.graph.node}
        assert top <= set(s.ops)


def test_tiny_models_from_the_onnx_helper_agree(tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    from tests.helpers.models import custom_domain_model, save, unary_model

    for model, want in (
        (unary_model(opset=27, ir_version=14), (14, {AI_ONNX: 27})),
        (custom_domain_model(), (8, {AI_ONNX: 13, "com.example.vision": 1})),
        (unary_model(opset=13, extra_opsets={AI_ONNX_ML: 3}), (8, {AI_ONNX: 13, AI_ONNX_ML: 3})),
    ):
        header = read_header(save(model, tmp_path / "m.onnx"))
        assert (header.ir_version, header.opsets) == want
