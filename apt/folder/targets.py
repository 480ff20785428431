"""Which weights were pruned, and with which pattern: decided here and read by every exporter and benchmark.

A folder written by ``apt-sparse prune`` carries ``prune_report.json``, which lists every layer the run
pruned (and the checkpoint name of its weight) and the pattern; that is the answer. Any other folder
(pruned elsewhere) is read through the same family adapter the run uses (``block_groups`` over a
skeleton built from its config, no weights read), with the pattern the caller names (2:4 unless told
otherwise, and then recorded as assumed). Never from a substring of a tensor name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from apt.errors import InvalidInputError
from apt.folder.report import REPORT_NAME, read_report
from apt.models.families import block_groups, family_for, find_blocks
from apt.models.layered import LayeredModel
from apt.solver.patterns import Pattern


@dataclass(frozen=True)
class PrunedTargets:
    """``tensors``: checkpoint names of the pruned weights (``[out, in]`` each); ``pattern``: what they
    follow along ``in``; ``source``: how this was decided."""

    tensors: tuple[str, ...]
    pattern: Pattern
    source: str

    def as_dict(self) -> dict:
        return {"pattern": str(self.pattern), "tensors": len(self.tensors), "source": self.source}


def targets_of_folder(folder: str | Path, pattern: str | Pattern | None = None) -> PrunedTargets:
    """The pruned weights of a Hugging Face folder (see the module docstring)."""
    folder = Path(folder)
    report_path = folder / REPORT_NAME
    report = read_report(folder)
    if report is not None:
        reported = Pattern.parse(report.get("pattern") or report["config"]["run"]["solver"]["pattern"])
        if pattern is not None and Pattern.parse(pattern) != reported:
            raise InvalidInputError(f"{report_path} says the pattern is {reported}, not {Pattern.parse(pattern)}")
        tensors = tuple(r.get("tensor") or f"{r['name']}.weight" for r in report["layers"] if not r["skipped"])
        return PrunedTargets(tensors, reported, f"{REPORT_NAME}")
    layered = LayeredModel.from_folder(folder)
    names = [
        layered.checkpoint_key(f"{name}.weight")
        for index, block in enumerate(layered.blocks)
        for group in block_groups(block, layered.family, f"{layered.block_path}.{index}", None, None)
        for name, _ in group
    ]
    given = Pattern.parse(pattern or "2:4")
    how = "given" if pattern is not None else "assumed (no prune_report.json)"
    return PrunedTargets(tuple(names), given, f"{layered.family.name} family adapter; pattern {given} {how}")


def target_linears(model, targets: PrunedTargets | None = None) -> list[tuple[str, object]]:
    """``(module name, Linear)`` of the pruned layers of an in-memory model: the ``targets`` read from its
    folder, or every layer the family adapter prunes."""
    if targets is not None:
        modules = dict(model.named_modules())
        found = []
        prefix = getattr(model, "base_model_prefix", "")
        for tensor in targets.tensors:
            name = tensor.removesuffix(".weight")
            match = next((n for n in (name, f"{prefix}.{name}", name.removeprefix(f"{prefix}.")) if n in modules), None)
            if match is None:
                raise InvalidInputError(f"pruned weight {tensor} has no module in this model")
            found.append((match, modules[match]))
        return found
    family = family_for(model.config)
    path, blocks = find_blocks(model, family)
    return [
        pair
        for index, block in enumerate(blocks)
        for group in block_groups(block, family, f"{path}.{index}", None, None)
        for pair in group
    ]
