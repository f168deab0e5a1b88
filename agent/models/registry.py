"""The device side of the model registry: signed channel pointers and manifests, verified downloads.

`RegistryClient.check_and_pull(model, channel=..., version=...)` does one update step and reports it as
events (model.downloading, model.verifying, model.activated, model.refused with a reason, model.error)
and as a `PullResult`. Every check that can refuse a version runs before the bytes it guards are
trusted, and most before anything is downloaded:

1. the registry's keys are brought up to date (agent.models.trust: the root chain from the pinned root
   key, so that a revoked key is known before anything it signed is read); the channel pointer and the
   manifest are fetched (conditional GETs, bounded size, retries with backoff) and their ed25519
   signatures, bound to their payload type, checked over the exact bytes with the keys of their role;
2. the manifest is parsed strictly, must name the model and version asked for (mix-and-match), must
   not have expired (freeze) and must not be older than the active version unless a rollback was
   ordered (rollback attack); a version this device held (it was refused after a try, or rolled back)
   is not installed again, whichever path asks for it, unless the request overrides holds
   (`allow_older`: a rollback order, or an operator's pull naming the version);
3. a variant this runtime, architecture and provider set can load is chosen from the signed opsets
   and IR version (refusing the others with their reasons) - before any download;
4. the blob is downloaded into a resumable partial file (Range), never reading past the signed size,
   then its sha256 must match; the file's own header must agree with the manifest;
5. the manifest's test vectors (agent.models.vectors: stored without pickle) run on this device's
   chosen provider; only then does the store commit the version and switch the active pointer (see
   agent.models.store). A version whose vectors fail, or that does not load, is held with the reason.

The HTTP side (retries, the conditional-GET cache, resumable downloads) is agent.models.fetch.
"""

from __future__ import annotations

import errno
import functools
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.device import compat
from agent.device.customops import write_sidecar
from agent.models import customops, variants
from agent.models.fetch import Fetcher, FetchError, MissingError, Progress, RefusalError
from agent.models.manifest import (
    Blob,
    ChannelPointer,
    Manifest,
    ManifestError,
    Variant,
    file_digest,
    parse_channel,
    parse_manifest,
    utcnow,
    version_key,
)
from agent.models.registry_verify import Fetched, SessionOpener, blobs_of, check_header, run_vectors
from agent.models.signing import (
    CHANNEL,
    MANIFEST,
    ORDER,
    Keyring,
    PayloadType,
    SignatureError,
    load_public_keys,
    verify,
)
from agent.models.store import STALE_PARTIAL, Installed, Store, StoreError
from agent.models.trust import Trust, TrustError
from agent.transport.events import Event, EventSink, log_event
from agent.util.names import NAME_PATTERN, VERSION_PATTERN
from agent.util.printable import printable

if TYPE_CHECKING:
    from agent.config.profile import Profile, RuntimeConfig
    from agent.config.runtime import LocalLibrary

DISK_MARGIN = 16 * 1024 * 1024  # left free beyond the download, for the outbox and logs
# Of a refusal or an error, as its event, its hold and `models pull` carry it: every variant's reason fits,
# a string from a signed manifest (a provider name of 400,000 characters once did) does not.
MAX_REASON_CHARS = 2000


@dataclass(frozen=True)
class PullResult:
    model: str
    status: Literal["activated", "current", "held", "refused", "failed"]
    version: str | None = None
    variant: str | None = None
    reason: str | None = None
    provider: str | None = None
    previous: str | None = None
    downloaded_bytes: int = 0


def _check_name(value: str, pattern: str, what: str) -> None:
    if not re.fullmatch(pattern, value):
        raise RefusalError(
            f"{what} {value!r} is not a safe name (letters, digits and _ . - only, not starting with a dot)"
        )


