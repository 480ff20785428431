"""FP8 emulated exactly on any machine: an FP8 folder's weights as ``q · scale`` (the folder's reader,
``apt.models.checkpoint``) and the inputs of its quantized Linears through float8_e4m3fn and back per token, as
vLLM's FP8 path and compressed-tensors' forward quantize them. Only the accumulation differs from an FP8 GEMM
(float32 here).

Every command that streams a folder (``eval``, the report's accuracy, the benchmarks) gets this from
``apt.models.layered`` by itself; this module is the same emulation for a whole model in memory (what
transformers' and vLLM's outputs are compared with).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch

from apt.errors import InvalidInputError
from apt.models.checkpoint import SCALE_SUFFIX, CheckpointReader
from apt.models.layered import quantize_inputs


@contextlib.contextmanager
def fp8_activations(model: torch.nn.Module, modules: list[str]) -> Iterator[None]:
    """While open, the inputs of ``modules`` (names in ``model``, or checkpoint names that end with one)
    are quantized per token before every call."""
    found = dict(model.named_modules())
    handles = []
    try:
        for name in modules:
            match = next(
                (n for n in found if n and (n == name or name.endswith(f".{n}") or n.endswith(f".{name}"))), None
            )
            if match is None:
                raise InvalidInputError(f"{name} has no module in this model")
            handles.append(found[match].register_forward_pre_hook(quantize_inputs))
        yield
    finally:
        for handle in handles:
            handle.remove()


def load_fp8_emulated(folder: str | Path, dtype: torch.dtype = torch.float32):
    """``(model, modules)``: the transformers model of an FP8 folder with ``q · scale`` weights in ``dtype``
    (the folder's quantization config is not applied: this is the float model), and its FP8 modules."""
    import json

    import transformers

    from apt.models.layered import auto_class

    folder = Path(folder)
    reader = CheckpointReader(folder)
    if not reader.fp8:
        raise InvalidInputError(f"{folder} holds no FP8 weight: quantize it with apt-sparse quantize")
    config = json.loads((folder / "config.json").read_text())
    config.pop("quantization_config", None)
    model_type = config.pop("model_type")
    hf_config = transformers.AutoConfig.for_model(model_type, **config)
    model = auto_class(hf_config).from_config(hf_config, dtype=dtype).eval()
    state = {name: reader.read(name, dtype) for name in reader.names() if not name.endswith(SCALE_SUFFIX)}
    prefix = getattr(model, "base_model_prefix", "")
    own = model.state_dict()
    renamed = {}
    for name, tensor in state.items():
        key = next((k for k in (name, f"{prefix}.{name}", name.removeprefix(f"{prefix}.")) if k in own), None)
        if key is not None:
            renamed[key] = tensor
    missing = [k for k in own if k not in renamed and not _tied(model, k)]
    if missing:
        raise InvalidInputError(f"{folder} lacks {missing[0]} (and {len(missing) - 1} more)")
    model.load_state_dict(renamed, strict=False)
    if getattr(hf_config, "tie_word_embeddings", False):
        model.tie_weights()
    return model, sorted(n.removesuffix(".weight") for n in reader.fp8)


def _tied(model, key: str) -> bool:
    return key.endswith("lm_head.weight") and getattr(model.config, "tie_word_embeddings", False)
