"""A vision-language model's vision part, pruned when asked (``--prune-vision``), before its language model.

The vision tower's blocks are pruned sequentially on the images of the calibration batches, exactly as
the language model's blocks are (``apt.run.sequential.prune_blocks`` over a ``LayeredModel.section``):
each block sees the pruned blocks before it. Then the Linears after the tower (the projector, Qwen2-VL's
patch merger; ``apt.models.discovery.vision_tail_targets``) are pruned on their inputs as the pruned tower
produces them, all in one pass (SparseGPT's non-sequential variant: the projector is one or two layers).
The language model is calibrated afterwards on what the pruned vision part gives it, so it is pruned for
the model that will be written. A tensor of the vision part that is not a Linear (Gemma 3's projection
matrix, the patch embedding's convolution) stays dense, and the report lists it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from apt.collective import Collective
from apt.models.activations import ActivationStore
from apt.models.checkpoint import CheckpointReader
from apt.models.discovery import Target, find_groups, vision_block_path, vision_tail_targets
from apt.models.layered import LayeredModel, _Stop
from apt.run.calibration import Statistics, input_hook, sum_over_ranks
from apt.run.config import RunConfig
from apt.run.sequential import prune_blocks, prune_group

log = logging.getLogger(__name__)

# Called with the names of parameters just pruned (still materialised), to write them out.
WriteParameters = Callable[[list[str]], None]


def prune_vision(
    layered: LayeredModel,
    batches: list[dict[str, torch.Tensor]],
    config: RunConfig,
    new_store: Callable[[], ActivationStore],
    write: WriteParameters,
    written: CheckpointReader | None,
    coll: Collective | None = None,
) -> tuple[list[dict], dict]:
    """Prune the vision blocks, then the Linears after them, of the vision-language model ``layered`` (its
    language model's view) on ``batches`` (the processor's inputs: ``input_ids``, ``pixel_values``, …).
    ``write`` stores each pruned block's parameters as soon as it is done; ``written`` reads them back (the
    output being written; None for a model held in memory). Returns the layer records and a summary of
    the vision part for the report."""
    coll = coll or Collective()
    vision = layered.section(vision_block_path(layered.model, layered.block_path))
    store = new_store()
    try:
        vision.block_inputs(batches, store)

        def done(index: int, _records: list[dict]) -> None:
            write(vision.parameter_names(vision.block_prefix(index)))

        records = prune_blocks(vision, store, config, on_block_done=done, coll=coll)
    finally:
        store.close()
    model = layered.model
    tail = vision_tail_targets(model, layered.block_path, vision.block_path, config.targets, config.ignore)
    records += _prune_tail(layered, tail, batches, config, write, written, coll)
    pruned = {f"{r['name']}.weight" for r in records if not r["skipped"]}
    text = {id(p) for p in model.get_decoder().parameters()}
    text |= {id(p) for module in layered.final_modules() for p in module.parameters()}
    dense = [n for n, p in model.named_parameters() if id(p) not in text and p.dim() >= 2 and n not in pruned]
    summary = {
        "pruned": True,
        "blocks": vision.block_path,
        "count": len(vision.blocks),
        "after_blocks": [t.name for t in tail],
        "matrices_kept_dense": dense,
    }
    return records, summary


def _stop(*_) -> None:
    raise _Stop


def _prune_tail(
    layered: LayeredModel,
    targets: list[Target],
    batches: list[dict[str, torch.Tensor]],
    config: RunConfig,
    write: WriteParameters,
    written: CheckpointReader | None,
    coll: Collective,
) -> list[dict]:
    """Prune the Linears between the vision blocks and the language model on their inputs, collected in one
    pass of the model (as far as its first language block) with the pruned vision tower."""
    if not targets:
        return []
    stop = layered.blocks[0].register_forward_pre_hook(_stop)
    names = layered.outside_names()  # everything before language block 0, the pruned vision blocks included
    bar = tqdm(total=len(targets), desc="pruning", unit="layer", disable=None if coll.is_writer else True)
    try:
        with layered.loaded(names, written):
            groups = find_groups(layered.model, targets, lambda: layered.run_until_stopped(batches[0]))
            stats = [Statistics() for _ in groups]
            handles = [
                g.source.register_forward_hook(input_hook(s, last=False))
                for g, s in zip(groups, stats)
                if g.source is not None
            ]
            try:
                for batch in batches:
                    layered.run_until_stopped(batch)
            finally:
                for handle in handles:
                    handle.remove()
            sum_over_ranks(stats, groups, coll)
            records = []
            for group, stat in zip(groups, stats):
                records += prune_group(group, stat, layered, config, bar, None, coll)
            write([t.parameter for g in groups for t in g.targets])
    finally:
        stop.remove()
        bar.close()
    return records