class RegistryClient:
    """One registry, as this device trusts it (`trust`: the pinned root key(s) and the root chain followed
    since) and can run its models (`caps`, `providers`)."""

    def __init__(
        self,
        url: str,
        public_keys: Path | dict[str, Ed25519PublicKey],
        store: Store,
        *,
        runtime: RuntimeConfig | None = None,
        caps: compat.RuntimeCaps | None = None,
        providers: tuple[str, ...] | None = None,
        emit: EventSink = log_event,
        timeout: float = 30.0,
        retries: int = 3,
        backoff: float = 0.5,
        progress: Progress | None = None,
        open_session: SessionOpener | None = None,
        now: Callable[[], datetime] = utcnow,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        pinned = public_keys if isinstance(public_keys, dict) else load_public_keys(public_keys)
        self.trust = Trust(pinned, store.root.parent, now=now)
        self.store = store
        self._runtime = runtime
        self._caps = caps
        self._providers = providers
        self.emit = emit
        self.progress = progress
        self._open_session = open_session
        self.now = now
        cache_dir = store.root.parent / "registry-cache"
        self.fetcher = Fetcher(url, cache_dir, timeout=timeout, retries=retries, backoff=backoff, sleep=sleep)
        self.max_accuracy_loss = variants.DEFAULT_MAX_ACCURACY_LOSS

    @classmethod
    def from_profile(cls, profile: Profile, emit: EventSink = log_event, **kwargs: Any) -> RegistryClient:
        if profile.registry is None:
            raise ValueError("the profile has no registry section")
        reg = profile.registry
        store = kwargs.pop("store", None) or Store(profile.device.state_dir, keep_versions=reg.keep_versions)
        client = cls(reg.url, reg.public_key, store, runtime=profile.runtime, emit=emit, timeout=reg.timeout, **kwargs)
        client.max_accuracy_loss = reg.max_accuracy_loss
        return client

    # --- what this device can run -----------------------------------------------------------

    @property
    def caps(self) -> compat.RuntimeCaps:
        if self._caps is None:
            self._caps = compat.installed_caps()
        return self._caps

    @property
    def providers(self) -> tuple[str, ...]:
        if self._providers is None:
            import onnxruntime as ort

            self._providers = tuple(ort.get_available_providers())
        return self._providers

    def _profile_libraries(self) -> tuple[LocalLibrary, ...]:
        return self._runtime.custom_ops if self._runtime is not None else ()

    def variant_refusal(self, variant: Variant) -> str | None:
        choice = customops.choose(variant, self.caps, self._profile_libraries())
        if choice.refusal is not None:
            return choice.refusal
        caps = self.caps
        if choice.library is not None or self._profile_libraries():
            provided = choice.library.domains if choice.library is not None else {}
            caps = replace(
                caps,
                custom_domains=caps.custom_domains | frozenset(provided),
                undeclared_custom_ops=bool(self._profile_libraries()),
            )
        reason = compat.refusal(
            caps, variant.id, variant.ir_version, variant.opsets, variant.architectures, variant.min_runtime
        )
        if reason is None and variant.providers and not set(variant.providers) & set(self.providers):
            reason = f"variant {variant.id} suits {', '.join(variant.providers)}; this device has {', '.join(self.providers)}"
        return reason

    @functools.cached_property
    def target_provider(self) -> str:
        return variants.target_provider(self._runtime, self.providers)

    def choose_variant(self, manifest: Manifest) -> Variant:
        return self.preferred(manifest).variant

    def preferred(self, manifest: Manifest) -> variants.Preference:
        """The variant this device prefers for its provider among those it can run (agent.models.variants)."""
        return variants.choose(manifest.variants, self.target_provider, self.variant_refusal, self.max_accuracy_loss)

    # --- HTTP -------------------------------------------------------------------------------

    def refresh_trust(self) -> None:
        """Follow the registry's root chain now (RefusalError for a root that must not be trusted,
        FetchError when the registry cannot say)."""
        try:
            self.trust.refresh(self._document_or_none)
        except TrustError as exc:
            raise RefusalError(str(exc)) from None

    def keyring(self, payload_type: PayloadType) -> Keyring:
        """The keys trusted for documents of this kind, as the last refresh left them."""
        try:
            return self.trust.keyring(payload_type)
        except TrustError as exc:
            raise RefusalError(str(exc)) from None

    def order_keys(self) -> Keyring:
        """The keys that sign deployment orders, fresh from the registry: an order is checked against the
        keys of now, never against those of the last poll (a revoked key is refused at once)."""
        self.refresh_trust()
        return self.keyring(ORDER)

    def _document_or_none(self, path: str) -> bytes | None:
        try:
            return self.fetcher.document(path)
        except MissingError:
            return None

    def _signed(self, path: str, payload_type: PayloadType) -> tuple[bytes, bytes]:
        data = self.fetcher.document(path)
        sig = self.fetcher.document(path + ".sig")
        try:
            verify(self.keyring(payload_type), data, sig, path, payload_type)
        except SignatureError as exc:
            raise RefusalError(str(exc)) from None
        return data, sig

    def channel(self, model: str, channel: str) -> ChannelPointer:
        _check_name(model, NAME_PATTERN, "model")
        _check_name(channel, NAME_PATTERN, "channel")
        path = f"channels/{model}/{channel}.json"
        try:
            pointer = parse_channel(self._signed(path, CHANNEL)[0], path)
        except ManifestError as exc:
            raise RefusalError(str(exc)) from None
        if (pointer.model, pointer.channel) != (model, channel):
            raise RefusalError(f"{path} is signed for {pointer.model}/{pointer.channel}, not {model}/{channel}")
        if pointer.expires < self.now():
            raise RefusalError(f"{path} expired at {pointer.expires.isoformat()}; the registry must re-sign it")
        return pointer

    def manifest(self, model: str, version: str) -> Manifest:
        return self._manifest(model, version)[0]

    def _manifest(self, model: str, version: str) -> tuple[Manifest, tuple[bytes, bytes]]:
        """The manifest and its signed bytes, which the pull installs (never kept here: a channel moved at
        every poll once kept 1 MiB per poll in memory)."""
        _check_name(model, NAME_PATTERN, "model")
        _check_name(version, VERSION_PATTERN, "version")
        path = f"models/{model}/{version}/manifest.json"
        data, sig = self._signed(path, MANIFEST)
        try:
            manifest = parse_manifest(data, path)
        except ManifestError as exc:
            raise RefusalError(str(exc)) from None
        if (manifest.model, manifest.version) != (model, version):
            raise RefusalError(f"{path} is signed for {manifest.model} {manifest.version}, not {model} {version}")
        if manifest.expires < self.now():
            raise RefusalError(f"manifest of {model} {version} expired at {manifest.expires.isoformat()}")
        return manifest, (data, sig)

    # --- one update step --------------------------------------------------------------------

    def check_and_pull(
        self,
        model: str,
        channel: str | None = "stable",
        version: str | None = None,
        allow_older: bool = False,
        override_hold: bool | None = None,
    ) -> PullResult:
        """Bring `model` to the channel's (or the pinned) version; emit events; never raise for refusals.

        `allow_older`: a version older than the active one may be installed. `override_hold`: a held
        version may be installed (the request names it on purpose); by default as `allow_older`, which
        an operator's rollback order or `models pull --allow-older` sets."""
        override = allow_older if override_hold is None else override_hold
        target = version
        try:
            _check_name(model, NAME_PATTERN, "model")
            if version is not None:
                _check_name(version, VERSION_PATTERN, "version")
            elif channel:
                _check_name(channel, NAME_PATTERN, "channel")
            self.refresh_trust()
            if target is None:
                target = self.channel(model, channel or "stable").version
            # The store's lock is held only to decide and to install, never across the network: a stalled
            # download must not hold up a rollback or `models list` (issue 17, item 1).
            with self.store.lock():
                self.store.recover()
                settled = self._settled(model, target, allow_older, override, from_channel=version is None)
            if settled is not None:
                return settled
            fetched = self._fetch(model, target)
            with self.store.lock():
                settled = self._settled(model, target, allow_older, override, from_channel=version is None)
                return settled if settled is not None else self._install(model, target, fetched)
        except RefusalError as exc:
            reason = printable(str(exc), MAX_REASON_CHARS)
            if exc.hold and target is not None:
                with self.store.lock():
                    self.store.hold(model, target, reason)
            self.emit(Event("model.refused", {"model": model, "version": target, "reason": reason}))
            return PullResult(model, "refused", target, reason=reason)
        except (FetchError, StoreError, OSError) as exc:
            reason = printable(
                str(exc)
                if not isinstance(exc, OSError)
                else f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": "),
                MAX_REASON_CHARS,
            )
            self.emit(Event("model.error", {"model": model, "version": target, "reason": reason}))
            return PullResult(model, "failed", target, reason=reason)

    def _settled(
        self, model: str, version: str, allow_older: bool, override_hold: bool, from_channel: bool
    ) -> PullResult | None:
        """The answer when nothing is to be fetched (current, held), RefusalError for an older version."""
        active = self.store.active(model)
        if active is not None and active.version == version:
            return PullResult(model, "current", version, active.variant.id, provider=active.provider)
        held = self.store.held_reason(model, version)
        if held is not None and not override_hold:
            where = "the channel names it" if from_channel else "asked for by version"
            return PullResult(
                model,
                "held",
                version,
                active.variant.id if active else None,
                provider=active.provider if active else None,
                reason=f"{version} is held on this device ({held}); {where}, but only an override "
                "installs it again (a rollback order, or a pull with --allow-older)",
            )
        if active is not None and version_key(version) < version_key(active.version) and not allow_older:
            raise RefusalError(
                f"version {version} is older than the active {active.version}; "
                "an older version is only installed on a rollback order"
            )
        return None

    def _fetch(self, model: str, version: str) -> Fetched:
        """The signed manifest, the variant for this device and its blobs downloaded (none when the store
        holds the version intact already). Runs without the store's lock: only partial files change."""
        manifest, signed = self._manifest(model, version)
        preference = self.preferred(manifest)
        variant = preference.variant
        if version in self.store.versions(model):
            entry = self.store.installed(model, version)
            if entry.digest == variant.blob.digest and file_digest(entry.path) == entry.digest:
                return Fetched(manifest, signed, variant, preference.reason, None, {})
        library = customops.choose(variant, self.caps, self._profile_libraries()).library
        blobs = blobs_of(manifest, variant, library)
        keep = {b.digest for b in blobs}
        with self.store.partials():
            # Other pulls' partial downloads: gone after a day untouched (their version was left behind), and
            # at once when this download needs their room (else one abandoned kept every later version out).
            self.store.discard_partials(keep, STALE_PARTIAL)
            need = sum(b.size for b in blobs) - sum(self._partial_size(b) for b in blobs)
            if need + DISK_MARGIN > self.store.free_bytes():
                self.store.discard_partials(keep)
            free = self.store.free_bytes()
        if need + DISK_MARGIN > free:
            raise FetchError(f"not enough disk for {model} {version}: needs {need + DISK_MARGIN} bytes, {free} free")

        fields = {"model": model, "version": version, "variant": variant.id}
        self.emit(
            Event(
                "model.downloading",
                {
                    **fields,
                    "bytes": variant.blob.size,
                    "resume_from": self._partial_size(variant.blob),
                    "preference": preference.reason,
                },
            )
        )
        model_part = self._download(variant.blob, f"{model} {version} variant {variant.id}", self.progress)
        # A custom-op library comes through the same bounded, digest-checked fetch as the model: bytes that
        # differ from what the manifest signed are refused here, never placed where a session would load them.
        extra = {
            b.digest: self._download(
                b,
                f"{model} {version} custom-op library for {library.platform}"
                if library is not None and b is library.blob
                else f"{model} {version} test data {b.digest[7:19]}",
            )
            for b in blobs[1:]
        }
        return Fetched(manifest, signed, variant, preference.reason, model_part, extra)

    def _install(self, model: str, version: str, fetched: Fetched) -> PullResult:
        """Verify, test, commit and activate what `_fetch` brought (under the store's lock)."""
        manifest, (data, sig), variant, preference, model_part, extra = fetched
        active = self.store.active(model)
        previous = active.version if active else None
        fields = {
            "model": model,
            "version": version,
            "variant": variant.id,
            "preference": preference,
        }
        if model_part is None:
            entry = self.store.activate(model, version)
            self.emit(Event("model.activated", {**fields, "provider": entry.provider, "previous": previous}))
            return PullResult(model, "activated", version, variant.id, provider=entry.provider, previous=previous)
        tests = manifest.tests_for(variant.id)
        library = customops.choose(variant, self.caps, self._profile_libraries()).library
        blobs = blobs_of(manifest, variant, library)
        self.emit(Event("model.verifying", {k: v for k, v in fields.items() if k != "preference"}))
        name = f"model.{variant.format}"
        stage = self.store.stage(model)
        try:
            if variant.format == "onnx":
                check_header(model_part, variant)
            os.replace(model_part, stage / name)
            if library is not None:  # beside the model, named in its sidecar: session building registers it
                placed = customops.installed(library, stage)
                placed.path.parent.mkdir()
                os.replace(extra.pop(library.blob.digest), placed.path)
                write_sidecar(stage / name, [placed])
            for digest, path in extra.items():
                os.replace(path, stage / digest[7:])
            provider = run_vectors(
                self._open_session,
                self._runtime,
                self.store.root.parent,
                self.emit,
                stage / name,
                stage,
                tests,
                variant,
            )
        except BaseException:
            # Refused (or killed): nothing of this version stays, not even its partial download.
            shutil.rmtree(stage, ignore_errors=True)
            for blob in blobs:
                self.store.discard_partial(blob.digest)
            raise
        (stage / "manifest.json").write_bytes(data)
        (stage / "manifest.json.sig").write_bytes(sig)
        labels = None
        if manifest.labels:
            labels = "labels.txt"
            shutil.copyfile(stage / manifest.labels.hex, stage / labels)
        info: Installed = {
            "variant": variant.id,
            "digest": variant.blob.digest,
            "file": name,
            "provider": provider,
            "labels": labels,
            "installed": self.now().isoformat(),
        }
        self.store.commit(model, version, stage, info)
        self.store.activate(model, version)
        self.store.collect(model)
        self.emit(Event("model.activated", {**fields, "provider": provider, "previous": previous}))
        return PullResult(
            model,
            "activated",
            version,
            variant.id,
            provider=provider,
            previous=previous,
            downloaded_bytes=variant.blob.size,
        )

    def _download(self, blob: Blob, what: str, progress: Progress | None = None) -> Path:
        part = self.store.partial_path(blob.digest)
        with self.store.partials():
            try:
                return self.fetcher.download(blob, part, what, progress)
            except OSError as exc:
                if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                # The disk filled up under the download (the outbox, the logs): the room goes back to them
                # now, and the next poll starts again from the disk check.
                have = part.stat().st_size if part.exists() else 0
                part.unlink(missing_ok=True)
                raise FetchError(
                    f"{what}: the disk filled up at {have} of {blob.size} bytes; the partial download is discarded"
                ) from None

    def _partial_size(self, blob: Blob) -> int:
        part = self.store.root / ".partial" / blob.hex
        return min(part.stat().st_size, blob.size) if part.exists() else 0
