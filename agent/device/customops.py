"""Custom-op libraries on this machine: what a library file is built for, which ones a model brings, and
their registration on a session.

A custom-op library is native code that onnxruntime dlopens into the agent's process, so nothing is
registered before it is proven: its ELF header must say "shared object for this machine", and a library
installed with a registry model must still match the size and sha256 that the signed manifest named
(the registry client wrote them into the model's sidecar, `<model file>.customops.json`, beside the
verified library under `customops/`). A library named by the profile (`runtime.custom_ops`) is the
operator's own file: it is checked for being a shared object for this machine, nothing more; the
domains it declares there (if any) are what the pre-checks believe it provides.

The ELF header is read by hand (e_ident, e_type, e_machine): the same check works on the publishing
machine for a library built for another architecture, which it cannot load.
"""

from __future__ import annotations

import json
import platform
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from agent.device.compat import ModelFormatError, RuntimeCaps, normalize_arch, normalize_domain, read_header
from agent.util.hashing import sha256_file

if TYPE_CHECKING:
    import onnxruntime as ort

    from agent.config.runtime import LocalLibrary

SIDECAR_SUFFIX = ".customops.json"
LIBRARY_DIR = "customops"
MAX_SIDECAR_BYTES = 64 * 1024  # a few libraries' digests and domains
ELF_MAGIC = b"\x7fELF"
ET_DYN = 3
# e_machine -> the architecture name platform.machine() gives there (after compat.normalize_arch).
ELF_MACHINES = {3: "i686", 40: "armv7l", 62: "x86_64", 183: "aarch64", 243: "riscv64", 21: "ppc64le", 22: "s390x"}


class CustomOpsError(ValueError):
    """A custom-op library that must not be loaded here; the message names the file and why."""


@dataclass(frozen=True)
class InstalledLibrary:
    """A library installed with a registry model: where it is, and what the signed manifest said of it."""

    path: Path
    digest: str  # sha256:<hex>
    size: int
    platform: str
    domains: dict[str, int]


def this_platform() -> str:
    """`linux-x86_64`, `linux-aarch64`, ...: how manifests name the machine a library is built for."""
    return f"{sys.platform}-{normalize_arch(platform.machine())}"


def elf_platform(path: Path) -> str:
    """The platform an ELF shared object is built for; CustomOpsError when it is not one."""
    try:
        with path.open("rb") as f:
            head = f.read(64)
    except FileNotFoundError:
        raise CustomOpsError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise CustomOpsError(f"{path}: a folder, not a shared library") from None
    except OSError as exc:
        raise CustomOpsError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    if len(head) < 20 or head[:4] != ELF_MAGIC:
        raise CustomOpsError(f"{path}: not a shared library (no ELF header)")
    order: Literal["little", "big"] = "little" if head[5] == 1 else "big"
    e_type = int.from_bytes(head[16:18], order)
    machine = int.from_bytes(head[18:20], order)
    if e_type != ET_DYN:
        raise CustomOpsError(f"{path}: an ELF file of type {e_type}, not a shared library (type {ET_DYN})")
    arch = ELF_MACHINES.get(machine)
    if arch is None:
        raise CustomOpsError(f"{path}: a shared library for an unknown machine (ELF e_machine {machine})")
    return f"linux-{arch}"


def check_local(path: Path) -> str | None:
    """Why the profile's library `path` cannot be registered here (None when it can)."""
    try:
        built_for = elf_platform(path)
    except CustomOpsError as exc:
        return str(exc).removeprefix(f"{path}: ")
    here = this_platform()
    return None if built_for == here else f"a shared library for {built_for}; this machine is {here}"


def sidecar(model: Path) -> Path:
    return model.with_name(model.name + SIDECAR_SUFFIX)


def write_sidecar(model: Path, libraries: Sequence[InstalledLibrary]) -> None:
    """Name the libraries installed with `model` (paths relative to its folder, so that the store's rename
    of the version folder keeps them right)."""
    doc = [
        {
            "file": str(lib.path.relative_to(model.parent)),
            "digest": lib.digest,
            "size": lib.size,
            "platform": lib.platform,
            "domains": lib.domains,
        }
        for lib in libraries
    ]
    sidecar(model).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")


def installed_with(model: Path | bytes) -> tuple[InstalledLibrary, ...]:
    """The libraries a registry model was installed with (none for a profile's file or model bytes)."""
    if isinstance(model, bytes):
        return ()
    path = sidecar(Path(model))
    try:
        raw = path.read_bytes()[: MAX_SIDECAR_BYTES + 1]
    except FileNotFoundError:
        return ()
    if len(raw) > MAX_SIDECAR_BYTES:
        raise CustomOpsError(f"{path}: larger than {MAX_SIDECAR_BYTES} bytes; the store is damaged")
    try:
        doc = json.loads(raw)
        return tuple(
            InstalledLibrary(
                path=_inside(path.parent, str(e["file"])),
                digest=str(e["digest"]),
                size=int(e["size"]),
                platform=str(e["platform"]),
                domains={str(d): int(v) for d, v in dict(e["domains"]).items()},
            )
            for e in doc
        )
    except (ValueError, TypeError, KeyError) as exc:
        raise CustomOpsError(f"{path}: unreadable ({exc.__class__.__name__}: {exc}); the store is damaged") from None


