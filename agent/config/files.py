"""The files a profile names, checked against this machine: each one missing is a located problem.

Only when asked (`load_profile(..., files=...)`): a profile is often written on one machine for another.
`edge-agent check` asks for all of them, `run` for the ones the service cannot start without.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from agent.config.checks import Problem
    from agent.config.profile import Profile

# none; the files the service itself cannot start without (the registry's key, the broker's TLS files and
# password file); or also the pipelines' (model files, labels), which `run` leaves to each pipeline (one
# that cannot load is an event, and the others serve).
FileCheck = Literal["none", "service", "all"]


def named_files(profile: Profile, which: FileCheck) -> Iterator[tuple[tuple[str | int, ...], Path, str]]:
    """(key path, file, what it is) for each file the profile names that `which` covers."""
    if which == "none":
        return
    if profile.registry is not None:
        yield ("registry", "public_key"), profile.registry.public_key, "the registry's public key"
    mqtt = profile.mqtt
    if mqtt is not None:
        if mqtt.password_file is not None:
            yield ("mqtt", "password_file"), mqtt.password_file, "the broker password"
        tls = mqtt.tls
        for key, path in (("ca", tls.ca), ("cert", tls.cert), ("key", tls.key)) if tls is not None else ():
            if path is not None:
                yield ("mqtt", "tls", key), path, "a TLS file"
    for i, library in enumerate(profile.runtime.custom_ops):
        yield ("runtime", "custom_ops", i), library.path, "a custom-op library"
    endpoint = profile.endpoint
    if endpoint.enabled:
        if endpoint.token_file is not None:
            yield ("endpoint", "token_file"), endpoint.token_file, "the endpoint's bearer token"
        etls = endpoint.tls
        for key, path in (("cert", etls.cert), ("key", etls.key), ("client_ca", etls.client_ca)) if etls else ():
            if path is not None:
                yield ("endpoint", "tls", key), path, "a TLS file"
    if which != "all":
        return
    for i, pipeline in enumerate(profile.pipelines):
        if pipeline.model_is_file:
            yield ("pipelines", i, "model"), Path(pipeline.model), "the model file"
        labels = getattr(pipeline.postprocess, "labels", None)  # the post-processors that name classes
        if isinstance(labels, Path):
            yield ("pipelines", i, "postprocess", "labels"), labels, "the labels file"


def _public_keys(path: Path) -> str | None:
    """The registry key as trust reads it (agent.models.signing): ed25519 public key(s) in PEM."""
    from agent.models.signing import load_public_keys  # lazily: the cryptography import is not cheap

    try:
        load_public_keys(path)
    except ValueError as exc:
        return str(exc).removeprefix(f"{path}: ")
    return None


def _library(path: Path) -> str | None:
    """A custom-op library as session building checks it (agent.device.customops): an ELF shared object for
    this machine."""
    from agent.device.customops import check_local  # lazily, as the key check above

    return check_local(path)


# Files whose content `run` parses at start, by key path: a check returns what is wrong, or None.
CONTENT_CHECKS: dict[tuple[str | int, ...], Callable[[Path], str | None]] = {
    ("registry", "public_key"): _public_keys,
}
MAX_KEY_FILE = 1 << 20  # a PEM file of a few root keys is a few hundred bytes


def _state_dir_problem(path: Path) -> str | None:
    """Why `run` could not keep its state in `path` (None when it can): a directory it may write, or one it
    may create under the nearest existing parent."""
    if path.exists():
        if not path.is_dir():
            return f"not a directory: {path} (models, outbox and caches live here)"
        return None if os.access(path, os.W_OK | os.X_OK) else f"cannot write {path}: permission denied"
    parent = next((p for p in path.parents if p.exists()), None)
    if parent is None or not parent.is_dir():
        return f"cannot create {path}: {parent} is not a directory"
    return None if os.access(parent, os.W_OK | os.X_OK) else f"cannot create {path}: {parent} is not writable"


def missing_files(profile: Profile, which: FileCheck) -> list[Problem]:
    """A located problem for each named file that is not a readable file here, or whose content `run`
    could not use, and for a state folder it could not write."""
    problems: list[Problem] = []
    if which != "none" and (state := _state_dir_problem(profile.device.state_dir)) is not None:
        problems.append((("device", "state_dir"), state))
    for key, path, what in named_files(profile, which):
        check = CONTENT_CHECKS.get(key)
        if not path.exists():
            problems.append((key, f"no such file: {path} ({what})"))
        elif not path.is_file():
            problems.append((key, f"not a file: {path} ({what})"))
        elif not os.access(path, os.R_OK):
            problems.append((key, f"cannot read {path} ({what}): permission denied"))
        elif check is not None and path.stat().st_size > MAX_KEY_FILE:
            problems.append((key, f"{path} is larger than {MAX_KEY_FILE} bytes; expected {what}"))
        elif check is not None and (wrong := check(path)) is not None:
            problems.append((key, f"{path}: {wrong} (expected {what} as PEM)"))
        elif key[:2] == ("runtime", "custom_ops") and (wrong := _library(path)) is not None:
            problems.append((key, f"{path}: {wrong} (expected {what})"))
    return problems
