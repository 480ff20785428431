"""What every exporter shares: reading a pruned folder, refusing weights that are not N:M, and the manifest."""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from apt.artifacts import file_listing, write_json_atomic
from apt.errors import InvalidInputError
from apt.patterns import first_nm_violation, is_nm_sparse
from apt.run import REPORT_NAME, versions


@dataclass(frozen=True)
class PrunedCheckpoint:
    """A pruned Hugging Face folder: its tensors (``name → tensor``), its config and the names of the
    weights that were pruned (from ``prune_report.json``, or every 2-D weight inside the blocks)."""

    folder: Path
    tensors: dict
    config: dict
    targets: tuple[str, ...]
    report: dict | None


def read_checkpoint(folder: str | Path) -> PrunedCheckpoint:
    from safetensors.torch import load_file

    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not (folder / "config.json").is_file() or not files:
        raise InvalidInputError(f"{folder} is not a Hugging Face folder with safetensors: export a pruned model folder")
    tensors = {}
    for file in files:
        tensors.update(load_file(str(file)))
    report_path = folder / REPORT_NAME
    report = json.loads(report_path.read_text()) if report_path.is_file() else None
    if report:
        targets = tuple(f"{r['name']}.weight" for r in report["layers"] if not r["skipped"])
    else:
        targets = tuple(n for n, t in tensors.items() if t.dim() == 2 and ".layers." in n and n.endswith(".weight"))
    return PrunedCheckpoint(folder, tensors, json.loads((folder / "config.json").read_text()), targets, report)


def verify_nm(checkpoint: PrunedCheckpoint, n: int = 2, m: int = 4) -> list[dict]:
    """Per target weight ``{name, shape, nm_valid}``; raises naming the first weight that is not N:M."""
    rows = []
    for name in checkpoint.targets:
        if name not in checkpoint.tensors:
            raise InvalidInputError(f"{name} is listed in the prune report but missing from {checkpoint.folder}")
        weight = checkpoint.tensors[name]
        if not is_nm_sparse(weight, n, m):
            where = first_nm_violation(weight, n, m)
            raise InvalidInputError(
                f"{name} {tuple(weight.shape)} is not {n}:{m} sparse along its input dimension "
                f"(row {where[0]}, columns {where[1]}..{where[1] + m - 1}): prune it first with apt-sparse prune"
            )
        rows.append({"name": name, "shape": list(weight.shape), "nm_valid": True})
    return rows


def positive_zeros(tensor: torch.Tensor) -> torch.Tensor:
    """Stored zeros must be +0.0 (a stored -0.0 once produced garbage in vLLM's sparse path)."""
    return torch.where(tensor == 0, torch.zeros((), dtype=tensor.dtype), tensor)


def write_manifest(
    folder: Path, *, source: Path, target: str, layers: list[dict], validation: dict, extra: dict | None = None
) -> dict:
    manifest = {
        "schema": "apt-sparse/export-manifest/1",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": str(source.resolve()),
        "target": target,
        "versions": versions(),
        "files": file_listing(folder),
        "pattern_check": {"pattern": "2:4", "layers": layers, "all_valid": all(r["nm_valid"] for r in layers)},
        "validation": validation,
    } | (extra or {})
    write_json_atomic(folder / "manifest.json", manifest)
    return manifest
