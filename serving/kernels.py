"""PyTorch core's 2:4 semi-structured kernels (``torch.sparse.to_sparse_semi_structured``: cuSPARSELt by
default, CUTLASS on request), and whether they can run here. They need an NVIDIA GPU of compute
capability 8.0 or newer and fp16/bf16 (or int8; fp8 on sm90) weights."""

from __future__ import annotations

from dataclasses import dataclass

import torch

KERNELS = ("torch-sparse-cusparselt", "torch-sparse-cutlass")


@dataclass(frozen=True)
class Availability:
    available: bool
    reason: str  # why not, or what it runs on

    def as_dict(self) -> dict:
        return {"available": self.available, "reason": self.reason}


def cuda_sm80() -> Availability:
    if not torch.cuda.is_available():
        return Availability(False, "no CUDA GPU: PyTorch's 2:4 kernels run on NVIDIA GPUs of compute capability >= 8.0")
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return Availability(False, f"GPU compute capability {major}.{minor} < 8.0 has no 2:4 sparse tensor cores")
    return Availability(True, f"{torch.cuda.get_device_name()} (sm{major}{minor})")


def cusparselt() -> Availability:
    base = cuda_sm80()
    if not base.available:
        return base
    if not torch.backends.cusparselt.is_available():
        return Availability(False, "this PyTorch build has no cuSPARSELt")
    return Availability(True, f"{base.reason}, cuSPARSELt {torch.backends.cusparselt.version()}")


def cutlass() -> Availability:
    return cuda_sm80()


def kernel_availability(kernel: str) -> Availability:
    return {"torch-sparse-cusparselt": cusparselt, "torch-sparse-cutlass": cutlass}[kernel]()


def to_sparse(weight: torch.Tensor, kernel: str):
    """A 2:4 ``weight`` ``[out, in]`` (CUDA, fp16/bf16) as PyTorch's semi-structured sparse tensor."""
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    SparseSemiStructuredTensor._FORCE_CUTLASS = kernel == "torch-sparse-cutlass"
    return to_sparse_semi_structured(weight)
