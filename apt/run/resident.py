"""Pruning a model held in memory: the streamed run's engine (``apt.run.sequential``, ``apt.run.vision``) with
nothing to read or write; what the tests compare the streamed run against, and what benchmarks prune with."""

from __future__ import annotations

import time

import torch

from apt.models.activations import ActivationStore
from apt.models.layered import LayeredModel, token_batches
from apt.run.config import RunConfig
from apt.run.sequential import prune_blocks
from apt.run.vision import prune_vision


def calibrate_and_prune(model, windows: torch.Tensor | list[dict], config: RunConfig) -> dict:
    """Prune a model that is already in memory, in place, on calibration ``windows`` ``[n, seq]`` (int64), or on
    a list of ready model-input batches (a vision-language model's image+text samples, ``apt.run.multimodal``).

    The same engine as the streaming run, with nothing to read or write. Returns ``{"layers", "seconds"}``.
    """
    start = time.perf_counter()
    layered = LayeredModel.resident(model, config.device)
    model.to(config.device)
    batches = token_batches(windows, config.batch_size) if isinstance(windows, torch.Tensor) else windows

    def new_store() -> ActivationStore:
        return ActivationStore(layered.dtype, device=config.device)

    layers = []
    if config.vision:
        layers, _ = prune_vision(layered, batches, config, new_store, lambda _names: None, None)
    store = layered.block_inputs(batches, new_store())
    layers += prune_blocks(layered, store, config)
    model.to("cpu")
    return {"layers": layers, "seconds": time.perf_counter() - start}
