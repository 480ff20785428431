"""FP8 after pruning: a Hugging Face folder (pruned by ``apt-sparse prune``, pruned elsewhere, or dense) written
again in compressed-tensors' FP8 layout (``apt.folder.fp8``), one tensor at a time.

Quantized: every pruned 2-D Linear weight of a pruned folder (``apt.folder.targets``: the report, else
discovery), each checked against its pattern first, or every Linear of the blocks of a dense folder (one
that follows no pattern: ``apt-sparse quantize`` on a dense model gives the dense FP8 baseline). Left as
stored, and named in ``ignore``: MoE experts, GPT-2 ``Conv1D`` weights and every other Linear (the LM head).

Rounding (``QuantizeConfig.rounding``):

- ``compensate`` (the default): GPTQ's sequential pass with the mask fixed. Block by block on calibration
  text (the pruning run's own, from its report), every quantized Linear's Hessian is collected from the
  inputs it gets as served, every block before it already in FP8 and its own inputs through FP8 per token,
  and its weight is rounded by the error-compensating pass (``apt.solver.fp8.compensated_fp8``: each
  column's rounding error pushed onto the columns not yet rounded, through the Cholesky factor of ``H⁻¹``).
- ``nearest``: each weight rounded to nearest on its own, no data needed.

A folder whose run already put its weights on the FP8 grid (``--quantize fp8 --fp8-in-run``) is rounded to
nearest, which keeps that grid exactly, and its report's accuracy (measured W8A8 by the run) stays. (Plain
``--quantize fp8`` runs this module on the pruned folder, with the rounding it asks for.) Any other pruned folder
gets its report's accuracy measured again, as FP8 (W8A8, on the same text as the run's), the unquantized
figures kept as ``accuracy_unquantized``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from apt.atomic import atomic_directory, check_free_space, write_json_atomic
from apt.collective import Collective
from apt.errors import InvalidInputError
from apt.folder.card import figure
from apt.folder.fp8 import SCALE_SUFFIX, SCHEME, SIDE_FILE, open_fp8_checked, quantization_config
from apt.folder.report import REPORT_NAME, read_report
from apt.folder.targets import PrunedTargets, targets_of_folder
from apt.models.activations import ActivationStore
from apt.models.checkpoint import CheckpointReader, PlannedTensor, ShardedWriter, parse_size
from apt.models.discovery import block_targets
from apt.models.layered import LayeredModel, quantize_inputs, token_batches
from apt.models.loading import check_device, load_tokenizer
from apt.models.portable import copy_side_files, write_config
from apt.run.calibration import collect
from apt.run.sequential import GroupFinder
from apt.solver import layer_loss
from apt.solver.fp8 import FP8, compensated_fp8, dequantize_weight, quantize_weight
from apt.solver.patterns import conforms, first_nm_violation, positive_zeros
from apt.text.sources import calibration_windows, load_text, prefix_source

log = logging.getLogger(__name__)

ROUNDINGS = ("compensate", "nearest")
# a folder that no run calibrated (a dense model, a folder pruned elsewhere) is calibrated as prune's defaults
DEFAULT_CALIBRATION = {"source": "stdlib", "windows": 128, "seq_len": 512, "seed": 0}


@dataclass(frozen=True)
class QuantizeConfig:
    """How ``quantize_folder`` writes a folder in FP8. ``rounding``: ``compensate`` or ``nearest`` (see the module
    docstring); the calibration text of ``compensate``: ``calibration_data``, ``num_calibration_samples`` windows
    of ``max_seq_length`` tokens, ``seed`` (each ``None``: the pruning run's, from the report, else prune's
    defaults); ``device`` holds one block and its Hessians; ``batch_size`` windows per forward; ``evaluate``:
    measure the report's accuracy again in FP8 (off: the report keeps no accuracy, only the unquantized one)."""

    rounding: str = "compensate"
    calibration_data: str | None = None
    num_calibration_samples: int | None = None
    max_seq_length: int | None = None
    seed: int | None = None
    device: str = "cpu"
    batch_size: int = 8
    evaluate: bool = True
    max_shard_size: str = "5GB"

    def __post_init__(self) -> None:
        if self.rounding not in ROUNDINGS:
            raise InvalidInputError(f"--rounding takes {' or '.join(ROUNDINGS)}, got {self.rounding!r}")
        if (self.num_calibration_samples or 1) < 1 or (self.max_seq_length or 2) < 2 or self.batch_size < 1:
            raise InvalidInputError(
                "--num-calibration-samples and --batch-size must be at least 1, --max-seq-length at least 2"
            )
        check_device(self.device)
        parse_size(self.max_shard_size)

    def calibration(self, report: dict | None) -> dict:
        """``{source, windows, seq_len, seed}``: what was given, else the run's (its report), else the defaults."""
        run = report["config"] if report else {}
        given = {
            "source": self.calibration_data,
            "windows": self.num_calibration_samples,
            "seq_len": self.max_seq_length,
            "seed": self.seed,
        }
        from_run = {
            "source": run.get("calibration_data"),
            "windows": run.get("num_calibration_samples"),
            "seq_len": run.get("max_seq_length"),
            "seed": run.get("seed"),
        }
        return {
            k: given[k] if given[k] is not None else from_run[k] if from_run[k] is not None else v
            for k, v in DEFAULT_CALIBRATION.items()
        }


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


