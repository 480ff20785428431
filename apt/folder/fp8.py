"""What an FP8 folder holds: compressed-tensors' ``float-quantized`` layout (the ``FP8_DYNAMIC`` scheme of
llm-compressor, which transformers and vLLM load as dense FP8), read back and checked from the folder alone.

Per quantized Linear ``M`` (every pruned 2-D weight, or every Linear of the blocks of a dense folder):
``M.weight`` float8_e4m3fn ``[out, in]`` and ``M.weight_scale`` float32 ``[out, 1]``; every other tensor as
the source stores it. ``config.json`` carries ``quantization_config`` (``quantization_config()`` below,
the keys compressed-tensors 0.14 and 0.17 both parse); a 2:4 folder also carries ``apt_sparse_24.json``
(``format: fp8``), which tells the vLLM plugin which layers are 2:4, and its ``prune_report.json`` gains a
``quantization`` entry.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from apt.errors import InvalidInputError
from apt.models.checkpoint import CheckpointReader
from apt.solver.fp8 import FP8, dequantize_weight

SCALE_SUFFIX = ".weight_scale"
SIDE_FILE = "apt_sparse_24.json"  # serving.vllm_plugin.SIDE_FILE: the plugin's list of 2:4 layers
SCHEME = "FP8_DYNAMIC"  # llm-compressor's name for it: W8A8, channel-wise weights, dynamic per-token inputs


def _args(strategy: str, dynamic: bool, observer) -> dict:
    return {
        "num_bits": 8,
        "type": "float",
        "symmetric": True,
        "group_size": None,
        "strategy": strategy,
        "block_structure": None,
        "dynamic": dynamic,
        "actorder": None,
        "observer": observer,
        "observer_kwargs": {},
    }


def quantization_config(ignore: list[str]) -> dict:
    """``config.json``'s ``quantization_config``: what compressed-tensors' ``QuantizationConfig`` with the
    ``FP8_DYNAMIC`` preset dumps (checked against 0.17's own in tests), without the keys 0.14 lacks."""
    return {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": _args("channel", False, "minmax"),
                "input_activations": _args("token", True, None),
                "output_activations": None,
            }
        },
        "ignore": sorted(set(ignore)),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }


def is_fp8_config(config: dict) -> bool:
    """Whether a ``config.json`` describes this layout (channel-wise FP8 weights, dynamic per-token FP8 inputs)."""
    quant = config.get("quantization_config") or {}
    if str(quant.get("quant_method", "")).replace("_", "-") != "compressed-tensors":
        return False
    if quant.get("format") != "float-quantized":
        return False
    groups = list((quant.get("config_groups") or {}).values())
    return bool(groups) and all(
        (g.get("weights") or {}).get("type") == "float"
        and (g.get("weights") or {}).get("num_bits") == 8
        and (g.get("weights") or {}).get("strategy") == "channel"
        and (g.get("input_activations") or {}).get("strategy") == "token"
        and (g.get("input_activations") or {}).get("dynamic") is True
        for g in groups
    )


def fp8_weights(reader: CheckpointReader) -> list[str]:
    """The FP8 weights of a checkpoint (tensor names ending in ``.weight``); each must have its scale, of one
    float32 per output row, or the folder is refused naming the first that lacks it."""
    names = [n for n in reader.names() if reader.info(n).dtype == FP8]
    for name in names:
        scale = name.removesuffix(".weight") + SCALE_SUFFIX
        if not name.endswith(".weight"):
            raise InvalidInputError(f"{reader.folder}: {name} is float8 but not a weight: not this FP8 layout")
        if scale not in reader:
            raise InvalidInputError(
                f"{reader.folder}: {name} is float8 but the folder lacks {scale} (its per-channel scales): "
                "the folder is damaged; quantize it again with apt-sparse quantize"
            )
        rows = reader.info(name).shape[0]
        info = reader.info(scale)
        if info.dtype != torch.float32 or info.shape not in ((rows, 1), (rows,)):
            raise InvalidInputError(
                f"{reader.folder}: {scale} is {str(info.dtype).removeprefix('torch.')} {list(info.shape)}, "
                f"expected float32 [{rows}, 1]: the folder is damaged; quantize it again"
            )
    return names


class DequantizingReader(CheckpointReader):
    """A ``CheckpointReader`` over an FP8 folder that returns each FP8 weight as ``q · scale`` (float32, then
    the dtype asked): the weights an FP8 GEMM multiplies, for measuring the folder with the float model."""

    def __init__(self, folder: str | Path):
        super().__init__(folder)
        self.fp8 = set(fp8_weights(self))

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        if name not in self.fp8:
            return super().read(name, dtype)
        q = super().read(name)
        scale = super().read(name.removesuffix(".weight") + SCALE_SUFFIX)
        return dequantize_weight(q, scale, dtype or torch.float32)

    def scale(self, name: str) -> torch.Tensor:
        """``[out]`` float32 scales of the FP8 weight ``name``."""
        return super().read(name.removesuffix(".weight") + SCALE_SUFFIX).reshape(-1)


def quantized_modules(folder: str | Path) -> list[str]:
    """The module names (checkpoint names without ``.weight``) whose weights a folder stores in FP8."""
    return [n.removesuffix(".weight") for n in fp8_weights(CheckpointReader(folder))]


def read_side_file(folder: str | Path) -> dict | None:
    path = Path(folder) / SIDE_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise InvalidInputError(f"{path} is damaged ({err}); quantize the folder again") from err
