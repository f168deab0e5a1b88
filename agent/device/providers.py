"""Execution-provider ranking, session construction, fallback and proof of what really runs.

ONNX Runtime's own answer is not enough: `get_available_providers()` lists what the wheel was built
with, and a CUDA or TensorRT session whose libraries are missing quietly becomes a CPU session. So the
ranking starts from the hardware probe, every session is read back (`get_providers()`, and the graph
assignment where the runtime records it), and every step down the chain is an event with its reason.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnxruntime as ort
import psutil

from agent.config.profile import KNOWN_PROVIDERS, PROVIDER_ALIASES, ProviderChoice, RuntimeConfig
from agent.device import hardware
from agent.device.hardware import Probe
from agent.transport.events import Event, EventSink, log_event

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
OPENVINO = "OpenVINOExecutionProvider"


class ProviderError(Exception):
    """No provider in the chain could run the model."""


class AcceleratorUnavailable(ProviderError):
    """`runtime.require_accelerator` is set and only the CPU provider would run the model."""


@dataclass(frozen=True)
class Candidate:
    """One provider in the ranking: kept ones are tried in order, dropped ones say why not."""

    provider: str
    options: dict[str, str]
    kept: bool
    reason: str
    requested: bool = False  # named in the profile, so dropping it is a fallback the operator hears about

    @property
    def label(self) -> str:
        device = self.options.get("device_type")
        return f"{self.provider}[{device}]" if device else self.provider

    def to_dict(self) -> dict[str, Any]:
        return {
            "provider": self.provider,
            "options": dict(self.options),
            "kept": self.kept,
            "reason": self.reason,
            "requested": self.requested,
        }


@dataclass(frozen=True)
class Ranking:
    candidates: tuple[Candidate, ...]
    notes: tuple[str, ...] = ()

    @property
    def kept(self) -> tuple[Candidate, ...]:
        return tuple(c for c in self.candidates if c.kept)

    @property
    def dropped(self) -> tuple[Candidate, ...]:
        return tuple(c for c in self.candidates if not c.kept)


@dataclass(frozen=True)
class Verification:
    """What the session really runs on, read back from it."""

    providers: tuple[str, ...]
    assignment: dict[str, int] | None  # nodes per provider, where the runtime records it (1.24+)

    def share(self, provider: str) -> float | None:
        if not self.assignment:
            return None
        total = sum(self.assignment.values())
        return self.assignment.get(provider, 0) / total if total else None


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


def canonical_provider(name: str) -> str:
    """`cuda`, `CUDA` and `CUDAExecutionProvider` all name one provider; ValueError for unknown names."""
    full = PROVIDER_ALIASES.get(name.lower(), name)
    if full not in KNOWN_PROVIDERS:
        lowered = {p.lower(): p for p in KNOWN_PROVIDERS}
        if name.lower() in lowered:
            return lowered[name.lower()]
        from agent.config.errors import did_you_mean

        raise ValueError(
            f"unknown execution provider {name!r}{did_you_mean(name, list(PROVIDER_ALIASES) + list(KNOWN_PROVIDERS))}"
        )
    return full


def thread_count(runtime: RuntimeConfig, probe: Probe | None = None) -> int:
    """Threads sized to physical cores: hyperthreads share one core's vector units."""
    if runtime.threads != "auto":
        return int(runtime.threads)
    if probe is not None:
        return max(1, probe.cpu.physical_cores)
    return psutil.cpu_count(logical=False) or psutil.cpu_count() or 1


# ---- ranking ---------------------------------------------------------------------------------------

Judge = Callable[[Probe, Any], "list[Candidate]"]


def _variant_precision(variant: Any) -> str:
    return str(getattr(variant, "precision", None) or "fp32")


def _variant_providers(variant: Any) -> tuple[str, ...]:
    names = getattr(variant, "providers", None) or ()
    out = []
    for n in names:
        try:
            out.append(canonical_provider(str(n)))
        except ValueError:
            continue
    return tuple(out)


