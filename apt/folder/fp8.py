"""What an FP8 folder holds: compressed-tensors' ``float-quantized`` layout (the ``FP8_DYNAMIC`` scheme of
llm-compressor, which transformers and vLLM load as dense FP8), read back and checked from the folder alone.

Per quantized Linear ``M`` (every pruned 2-D weight, or every Linear of the blocks of a dense folder):
``M.weight`` float8_e4m3fn ``[out, in]`` and ``M.weight_scale`` float32 ``[out, 1]``; every other tensor as
the source stores it. ``config.json`` carries ``quantization_config`` (``quantization_config()`` below,
the keys compressed-tensors 0.14 and 0.17 both parse); a 2:4 folder also carries ``apt_sparse_24.json``
(``format: fp8``), which tells the vLLM plugin which layers are 2:4, and its ``prune_report.json`` gains a
``quantization`` entry.

Reading such a folder is ``apt.models.checkpoint.CheckpointReader``'s: every reader of a folder reads its FP8
weights as ``q · scale`` and refuses a damaged one (``SCALE_SUFFIX`` and ``SIDE_FILE`` are defined there).
"""

from __future__ import annotations

import json
from pathlib import Path

from apt.errors import InvalidInputError
from apt.folder.report import read_report
from apt.folder.targets import targets_of_folder
from apt.models.checkpoint import SCALE_SUFFIX, SIDE_FILE, CheckpointReader
from apt.solver.patterns import conforms, first_nm_violation

__all__ = [
    "SCALE_SUFFIX",
    "SCHEME",
    "SIDE_FILE",
    "is_fp8_config",
    "open_fp8_checked",
    "quantization_config",
    "quantized_modules",
    "read_side_file",
]
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


def open_fp8_checked(folder: str | Path) -> CheckpointReader:
    """The folder's reader (``apt.models.checkpoint``: FP8 weights read as ``q · scale``, their scales checked on
    opening), with every FP8 weight read once now: finite, and following the pattern the folder's report
    (or its ``apt_sparse_24.json``) says it was pruned to. What a command that measures a folder calls first,
    so a damaged FP8 folder is refused, naming the tensor, before any work."""
    reader = CheckpointReader(folder)
    if not reader.fp8:
        return reader
    targets = targets_of_folder(folder) if read_report(folder) is not None else None
    for name in sorted(reader.fp8):
        weight = reader.read(name)  # NaN and the side file's pattern are checked here
        if targets is not None and name in targets.tensors and not conforms(weight, targets.pattern):
            where = ""
            if targets.pattern.is_nm:
                row, col = first_nm_violation(weight, targets.pattern.n, targets.pattern.m)
                where = f" (row {row}, columns {col}..{col + targets.pattern.m - 1})"
            raise InvalidInputError(
                f"{folder}: the FP8 weight {name} breaks {targets.pattern}{where}, which {targets.source} says it "
                "was pruned to: the folder is damaged; quantize its pruned source again"
            )
    return reader


def quantized_modules(folder: str | Path) -> list[str]:
    """The module names (checkpoint names without ``.weight``) whose weights a folder stores in FP8."""
    return sorted(n.removesuffix(".weight") for n in CheckpointReader(folder).fp8)


def read_side_file(folder: str | Path) -> dict | None:
    path = Path(folder) / SIDE_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise InvalidInputError(f"{path} is damaged ({err}); quantize the folder again") from err
