"""Which weights were pruned, and with which pattern: decided here and read by every exporter and benchmark.

A folder written by ``apt-sparse prune`` carries ``prune_report.json``, which lists every layer the run
pruned (and the checkpoint tensors that hold it) and the pattern; that is the answer. Any other folder
(pruned elsewhere) is read through the same discovery the run uses (``apt.models.discovery`` over a
skeleton built from its config, no weights read), with the pattern the caller names (2:4 unless told
otherwise, and then recorded as assumed). Never from a substring of a tensor name.

A pruned tensor is a Linear's weight ``[out, in]``, a transformers ``Conv1D``'s (GPT-2) ``[in, out]``, or
holds MoE experts: one expert's piece stored on its own (``[out, in]``), or every expert in one 3-D
tensor, ``[E, out, in]`` or transposed ``[E, in, out]``; ``in_axis`` says along which axis of the stored
tensor the pattern runs (-2 for a Conv1D and for transposed experts).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch

from apt.errors import InvalidInputError
from apt.folder.report import REPORT_NAME, read_report
from apt.models.discovery import block_targets
from apt.models.layered import LayeredModel
from apt.solver.patterns import Pattern


@dataclass(frozen=True)
class PrunedTargets:
    """``tensors``: checkpoint names of the pruned tensors; ``pattern``: what they follow along their input
    axis (``in_axis``, -1 unless said); ``experts``: the tensors that hold MoE experts; ``source``: how this
    was decided; ``modules``: the module each pruned Linear's tensor is the weight of, in the model as
    transformers builds it (a checkpoint may name it otherwise: Gemma 3's and LLaVA's
    ``language_model.model.layers…``); ``vision``: the pruned tensors of a vision-language model's vision
    part (``--prune-vision``), which a check on text alone never runs."""

    tensors: tuple[str, ...]
    pattern: Pattern
    source: str
    in_axis: dict[str, int] = field(default_factory=dict)
    experts: frozenset[str] = frozenset()
    modules: dict[str, str] = field(default_factory=dict)
    vision: frozenset[str] = frozenset()

    def axis(self, tensor: str) -> int:
        return self.in_axis.get(tensor, -1)

    def as_dict(self) -> dict:
        return {
            "pattern": str(self.pattern),
            "tensors": len(self.tensors),
            "expert_tensors": len(self.experts),
            "source": self.source,
        }


def targets_of_folder(folder: str | Path, pattern: str | Pattern | None = None) -> PrunedTargets:
    """The pruned weights of a Hugging Face folder (see the module docstring)."""
    folder = Path(folder)
    report_path = folder / REPORT_NAME
    report = read_report(folder)
    if report is not None:
        reported = Pattern.parse(report.get("pattern") or report["config"]["run"]["solver"]["pattern"])
        if pattern is not None and Pattern.parse(pattern) != reported:
            raise InvalidInputError(f"{report_path} says the pattern is {reported}, not {Pattern.parse(pattern)}")
        pieces = [
            (name, r.get("in_axis", -1), r.get("expert") is not None, r["name"])
            for r in report["layers"]
            if not r["skipped"]
            for name in (r.get("tensors") or [r.get("tensor") or f"{r['name']}.weight"])
        ]
        targets = _targets(pieces, reported, REPORT_NAME)
        vision = report.get("vision") or {}
        if vision.get("pruned"):
            part = (f"{vision['blocks']}.", *vision["after_blocks"])
            layers = [r for r in report["layers"] if r["name"].startswith(part)]
            names = {n for r in layers for n in r.get("tensors") or [r["tensor"]]}
            targets = dataclasses.replace(targets, vision=frozenset(names & set(targets.tensors)))
        return targets
    layered = LayeredModel.from_folder(folder)
    pieces = []
    for index, block in enumerate(layered.blocks):
        for target in block_targets(block, layered.block_prefix(index)[:-1], layered.config):
            where = layered.target_tensors(target)
            axis = where.get("in_axis", -1)
            pieces += [(name, axis, target.is_expert, target.name) for name in where.get("tensors", [where["tensor"]])]
    given = Pattern.parse(pattern or "2:4")
    how = "given" if pattern is not None else "assumed (no prune_report.json)"
    return _targets(pieces, given, f"discovery in the {layered.layout.name} model; pattern {given} {how}")


def _targets(pieces: list[tuple[str, int, bool, str]], pattern: Pattern, source: str) -> PrunedTargets:
    names = tuple(dict.fromkeys(name for name, *_ in pieces))
    axes = {name: axis for name, axis, _, _ in pieces if axis != -1}
    experts = frozenset(name for name, _, expert, _ in pieces if expert)
    modules = {name: module for name, _, expert, module in pieces if not expert}
    return PrunedTargets(names, pattern, source, axes, experts, modules)


def target_linears(model, targets: PrunedTargets | None = None) -> list[tuple[str, torch.nn.Linear]]:
    """``(module name, Linear)`` of the pruned Linear layers of an in-memory model: the ``targets`` read from
    its folder, or every Linear discovery prunes. Experts are not Linears and are not listed; a GPT-2
    ``Conv1D`` is listed as it is (its weight ``[in, out]``: the tensor's ``in_axis`` is -2)."""
    if targets is not None:
        modules = dict(model.named_modules())
        found = []
        prefix = getattr(model, "base_model_prefix", "")
        for tensor in targets.tensors:
            if tensor in targets.experts:
                continue
            name = tensor.removesuffix(".weight")
            candidates = (targets.modules.get(tensor), name, f"{prefix}.{name}", name.removeprefix(f"{prefix}."))
            match = next((n for n in candidates if n in modules), None)
            if match is None:
                raise InvalidInputError(f"pruned weight {tensor} has no module in this model")
            found.append((match, modules[match]))
        return found
    layered = LayeredModel.resident(model)
    return [
        (target.name, target.module)
        for index, block in enumerate(layered.blocks)
        for target in block_targets(block, layered.block_prefix(index)[:-1], model.config)
        if not target.is_expert
    ]
