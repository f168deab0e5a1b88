"""Which of a variant's signed custom-op libraries this device can use, decided before any download.

A variant whose opsets name a custom domain runs here only with a library that provides that domain at
that opset version or newer: the signed manifest lists one library per platform with the domains it
provides and the oldest onnxruntime that loads it, so the choice (and every refusal's reason) comes from
the manifest alone. The chosen library is then downloaded like the model (the same resumable, size-bound,
sha256-checked fetch) and installed beside it (agent.device.customops writes the sidecar that session
building reads). A library from the profile (`runtime.custom_ops`) is the fallback when the manifest has
none for this device: where the profile declares its domains, they are checked here the same way; where
it does not, loading the model is what proves it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict

from agent.device import compat
from agent.device.customops import LIBRARY_DIR, InstalledLibrary, declared_domains, this_platform
from agent.models.manifest import CustomOpLibrary, Variant

if TYPE_CHECKING:
    from agent.config.runtime import LocalLibrary


class DomainInfo(TypedDict):
    """A custom domain a model imports, and the libraries that provide it (`models inspect`)."""

    opset: int
    libraries: list[str]  # on this device: installed with the model, or the profile's
    published_for: list[str]  # the platforms the signed manifest has a library for


@dataclass(frozen=True)
class Choice:
    """The library a variant will load with (None: it needs none, or the profile's libraries serve), or why
    no library fits."""

    library: CustomOpLibrary | None = None
    refusal: str | None = None


def needed_domains(variant: Variant, caps: compat.RuntimeCaps) -> dict[str, int]:
    """The variant's custom domains: those neither the runtime nor a library already registered here implements."""
    found = {compat.normalize_domain(d): v for d, v in variant.opsets.items()}
    return {d: v for d, v in sorted(found.items()) if d not in caps.opsets and d not in caps.custom_domains}


def domains_refusal(provides: Mapping[str, int], needed: dict[str, int]) -> str | None:
    """Why a library that provides these domains (domain -> highest opset) cannot serve `needed`."""
    for domain, version in needed.items():
        have = provides.get(domain)
        if have is None:
            return f"it does not provide domain {domain!r}"
        if have < version:
            return f"it provides {domain} up to opset {have}; the model needs {version}"
    return None


def profile_refusal(needed: dict[str, int], profile_libraries: Sequence[LocalLibrary]) -> str | None:
    """Why the profile's libraries cannot serve `needed`, from the domains they declare (None when they do,
    or may: a library that declares none may provide any, and loading the model decides)."""
    if any(lib.domains is None for lib in profile_libraries):
        return None
    why = domains_refusal(declared_domains(profile_libraries), needed)
    if why is None:
        return None
    return f"the profile's runtime.custom_ops ({', '.join(str(lib.path) for lib in profile_libraries)}): {why}"


def library_refusal(
    library: CustomOpLibrary, needed: dict[str, int], caps: compat.RuntimeCaps, platform: str
) -> str | None:
    """Why `library` cannot serve `needed` here (None when it can)."""
    if library.platform != platform:
        return f"it is built for {library.platform}; this device is {platform}"
    why = domains_refusal(library.domains, needed)
    if why is not None:
        return why
    if library.min_runtime and compat.parse_version(caps.ort_version) < compat.parse_version(library.min_runtime):
        return f"it needs onnxruntime {library.min_runtime} or newer; this is {caps.ort_version}"
    return None


def choose(
    variant: Variant,
    caps: compat.RuntimeCaps,
    profile_libraries: Sequence[LocalLibrary] = (),
    platform: str | None = None,
) -> Choice:
    """The library this variant loads with here, from the signed manifest alone."""
    needed = needed_domains(variant, caps)
    if not needed:
        return Choice()
    platform = platform or this_platform()
    reasons = []
    for library in variant.custom_ops or ():
        why = library_refusal(library, needed, caps, platform)
        if why is None:
            return Choice(library)
        reasons.append(f"the library for {library.platform}: {why}")
    if profile_libraries:
        why = profile_refusal(needed, profile_libraries)
        if why is None:
            return Choice()  # the profile's own libraries serve
        reasons.append(why)
    want = ", ".join(f"{d!r} (opset {v})" for d, v in needed.items())
    if not reasons:
        return Choice(
            refusal=f"variant {variant.id} needs custom domain {want}; no custom-op library for it is registered here"
        )
    return Choice(
        refusal=f"variant {variant.id} needs custom domain {want}; no custom-op library fits: " + "; ".join(reasons)
    )


def installed(library: CustomOpLibrary, folder: Path) -> InstalledLibrary:
    """Where a verified library lives in a version folder (by its digest), with what the manifest says."""
    return InstalledLibrary(
        path=folder / LIBRARY_DIR / f"{library.blob.hex}.so",
        digest=library.blob.digest,
        size=library.blob.size,
        platform=library.platform,
        domains=dict(library.domains),
    )


def describe(
    opsets: dict[str, int],
    caps: compat.RuntimeCaps,
    model: Path,
    profile_libraries: Sequence[LocalLibrary] = (),
    variant: Variant | None = None,
) -> dict[str, DomainInfo]:
    """For `models inspect`: each custom domain the model imports, and which libraries provide it here
    (installed with the model, the profile's) or, for a registry model, for which platforms."""
    from agent.device.customops import CustomOpsError, installed_with

    try:
        installed = installed_with(model)
    except CustomOpsError:
        installed = ()
    out: dict[str, DomainInfo] = {}
    for domain, version in sorted(opsets.items()):
        if domain in caps.opsets:
            continue
        libraries: list[str] = [
            f"{lib.path} ({lib.platform}, {domain} up to opset {lib.domains[domain]}, {lib.digest[:19]})"
            for lib in installed
            if domain in lib.domains
        ]
        libraries += [
            f"{lib.path} (runtime.custom_ops; its domains are proven when the model loads)"
            if lib.domains is None
            else f"{lib.path} (runtime.custom_ops, declares {domain} up to opset {lib.domains[domain]})"
            for lib in profile_libraries
            if lib.domains is None or domain in lib.domains
        ]
        published = [
            f"{lib.platform} ({domain} up to opset {lib.domains[domain]}, onnxruntime >= {lib.min_runtime or '?'})"
            for lib in (variant.custom_ops or () if variant is not None else ())
            if domain in lib.domains
        ]
        out[domain] = {"opset": version, "libraries": libraries, "published_for": published}
    return out