INSTALL_HINTS = {
    CUDA: "install onnxruntime-gpu",
    TENSORRT: "install onnxruntime-gpu and the TensorRT libraries",
    OPENVINO: "install onnxruntime-openvino in place of onnxruntime",
    "ROCMExecutionProvider": "install onnxruntime-rocm",
    "MIGraphXExecutionProvider": "install onnxruntime-migraphx",
    "QNNExecutionProvider": "install onnxruntime-qnn",
    "DmlExecutionProvider": "install onnxruntime-directml (Windows)",
}


def _not_built(provider: str, probe: Probe, hint: str) -> str:
    have = ", ".join(p.removesuffix("ExecutionProvider") for p in probe.runtime.available) or "none"
    return f"not in this onnxruntime {probe.runtime.version} build (it has {have}); {hint}"


def _nvidia(probe: Probe) -> hardware.Accelerator | None:
    return next((a for a in probe.accelerators if a.vendor == "nvidia" and a.kind == "gpu"), None)


def _judge_tensorrt(probe: Probe, variant: Any) -> list[Candidate]:
    gpu = _nvidia(probe)
    if gpu is None:
        return [Candidate(TENSORRT, {}, False, "no NVIDIA GPU found")]
    if TENSORRT not in probe.runtime.available:
        return [
            Candidate(
                TENSORRT,
                {},
                False,
                f"{gpu.name} found, but TensorRT is "
                + _not_built(TENSORRT, probe, "install onnxruntime-gpu and the TensorRT libraries"),
            )
        ]
    return [
        Candidate(
            TENSORRT,
            {},
            True,
            f"{gpu.name} found and the build has TensorRT: fastest on NVIDIA once its engine "
            "is built (engines cached under the state dir)",
        )
    ]


def _judge_cuda(probe: Probe, variant: Any) -> list[Candidate]:
    gpu = _nvidia(probe)
    if gpu is None:
        return [Candidate(CUDA, {}, False, "no NVIDIA GPU found")]
    if CUDA not in probe.runtime.available:
        return [
            Candidate(
                CUDA, {}, False, f"{gpu.name} found, but CUDA is " + _not_built(CUDA, probe, "install onnxruntime-gpu")
            )
        ]
    return [
        Candidate(
            CUDA, {}, True, f"{gpu.name} found and the build has CUDA: runs every op TensorRT cannot, no engine build"
        )
    ]


def _judge_openvino(probe: Probe, variant: Any) -> list[Candidate]:
    if probe.cpu.arch != "x86_64":
        return [
            Candidate(OPENVINO, {}, False, f"OpenVINO's onnxruntime wheel is for x86-64; this CPU is {probe.cpu.arch}")
        ]
    if OPENVINO not in probe.runtime.available:
        return [
            Candidate(
                OPENVINO,
                {},
                False,
                "x86-64 CPU found, but OpenVINO is "
                + _not_built(OPENVINO, probe, "install onnxruntime-openvino in place of onnxruntime"),
            )
        ]
    out = []
    gpu = next((a for a in probe.accelerators if a.vendor == "intel" and a.kind == "gpu"), None)
    if gpu is not None and any("renderD" in n for n in gpu.nodes):
        render = next(n for n in gpu.nodes if "renderD" in n)
        out.append(
            Candidate(
                OPENVINO,
                {"device_type": "GPU"},
                True,
                f"{gpu.name} at {render}: OpenVINO's GPU plugin (first load compiles; kernels cached under the state dir)",
            )
        )
    elif gpu is not None:
        out.append(
            Candidate(
                OPENVINO,
                {"device_type": "GPU"},
                False,
                f"{gpu.name} found without a /dev/dri render node (driver not loaded?)",
            )
        )
    npu = next((a for a in probe.accelerators if a.vendor == "intel" and a.kind == "npu"), None)
    if npu is not None:
        precision = _variant_precision(variant)
        if not npu.nodes:
            out.append(
                Candidate(
                    OPENVINO,
                    {"device_type": "NPU"},
                    False,
                    f"{npu.name} found without /dev/accel (intel_vpu driver not loaded?)",
                )
            )
        elif precision in ("fp16", "int8"):
            out.append(
                Candidate(
                    OPENVINO,
                    {"device_type": "NPU"},
                    True,
                    f"{npu.name} at {npu.nodes[0]}: suits this {precision} variant",
                )
            )
        else:
            out.append(
                Candidate(
                    OPENVINO,
                    {"device_type": "NPU"},
                    False,
                    f"{npu.name} at {npu.nodes[0]}, but auto keeps it for fp16 and int8 variants (this one is {precision}); "
                    "name openvino with device_type NPU in the profile to use it",
                )
            )
    simd = next((f for f in ("avx512f", "avx2", "sse4_2") if f in probe.cpu.flags), None)
    if simd is None:
        out.append(
            Candidate(
                OPENVINO, {"device_type": "CPU"}, False, "OpenVINO's CPU plugin needs SSE4.2, which this CPU lacks"
            )
        )
    else:
        out.append(
            Candidate(
                OPENVINO,
                {"device_type": "CPU"},
                True,
                f"{probe.cpu.vendor} x86-64 CPU with {simd}: OpenVINO's CPU plugin, usually faster than the CPU "
                "provider on convolutional models (autotune measures it)",
            )
        )
    return out


