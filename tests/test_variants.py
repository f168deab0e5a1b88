"""Variant preference follows the provider that will run it: fp16 first on a GPU provider, int8 where the
provider has int8 kernels and the manifest's accuracy figure allows it, with the reason in the events."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from agent.device import hardware
from agent.models.manifest import Blob, Manifest, Variant, parse_manifest
from agent.models.variants import rank_variants
from agent.transport.events import Event
from tests.helpers.registry import Registry

DIGEST = "sha256:" + "0" * 64


def variant(precision: str, accuracy_loss: float | None = None) -> Variant:
    return Variant(
        id=precision,
        blob=Blob(digest=DIGEST, size=1),
        ir_version=8,
        opsets={"ai.onnx": 13},
        precision=precision,  # type: ignore[arg-type]
        accuracy_loss=accuracy_loss,
    )


def manifest(int8_loss: float | None) -> Manifest:
    now = datetime.now(timezone.utc)
    # The publisher's order, as `registry publish` writes it: fp32, fp16, int8.
    return Manifest(
        schema=1,
        model="m",
        version="1.0.0",
        created=now,
        expires=now + timedelta(days=1),
        variants=(variant("fp32"), variant("fp16"), variant("int8", int8_loss)),
    )


def order(provider: str, int8_loss: float | None, **kwargs: Any) -> list[str]:
    return [p.variant.id for p in rank_variants(manifest(int8_loss).variants, provider, **kwargs)]


@pytest.mark.parametrize(
    ("provider", "loss", "flags", "expected"),
    [
        ("CUDAExecutionProvider", 0.002, (), ["fp16", "fp32", "int8"]),  # CUDA: fast fp16, no int8 kernels
        ("TensorrtExecutionProvider", 0.002, (), ["int8", "fp16", "fp32"]),  # both
        ("TensorrtExecutionProvider", 0.2, (), ["fp16", "fp32", "int8"]),  # int8 loses too much
        ("CPUExecutionProvider", 0.002, (), ["int8", "fp32", "fp16"]),  # int8 kernels, fp16 emulated
        ("CPUExecutionProvider", None, (), ["fp32", "fp16", "int8"]),  # no accuracy figure: today's order
        ("CPUExecutionProvider", None, ("avx512_fp16",), ["fp16", "fp32", "int8"]),  # native fp16 on this CPU
        ("OpenVINOExecutionProvider", 0.01, (), ["int8", "fp32", "fp16"]),  # exactly the limit is within it
    ],
)
def test_the_order_follows_the_provider(
    provider: str, loss: float | None, flags: tuple[str, ...], expected: list[str]
) -> None:
    assert order(provider, loss, cpu_flags=flags) == expected


def test_the_limit_is_the_profiles() -> None:
    assert order("CPUExecutionProvider", 0.03)[0] == "fp32"
    assert order("CPUExecutionProvider", 0.03, max_accuracy_loss=0.05)[0] == "int8"


def test_each_place_has_its_reason() -> None:
    ranked = rank_variants(manifest(0.3).variants, "CPUExecutionProvider")
    reasons = {p.variant.id: p.reason for p in ranked}
    assert reasons["fp32"] == "fp32 first on CPU"
    assert reasons["fp16"] == "fp32 before fp16: CPU has no faster fp16"
    assert reasons["int8"] == "int8 last: it loses 30.00% accuracy, over registry.max_accuracy_loss 1.00%"
    cuda = rank_variants(manifest(0.001).variants, "CUDAExecutionProvider")
    assert (cuda[0].variant.id, cuda[0].reason) == ("fp16", "fp16 before fp32: CUDA runs fp16 faster")
    assert cuda[2].reason == "int8 last: CUDA has no int8 kernels"


def test_the_manifest_refuses_an_accuracy_loss_out_of_range() -> None:
    with pytest.raises(ValueError, match="accuracy_loss"):
        variant("int8", 1.5)


def _publish_three(registry: Registry, int8_loss: float) -> None:
    for precision in ("fp32", "fp16", "int8"):
        registry.publish(
            "m", "1.0.0", registry.tiny(precision, doc=precision.encode()), variant_id=precision, precision=precision
        )

    def add_loss(doc: dict[str, Any]) -> None:
        for v in doc["variants"]:
            if v["id"] == "int8":
                v["accuracy_loss"] = int8_loss

    registry.resign("m", "1.0.0", add_loss)


@pytest.mark.parametrize(
    ("provider", "loss", "flags", "chosen", "reason"),
    [
        ("CUDAExecutionProvider", 0.004, (), "fp16", "fp16 before fp32: CUDA runs fp16 faster"),
        ("CPUExecutionProvider", 0.004, (), "int8", "int8 first: CPU has int8 kernels and the variant loses 0.40%"),
        ("CPUExecutionProvider", 0.04, ("avx2",), "fp32", "fp32 first on CPU"),
        ("CPUExecutionProvider", 0.04, ("avx512_fp16",), "fp16", "fp16 before fp32: CPU runs fp16 faster"),
    ],
)
def test_a_pull_takes_the_preferred_variant_and_says_why(
    registry: Registry,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    provider: str,
    loss: float,
    flags: tuple[str, ...],
    chosen: str,
    reason: str,
) -> None:
    """The CPU's flags are the device's, not this host's (one with AVX512-FP16 rightly preferred fp16)."""
    real = hardware.probe()
    monkeypatch.setattr(hardware, "probe", lambda *_, **__: replace(real, cpu=replace(real.cpu, flags=flags)))
    _publish_three(registry, loss)
    events: list[Event] = []
    client = registry.client(tmp_path / "state", events, providers=("CPUExecutionProvider", provider))
    client.target_provider = provider  # the provider the ranking would pick on such a device
    result = client.check_and_pull("m")
    assert (result.status, result.variant) == ("activated", chosen)
    by_type = {e.type: e.fields for e in events}
    assert reason in by_type["model.downloading"]["preference"]
    assert by_type["model.activated"]["preference"] == by_type["model.downloading"]["preference"]
    assert "preference" not in by_type["model.verifying"]
    # Only the preferred variant's blob was fetched.
    published = parse_manifest(registry.manifest_path("m", "1.0.0").read_bytes()).variants
    assert [v.id for v in published] == ["fp32", "fp16", "int8"]  # the publisher's order is not the device's
    blobs = {v.id: v.blob.hex for v in published}
    fetched = {r["path"].rsplit("/", 1)[-1] for r in registry.blob_requests()}
    assert blobs[chosen] in fetched and not fetched & {h for i, h in blobs.items() if i != chosen}


def test_registry_publish_records_the_accuracy_loss(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from agent.cli import main
    from tests.helpers.models import save, unary_model

    model = save(unary_model("Relu"), tmp_path / "m.onnx")
    assert main(["registry", "keygen", "--out", str(tmp_path / "keys")]) == 0
    common = ["registry", "publish", "--root", str(tmp_path / "reg"), "--model", "m", "--version", "1.0.0"]
    common += ["--file", str(model), "--key", str(tmp_path / "keys" / "registry.key"), "--precision", "int8"]
    assert main([*common, "--accuracy-loss", "0.004"]) == 0
    doc = parse_manifest((tmp_path / "reg" / "models" / "m" / "1.0.0" / "manifest.json").read_bytes())
    assert [(v.id, v.accuracy_loss) for v in doc.variants] == [("int8", 0.004)]
    assert main([*common, "--accuracy-loss", "4"]) == 2
    assert "--accuracy-loss 4.0: expected a fraction from 0 to 1" in capsys.readouterr().err
