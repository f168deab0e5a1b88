"""Execution-provider ranking: which providers to try here, best first, and why each other one is left out.

ONNX Runtime's own answer is not enough: `get_available_providers()` lists what the wheel was built
with, not what this device can drive. So the ranking starts from the hardware probe, and every
provider it leaves out carries its reason. agent.device.session then proves the choice on a real
session and falls back down the ranking.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from agent.config.errors import did_you_mean
from agent.config.runtime import KNOWN_PROVIDERS, PROVIDER_ALIASES, ProviderChoice, RuntimeConfig
from agent.device.accelerators import Accelerator
from agent.device.hardware import Probe, cpu_budget, physical_cores

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
OPENVINO = "OpenVINOExecutionProvider"


class VariantTraits(Protocol):
    """What ranking reads from a model variant (agent.models.manifest.Variant has both)."""

    @property
    def precision(self) -> str: ...

    @property
    def providers(self) -> Sequence[str]: ...


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


def canonical_provider(name: str) -> str:
    """`cuda`, `CUDA` and `CUDAExecutionProvider` all name one provider; ValueError for unknown names."""
    full = PROVIDER_ALIASES.get(name.lower(), name)
    if full not in KNOWN_PROVIDERS:
        lowered = {p.lower(): p for p in KNOWN_PROVIDERS}
        if name.lower() in lowered:
            return lowered[name.lower()]
        raise ValueError(
            f"unknown execution provider {name!r}{did_you_mean(name, list(PROVIDER_ALIASES) + list(KNOWN_PROVIDERS))}"
        )
    return full


def thread_count(runtime: RuntimeConfig, probe: Probe | None = None) -> int:
    """Intra-op threads: the profile's number, or the device's thread budget (`core_budget`)."""
    return int(runtime.threads) if runtime.threads != "auto" else core_budget(probe)


def run_threads(threads: int, at_once: int) -> int:
    """Each run's share of `threads` when `at_once` inferences run at once on the CPU provider (camera
    pipelines on the stage pool), so that together they use the budget once. Two 2-thread runs on 2 cores
    wait on each other's threads at every parallel step: four PP-OCR cameras made ~20% more results with
    two 1-thread runs at once than with one 2-thread run at a time. Not for OpenVINO: its 1-thread runs
    on one session made a third fewer results than 2-thread ones (bench/bench_runtime.py)."""
    return max(1, threads // max(1, min(at_once, threads)))


def core_budget(probe: Probe | None = None) -> int:
    """The device's one thread budget: physical cores (hyperthreads share one core's vector units), and
    never more than the CPUs this process may use (affinity, cgroup quota: see `hardware.cpu_budget`)."""
    budget = probe.budget if probe is not None and probe.budget is not None else cpu_budget()
    cores = probe.cpu.physical_cores if probe is not None else physical_cores()
    return max(1, min(cores, budget.usable))


# ---- ranking ---------------------------------------------------------------------------------------

Judge = Callable[[Probe, "VariantTraits | None"], "list[Candidate]"]


def _variant_precision(variant: VariantTraits | None) -> str:
    return variant.precision if variant is not None else "fp32"


def _variant_providers(variant: VariantTraits | None) -> tuple[str, ...]:
    names = variant.providers if variant is not None else ()
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


def _nvidia(probe: Probe) -> Accelerator | None:
    return next((a for a in probe.accelerators if a.vendor == "nvidia" and a.kind == "gpu"), None)


def _judge_tensorrt(probe: Probe, variant: VariantTraits | None) -> list[Candidate]:
    gpu = _nvidia(probe)
    if gpu is None:
        return [Candidate(TENSORRT, {}, False, "no NVIDIA GPU found")]
    if TENSORRT not in probe.runtime.available:
        return [
            Candidate(
                TENSORRT,
                {},
                False,
                f"{gpu.name} found, but TensorRT is " + _not_built(TENSORRT, probe, INSTALL_HINTS[TENSORRT]),
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


def _judge_cuda(probe: Probe, variant: VariantTraits | None) -> list[Candidate]:
    gpu = _nvidia(probe)
    if gpu is None:
        return [Candidate(CUDA, {}, False, "no NVIDIA GPU found")]
    if CUDA not in probe.runtime.available:
        return [
            Candidate(CUDA, {}, False, f"{gpu.name} found, but CUDA is " + _not_built(CUDA, probe, INSTALL_HINTS[CUDA]))
        ]
    return [
        Candidate(
            CUDA, {}, True, f"{gpu.name} found and the build has CUDA: runs every op TensorRT cannot, no engine build"
        )
    ]


def _judge_openvino(probe: Probe, variant: VariantTraits | None) -> list[Candidate]:
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
                "x86-64 CPU found, but OpenVINO is " + _not_built(OPENVINO, probe, INSTALL_HINTS[OPENVINO]),
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


def _judge_amd(probe: Probe, variant: VariantTraits | None) -> list[Candidate]:
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


def _judge_rknpu(probe: Probe, variant: VariantTraits | None) -> list[Candidate]:
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
    def judge(probe: Probe, variant: VariantTraits | None) -> list[Candidate]:
        return [Candidate(name, {}, False, why)] if name in probe.runtime.available else []

    return judge


def _judge_cpu(probe: Probe, variant: VariantTraits | None) -> list[Candidate]:
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


def rank(runtime: RuntimeConfig, probe: Probe, variant: VariantTraits | None = None) -> Ranking:
    """Providers to try, best first, and the ones left out, each with its reason.

    `variant` is a model variant from a manifest; a variant
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


def _option_str(value: str | int | float | bool) -> str:
    return str(value) if not isinstance(value, bool) else ("True" if value else "False")