def _judge_amd(probe: Probe, variant: Any) -> list[Candidate]:
    gpu = next((a for a in probe.accelerators if a.vendor == "amd" and a.kind == "gpu"), None)
    out = []
    for name in ("MIGraphXExecutionProvider", "ROCMExecutionProvider"):
        if gpu is None:
            if name in probe.runtime.available:
                out.append(Candidate(name, {}, False, "no AMD GPU found"))
        elif name not in probe.runtime.available:
            out.append(
                Candidate(
                    name,
                    {},
                    False,
                    f"{gpu.name} found, but {name.removesuffix('ExecutionProvider')} is "
                    + _not_built(name, probe, "install onnxruntime-rocm"),
                )
            )
        else:
            out.append(Candidate(name, {}, True, f"{gpu.name} found and the build has it"))
    return out


def _judge_rknpu(probe: Probe, variant: Any) -> list[Candidate]:
    npu = next((a for a in probe.accelerators if a.vendor == "rockchip"), None)
    name = "RknpuExecutionProvider"
    if npu is None:
        return [Candidate(name, {}, False, "no Rockchip NPU found")] if name in probe.runtime.available else []
    if name not in probe.runtime.available:
        return [
            Candidate(
                name,
                {},
                False,
                f"{npu.name} found, but "
                + _not_built(
                    name, probe, "onnxruntime has no packaged RKNPU build; convert the model with rknn-toolkit2 instead"
                ),
            )
        ]
    return [Candidate(name, {}, True, f"{npu.name} found and the build has RKNPU")]


def _judge_cpu_only(name: str, why: str) -> Judge:
    def judge(probe: Probe, variant: Any) -> list[Candidate]:
        return [Candidate(name, {}, False, why)] if name in probe.runtime.available else []

    return judge


def _judge_cpu(probe: Probe, variant: Any) -> list[Candidate]:
    precision = _variant_precision(variant)
    extra = ""
    if precision == "fp16" and not ({"avx512_fp16", "asimdhp"} & set(probe.cpu.flags)):
        extra = "; this fp16 variant runs slower than fp32 would (no native fp16 on this CPU)"
    flags = " ".join(probe.cpu.flags) or "no SIMD flags found"
    return [
        Candidate(
            CPU, {}, True, f"always present: {probe.cpu.physical_cores} cores of {probe.cpu.model} ({flags}){extra}"
        )
    ]


# The auto order: accelerators the model can use, best first, the CPU provider last. A table of judges
# rather than a chain of conditions, so that a new provider is one entry.
AUTO_ORDER: tuple[Judge, ...] = (
    _judge_tensorrt,
    _judge_cuda,
    _judge_amd,
    _judge_openvino,
    _judge_rknpu,
    _judge_cpu_only(
        "QNNExecutionProvider", "in the build, but auto ranks QNN only on Qualcomm SoCs, and none was found"
    ),
    _judge_cpu_only(
        "XnnpackExecutionProvider",
        "in the build, but the CPU provider's own kernels are as fast for fp32; name xnnpack in the profile to use it",
    ),
    _judge_cpu_only(
        "ACLExecutionProvider", "in the build, but auto does not rank ACL; name acl in the profile to use it"
    ),
    _judge_cpu_only("AzureExecutionProvider", "calls a remote endpoint; not a local inference provider"),
    _judge_cpu,
)


