"""The registry of bench backends. Each says whether it can run here and, if not, exactly why.

- ``torch-dense``: ``torch.nn.functional.linear`` on the dense weight (CPU or CUDA).
- ``torch-sparse-cusparselt`` / ``torch-sparse-cutlass``: PyTorch's semi-structured 2:4 tensors
  (``serving.kernels``); CUDA compute capability ≥ 8.0, fp16/bf16 (and int8).
- ``onnxruntime``: the exported ONNX graph in ONNX Runtime (dense kernels; CUDA provider where present).
- ``vllm``: the dense folder in vLLM against the pruned one served by the ``apt_sparse_24`` plugin
  (``serving.vllm_run bench``: prefill latency and decode tokens/s at batch 1, 8 and 64).
- ``tensorrt``: a TensorRT engine built with ``SPARSE_WEIGHTS``.
"""

from __future__ import annotations

import importlib.util

import torch

from serving.kernels import Availability, cusparselt, cutlass


def torch_dense() -> Availability:
    if torch.cuda.is_available():
        return Availability(True, torch.cuda.get_device_name())
    return Availability(True, f"CPU, {torch.get_num_threads()} threads")


def onnxruntime_backend() -> Availability:
    if importlib.util.find_spec("onnxruntime") is None:
        return Availability(False, "onnxruntime is not installed (pip install onnxruntime)")
    import onnxruntime

    providers = onnxruntime.get_available_providers()
    return Availability(True, f"onnxruntime {onnxruntime.__version__}, providers {', '.join(providers)}; dense kernels")


def vllm_backend() -> Availability:
    from serving.vllm_run import vllm_python

    python = vllm_python()
    if python is None:
        return Availability(False, "no environment with vLLM (set APT_SPARSE_VLLM_PYTHON, or make install)")
    where = "CPU: the plugin computes dense there" if not torch.cuda.is_available() else "GPU"
    return Availability(True, f"vLLM at {python}, dense vs the apt_sparse_24 plugin; {where}")


def tensorrt_backend() -> Availability:
    if importlib.util.find_spec("tensorrt") is None:
        return Availability(False, "the tensorrt package is not installed (and it needs an NVIDIA GPU)")
    if not torch.cuda.is_available():
        return Availability(False, "no CUDA GPU")
    return Availability(True, "tensorrt with SPARSE_WEIGHTS")


BACKENDS = {
    "torch-dense": torch_dense,
    "torch-sparse-cusparselt": cusparselt,
    "torch-sparse-cutlass": cutlass,
    "onnxruntime": onnxruntime_backend,
    "vllm": vllm_backend,
    "tensorrt": tensorrt_backend,
}


def availability() -> dict[str, dict]:
    return {name: check().as_dict() for name, check in BACKENDS.items()}
