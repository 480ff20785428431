"""What every exporter shares: the pruned source read one tensor at a time, the check that every pruned
weight follows the pattern, and the manifest.

Which weights were pruned, and with which pattern, comes from ``apt.folder.targets`` (the folder's
``prune_report.json``, else discovery): the same definition the run and the benchmark use.
An exporter refuses, before writing anything, a folder with no pruned weights, a weight that breaks
the pattern, and a pattern its target format cannot hold.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from apt.atomic import check_free_space, file_listing, write_json_atomic
from apt.errors import InvalidInputError
from apt.folder.fp8 import open_fp8_checked
from apt.folder.report import read_report, versions
from apt.folder.targets import PrunedTargets, targets_of_folder
from apt.models.checkpoint import CheckpointReader
from apt.solver.patterns import Pattern, as_rows, conforms, first_nm_violation

# A pattern check of an export target: None where the target can hold the pattern, else the reason.
PatternCheck = Callable[[Pattern], "str | None"]


def any_pattern(_pattern: Pattern) -> str | None:
    return None


def only_2_4(why: str) -> PatternCheck:
    def check(pattern: Pattern) -> str | None:
        return None if (pattern.n, pattern.m) == (2, 4) else why

    return check


@dataclass(frozen=True)
class PrunedSource:
    """A pruned Hugging Face folder: its tensors behind a reader, its config, and what was pruned."""

    folder: Path
    reader: CheckpointReader
    config: dict
    targets: PrunedTargets


def open_pruned(
    folder: str | Path,
    target: str,
    accepts: PatternCheck = any_pattern,
    experts: str | None = None,
    fp8: str | None = None,
) -> PrunedSource:
    """Open ``folder`` for the export ``target``; refuses (nothing written yet) a folder that is not a
    model folder, a damaged FP8 folder (naming the tensor), an FP8 folder where ``fp8`` says why ``target``
    cannot carry FP8 (``None``: it carries it), a folder with no pruned weights, whose pattern ``target``
    cannot hold, or (``experts``: the reason) whose pruned weights include MoE experts the format cannot
    hold."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise InvalidInputError(f"{folder} is not a Hugging Face folder (no config.json): export a pruned model folder")
    reader = open_fp8_checked(folder)
    if reader.fp8 and fp8:
        report = read_report(folder) or {}
        source = (report.get("quantization") or {}).get("source")
        instead = f"export its unquantized source ({source})" if source else "export its unquantized source"
        raise InvalidInputError(
            f"{folder} is FP8 (W8A8, {len(reader.fp8)} float8 weights): the {target} export {fp8}; {instead}, or "
            "serve the FP8 folder itself (vLLM reads it as it is), or export vllm, which keeps FP8"
        )
    targets = targets_of_folder(folder)
    if not targets.tensors:
        raise InvalidInputError(
            f"{folder} has no pruned weights ({targets.source}): prune it first with apt-sparse prune"
        )
    reason = accepts(targets.pattern)
    if reason:
        raise InvalidInputError(f"the {target} export cannot hold pattern {targets.pattern}: {reason}")
    if experts and targets.experts:
        raise InvalidInputError(
            f"the {target} export cannot hold pruned MoE experts ({len(targets.experts)} expert tensors, e.g. "
            f"{sorted(targets.experts)[0]}): {experts}; export vllm, or prune with --ignore experts"
        )
    config = json.loads((folder / "config.json").read_text())
    return PrunedSource(folder, reader, config, targets)


