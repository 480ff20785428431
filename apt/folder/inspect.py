"""Per-tensor sparsity of a checkpoint folder and whether its pruned weights follow the pattern, read
one tensor at a time from its safetensors."""

from __future__ import annotations

from pathlib import Path

from apt.folder.fp8 import SCALE_SUFFIX, open_fp8_checked
from apt.folder.targets import targets_of_folder
from apt.solver.patterns import as_rows, conforms, sparsity_of


def inspect_checkpoint(path: str | Path, pattern: str | None = None) -> dict:
    """``{pattern, targets_from, tensors}``; one row per 2-D floating-point tensor and per pruned 3-D experts
    tensor: ``name``, ``shape``, ``sparsity``, ``target`` (pruned, per ``apt.folder.targets``) and
    ``follows_pattern`` along the tensor's input axis (None where the pattern cannot apply: an N:M pattern
    on a width that is not a multiple of M). An FP8 folder is read as FP8 (``q · scale``; a damaged one is
    refused, ``apt.folder.fp8.open_fp8_checked``) and also gives each FP8 weight's ``dtype`` and ``scale`` (min,
    max of its per-channel scales); the scales are not rows of their own."""
    reader = open_fp8_checked(path)
    targets = targets_of_folder(path, pattern)
    pruned = set(targets.tensors)
    rows = []
    for name in reader.names():
        info = reader.info(name)
        if not info.dtype.is_floating_point or (len(info.shape) != 2 and name not in pruned):
            continue
        if name.endswith(SCALE_SUFFIX) and name.removesuffix(SCALE_SUFFIX) + ".weight" in reader.fp8:
            continue
        tensor = as_rows(reader.read(name), targets.axis(name))
        applies = not targets.pattern.is_nm or tensor.shape[1] % targets.pattern.m == 0
        rows.append(
            {
                "name": name,
                "shape": list(info.shape),
                "sparsity": sparsity_of(tensor),
                "target": name in pruned,
                "follows_pattern": conforms(tensor, targets.pattern) if applies else None,
                "dtype": str(info.dtype).removeprefix("torch."),
            }
        )
        if name in reader.fp8:
            scale = reader.read(name.removesuffix(".weight") + SCALE_SUFFIX)
            rows[-1]["scale"] = {"min": float(scale.min()), "max": float(scale.max())}
    return {"pattern": str(targets.pattern), "targets_from": targets.source, "tensors": rows}