def quantize_folder(
    src: str | Path,
    out: str | Path,
    overwrite: bool = False,
    max_shard_size: str | None = None,
    config: QuantizeConfig | None = None,
) -> dict:
    """Write ``src`` as an FP8 folder at ``out`` (atomically); returns the ``quantization`` record that its
    report (for a pruned folder) and the model card carry. ``max_shard_size`` overrides ``config``'s."""
    config = config or QuantizeConfig()
    src = Path(src)
    if not (src / "config.json").is_file():
        raise InvalidInputError(f"{src} is not a Hugging Face folder (no config.json)")
    reader = open_fp8_checked(src)  # a damaged FP8 folder is named for what is damaged
    if reader.fp8:
        raise InvalidInputError(f"{src} is already FP8: quantize its unquantized source instead")
    targets = targets_of_folder(src)
    chosen, pruned = plan_quantization(src, targets, reader)
    quantized = set(chosen)
    hf_config = json.loads((src / "config.json").read_text())
    if hf_config.get("quantization_config"):
        raise InvalidInputError(f"{src} is already quantized ({hf_config['quantization_config'].get('quant_method')})")
    report = read_report(src)
    run = report["config"]["run"] if report is not None else {}
    # --fp8-in-run put the weights on the FP8 grid already (runs before the option existed all did)
    on_grid = run.get("quantize") == "fp8" and run.get("fp8_in_run", True)
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
        "weights": "float8_e4m3fn, one float32 scale per output channel: amax(|w_row|)/448",
        "input_activations": "float8_e4m3fn, dynamic per-token scales at run time: amax(|x_token|)/448",
        "weights_quantized": len(chosen),
        "pattern": str(targets.pattern) if pruned else None,
        "ignore": sorted(set(ignore)),
        "source": str(src.resolve()),
    }
    with atomic_directory(out, overwrite=overwrite) as tmp:
        writer = ShardedWriter(tmp, plan, parse_size(max_shard_size or config.max_shard_size))
        writer.create()

        def write(name: str, q: torch.Tensor, scale: torch.Tensor) -> None:
            writer.write(name, q)
            writer.write(name.removesuffix(".weight") + SCALE_SUFFIX, scale.reshape(-1, 1))

        if on_grid:
            where = "error-compensating" if run.get("fp8_compensate") else "round to nearest"
            record["pass"] = f"{where} (in the run, on its Hessians; rounding to nearest here keeps that grid)"
        elif config.rounding == "compensate":
            calibration = config.calibration(report)
            losses = compensate_blocks(src, quantized, calibration, config, write)
            quantized -= set(losses)  # what the pass reached; anything outside the blocks is rounded to nearest
            record["pass"] = "error-compensating (apt-sparse quantize, GPTQ's sequential pass with the mask fixed)"
            record["calibration"] = calibration
            record["compensated"] = len(losses)
            record["fp8_relative_loss"] = losses
        else:
            record["pass"] = "round to nearest"
        for name in reader.names():
            if name in quantized:
                write(name, *quantize_weight(positive_zeros(reader.read(name))))
            elif name not in record.get("fp8_relative_loss", {}):
                writer.write(name, reader.read(name))
        writer.write_index()
        hf_config["quantization_config"] = quantization_config(ignore)
        write_config(hf_config, tmp)
        copy_side_files(src, tmp)
        if pruned and (targets.pattern.n, targets.pattern.m) == (2, 4):
            side = {"format": "fp8", "pattern": "2:4", "targets": sorted(modules), "ignore": ["lm_head"]}
            (tmp / SIDE_FILE).write_text(json.dumps(side, indent=2) + "\n")
        accuracy = None
        if report is not None:
            written = report | {"quantization": record}
            write_json_atomic(tmp / REPORT_NAME, written)  # the accuracy below reads the folder as FP8
            if not on_grid and report.get("accuracy"):
                written["accuracy_unquantized"] = report["accuracy"]
                written["accuracy"] = _fp8_accuracy(tmp, report, config) if config.evaluate else None
                write_json_atomic(tmp / REPORT_NAME, written)
            accuracy = written.get("accuracy")
        CheckpointReader(tmp)  # every FP8 weight has its scales: what every reader checks
        card = (src / "README.md").read_text() if (src / "README.md").is_file() else ""
        (tmp / "README.md").write_text(fp8_card(card, record, accuracy))
    log.info("wrote %s: %d weights in FP8 (%s)", out, len(chosen), record["pass"])
    return record


