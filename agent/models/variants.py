"""Which of a manifest's variants this device prefers, for the provider that will run it, and why.

A fixed fp32 > fp16 > int8 order wastes the hardware: a GPU runs fp16 about twice as fast as fp32 with
the same accuracy for most vision models, and a CPU or NPU with int8 kernels runs a quantised variant
several times faster, at an accuracy cost that only the publisher can measure. So:

- int8 first where the provider has int8 kernels and the manifest's `accuracy_loss` for the variant
  (measured by the publisher against the reference variant) is within `registry.max_accuracy_loss`;
  an int8 variant without that figure is never preferred (its cost is unknown);
- fp16 before fp32 on a provider that runs fp16 faster (GPUs; a CPU only with native fp16 arithmetic);
- otherwise the publisher's order, fp32 before fp16 before int8.

The ranking is stable: variants of one rank keep the publisher's order (e.g. lower-opset exports).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from agent.models.fetch import RefusalError
from agent.models.manifest import Variant

if TYPE_CHECKING:
    from agent.config.runtime import RuntimeConfig

CPU = "CPUExecutionProvider"
# Providers whose fp16 kernels run faster than their fp32 ones (tensor cores, GPU half-precision ALUs).
FAST_FP16 = frozenset(
    {
        "CUDAExecutionProvider",
        "TensorrtExecutionProvider",
        "NvTensorRTRTXExecutionProvider",
        "ROCMExecutionProvider",
        "MIGraphXExecutionProvider",
        "DmlExecutionProvider",
        "CoreMLExecutionProvider",
        "WebGpuExecutionProvider",
        "QNNExecutionProvider",
        "NnapiExecutionProvider",
    }
)
# Providers with int8 kernels (QLinear*/QDQ fused, MatMulInteger), where a quantised model runs faster.
INT8_KERNELS = frozenset(
    {
        CPU,  # MLAS: VNNI/AMX on x86-64, dot-product instructions on ARM
        "TensorrtExecutionProvider",
        "NvTensorRTRTXExecutionProvider",
        "OpenVINOExecutionProvider",
        "XnnpackExecutionProvider",
        "QNNExecutionProvider",
        "ACLExecutionProvider",
        "ArmNNExecutionProvider",
        "NnapiExecutionProvider",
        "RknpuExecutionProvider",
        "VitisAIExecutionProvider",
        "MIGraphXExecutionProvider",
    }
)
# CPU flags of native fp16 arithmetic (x86-64 AVX512-FP16, ARMv8.2 half precision).
CPU_FP16_FLAGS = frozenset({"avx512_fp16", "asimdhp"})
DEFAULT_MAX_ACCURACY_LOSS = 0.01


@dataclass(frozen=True)
class Preference:
    """A variant in the device's order of preference, and why it stands there."""

    variant: Variant
    reason: str


def fast_fp16(provider: str, cpu_flags: Iterable[str] = ()) -> bool:
    if provider == CPU:
        return bool(CPU_FP16_FLAGS & set(cpu_flags))
    return provider in FAST_FP16


def _short(provider: str) -> str:
    return provider.removesuffix("ExecutionProvider")


def rank_variants(
    variants: Sequence[Variant],
    provider: str,
    *,
    cpu_flags: Iterable[str] = (),
    max_accuracy_loss: float = DEFAULT_MAX_ACCURACY_LOSS,
) -> list[Preference]:
    """`variants` best first for `provider`, each with the reason for its place."""
    fp16 = fast_fp16(provider, cpu_flags)
    int8 = provider in INT8_KERNELS
    name = _short(provider)
    ranked: list[tuple[int, Preference]] = []
    for variant in variants:
        if variant.precision == "int8":
            loss = variant.accuracy_loss
            if int8 and loss is not None and loss <= max_accuracy_loss:
                rank, why = (
                    0,
                    (
                        f"int8 first: {name} has int8 kernels and the variant loses {loss:.2%} accuracy "
                        f"(registry.max_accuracy_loss {max_accuracy_loss:.2%})"
                    ),
                )
            elif not int8:
                rank, why = 3, f"int8 last: {name} has no int8 kernels"
            elif loss is None:
                rank, why = 3, "int8 last: the manifest gives no accuracy_loss for it"
            else:
                rank, why = (
                    3,
                    (
                        f"int8 last: it loses {loss:.2%} accuracy, over registry.max_accuracy_loss {max_accuracy_loss:.2%}"
                    ),
                )
        elif variant.precision == "fp16":
            rank, why = (
                (1, f"fp16 before fp32: {name} runs fp16 faster")
                if fp16
                else (2, f"fp32 before fp16: {name} has no faster fp16")
            )
        else:
            rank, why = (2, f"fp16 before fp32: {name} runs fp16 faster") if fp16 else (1, f"fp32 first on {name}")
        ranked.append((rank, Preference(variant, why)))
    ranked.sort(key=lambda pair: pair[0])  # stable: equal ranks keep the publisher's order
    return [preference for _, preference in ranked]


def target_provider(runtime: RuntimeConfig | None, available: Sequence[str]) -> str:
    """The provider that will run what a pull installs: the first one the ranking keeps here."""
    from agent.config.runtime import RuntimeConfig
    from agent.device.hardware import probe
    from agent.device.providers import rank

    kept = rank(runtime or RuntimeConfig(), probe()).kept
    usable = [c.provider for c in kept if c.provider in available]
    return usable[0] if usable else CPU


def choose(
    variants: Sequence[Variant],
    provider: str,
    refusal: Callable[[Variant], str | None],
    max_accuracy_loss: float = DEFAULT_MAX_ACCURACY_LOSS,
) -> Preference:
    """The most preferred variant that `refusal` lets run here; RefusalError with every reason when none."""
    from agent.device.hardware import probe

    flags = probe().cpu.flags if provider == CPU else ()
    reasons = []
    for preference in rank_variants(variants, provider, cpu_flags=flags, max_accuracy_loss=max_accuracy_loss):
        reason = refusal(preference.variant)
        if reason is None:
            return preference
        reasons.append(reason)
    raise RefusalError("; ".join(reasons) if len(reasons) == 1 else "no variant can run here: " + "; ".join(reasons))
