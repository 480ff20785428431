"""FP8 after pruning: a Hugging Face folder (pruned by ``apt-sparse prune``, pruned elsewhere, or dense) written
again in compressed-tensors' FP8 layout (``apt.folder.fp8``), one tensor at a time.

Quantized: every pruned 2-D Linear weight of a pruned folder (``apt.folder.targets``: the report, else
discovery), each checked against its pattern first, or every Linear of the blocks of a dense folder (one
that follows no pattern: ``apt-sparse quantize`` on a dense model gives the dense FP8 baseline). Left as
stored, and named in ``ignore``: MoE experts, GPT-2 ``Conv1D`` weights and every other Linear (the LM head).
Weights are rounded to nearest (``apt.solver.fp8``); a run with ``--quantize fp8 --fp8-compensate`` has
already put its weights on the FP8 grid with the error-compensating pass, which rounding then keeps exactly.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from apt.atomic import atomic_directory, check_free_space, write_json_atomic
from apt.errors import InvalidInputError
from apt.folder.fp8 import SCALE_SUFFIX, SCHEME, SIDE_FILE, fp8_weights, quantization_config
from apt.folder.report import REPORT_NAME, read_report
from apt.folder.targets import PrunedTargets, targets_of_folder
from apt.models.checkpoint import CheckpointReader, PlannedTensor, ShardedWriter, parse_size
from apt.models.portable import copy_side_files, write_config
from apt.solver.fp8 import FP8, quantize_weight
from apt.solver.patterns import conforms, first_nm_violation, positive_zeros

log = logging.getLogger(__name__)


def _linear_modules(folder: Path) -> list[str]:
    """Every ``nn.Linear`` of the model (module names), from a skeleton built on the meta device."""
    from apt.models.layered import LayeredModel

    layered = LayeredModel.from_folder(folder)
    return [name for name, m in layered.model.named_modules() if isinstance(m, torch.nn.Linear)]


def plan_quantization(folder: Path, targets: PrunedTargets, reader: CheckpointReader) -> tuple[list[str], bool]:
    """``(weights to quantize, folder is pruned)``: the 2-D Linear targets; a folder is treated as pruned when
    every one follows its pattern, as dense when none does; a mix is refused naming the first that breaks."""
    chosen = [t for t in targets.tensors if t not in targets.experts and targets.axis(t) == -1 and t in reader]
    chosen = [t for t in chosen if len(reader.info(t).shape) == 2 and reader.info(t).dtype.is_floating_point]
    if not chosen:
        raise InvalidInputError(f"{folder} has no Linear weight to quantize ({targets.source})")
    if any(reader.info(t).dtype == FP8 for t in chosen):
        raise InvalidInputError(f"{folder} is already FP8: quantize its unquantized source instead")
    pattern = targets.pattern
    broken = [t for t in chosen if not (pattern.is_nm and conforms(reader.read(t), pattern))]
    if broken and (len(broken) < len(chosen) or read_report(folder) is not None):
        name = broken[0]
        weight = reader.read(name)
        where = ""
        if pattern.is_nm and weight.shape[1] % pattern.m == 0:
            row, col = first_nm_violation(weight, pattern.n, pattern.m)
            where = f" (row {row}, columns {col}..{col + pattern.m - 1})"
        raise InvalidInputError(
            f"{name} breaks {pattern}{where}, but {targets.source} lists it as pruned: prune it again"
        )
    return chosen, not broken


def quantize_folder(src: str | Path, out: str | Path, overwrite: bool = False, max_shard_size: str = "5GB") -> dict:
    """Write ``src`` as an FP8 folder at ``out`` (atomically); returns the ``quantization`` record that its
    report (for a pruned folder) and the model card carry."""
    src = Path(src)
    if not (src / "config.json").is_file():
        raise InvalidInputError(f"{src} is not a Hugging Face folder (no config.json)")
    reader = CheckpointReader(src)
    targets = targets_of_folder(src)
    chosen, pruned = plan_quantization(src, targets, reader)
    quantized = set(chosen)
    config = json.loads((src / "config.json").read_text())
    if config.get("quantization_config"):
        raise InvalidInputError(f"{src} is already quantized ({config['quantization_config'].get('quant_method')})")
    modules = {t.removesuffix(".weight") for t in chosen}
    ignore = ["lm_head"] + [m for m in _linear_modules(src) if not _quantized(m, modules)]
    plan = []
    for name in reader.names():
        info = reader.info(name)
        if name in quantized:
            plan += [
                PlannedTensor(name, FP8, info.shape),
                PlannedTensor(name.removesuffix(".weight") + SCALE_SUFFIX, torch.float32, (info.shape[0], 1)),
            ]
        else:
            plan.append(PlannedTensor(name, info.dtype, info.shape))
    check_free_space(
        [("the FP8 folder", Path(out).resolve().parent, sum(p.nbytes for p in plan))],
        "free space there or choose another output folder",
    )
    record = {
        "scheme": SCHEME,
        "format": "compressed-tensors float-quantized",
        "weights": "float8_e4m3fn, one float32 scale per output channel: amax(|w_row|)/448, round to nearest",
        "input_activations": "float8_e4m3fn, dynamic per-token scales at run time: amax(|x_token|)/448",
        "weights_quantized": len(chosen),
        "pattern": str(targets.pattern) if pruned else None,
        "ignore": sorted(set(ignore)),
        "source": str(src.resolve()),
    }
    with atomic_directory(out, overwrite=overwrite) as tmp:
        writer = ShardedWriter(tmp, plan, parse_size(max_shard_size))
        writer.create()
        for name in reader.names():
            tensor = reader.read(name)
            if name in quantized:
                q, scale = quantize_weight(positive_zeros(tensor))
                writer.write(name, q)
                writer.write(name.removesuffix(".weight") + SCALE_SUFFIX, scale.reshape(-1, 1))
            else:
                writer.write(name, tensor)
        writer.write_index()
        config["quantization_config"] = quantization_config(ignore)
        write_config(config, tmp)
        copy_side_files(src, tmp)
        report = read_report(src)
        if report is not None:
            run = report["config"]["run"]
            compensated = run.get("quantize") == "fp8" and run.get("fp8_compensate")
            record["pass"] = "error-compensating (in the run, on its Hessians)" if compensated else "round to nearest"
            write_json_atomic(tmp / REPORT_NAME, report | {"quantization": record})
        if pruned and (targets.pattern.n, targets.pattern.m) == (2, 4):
            side = {"format": "fp8", "pattern": "2:4", "targets": sorted(modules), "ignore": ["lm_head"]}
            (tmp / SIDE_FILE).write_text(json.dumps(side, indent=2) + "\n")
        fp8_weights(CheckpointReader(tmp))  # every FP8 weight has its scale: what every reader checks
        card = (src / "README.md").read_text() if (src / "README.md").is_file() else ""
        (tmp / "README.md").write_text(fp8_card(card, record))
    log.info("wrote %s: %d weights in FP8", out, len(chosen))
    return record


def _quantized(module: str, modules: set[str]) -> bool:
    # the skeleton's module names may lack or carry the base-model prefix the checkpoint uses
    return module in modules or any(m.endswith("." + module) or module.endswith("." + m) for m in modules)


def fp8_card(card: str, record: dict) -> str:
    """The source's model card with an FP8 section: the layout, how to load it, and the 2:4 side file."""
    if card.startswith("---"):
        head, _, rest = card[3:].partition("\n---")
        head = head.replace('- "apt-sparse"', '- "apt-sparse"\n- "fp8"\n- "compressed-tensors"', 1)
        card = "---" + head + "\n---" + rest
    sparse = record["pattern"]
    lines = [
        "",
        "## FP8 (W8A8)",
        "",
        f"Quantized by `apt-sparse quantize` after pruning: {record['weights_quantized']} Linear weights in "
        "float8_e4m3fn with one float32 scale per output channel (`<module>.weight_scale`, amax/448, round to "
        "nearest); activations are quantized per token at run time (FP8_DYNAMIC). The folder is "
        "compressed-tensors' `float-quantized` layout: transformers (with compressed-tensors installed) and vLLM "
        "load it as dense FP8 with no plugin.",
        "",
        f"Left unquantized: {', '.join(record['ignore'])}.",
        "",
    ]
    if sparse:
        lines += [
            f"The FP8 weights keep the {sparse} pattern (zeros are exact `+0`). `apt_sparse_24.json` lists the "
            "2:4 layers for the `apt_sparse_24` vLLM plugin, which serves them with the 2:4 FP8 op on a GPU:",
            "",
            "```",
            "vllm serve path/to/this/folder --quantization apt_sparse_24",
            "```",
            "",
        ]
    return card.rstrip("\n") + "\n" + "\n".join(lines)