def compensate_blocks(
    folder: Path,
    chosen: set[str],
    calibration: dict,
    config: QuantizeConfig,
    write: Callable[[str, torch.Tensor, torch.Tensor], None],
) -> dict[str, float]:
    """The ``compensate`` rounding (see the module docstring) of the ``chosen`` weights of ``folder`` that are
    Linears of its blocks, on ``calibration`` (``QuantizeConfig.calibration``); ``write(tensor, q, scale)`` is
    called for each as soon as it is rounded. Returns each one's layer loss relative to its zero loss,
    ``L(q·scale) / L(0)`` on its Hessian (``apt.solver.loss``)."""
    layered = LayeredModel.from_folder(folder, torch.float32, config.device)
    tokenizer = load_tokenizer(folder)
    # a run calibrated on its own continuations (``self:SOURCE``) is rounded on SOURCE's text: the pruned model's
    # continuations are not the dense model's, and generating again would cost the whole pruning's share
    text = load_text(prefix_source(calibration["source"]), seed=calibration["seed"])
    windows = calibration_windows(  # as the pruning run calibrated
        text.calibration,
        tokenizer,
        calibration["windows"],
        calibration["seq_len"],
        calibration["seed"],
        layered.layout.causal,
    )
    store = layered.block_inputs(token_batches(windows, config.batch_size), ActivationStore(torch.float32))
    finder, losses, coll = GroupFinder(), {}, Collective()
    try:
        for index, block in enumerate(layered.blocks):
            prefix = layered.block_prefix(index)[:-1]
            with layered.loaded(layered.parameter_names(layered.block_prefix(index))):
                targets = [
                    t
                    for t in block_targets(block, prefix, layered.config)
                    if not t.is_expert and t.in_axis == -1 and layered.checkpoint_key(t.parameter) in chosen
                ]
                # the layers take their inputs through FP8 as served: their Hessians are those inputs'
                hooks = [t.module.register_forward_pre_hook(quantize_inputs) for t in targets]
                try:
                    groups = finder.groups(layered, index, targets, store) if targets else []
                    stats = collect(block, index, store, groups, layered.device, coll) if groups else []
                    for group, stat in zip(groups, stats):
                        for target in group.targets:
                            key = layered.checkpoint_key(target.parameter)
                            losses[key] = _round_layer(target.weight, stat.hessian, key, write)
                    layered.run_block(index, store)  # the next block's inputs, from this block in FP8
                finally:
                    for hook in hooks:
                        hook.remove()
    finally:
        store.close()
    return losses


