"""A session on the best provider that proves to work here: rank, autotune, build, verify, fall back.

This is where a model becomes a session (agent.inference.runtime and the registry's test vectors both
come here): the ranking (agent.device.providers) says what to try, autotune (agent.device.autotune)
may reorder it by measurement, and each candidate is built and read back (agent.device.build) until
one really runs the model. Every step down the chain is a `provider.fallback` event with its reason.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from agent.config.runtime import Optimization, RuntimeConfig
from agent.device import hardware
from agent.device.autotune import model_digest, tune
from agent.device.build import build_cached, one_line, provider_options, verify, why_not
from agent.device.customops import session_libraries
from agent.device.graphcache import graph_cache
from agent.device.providers import CPU, OPENVINO, Candidate, Ranking, VariantTraits, rank, run_threads, thread_count
from agent.transport.events import Event, EventSink, log_event

log = logging.getLogger(__name__)


class ProviderError(Exception):
    """No provider in the chain could run the model."""


class AcceleratorUnavailableError(ProviderError):
    """`runtime.require_accelerator` is set and only the CPU provider would run the model."""


@dataclass
class OpenedSession:
    """A session and the provider proven to run it (read back from the session, never assumed)."""

    session: ort.InferenceSession
    provider: str
    providers: tuple[str, ...]
    notes: list[str] = field(default_factory=list)
    options: dict[str, str] = field(default_factory=dict)
    threads: int = 1
    assignment: dict[str, int] | None = None
    fallbacks: list[tuple[str, str]] = field(default_factory=list)  # (provider label, reason) for each step down
    ranking: Ranking | None = None
    autotuned: bool = False
    cache: str = "off"  # the optimised model: "hit" (loaded from the cache), "written", or "off"
    # An interim CPU session's way to the provider chosen: opens it (falling back as the chain does), or None.
    upgrade: Callable[[], OpenedSession | None] | None = None
    # ... and its way back: the CPU provider's session opened again (from its optimised-graph cache), or None.
    again: Callable[[], OpenedSession | None] | None = None


def open_session(
    model: Path | bytes,
    runtime: RuntimeConfig,
    state_dir: Path,
    emit: EventSink = log_event,
    *,
    probe: hardware.Probe | None = None,
    variant: VariantTraits | None = None,
    inputs: dict[str, np.ndarray] | None = None,
    optimization: Optimization | None = None,
    digest: str | None = None,
    at_once: int = 1,
    interim: bool = False,
) -> OpenedSession:
    """A session on the best provider that proves to work here, falling back down the ranking.

    Each step down emits a `provider.fallback` event with the reason. With `runtime.require_accelerator`
    the CPU provider is not in the chain, and running out raises AcceleratorUnavailableError.
    With `runtime.autotune` the chain starts with the measured fastest (see agent.device.autotune).
    `optimization` (a pipeline's own level) overrides `runtime.optimization`; with `runtime.cache` the
    optimised model is kept under the state dir (agent.device.graphcache). `digest` saves hashing the
    model again when the caller has it. `at_once`: how many runs the session will take at once (the camera
    pipelines sharing it); with threads `auto` each CPU provider run gets its share. Custom-op libraries
    (the profile's `runtime.custom_ops`, and those a registry model was installed with) are proven before
    any is registered: CustomOpsError otherwise.

    `interim` (a start, where the first result counts; `runtime.start_on_cpu`): when the chosen provider
    compiles the model on the CPU at every open (`_opens_slowly_on_cpu`), the session returned is the CPU
    provider's, and its `upgrade` opens the chosen one: the caller runs that off the serving thread and
    switches over (agent.inference.sessions); its `again` opens the CPU provider's session anew, for the
    renewal of a successor that measured a batch (agent.inference.interim).
    """
    libraries = session_libraries(model, runtime.custom_ops)
    state_dir = Path(state_dir)
    hw = probe if probe is not None else hardware.probe(state_dir=state_dir)
    ranking = rank(runtime, hw, variant)
    threads = thread_count(runtime, hw)
    fallbacks: list[tuple[str, str]] = []
    notes = list(ranking.notes)

    def fall(label: str, reason: str, after: str | None) -> None:
        fallbacks.append((label, reason))
        log.warning("provider %s not used: %s", label, reason)
        emit(Event("provider.fallback", {"provider": label, "reason": reason, "next": after}))

    chain = list(ranking.kept)
    if runtime.require_accelerator:
        chain = [c for c in chain if c.provider != CPU]
    for c in ranking.dropped:
        if c.requested:
            fall(c.label, c.reason, chain[0].label if chain else None)

    autotuned = False
    # One provider at a fixed thread count leaves nothing to choose between.
    if runtime.autotune and chain and (len(chain) > 1 or runtime.threads == "auto"):
        choice = tune(
            model,
            chain,
            state_dir,
            hw,
            threads_options=None if runtime.threads == "auto" else [threads],
            inputs=inputs,
            emit=emit,
            libraries=libraries,
        )
        if choice is not None:
            best = next(c for c in chain if c.label == choice.label)
            chain = [best] + [c for c in chain if c is not best]
            threads, autotuned = choice.threads, True
            notes.append(
                f"autotune chose {choice.label} with {choice.threads} threads "
                f"({'cached' if choice.cached else 'measured'}: p50 {choice.p50_ms:.1f} ms)"
            )

    cache_digest = (digest or model_digest(model)) if runtime.cache else None  # None: no optimised-model cache
    chains = _Chains(
        model,
        runtime,
        state_dir,
        hw,
        libraries,
        # An optimised graph is only valid with the same libraries (their kernels, their fusions).
        {f"custom_ops.{i}": model_digest(p) for i, p in enumerate(libraries)} if cache_digest else {},
        optimization or runtime.optimization,
        cache_digest,
        run_threads(threads, at_once) if runtime.threads == "auto" else threads,
        threads,
        fall,
        notes,
        fallbacks,
        ranking,
        autotuned,
    )
    if interim and runtime.start_on_cpu and _opens_slowly_on_cpu(chain):
        first = [c for c in chain if c.provider == CPU]
        try:
            opened = chains.open(first, quiet=True)
        except ProviderError as exc:  # the CPU provider cannot run it: the chain opens as it would have
            log.debug("no interim CPU session: %s", exc)
        else:
            better = [c for c in chain if c.provider != CPU]
            opened.notes.append(f"the CPU provider serves while {better[0].label} opens")
            opened.upgrade = functools.partial(chains.upgrade, better, first[0].label)
            opened.again = functools.partial(chains.upgrade, first, None)
            return opened
    return chains.open(chain)


def _opens_slowly_on_cpu(chain: list[Candidate]) -> bool:
    """The chain starts with a provider that compiles the model on the CPU at every open (OpenVINO's CPU
    plugin: 0.2 s for PP-OCR here, blob cache or not) and the CPU provider is in it: the CPU provider opens
    in 0.04 s from its optimised-graph cache and runs the model at a comparable speed, so it can serve the
    first frames. GPU providers open directly: a CPU run of a model sized for a GPU can take longer than
    the GPU's whole open."""
    head = chain[0] if chain else None
    return (
        head is not None
        and head.provider == OPENVINO
        and head.options.get("device_type", "CPU") == "CPU"
        and any(c.provider == CPU for c in chain)
    )


@dataclass(frozen=True)
class _Chains:
    """What opening a model's chain of candidates needs, decided once by `open_session` (ranking, autotune,
    threads), for the chain it opens now and, with an interim CPU session, for the one it opens later."""

    model: Path | bytes
    runtime: RuntimeConfig
    state_dir: Path
    hw: hardware.Probe
    libraries: tuple[Path, ...]
    library_keys: dict[str, str]  # custom_ops.<i> -> the library's sha256, in the optimised-graph cache key
    level: Optimization
    digest: str | None  # the model's, where the optimised graph is cached
    cpu_threads: int
    threads: int
    fall: Callable[[str, str, str | None], None]
    notes: list[str]
    fallbacks: list[tuple[str, str]]  # every step down so far (`fall` appends to it)
    ranking: Ranking
    autotuned: bool

    def open(self, chain: list[Candidate], *, tail: str | None = None, quiet: bool = False) -> OpenedSession:
        """The first candidate of `chain` that builds and proves to run the model; each one that does not is
        a fallback (to the next, or to `tail` after the last), unless `quiet`. ProviderError when none does."""
        failed: list[tuple[str, str]] = []
        for i, candidate in enumerate(chain):
            after = chain[i + 1].label if i + 1 < len(chain) else tail
            opened, why = self._try(candidate)
            if opened is not None:
                return opened
            failed.append((candidate.label, why))
            if not quiet:
                self.fall(candidate.label, why, after)
        tried = "; ".join(f"{label}: {reason}" for label, reason in self.fallbacks + (failed if quiet else [])) or (
            "none was ranked: " + "; ".join(f"{c.label}: {c.reason}" for c in self.ranking.dropped)
        )
        if self.runtime.require_accelerator:
            raise AcceleratorUnavailableError(
                f"runtime.require_accelerator is true, but no accelerator runs this model here ({tried})"
            )
        raise ProviderError(f"no execution provider could open the model ({tried})")

    def upgrade(self, chain: list[Candidate], interim: str | None) -> OpenedSession | None:
        """A session on `chain`, opened after the start: the better providers an interim CPU session serves in
        place of (each failure a fallback to `interim`, the CPU provider, which then stays), or the interim
        session's own provider again (`interim` None: quietly); None when none opens."""
        try:
            return self.open(chain, tail=interim, quiet=interim is None)
        except ProviderError:
            return None

    def _try(self, candidate: Candidate) -> tuple[OpenedSession | None, str]:
        """The candidate's session, built and read back; or None and why not."""
        run = self.cpu_threads if candidate.provider == CPU else self.threads
        cache = None
        if self.digest is not None:
            options = {**provider_options(candidate, self.state_dir, run), **self.library_keys}
            cache = graph_cache(
                self.state_dir,
                self.model,
                self.digest,
                candidate.provider,
                options,
                self.level,
                self.hw.fingerprint(),
                ort.__version__,
            )
        try:
            session, cached = build_cached(
                self.model, candidate, self.state_dir, run, self.level, cache, self.libraries
            )
        except Exception as exc:  # noqa: BLE001 (any provider failure is a reason to fall back, not to stop)
            return None, f"session creation failed: {one_line(exc)}"
        check = verify(session)
        why = why_not(candidate, check)
        if why is not None:
            return None, why
        notes = list(self.notes)
        share = check.share(candidate.provider)
        if share is not None and share < 1:
            notes.append(
                f"{candidate.provider} runs {share:.0%} of the nodes; the rest run on "
                f"{', '.join(p for p in check.assignment or {} if p != candidate.provider)}"
            )
        opened = OpenedSession(
            session,
            candidate.provider,
            check.providers,
            notes,
            options=provider_options(candidate, self.state_dir, run),
            threads=run,
            assignment=check.assignment,
            fallbacks=list(self.fallbacks),
            ranking=self.ranking,
            autotuned=self.autotuned,
            cache=cached,
        )
        return opened, ""