def _orphans(probe: Probe) -> list[str]:
    """Accelerators that no onnxruntime provider drives: say so, so nobody waits for them to be used."""
    notes = []
    for a in probe.accelerators:
        where = f" at {a.nodes[0]}" if a.nodes else ""
        if a.vendor == "hailo":
            notes.append(
                f"{a.name}{where}: onnxruntime has no provider for it; compile the model with Hailo's "
                "Dataflow Compiler and run it with HailoRT"
            )
        elif a.vendor == "google":
            notes.append(f"{a.name}{where}: onnxruntime has no provider for it; convert to an Edge TPU TFLite model")
        elif a.vendor == "nvidia" and a.kind == "npu":
            notes.append(
                f"{a.name}{where}: reached through TensorRT with the provider options trt_dla_enable and trt_dla_core"
            )
    return notes


def rank(runtime: RuntimeConfig, probe: Probe, variant: Any = None) -> Ranking:
    """Providers to try, best first, and the ones left out, each with its reason.

    `variant` is a model variant from a manifest (anything with `precision` and `providers`); a variant
    built for some providers drops the others, except the CPU provider, which runs everything.
    """
    suits = _variant_providers(variant)
    if runtime.providers == "auto":
        candidates = [c for judge in AUTO_ORDER for c in judge(probe, variant)]
    else:
        candidates = _explicit(runtime.providers, probe)
    if suits:
        candidates = [
            c
            if (not c.kept or c.provider == CPU or c.provider in suits)
            else Candidate(
                c.provider,
                c.options,
                False,
                f"the {_variant_precision(variant)} variant is built for "
                f"{', '.join(s.removesuffix('ExecutionProvider') for s in suits)}",
                c.requested,
            )
            for c in candidates
        ]
    kept = [c for c in candidates if c.kept]
    dropped = [c for c in candidates if not c.kept]
    return Ranking(tuple(kept + dropped), tuple(_orphans(probe)))


def _explicit(choices: Iterable[ProviderChoice], probe: Probe) -> list[Candidate]:
    out: list[Candidate] = []
    for i, choice in enumerate(choices, 1):
        name = canonical_provider(choice.name)
        options = {k: _option_str(v) for k, v in choice.options.items()}
        if name == OPENVINO:
            options.setdefault("device_type", "CPU")  # OpenVINO's own default, made visible in labels
        if name not in probe.runtime.available:
            out.append(
                Candidate(
                    name,
                    options,
                    False,
                    f"asked for (#{i} in the list), but "
                    + _not_built(name, probe, INSTALL_HINTS.get(name, "install an onnxruntime package built with it")),
                    requested=True,
                )
            )
            continue
        reason = f"asked for (#{i} in the list)"
        if name in (TENSORRT, CUDA) and _nvidia(probe) is None:
            reason += "; the probe found no NVIDIA GPU, trying anyway"
        out.append(Candidate(name, options, True, reason, requested=True))
    if not any(c.provider == CPU for c in out):
        out.append(Candidate(CPU, {}, True, "added last: the fallback that runs every op"))
    return out


def _option_str(value: Any) -> str:
    return str(value) if not isinstance(value, bool) else ("True" if value else "False")


# ---- sessions --------------------------------------------------------------------------------------