def _round_layer(weight: torch.Tensor, hessian: torch.Tensor | None, key: str, write) -> float:
    """Round one weight (in place: later blocks calibrate on it) and write it; its relative FP8 loss."""
    original = positive_zeros(weight.float())
    if hessian is None:  # no calibration token reached the layer: nothing to compensate with
        q, scale = quantize_weight(original)
    else:
        q, scale = compensated_fp8(original, hessian)
    write(key, q, scale)
    on_grid = dequantize_weight(q, scale)
    weight.copy_(on_grid.to(weight.dtype))
    if hessian is None:
        return 0.0
    zero = layer_loss(torch.zeros_like(original), original, hessian)
    return layer_loss(on_grid, original, hessian) / zero if zero > 0 else 0.0


def _fp8_accuracy(folder: Path, report: dict, config: QuantizeConfig) -> dict:
    """The report's accuracy measured again on the FP8 folder (W8A8), on the text and windows of the run's."""
    from apt.measure.accuracy import evaluate_model

    run = report["config"]
    result = evaluate_model(
        str(folder),
        eval_data=run["eval_data"],
        num_eval_windows=run["num_eval_windows"],
        max_seq_length=run["max_seq_length"],
        device=config.device,
        seed=run["seed"],
        trust_remote_code=run.get("trust_remote_code", False),
    )
    result["dense"].pop("model", None)
    return {k: result[k] for k in ("metric", "data", "dense", "pruned", "fp8")}


def _quantized(module: str, modules: set[str]) -> bool:
    # the skeleton's module names may lack or carry the base-model prefix the checkpoint uses
    return module in modules or any(m.endswith("." + module) or module.endswith("." + m) for m in modules)


def fp8_card(card: str, record: dict, accuracy: dict | None = None) -> str:
    """The source's model card with an FP8 section: the layout, the rounding, the report's ``accuracy`` (measured
    in FP8), how to load it, and the 2:4 side file."""
    if card.startswith("---"):
        head, _, rest = card[3:].partition("\n---")
        head = head.replace('- "apt-sparse"', '- "apt-sparse"\n- "fp8"\n- "compressed-tensors"', 1)
        card = "---" + head + "\n---" + rest
    sparse = record["pattern"]
    lines = [
        "",
        "## FP8 (W8A8)",
        "",
        f"Quantized by `apt-sparse quantize`: {record['weights_quantized']} Linear weights in float8_e4m3fn with one "
        "float32 scale per output channel (`<module>.weight_scale`, amax/448), rounded by "
        f"{record.get('pass', 'round to nearest')}; activations are quantized per token at run time (FP8_DYNAMIC). "
        "The folder is compressed-tensors' `float-quantized` layout: transformers (with compressed-tensors ≥ 0.15, "
        "or 0.14 with transformers 4.x) and vLLM load it as dense FP8 with no plugin.",
        "",
        f"Left unquantized: {', '.join(record['ignore'])}.",
        "",
    ]
    if accuracy and accuracy.get("pruned"):
        metric = accuracy["metric"]
        dense = accuracy["dense"].get(metric)
        lines += [
            f"Accuracy in FP8 (W8A8 emulated exactly: weights `q · scale`, inputs through float8 per token; "
            f"{accuracy['data']}): {metric} "
            + (f"dense {figure(dense)} → " if dense is not None else "")
            + f"this model {figure(accuracy['pruned'].get(metric))}.",
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