def _inside(folder: Path, relative: str) -> Path:
    target = (folder / relative).resolve()
    if folder.resolve() not in target.parents:
        raise ValueError(f"{relative!r} is outside the model's folder")
    return target


def verify_installed(lib: InstalledLibrary, deep: bool = True) -> None:
    """The installed library is still the one the signed manifest named (size, then with `deep` sha256) and
    suits this machine; CustomOpsError otherwise, before anything dlopens it."""
    try:
        size = lib.path.stat().st_size
    except FileNotFoundError:
        raise CustomOpsError(f"custom-op library {lib.path} is missing; the store is damaged") from None
    if size != lib.size:
        raise CustomOpsError(f"custom-op library {lib.path} is {size} bytes; its signed size is {lib.size}")
    if not deep:
        return
    if "sha256:" + sha256_file(lib.path) != lib.digest:
        raise CustomOpsError(f"custom-op library {lib.path} does not match its signed digest {lib.digest}")
    why = check_local(lib.path)
    if why is not None:
        raise CustomOpsError(f"custom-op library {lib.path}: {why}")


def damage(model: Path, deep: bool = True) -> list[str]:
    """What is wrong with the libraries installed with `model`, one line each (`models list --verify`):
    an unreadable sidecar, a library missing or resized, and with `deep` one that no longer matches its
    signed digest or this machine."""
    try:
        libraries = installed_with(model)
    except CustomOpsError as exc:
        return [str(exc)]
    problems = []
    for lib in libraries:
        try:
            verify_installed(lib, deep)
        except CustomOpsError as exc:
            problems.append(str(exc))
    return problems


def _profile_library(library: LocalLibrary) -> Path:
    """The profile's library file, once proven a shared object for this machine."""
    why = check_local(library.path)
    if why is not None:
        raise CustomOpsError(f"runtime.custom_ops: {library.path}: {why}")
    return library.path


def declared_domains(profile_libraries: Sequence[LocalLibrary]) -> dict[str, int]:
    """The custom domains the profile's libraries declare, each at the highest opset one of them provides."""
    out: dict[str, int] = {}
    for lib in profile_libraries:
        for domain, version in (lib.domains or {}).items():
            out[normalize_domain(domain)] = max(version, out.get(normalize_domain(domain), 0))
    return out


def session_libraries(model: Path | bytes, profile_libraries: Sequence[LocalLibrary] = ()) -> tuple[Path, ...]:
    """Every library a session for `model` registers: the profile's, then the model's own, each proven
    first (CustomOpsError names the first that is not)."""
    out = [_profile_library(lib) for lib in profile_libraries]
    for lib in installed_with(model):
        verify_installed(lib)
        out.append(lib.path)
    return tuple(out)


def library_digests(model: Path | bytes, profile_libraries: Sequence[LocalLibrary] = ()) -> tuple[str, ...]:
    """The sha256 of each library a session for `model` registers, in `session_libraries`' order: one model's
    bytes with other libraries run other kernels, so a shared session is keyed on these too. The installed
    libraries count by their signed digest (session building proves the files still match it), the
    profile's by their bytes (an operator may replace the file behind the same path)."""
    profile = ["sha256:" + sha256_file(_profile_library(lib)) for lib in profile_libraries]
    return (*profile, *(lib.digest for lib in installed_with(model)))


def register(options: ort.SessionOptions, libraries: Sequence[Path]) -> None:
    """Register each library on the session options (onnxruntime dlopens it here)."""
    for path in libraries:
        options.register_custom_ops_library(str(path))


def loadable_caps(
    caps: RuntimeCaps, model: Path | bytes, profile_libraries: Sequence[LocalLibrary] = ()
) -> RuntimeCaps:
    """`caps` as seen by a model with its libraries: the domains its installed libraries provide count as
    registered, and those the profile's libraries declare at the model's opset or newer; a profile library
    that declares nothing may provide any custom domain, which loading the model then proves."""
    try:
        installed = installed_with(model)
    except CustomOpsError:
        installed = ()  # session_libraries reports the damage when the session is built
    domains = {normalize_domain(d) for lib in installed for d in lib.domains}
    declared = declared_domains(profile_libraries)
    if declared:
        try:
            needs = read_header(model).opsets
        except (ModelFormatError, OSError):  # not an ONNX protobuf (an .ort file): loading it decides
            needs = {}
        domains |= {d for d, v in declared.items() if v >= needs.get(d, 0)}
    undeclared = any(lib.domains is None for lib in profile_libraries)
    if not domains and not undeclared:
        return caps
    return replace(
        caps,
        custom_domains=caps.custom_domains | frozenset(domains),
        undeclared_custom_ops=caps.undeclared_custom_ops or undeclared,
    )
