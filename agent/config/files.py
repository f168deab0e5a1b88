"""The files a profile names, checked against this machine: each one missing is a located problem.

Only when asked (`load_profile(..., files=...)`): a profile is often written on one machine for another.
`edge-agent check` asks for all of them, `run` for the ones the service cannot start without.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
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
    if which != "all":
        return
    for i, pipeline in enumerate(profile.pipelines):
        if pipeline.model_is_file:
            yield ("pipelines", i, "model"), Path(pipeline.model), "the model file"
        labels = getattr(pipeline.postprocess, "labels", None)  # the post-processors that name classes
        if isinstance(labels, Path):
            yield ("pipelines", i, "postprocess", "labels"), labels, "the labels file"


def missing_files(profile: Profile, which: FileCheck) -> list[Problem]:
    """A located problem for each named file that is not a readable file here."""
    problems: list[Problem] = []
    for key, path, what in named_files(profile, which):
        if not path.exists():
            problems.append((key, f"no such file: {path} ({what})"))
        elif not path.is_file():
            problems.append((key, f"not a file: {path} ({what})"))
        elif not os.access(path, os.R_OK):
            problems.append((key, f"cannot read {path} ({what}): permission denied"))
    return problems