def check_space(out: str | Path, source: PrunedSource, bytes_per_value: float) -> None:
    """Refuse before writing when ``out``'s file system cannot hold the export: every floating-point value of
    the source at ``bytes_per_value`` (the export dtype's size, or less where values are compressed)."""
    reader = source.reader
    values = sum(reader.info(n).nbytes // reader.info(n).dtype.itemsize for n in reader.names())
    check_free_space(
        [("the export", Path(out).resolve().parent, int(values * bytes_per_value))],
        "free space there or choose another output folder",
    )


def check_pattern(source: PrunedSource) -> list[dict]:
    """Read every pruned weight once and check it against the pattern; raises naming the first that fails."""
    rows = []
    pattern = source.targets.pattern
    for name in source.targets.tensors:
        if name not in source.reader:
            raise InvalidInputError(
                f"{name} is listed as pruned ({source.targets.source}) but {source.folder} lacks it"
            )
        stored = source.reader.read(name)
        axis = source.targets.axis(name)
        if stored.dim() not in (2, 3) or not conforms(as_rows(stored, axis), pattern):
            weight = as_rows(stored, axis) if stored.dim() in (2, 3) else stored
            raise InvalidInputError(
                f"{name} {list(stored.shape)} is not {pattern} {_where(weight, pattern)}: "
                "prune it first with apt-sparse prune"
            )
        rows.append(
            {"name": name, "shape": list(stored.shape), "valid": True} | ({"in_axis": axis} if axis != -1 else {})
        )
    return rows


def _where(weight: torch.Tensor, pattern: Pattern) -> str:
    if weight.dim() != 2:
        return "(it is not a 2-D weight)"
    if pattern.is_nm:
        row, col = first_nm_violation(weight, pattern.n, pattern.m)
        return f"sparse along its input dimension (row {row}, columns {col}..{col + pattern.m - 1})"
    row = int(((weight == 0).sum(dim=1)).argmin())
    return f"(row {row} keeps {int((weight[row] != 0).sum())} of {weight.shape[1]})"


USAGE = {
    "vllm": [
        "```python",
        "from vllm import LLM",
        'llm = LLM(model="path/to/this/folder")  # the zeros run on dense kernels: vLLM removed 2:4 in 0.19.1',
        "```",
    ],
    "compressed-tensors": [
        "For vLLM 0.6.5–0.19.0 on Hopper (CUTLASS 2:4 GEMMs), or transformers 4.x with compressed-tensors ≤ 0.14:",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM  # transformers < 5, compressed-tensors 0.14",
        'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")',
        "```",
    ],
    "onnx": [
        "```python",
        "import onnxruntime as ort",
        'session = ort.InferenceSession("model.onnx")',
        'logits = session.run(None, {"input_ids": ids, "attention_mask": mask})[0]',
        "```",
        "",
        "A graph exported with past keys/values (`manifest.json` says `with_past`) also loads in Optimum's "
        '`ORTModelForCausalLM.from_pretrained("path/to/this/folder")` (optimum-onnx, transformers 4.57).',
    ],
    "tensorrt": [
        "Build the engine on the GPU that will run it (the exact command is in `manifest.json`):",
        "",
        "```",
        "trtexec --onnx=onnx/model.onnx --stronglyTyped --sparsity=enable --saveEngine=model.plan ...",
        "```",
    ],
}


def export_card(folder: Path, source: PrunedSource, target: str, validation: dict) -> None:
    """A short ``README.md`` for an export: what it holds, how to load it, what was checked."""
    checks = [
        f"- {k}: {v if not isinstance(v, dict) else v.get('status', v)}"
        for k, v in validation.items()
        if k != "dense_matmul_initializers"
    ]
    lines = [
        "---",
        "library_name: " + ("transformers" if target in ("vllm", "compressed-tensors") else "onnx"),
        "tags:",
        '- "sparse"',
        f'- "{source.targets.pattern}-sparsity"',
        '- "apt-sparse"',
        "---",
        "",
        f"# {source.folder.name}: {target} export, {source.targets.pattern} sparse",
        "",
        f"Written by `apt-sparse export {target}` from `{source.folder}`; {len(source.targets.tensors)} pruned "
        f"weights, each checked to follow {source.targets.pattern} (from {source.targets.source}). The source "
        "folder's README.md is the model card (method, data, accuracy).",
        "",
        "## Load",
        "",
        *USAGE[target],
        "",
        "## Checked at export",
        "",
        *checks,
    ]
    (folder / "README.md").write_text("\n".join(lines) + "\n")


def write_manifest(
    folder: Path,
    *,
    source: PrunedSource,
    target: str,
    layers: list[dict],
    validation: dict,
    extra: dict | None = None,
) -> dict:
    export_card(folder, source, target, validation)
    manifest = {
        "schema": "apt-sparse/export-manifest/2",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": str(source.folder.resolve()),
        "target": target,
        "versions": versions(),
        "files": file_listing(folder),
        "pattern_check": {
            "pattern": str(source.targets.pattern),
            "targets_from": source.targets.source,
            "layers": layers,
            "all_valid": bool(layers) and all(r["valid"] for r in layers),
        },
        "validation": validation,
    } | (extra or {})
    write_json_atomic(folder / "manifest.json", manifest)
    return manifest
