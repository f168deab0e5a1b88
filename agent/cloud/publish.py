"""Publishing to a registry folder: blobs by sha256, a signed manifest per version, signed channels.

The model is read with the same protobuf reader the device uses (agent.compat), so the manifest states
exactly what the device will check; when the onnx package is installed (the `cloud` extra) the model
is also run through onnx's checker first. Expected outputs of the test vectors come from onnxruntime's
CPU provider and are stored without pickle (agent.models.vectors): a model whose outputs they cannot
hold is refused here, with one line, rather than on every device. Publishing a second file under the same version adds a variant (fp16, int8, or a
lower-opset export for old runtimes); variants are kept best first, which is the order devices try.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Literal

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.cloud.customops import LibraryError, library_entries, prove
from agent.cloud.roots import KeysError, check_signing_key
from agent.cloud.writes import write_signed
from agent.device import compat
from agent.models.manifest import (
    Blob,
    ChannelPointer,
    Manifest,
    ManifestError,
    TensorSpec,
    TestVector,
    Variant,
    file_digest,
    parse_manifest,
)
from agent.models.signing import CHANNEL, MANIFEST, load_private_key
from agent.models.vectors import VectorError, decode, encode
from agent.util.hashing import sha256_bytes
from agent.util.names import NAME_PATTERN, VERSION_PATTERN, UnsafeNameError, check

Precision = Literal["fp32", "fp16", "int8"]

# Default tolerances per precision: wide enough for another provider's kernels (fused ops, TF32 on
# GPUs, OpenVINO's own rounding), narrow enough that a wrong or damaged model fails.
TOLERANCES: dict[Precision, tuple[float, float]] = {"fp32": (1e-3, 1e-3), "fp16": (1e-2, 1e-2), "int8": (5e-2, 5e-2)}
PRECISION_RANK: dict[Precision, int] = {"fp32": 0, "fp16": 1, "int8": 2}
INT8_OPS = {
    "QuantizeLinear",
    "DequantizeLinear",
    "DynamicQuantizeLinear",
    "MatMulInteger",
    "ConvInteger",
    "QLinearConv",
    "QLinearMatMul",
    "com.microsoft:DynamicQuantizeMatMul",
    "com.microsoft:QLinearAdd",
}
NP_TYPES = {
    "float32": np.float32,
    "float16": np.float16,
    "float64": np.float64,
    "int64": np.int64,
    "int32": np.int32,
    "int16": np.int16,
    "int8": np.int8,
    "uint8": np.uint8,
    "uint16": np.uint16,
    "uint32": np.uint32,
    "uint64": np.uint64,
    "bool": np.bool_,
}


class PublishError(Exception):
    """Publishing cannot go on; the message says what to fix."""


def _check_name(value: str, what: str, pattern: str = NAME_PATTERN) -> None:
    """The one name pattern (agent.util.names, matched whole: "m\\n" is no name), as a PublishError."""
    try:
        check(value, what, pattern)
    except UnsafeNameError as exc:
        raise PublishError(str(exc)) from None


@dataclass(frozen=True)
class Published:
    manifest: Manifest
    variant: Variant
    derived: tuple[Variant, ...] = ()
    notes: tuple[str, ...] = ()


def put_blob(root: Path, data: bytes | Path) -> Blob:
    """Store content under blobs/sha256/<hex> (idempotent, written by rename)."""
    if isinstance(data, Path):
        data = data.read_bytes()
    hexdigest = sha256_bytes(data)
    target = root / "blobs" / "sha256" / hexdigest
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{hexdigest}.{uuid.uuid4().hex[:8]}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, target)
    return Blob(digest=f"sha256:{hexdigest}", size=len(data))


def detect_precision(summary: compat.ModelSummary) -> Precision:
    if any(op in INT8_OPS or op.startswith("QLinear") for op in summary.ops):
        return "int8"
    if summary.initializer_types.get("float16", 0) > summary.initializer_types.get("float32", 0):
        return "fp16"
    return "fp32"


def synthesize_inputs(inputs: tuple[compat.TensorInfo, ...], seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs from the signature: random floats in [0, 1), zeros for integers; dynamic dims become 1,
    except the spatial dims of a 4-D input, which become 64 (image models rarely accept 1x1)."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for info in inputs:
        dtype = NP_TYPES.get(info.type)
        if dtype is None or info.shape is None:
            raise PublishError(
                f"cannot synthesise a test input for {info.name!r} ({info.type}); give --test-inputs FILE.npz"
            )
        shape = [
            d if isinstance(d, int) and d > 0 else (64 if len(info.shape) == 4 and i >= 2 else 1)
            for i, d in enumerate(info.shape)
        ]
        if np.issubdtype(dtype, np.floating):
            out[info.name] = rng.random(shape).astype(dtype)
        else:
            out[info.name] = np.zeros(shape, dtype=dtype)
    return out


def run_cpu(model: Path, feeds: dict[str, np.ndarray], library: Path | None = None) -> dict[str, object]:
    """Every output as onnxruntime returns it: arrays, and lists of maps for scikit-learn's ZipMap.
    `library`: the model's custom-op library for this machine."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if library is not None:
        options.register_custom_ops_library(str(library))
    session = ort.InferenceSession(str(model), sess_options=options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


def vector_blobs(
    root: Path, file: Path, feeds: dict[str, np.ndarray], expected: dict[str, object]
) -> tuple[Blob, Blob]:
    """The inputs and expected outputs of a test vector, stored as blobs; PublishError (one line) for
    outputs test vectors cannot hold, and for an output that is NaN everywhere (a broken model, or inputs
    that do not suit it: its vectors would pass a device that outputs nothing but NaN)."""
    for name, value in expected.items():
        if isinstance(value, np.ndarray) and value.dtype.kind == "f" and value.size and np.isnan(value).all():
            raise PublishError(
                f"{file.name}: every value of output {name!r} is NaN on the test inputs; the model is broken, "
                "or the inputs do not suit it (give --test-inputs FILE.npz)"
            )
    try:
        inputs, outputs = encode(feeds), encode(expected)
    except VectorError as exc:
        raise PublishError(
            f"{file.name}: the test vectors cannot be stored: {exc} (give --no-tests to publish it untested)"
        ) from None
    return put_blob(root, inputs), put_blob(root, outputs)


def onnx_check(path: Path) -> None:
    """onnx's own checker, when the cloud extra is installed; the protobuf reader covers the rest."""
    try:
        import onnx
    except ImportError:
        return
    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:  # noqa: BLE001 (onnx raises ValidationError and others)
        raise PublishError(f"{path}: onnx's checker refuses it: {str(exc).splitlines()[0]}") from None


def derive_int8(source: Path, out_dir: Path) -> Path:
    """A dynamically quantised copy (int8 weights) made with onnxruntime's quantisation tools."""
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    target = out_dir / f"{source.stem}.int8.onnx"
    prepared = out_dir / f"{source.stem}.pre.onnx"
    quiet = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # the tools log advice on the root logger
    try:
        # Pre-processing folds Constant nodes into initializers: exporters such as paddle2onnx keep
        # weights in Constants, which quantize_dynamic cannot see ("Expected ... to be an initializer").
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        quantize_dynamic(str(prepared), str(target), weight_type=QuantType.QInt8)
    except Exception as exc:  # noqa: BLE001 (the quantisation tools raise whatever onnx and numpy raise)
        raise PublishError(
            f"--derive int8 failed: {exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from None
    finally:
        logging.getLogger().setLevel(quiet)
    _drop_unused_domains(target)
    return target


def _drop_unused_domains(path: Path) -> None:
    """Remove opset imports no node uses: the tools add a dozen (training, aten, ...), and a device refuses
    a domain it does not know even when nothing uses it."""
    import onnx

    model = onnx.load(str(path))
    used = {n.domain for n in model.graph.node} | {"", "ai.onnx"}
    for f in model.functions:
        used |= {f.domain} | {n.domain for n in f.node}
    keep = [o for o in model.opset_import if o.domain in used]
    if len(keep) != len(model.opset_import):
        del model.opset_import[:]
        model.opset_import.extend(keep)
        onnx.save(model, str(path))


def _existing(root: Path, model: str, version: str) -> Manifest | None:
    path = root / "models" / model / version / "manifest.json"
    if not path.exists():
        return None
    try:
        return parse_manifest(path.read_bytes(), str(path))
    except ManifestError as exc:
        raise PublishError(f"the manifest already there is unreadable: {exc}") from None


def _variant(
    root: Path,
    file: Path,
    variant_id: str | None,
    taken: set[str],
    providers: tuple[str, ...],
    architectures: tuple[str, ...],
    precision: Precision | None,
) -> tuple[Variant, compat.ModelSummary]:
    try:
        summary = compat.summarize(file)
    except compat.ModelFormatError as exc:
        raise PublishError(f"{file}: {exc}") from None
    onnx_check(file)
    precision = precision or detect_precision(summary)
    header = summary.header
    if variant_id is None:
        variant_id = precision if precision not in taken else f"{precision}-op{header.opsets.get(compat.AI_ONNX, 0)}"
    _check_name(variant_id, "variant id")
    blob = put_blob(root, file)
    variant = Variant(
        id=variant_id,
        blob=blob,
        format="onnx",
        ir_version=header.ir_version,
        opsets=dict(sorted(header.opsets.items())),
        inputs=tuple(TensorSpec(name=i.name, type=i.type, shape=i.shape) for i in summary.inputs),
        outputs=tuple(TensorSpec(name=o.name, type=o.type, shape=o.shape) for o in summary.outputs),
        precision=precision,
        providers=providers,
        architectures=architectures,
        min_runtime=compat.min_runtime(header.ir_version, header.opsets),
    )
    return variant, summary


def _rank(v: Variant) -> tuple[int, int, int]:
    return PRECISION_RANK[v.precision], -v.opsets.get(compat.AI_ONNX, 0), -v.ir_version


def publish(
    root: Path,
    model: str,
    version: str,
    file: Path,
    key: Path,
    *,
    variant_id: str | None = None,
    channel: str | None = None,
    channel_key: Path | None = None,
    test_inputs: Path | None = None,
    labels: Path | None = None,
    derive: tuple[str, ...] = (),
    providers: tuple[str, ...] = (),
    architectures: tuple[str, ...] = (),
    precision: Precision | None = None,
    accuracy_loss: float | None = None,
    expires_days: float = 365.0,
    rtol: float | None = None,
    atol: float | None = None,
    no_tests: bool = False,
    custom_ops: tuple[tuple[str | None, Path], ...] = (),
    custom_domains: dict[str, int] | None = None,
    custom_ops_runtime: str | None = None,
    now: datetime | None = None,
) -> Published:
    """Add `file` as a variant of model/version (creating the version if new), sign, move the channel.
    `key` signs the manifest, `channel_key` (default: `key`) the channel pointer; in a registry with signing
    roles each must be a key its root trusts for that role. `custom_ops`: (platform or None, library) pairs
    stored as signed blobs beside the variant (agent.cloud.customops); the one for this machine must load
    the model and computes its test vectors."""
    root, file = Path(root), Path(file)
    _check_name(model, "model")
    _check_name(version, "version", VERSION_PATTERN)
    if channel is not None:
        _check_name(channel, "channel")
    if not file.is_file():
        raise PublishError(f"{file}: no such file")
    if accuracy_loss is not None and not 0 <= accuracy_loss <= 1:
        raise PublishError(f"--accuracy-loss {accuracy_loss}: expected a fraction from 0 to 1 (0.004 for 0.4%)")
    if file.suffix == ".ort":
        raise PublishError(f"{file}: publishing .ort files is not supported yet; publish the .onnx file")
    private = load_private_key(key)
    channel_private = load_private_key(channel_key) if channel_key is not None else private
    _check_role(root, private, "manifests")
    if channel:
        _check_role(root, channel_private, "channels")
    now = now or datetime.now(timezone.utc).replace(microsecond=0)
    old = _existing(root, model, version)
    variants = {v.id: v for v in old.variants} if old else {}
    tests = {t.name: t for t in old.tests} if old else {}

    feeds: dict[str, np.ndarray] | None = None
    try:
        if test_inputs is not None:
            feeds = decode(test_inputs)
        elif tests:
            feeds = decode(root / "blobs" / "sha256" / next(iter(tests.values())).inputs.hex)
    except VectorError as exc:
        raise PublishError(f"{test_inputs or 'the test inputs already published'}: {exc}") from None

    notes: list[str] = []
    made: list[Variant] = []
    try:
        libraries, local_library = (
            library_entries(lambda path: put_blob(root, path), custom_ops, file, custom_domains, custom_ops_runtime)
            if custom_ops
            else ((), None)
        )
        if local_library is not None:
            prove(file, local_library)
    except LibraryError as exc:
        raise PublishError(str(exc)) from None
    with tempfile.TemporaryDirectory() as tmp:
        files: list[tuple[Path, str | None, Precision | None]] = [(file, variant_id, precision)]
        for kind in derive:
            if kind != "int8":
                raise PublishError(f"--derive {kind}: only int8 can be derived")
            files.append((derive_int8(file, Path(tmp)), None, "int8"))
        reference: dict[str, object] | None = None
        for path, vid, prec in files:
            if vid is None:  # the same file published again re-signs its variant instead of adding a copy
                digest = file_digest(path)
                vid = next((v.id for v in variants.values() if v.blob.digest == digest), None)
            taken = set(variants) - ({vid} if vid else set())
            variant, summary = _variant(root, path, vid, taken, providers, architectures, prec)
            if libraries:  # entries checked one per platform by library_entries
                variant = variant.model_copy(update={"custom_ops": libraries})
            if accuracy_loss is not None and path == file:  # the publisher's own measurement of this file
                variant = variant.model_copy(update={"accuracy_loss": accuracy_loss})
            for name in [n for n, t in tests.items() if t.variant == variant.id]:
                del tests[name]
            variants[variant.id] = variant
            made.append(variant)
            if no_tests:
                # A model the cloud's onnxruntime cannot run (custom ops): devices activate it untested.
                notes.append(f"variant {variant.id}: published without test vectors")
                continue
            if feeds is None:
                feeds = synthesize_inputs(summary.inputs)
            try:
                expected = run_cpu(path, feeds, local_library)
            except Exception as exc:  # noqa: BLE001 (onnxruntime's errors derive from Exception only)
                raise PublishError(
                    f"{path.name}: cannot compute test vectors with onnxruntime "
                    f"({str(exc).splitlines()[0][:200]}); give --test-inputs FILE.npz, or --no-tests for custom ops"
                ) from None
            if reference is None:
                reference = expected
            else:
                diff = _largest_difference(expected, reference)
                if diff is not None:
                    notes.append(f"variant {variant.id}: outputs differ from {files[0][0].name} by up to {diff:.3g}")
            default_rtol, default_atol = TOLERANCES[variant.precision]
            inputs_blob, expected_blob = vector_blobs(root, path, feeds, expected)
            tests[f"{variant.id}-0"] = TestVector(
                name=f"{variant.id}-0",
                variant=variant.id,
                inputs=inputs_blob,
                expected=expected_blob,
                rtol=rtol if rtol is not None else default_rtol,
                atol=atol if atol is not None else default_atol,
            )

    ordered = tuple(sorted(variants.values(), key=_rank))
    labels_blob = put_blob(root, labels) if labels is not None else (old.labels if old else None)
    metadata = dict(old.metadata) if old else {}
    metadata.update({k: v[:1024] for k, v in list(compat.read_header(file).metadata.items())[:32]})
    manifest = Manifest(
        model=model,
        version=version,
        created=old.created if old else now,
        expires=now + timedelta(days=expires_days),
        variants=ordered,
        tests=tuple(sorted(tests.values(), key=lambda t: t.name)),
        labels=labels_blob,
        metadata=metadata,
    )
    write_signed(root / "models" / model / version / "manifest.json", manifest.to_bytes(), private, MANIFEST)
    if channel:
        move_channel(root, model, channel, version, channel_private, expires_days=expires_days, now=now)
    return Published(manifest, made[0], tuple(made[1:]), tuple(notes))


def _check_role(root: Path, private: Ed25519PrivateKey, role: Literal["manifests", "channels"]) -> None:
    try:
        check_signing_key(root, private, role)
    except KeysError as exc:
        raise PublishError(str(exc)) from None


def _largest_difference(expected: dict[str, object], reference: dict[str, object]) -> float | None:
    """How far a derived variant's numeric outputs are from the first variant's, where shapes agree."""
    diffs = [
        float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))
        for k, a in expected.items()
        if isinstance(a, np.ndarray)
        and isinstance(b := reference.get(k), np.ndarray)
        and a.shape == b.shape
        and a.size
        and a.dtype.kind in "biuf"
        and b.dtype.kind in "biuf"
    ]
    return max(diffs) if diffs else None


def move_channel(
    root: Path,
    model: str,
    channel: str,
    version: str,
    private: Ed25519PrivateKey,
    expires_days: float = 365.0,
    now: datetime | None = None,
) -> ChannelPointer:
    if not (root / "models" / model / version / "manifest.json").exists():
        raise PublishError(f"{model} {version} is not published in {root}")
    now = now or datetime.now(timezone.utc).replace(microsecond=0)
    pointer = ChannelPointer(
        model=model, channel=channel, version=version, updated=now, expires=now + timedelta(days=expires_days)
    )
    write_signed(root / "channels" / model / f"{channel}.json", pointer.to_bytes(), private, CHANNEL)
    return pointer
