"""The compute dtype of a run (calibration forwards and Hessian accumulation; the solver stays in float32):
what ``--dtype auto`` resolves to on the run's device, and why, in words the report keeps."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# bfloat16 tensor cores start with Ampere (compute capability 8.0)
CUDA_BF16_CAPABILITY = (8, 0)


@dataclass(frozen=True)
class DeviceFacts:
    """What the run's device offers for bfloat16 matrix products, as PyTorch reports it.

    ``kind``: ``cpu`` or ``cuda``; ``cuda_capability``: the GPU's (major, minor), ``None`` on a CPU;
    ``cpu_capability``: the vector instruction set of PyTorch's CPU kernels (``AVX2``, ``AVX512``, ...);
    ``avx512_bf16`` / ``amx``: the CPU has the AVX512-BF16 / AMX instructions that oneDNN runs bfloat16
    matrix products on (every AMX CPU so far has AMX-BF16)."""

    kind: str
    cuda_capability: tuple[int, int] | None = None
    cpu_capability: str = ""
    avx512_bf16: bool = False
    amx: bool = False

    @classmethod
    def of(cls, device: str) -> DeviceFacts:
        """The facts of ``device`` (``cpu``, ``cuda`` or ``cuda:N``) on this machine."""
        if device.startswith("cuda"):
            return cls("cuda", cuda_capability=tuple(torch.cuda.get_device_capability(device)))
        # private probes of torch.cpu; absent in some versions, where the CPU counts as without them
        avx512_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
        amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
        return cls("cpu", cpu_capability=torch.backends.cpu.get_cpu_capability(), avx512_bf16=avx512_bf16, amx=amx)


def auto_compute_dtype(stored: torch.dtype, facts: DeviceFacts) -> tuple[str, str]:
    """``--dtype auto``: ``(dtype, reason)`` for a checkpoint whose floating tensors are ``stored`` in that
    dtype, computed on a device with ``facts``.

    bfloat16 only for a bfloat16 checkpoint on a device that multiplies bfloat16 matrices natively: a CUDA
    GPU of compute capability 8.0 or more, or a CPU with AVX512-BF16 or AMX (on SmolLM2, bfloat16 compute
    was within the float32 run's noise, ``runtime_bench.method_comparison``). Elsewhere PyTorch emulates
    bfloat16 matrix products, 20-27x slower than float32 on an AVX2 CPU (issue 28), so float32 is the
    faster choice there. Any other checkpoint computes in float32: float16 activations can overflow where
    float32 (and bfloat16) hold them."""
    if stored != torch.bfloat16:
        return "float32", f"the checkpoint is stored in {str(stored).removeprefix('torch.')}"
    if facts.kind == "cuda":
        major, minor = facts.cuda_capability
        if facts.cuda_capability >= CUDA_BF16_CAPABILITY:
            return "bfloat16", f"bfloat16 checkpoint on a CUDA GPU of compute capability {major}.{minor} (8.0+)"
        return "float32", f"bfloat16 checkpoint, but the CUDA GPU's compute capability {major}.{minor} is below 8.0"
    native = [name for name, present in (("AVX512-BF16", facts.avx512_bf16), ("AMX", facts.amx)) if present]
    if native:
        return "bfloat16", f"bfloat16 checkpoint on a CPU with {' and '.join(native)}"
    return "float32", (
        f"bfloat16 checkpoint, but the CPU has neither AVX512-BF16 nor AMX (PyTorch's CPU capability: "
        f"{facts.cpu_capability or 'unknown'}), where bfloat16 matrix products are emulated"
    )


def compute_dtype(requested: str, stored: torch.dtype, device: str) -> tuple[str, str]:
    """``(dtype, reason)``: ``requested`` as asked, or ``auto`` resolved for this machine's ``device``."""
    if requested != "auto":
        return requested, f"--dtype {requested}"
    return auto_compute_dtype(stored, DeviceFacts.of(device))
