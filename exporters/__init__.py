"""Exporters: one registry, ``target → function(src, out, **options) -> manifest``.

Heavy optional packages (onnx, onnxruntime, tensorrt) are imported inside the exporter that needs them,
so ``import exporters`` works without them.
"""

from __future__ import annotations

from exporters.compressed_tensors import export_compressed_tensors
from exporters.onnx_export import export_onnx
from exporters.tensorrt import export_tensorrt
from exporters.vllm import export_vllm

EXPORTERS = {
    "onnx": export_onnx,
    "tensorrt": export_tensorrt,
    "vllm": export_vllm,
    "compressed-tensors": export_compressed_tensors,
}


def export(target: str, src, out, **options) -> dict:
    from apt.errors import InvalidInputError

    if target not in EXPORTERS:
        raise InvalidInputError(f"unknown export target {target!r}: choose one of {', '.join(EXPORTERS)}")
    return EXPORTERS[target](src, out, **options)
