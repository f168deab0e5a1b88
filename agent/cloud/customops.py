"""Publishing custom-op libraries: each one a signed blob that the variant's manifest entry names with the
platform it is built for, the custom domains and opset versions it provides, and the oldest onnxruntime
it is known to load on.

What is read from the library itself: its platform, from its ELF header (a library for another machine is
checked too, though it cannot be loaded here). What is proven here: a library for this machine must make
onnxruntime load the model (and computes its test vectors); the domains it provides are then the model's
custom domains at the versions the model imports, unless `--custom-domain` names them. Libraries built
for other machines cannot be run here, so their entries say what the publisher declares.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from agent.device import compat
from agent.device.customops import CustomOpsError, elf_platform, this_platform
from agent.models.manifest import PLATFORM_PATTERN, Blob, CustomOpLibrary

MAX_LIBRARY_BYTES = 1 << 30  # a custom-op library is megabytes; anything this large is a wrong file


class LibraryError(ValueError):
    """A custom-op library that cannot be published as given; the message says what to fix."""


def parse_spec(text: str) -> tuple[str | None, Path]:
    """`--custom-ops [PLATFORM=]PATH`: the platform (None: read from the file) and the file."""
    import re

    platform, sep, path = text.partition("=")
    if sep and re.match(PLATFORM_PATTERN, platform):
        return platform, Path(path)
    return None, Path(text)


def model_domains(model: Path) -> dict[str, int]:
    """The custom domains a model imports (the runtime implements the rest), with their opset versions."""
    standard = compat.caps_for("1.0").opsets
    return {d: v for d, v in sorted(compat.read_header(model).opsets.items()) if d not in standard}


def library_entries(
    store: Callable[[Path], Blob],
    specs: Sequence[tuple[str | None, Path]],
    model: Path,
    domains: Mapping[str, int] | None = None,
    min_runtime: str | None = None,
) -> tuple[tuple[CustomOpLibrary, ...], Path | None]:
    """The manifest entries of `specs` (blobs stored with `store`), and the library for this machine
    (None when none is), which the caller proves by loading the model with it."""
    imported = model_domains(model)
    provided = dict(domains) if domains else imported
    for domain, version in imported.items():
        if provided.get(domain, 0) < version:
            raise LibraryError(
                f"--custom-domain: {model.name} imports {domain} opset {version}; the libraries are declared "
                f"with {f'opset {provided[domain]}' if domain in provided else 'no such domain'}"
            )
    if not provided:
        raise LibraryError(
            f"{model.name} names no custom domain; say which domains the library provides with "
            "--custom-domain DOMAIN=VERSION"
        )
    if min_runtime is None:
        import onnxruntime as ort  # the publisher's runtime: the one the library is proven with here

        min_runtime = ort.__version__
    min_runtime = compat.version_str(compat.parse_version(min_runtime)[:2])
    entries: list[CustomOpLibrary] = []
    here: Path | None = None
    for declared, path in specs:
        try:
            built_for = elf_platform(path)
        except CustomOpsError as exc:
            raise LibraryError(f"--custom-ops {exc}") from None
        if declared is not None and declared != built_for:
            raise LibraryError(f"--custom-ops {declared}={path}: the file is a shared library for {built_for}")
        if any(e.platform == built_for for e in entries):
            raise LibraryError(f"--custom-ops: two libraries for {built_for}; give one per platform")
        if path.stat().st_size > MAX_LIBRARY_BYTES:
            raise LibraryError(f"--custom-ops {path}: larger than {MAX_LIBRARY_BYTES} bytes")
        entries.append(CustomOpLibrary(blob=store(path), platform=built_for, domains=provided, min_runtime=min_runtime))
        if built_for == this_platform():
            here = path
    return tuple(entries), here


def prove(model: Path, library: Path) -> None:
    """onnxruntime loads the model with the library registered; LibraryError with its reason otherwise."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        options.register_custom_ops_library(str(library))
        ort.InferenceSession(str(model), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 (onnxruntime's errors derive from Exception only)
        raise LibraryError(
            f"--custom-ops {library}: onnxruntime does not load {model.name} with it: {str(exc).splitlines()[0][:200]}"
        ) from None