def provider_options(candidate: Candidate, state_dir: Path, threads: int) -> dict[str, str]:
    """The candidate's options over device defaults: caches under the state dir, threads, device 0."""
    cache = Path(state_dir) / "cache"
    defaults: dict[str, str] = {}
    if candidate.provider == TENSORRT:
        # Building an engine takes minutes on a Jetson: cache it, and the timing cache that speeds rebuilds.
        defaults = {
            "device_id": "0",
            "trt_engine_cache_enable": "True",
            "trt_engine_cache_path": str(cache / "tensorrt"),
            "trt_timing_cache_enable": "True",
            "trt_timing_cache_path": str(cache / "tensorrt"),
        }
    elif candidate.provider == CUDA:
        defaults = {"device_id": "0"}
    elif candidate.provider == OPENVINO:
        defaults = {"device_type": "CPU", "cache_dir": str(cache / "openvino")}
        if candidate.options.get("device_type", "CPU") == "CPU":
            defaults["num_of_threads"] = str(threads)
    return {**defaults, **candidate.options}


def session_options(threads: int) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # Idle threads sleep instead of spinning: devices share their few cores with capture and MQTT.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    # Which nodes run where (1.24+); older runtimes ignore the key and we fall back to get_providers().
    options.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    return options


def build_session(model: Path | bytes, candidate: Candidate, state_dir: Path, threads: int) -> ort.InferenceSession:
    """One session on the candidate, with the CPU provider behind it for the ops it does not take."""
    opts = provider_options(candidate, state_dir, threads)
    for key in ("trt_engine_cache_path", "cache_dir"):
        if key in opts:
            Path(opts[key]).mkdir(parents=True, exist_ok=True)
    chain: list[tuple[str, dict[str, str]]] = [(candidate.provider, opts)]
    if candidate.provider == TENSORRT and CUDA in ort.get_available_providers():
        chain.append((CUDA, {"device_id": opts.get("device_id", "0")}))
    if candidate.provider != CPU:
        chain.append((CPU, {}))
    source = model if isinstance(model, bytes) else str(model)
    with warnings.catch_warnings():
        # onnxruntime only warns when a provider is not in the build; verify() turns that into a fallback event.
        warnings.filterwarnings("ignore", message="Specified provider", category=UserWarning)
        return ort.InferenceSession(
            source,
            sess_options=session_options(threads),
            providers=[p for p, _ in chain],
            provider_options=[o for _, o in chain],
        )


def verify(session: ort.InferenceSession) -> Verification:
    """Read back the providers the session kept and, where recorded, how many nodes each runs."""
    providers = tuple(session.get_providers())
    assignment: dict[str, int] | None = None
    getter = getattr(session, "get_provider_graph_assignment_info", None)
    if getter is not None:
        try:
            info = getter()
        except Exception as exc:  # noqa: BLE001 (optional diagnostics must never break a session)
            log.debug("graph assignment info unavailable: %s", exc)
            info = None
        if info:
            assignment = {}
            for sub in info:
                assignment[sub.ep_name] = assignment.get(sub.ep_name, 0) + len(sub.get_nodes())
    return Verification(providers, assignment)


def why_not(candidate: Candidate, check: Verification) -> str | None:
    """None when the session really runs on the candidate; otherwise the reason, in one line."""
    if candidate.provider not in check.providers:
        return (
            f"the session came up without it (runs on {', '.join(check.providers)}): "
            "its libraries are missing or the device is not usable"
        )
    total = sum(check.assignment.values()) if check.assignment else 0
    if check.assignment and total and not check.assignment.get(candidate.provider):
        return f"it took none of the model's {total} nodes"
    return None


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{exc.__class__.__name__}: {text[:300]}" if text else exc.__class__.__name__


