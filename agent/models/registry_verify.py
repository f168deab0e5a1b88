"""What a pull downloaded, and the proofs it passes before the store installs it: the file's own header
against the signed manifest, and the manifest's test vectors run on this device's provider.

Split from agent.models.registry (the pull's steps): the download happens without the store's lock,
the proofs and the install under it. A version
that fails here is refused with one line; one that does not load or whose vectors fail is held
(`RefusalError(hold=True)`), so that no poll downloads it again.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from agent.device import compat
from agent.models.fetch import RefusalError
from agent.models.manifest import Blob, CustomOpLibrary, Manifest, TestVector, Variant
from agent.models.vectors import VectorError, decode, mismatch
from agent.transport.events import EventSink

if TYPE_CHECKING:
    from agent.config.profile import RuntimeConfig
    from agent.device.session import OpenedSession

# Test vectors run for one variant: `registry publish` writes one. Each is two downloads, two files synced
# to disk and a run: the 2,500 a 1 MiB manifest lists took one pull 225 s and left 5,000 files.
MAX_TESTS = 64
# agent.device.session.open_session, or a stand-in: (model, runtime, state_dir, emit) -> a proven session
SessionOpener = Callable[[Path, "RuntimeConfig", Path, EventSink], "OpenedSession"]


class Fetched(NamedTuple):
    """What a pull brought, before it is installed: the manifest with its signed bytes (manifest.json and
    its .sig), the variant and why it was preferred, the model file (None: the store holds it intact
    already) and the test data by digest."""

    manifest: Manifest
    signed: tuple[bytes, bytes]
    variant: Variant
    preference: str
    model_file: Path | None
    extra: dict[str, Path]


def blobs_of(manifest: Manifest, variant: Variant, library: CustomOpLibrary | None = None) -> list[Blob]:
    """What installing `variant` downloads: its model file, its test vectors' data, the labels, and the
    custom-op library chosen for this device; RefusalError, before any download, for more than MAX_TESTS."""
    tests = manifest.tests_for(variant.id)
    if len(tests) > MAX_TESTS:
        raise RefusalError(
            f"variant {variant.id} has {len(tests)} test vectors; a device runs at most {MAX_TESTS} of one variant"
        )
    blobs = [variant.blob] + [b for t in tests for b in (t.inputs, t.expected)]
    return blobs + ([manifest.labels] if manifest.labels else []) + ([library.blob] if library else [])


def check_header(path: Path, variant: Variant) -> None:
    """The ONNX file's IR version and opsets must be those the manifest signed."""
    try:
        header = compat.read_header(path)
    except compat.ModelFormatError as exc:
        raise RefusalError(f"variant {variant.id} is not a readable ONNX file: {exc}") from None
    declared = {compat.normalize_domain(d): v for d, v in variant.opsets.items()}
    if header.ir_version != variant.ir_version or header.opsets != declared:
        raise RefusalError(
            f"variant {variant.id}: the file says IR {header.ir_version} opsets {header.opsets}; "
            f"the signed manifest says IR {variant.ir_version} opsets {declared}"
        )


def run_vectors(
    opener: SessionOpener | None,
    runtime: RuntimeConfig | None,
    state_dir: Path,
    emit: EventSink,
    model_path: Path,
    stage: Path,
    tests: tuple[TestVector, ...],
    variant: Variant,
) -> str:
    """Open the model as the pipelines will and run its test vectors; returns the provider that ran them."""
    from agent.config.profile import RuntimeConfig

    if opener is None:
        from agent.device.session import open_session

        opener = open_session
    try:
        opened = opener(model_path, runtime or RuntimeConfig(), state_dir, emit)
    except Exception as exc:  # noqa: BLE001 (onnxruntime's errors derive from Exception only)
        reason = f"variant {variant.id} does not load here: {str(exc).splitlines()[0][:300]}"
        raise RefusalError(reason, hold=True) from None
    for test in tests:
        try:
            feeds = decode(stage / test.inputs.hex)
            expected = decode(stage / test.expected.hex)
        except VectorError as exc:  # signed and verified, yet unreadable: the publisher's fault, not ours
            raise RefusalError(f"test vector {test.name}: {exc}") from None
        names = list(expected)
        try:
            got = opened.session.run(names, feeds)
        except Exception as exc:  # noqa: BLE001 (as above: a failed run is onnxruntime's plain Exception)
            reason = f"test vector {test.name} does not run on {opened.provider}: {str(exc).splitlines()[0][:300]}"
            raise RefusalError(reason, hold=True) from None
        for name, actual in zip(names, got, strict=True):
            why = mismatch(name, actual, expected[name], rtol=test.rtol, atol=test.atol)
            if why is not None:
                raise RefusalError(f"test vector {test.name} failed on {opened.provider}: {why}", hold=True)
    return opened.provider
