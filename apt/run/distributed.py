"""Pruning on several processes: who does what, and the collectives that make their work one result.

Launched by ``torchrun`` (``torch.distributed``: NCCL between GPUs, gloo on CPU), every rank runs the
same job on its share:

- **Calibration batches** are dealt round-robin: rank r keeps batches r, r+W, r+2W, ... and only
  their activations.
- **Hessians.** Each group's Hessian is the sum of the ranks' partial Hessians (an all-reduce), so
  every rank holds the one the single process would have summed (to float rounding).
- **The solve is split by rows.** Given H, the layer problem is separable by output row: SparseGPT's
  mask and updates, the joint removal, the exact refit and the swaps all decide row by row. Each
  rank solves a contiguous slice of every layer's rows with the full H, and the slices are
  all-gathered, since every rank needs the whole pruned block to push its activations through. Rows
  balance the work evenly whatever the layers' sizes (a split by layers would leave ranks idle
  while one solves a block's widest layer); the price is that each rank factorises every Hessian
  (O(in³), small next to the O(out·in²) refit).
- **One writer.** Rank 0 writes the shards, the resume state and the report; when another rank must
  read what rank 0 wrote (resuming, evaluating the output) rank 0 reads it and broadcasts it.

The collectives themselves are ``apt.collective``; a single process uses ``Collective()``, whose
operations do nothing, so the run has one code path.
"""

from __future__ import annotations

import os
import socket

import torch

from apt.collective import Collective, DistributedError, TorchCollective


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def collective_for(device: str, timeout_s: float = 1800.0) -> tuple[Collective, str]:
    """The collective of this process and its compute device: under torchrun with CUDA, ``cuda:LOCAL_RANK``."""
    if not launched_by_torchrun():
        return Collective(), device
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    return TorchCollective(device, timeout_s), device


def check_same_job(coll: Collective, fingerprint: dict, identity: dict) -> None:
    """Every rank must run the same options on the same source; refuses at start, naming the difference."""
    if coll.world == 1:
        return
    jobs = coll.gather_objects({"fingerprint": fingerprint, "source": identity, "host": socket.gethostname()})
    reference = jobs[0]
    for rank, job in enumerate(jobs[1:], start=1):
        changed = sorted(
            k
            for k in set(job["fingerprint"]) | set(reference["fingerprint"])
            if job["fingerprint"].get(k) != reference["fingerprint"].get(k)
        )
        if changed:
            auto = " and an explicit --dtype (auto resolves per machine)" if changed == ["dtype"] else ""
            raise DistributedError(
                f"rank {rank} runs other options than rank 0 ({', '.join(changed)}): "
                f"launch every rank with the same command{auto}"
            )
        if job["source"]["files"] != reference["source"]["files"]:
            raise DistributedError(
                f"rank {rank} on {job['host']} reads another source than rank 0 "
                f"({job['source']['folder']} vs {reference['source']['folder']})"
            )


class BroadcastReader:
    """A reader of the checkpoint rank 0 writes, for every rank: rank 0 reads each tensor and broadcasts
    it, so the other ranks need no access to rank 0's disk. ``layout`` maps name → (dtype, shape)."""

    def __init__(self, coll: Collective, reader, layout: dict[str, tuple[torch.dtype, tuple[int, ...]]]):
        self.coll, self.reader, self.layout = coll, reader, layout

    def __contains__(self, name: str) -> bool:
        return name in self.layout

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        stored, shape = self.layout[name]
        tensor = self.reader.read(name) if self.coll.is_writer else torch.empty(shape, dtype=stored)
        self.coll.broadcast_(tensor)
        return tensor if dtype is None else tensor.to(dtype)