def open_session(
    model: Path | bytes,
    runtime: RuntimeConfig,
    state_dir: Path,
    emit: EventSink = log_event,
    *,
    probe: Probe | None = None,
    variant: Any = None,
    inputs: dict[str, Any] | None = None,
) -> OpenedSession:
    """A session on the best provider that proves to work here, falling back down the ranking.

    Each step down emits a `provider.fallback` event with the reason. With `runtime.require_accelerator`
    the CPU provider is not in the chain, and running out raises AcceleratorUnavailable.
    With `runtime.autotune` the chain starts with the measured fastest (see agent.autotune).
    """
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
        from agent.device.autotune import tune

        choice = tune(
            model,
            chain,
            state_dir,
            hw,
            threads_options=None if runtime.threads == "auto" else [threads],
            inputs=inputs,
            emit=emit,
        )
        if choice is not None:
            best = next(c for c in chain if c.label == choice.label)
            chain = [best] + [c for c in chain if c is not best]
            threads, autotuned = choice.threads, True
            notes.append(
                f"autotune chose {choice.label} with {choice.threads} threads "
                f"({'cached' if choice.cached else 'measured'}: p50 {choice.p50_ms:.1f} ms)"
            )

    for i, candidate in enumerate(chain):
        after = chain[i + 1].label if i + 1 < len(chain) else None
        try:
            session = build_session(model, candidate, state_dir, threads)
        except Exception as exc:  # noqa: BLE001 (any provider failure is a reason to fall back, not to stop)
            fall(candidate.label, f"session creation failed: {one_line(exc)}", after)
            continue
        check = verify(session)
        why = why_not(candidate, check)
        if why is not None:
            fall(candidate.label, why, after)
            continue
        share = check.share(candidate.provider)
        if share is not None and share < 1:
            notes.append(
                f"{candidate.provider} runs {share:.0%} of the nodes; the rest run on "
                f"{', '.join(p for p in check.assignment or {} if p != candidate.provider)}"
            )
        return OpenedSession(
            session,
            candidate.provider,
            check.providers,
            notes,
            options=provider_options(candidate, state_dir, threads),
            threads=threads,
            assignment=check.assignment,
            fallbacks=fallbacks,
            ranking=ranking,
            autotuned=autotuned,
        )

    tried = "; ".join(f"{label}: {reason}" for label, reason in fallbacks) or "none was ranked: " + "; ".join(
        f"{c.label}: {c.reason}" for c in ranking.dropped
    )
    if runtime.require_accelerator:
        raise AcceleratorUnavailable(
            f"runtime.require_accelerator is true, but no accelerator runs this model here ({tried})"
        )
    raise ProviderError(f"no execution provider could open the model ({tried})")


def model_digest(model: Path | bytes) -> str:
    """sha256 of the model bytes: the autotune cache and manifests key on it."""
    digest = hashlib.sha256()
    if isinstance(model, bytes):
        digest.update(model)
    else:
        with open(model, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


# ---- a tiny model to prove a provider with ---------------------------------------------------------
# Written as protobuf bytes by hand, because the device side must not need the onnx package.


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, value: int | bytes | str) -> bytes:
    if isinstance(value, int):
        return _varint(number << 3) + _varint(value)
    data = value.encode() if isinstance(value, str) else value
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def probe_model(size: int = 64) -> bytes:
    """y = relu(x + x) on float32 [1, size], IR 8, opset 13: every provider takes Add and Relu."""

    def value_info(name: str) -> bytes:
        dims = _field(1, _field(1, 1)) + _field(1, _field(1, size))  # TensorShapeProto.dim[].dim_value
        tensor = _field(1, 1) + _field(2, dims)  # elem_type FLOAT, shape
        return _field(1, name) + _field(2, _field(1, tensor))  # ValueInfoProto{name, TypeProto{tensor_type}}

    add = _field(1, "x") + _field(1, "x") + _field(2, "s") + _field(3, "add") + _field(4, "Add")
    relu = _field(1, "s") + _field(2, "y") + _field(3, "relu") + _field(4, "Relu")
    graph = (
        _field(1, add)
        + _field(1, relu)
        + _field(2, "edge_agent_probe")
        + _field(11, value_info("x"))
        + _field(12, value_info("y"))
    )
    return _field(1, 8) + _field(2, "edge-agent") + _field(7, graph) + _field(8, _field(1, "") + _field(2, 13))


__all__ = [
    "AcceleratorUnavailable",
    "Candidate",
    "OpenedSession",
    "ProviderError",
    "Ranking",
    "Verification",
    "build_session",
    "canonical_provider",
    "model_digest",
    "open_session",
    "provider_options",
    "rank",
    "probe_model",
    "thread_count",
    "verify",
    "why_not",
]
