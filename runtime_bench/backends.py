"""The registry of bench backends. Each says whether it can run here and, if not, exactly why.

- ``torch-dense``: ``torch.nn.functional.linear`` on the dense weight (CPU or CUDA).
- ``torch-sparse-cusparselt`` / ``torch-sparse-cutlass``: PyTorch's semi-structured 2:4 tensors
  (``to_sparse_semi_structured``); CUDA compute capability ≥ 8.0, fp16/bf16 (and int8).
- ``onnxruntime``: the exported ONNX graph in ONNX Runtime (dense kernels; CUDA provider where present).
- ``tensorrt``: a TensorRT engine built with ``SPARSE_WEIGHTS``.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Availability:
    available: bool
    reason: str  # why not, or what it runs on

    def as_dict(self) -> dict:
        return {"available": self.available, "reason": self.reason}


def _cuda_sm80() -> Availability:
    if not torch.cuda.is_available():
        return Availability(False, "no CUDA GPU: PyTorch's 2:4 kernels run on NVIDIA GPUs of compute capability >= 8.0")
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return Availability(False, f"GPU compute capability {major}.{minor} < 8.0 has no 2:4 sparse tensor cores")
    return Availability(True, f"{torch.cuda.get_device_name()} (sm{major}{minor})")


def torch_dense() -> Availability:
    if torch.cuda.is_available():
        return Availability(True, torch.cuda.get_device_name())
    return Availability(True, f"CPU, {torch.get_num_threads()} threads")


def torch_sparse_cusparselt() -> Availability:
    base = _cuda_sm80()
    if not base.available:
        return base
    if not torch.backends.cusparselt.is_available():
        return Availability(False, "this PyTorch build has no cuSPARSELt")
    return Availability(True, f"{base.reason}, cuSPARSELt {torch.backends.cusparselt.version()}")


def torch_sparse_cutlass() -> Availability:
    return _cuda_sm80()


def onnxruntime_backend() -> Availability:
    if importlib.util.find_spec("onnxruntime") is None:
        return Availability(False, "onnxruntime is not installed (pip install onnxruntime)")
    import onnxruntime

    providers = onnxruntime.get_available_providers()
    return Availability(True, f"onnxruntime {onnxruntime.__version__}, providers {', '.join(providers)}; dense kernels")


def tensorrt_backend() -> Availability:
    if importlib.util.find_spec("tensorrt") is None:
        return Availability(False, "the tensorrt package is not installed (and it needs an NVIDIA GPU)")
    if not torch.cuda.is_available():
        return Availability(False, "no CUDA GPU")
    return Availability(True, "tensorrt with SPARSE_WEIGHTS")


BACKENDS = {
    "torch-dense": torch_dense,
    "torch-sparse-cusparselt": torch_sparse_cusparselt,
    "torch-sparse-cutlass": torch_sparse_cutlass,
    "onnxruntime": onnxruntime_backend,
    "tensorrt": tensorrt_backend,
}


def availability() -> dict[str, dict]:
    return {name: check().as_dict() for name, check in BACKENDS.items()}


def to_sparse(weight: torch.Tensor, backend: str):
    """A 2:4 ``weight`` ``[out, in]`` (CUDA, fp16/bf16) as PyTorch's semi-structured sparse tensor."""
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    SparseSemiStructuredTensor._FORCE_CUTLASS = backend == "torch-sparse-cutlass"
    return to_sparse_semi_structured(weight)
