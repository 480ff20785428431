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

A single process uses ``Collective()``, whose operations do nothing, so the run has one code path.
"""

from __future__ import annotations

import datetime
import os
import pickle
import socket
import time
from dataclasses import dataclass, field

import torch

from apt.errors import AptError


class DistributedError(AptError, RuntimeError):
    """A rank stopped answering, or the ranks disagree about the job."""


@dataclass
class Collective:
    """One process: every collective is the identity."""

    rank: int = 0
    world: int = 1
    seconds: float = 0.0  # time spent waiting in collectives (communication and imbalance)
    bytes_moved: int = 0  # payload this rank sent into collectives
    backend: str = "none"
    timings: dict = field(default_factory=dict)

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    def share(self, items: list) -> list:
        """This rank's round-robin share of ``items``."""
        return items[self.rank :: self.world]

    def row_slice(self, rows: int) -> slice:
        chunk = -(-rows // self.world)
        return slice(min(self.rank * chunk, rows), min((self.rank + 1) * chunk, rows))

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over ranks, in place; returns it."""
        return tensor

    def gather_rows(self, local: torch.Tensor, rows: int) -> torch.Tensor:
        """The row slices of all ranks, in rank order: ``[rows, ...]``."""
        return local

    def broadcast_(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        return tensor

    def gather_objects(self, obj) -> list:
        return [obj]

    def broadcast_object(self, obj, src: int = 0):
        return obj

    def barrier(self) -> None:
        pass


class TorchCollective(Collective):
    """``torch.distributed`` collectives, with every failure turned into a ``DistributedError``."""

    def __init__(self, device: str, timeout_s: float):
        import torch.distributed as dist

        self.dist = dist
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
        super().__init__(rank=dist.get_rank(), world=dist.get_world_size(), backend=backend)
        self.device = device if backend == "nccl" else "cpu"
        self.timeout_s = timeout_s

    def _call(self, what: str, fn, nbytes: int = 0):
        start = time.perf_counter()
        try:
            result = fn()
        except (RuntimeError, OSError) as err:  # gloo and NCCL raise RuntimeError subclasses
            raise DistributedError(
                f"rank {self.rank}: {what} failed — another rank stopped answering or died "
                f"(timeout {self.timeout_s:.0f} s): {str(err).splitlines()[0] if str(err) else err}"
            ) from err
        self.seconds += time.perf_counter() - start
        self.bytes_moved += nbytes
        return result

    def _on_device(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.device) if tensor.device.type != torch.device(self.device).type else tensor

    def sum_(self, tensor):
        moved = self._on_device(tensor)
        self._call("all-reduce", lambda: self.dist.all_reduce(moved), moved.numel() * moved.element_size())
        if moved is not tensor:
            tensor.copy_(moved)
        return tensor

    def gather_rows(self, local, rows):
        chunk = -(-rows // self.world)
        padded = torch.zeros((chunk, *local.shape[1:]), dtype=local.dtype, device=self.device)
        padded[: local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        self._call("all-gather", lambda: self.dist.all_gather(parts, padded), padded.numel() * padded.element_size())
        return torch.cat(parts)[:rows].to(local.device)

    def broadcast_(self, tensor, src=0):
        # as bytes: every backend moves uint8, whatever the dtype (gloo has no bfloat16 everywhere)
        moved = self._on_device(tensor.contiguous())
        raw = moved.view(torch.uint8) if moved.dim() else moved.reshape(1).view(torch.uint8)
        self._call("broadcast", lambda: self.dist.broadcast(raw, src), raw.numel() if self.rank == src else 0)
        if moved is not tensor:
            tensor.copy_(moved)
        return tensor

    def gather_objects(self, obj):
        out = [None] * self.world
        self._call("all-gather", lambda: self.dist.all_gather_object(out, obj), len(pickle.dumps(obj)))
        return out

    def broadcast_object(self, obj, src=0):
        box = [obj]
        self._call("broadcast", lambda: self.dist.broadcast_object_list(box, src))
        return box[0]

    def barrier(self):
        self._call("barrier", lambda: self.dist.barrier())

    def close(self) -> None:
        if self.dist.is_initialized():
            self.dist.destroy_process_group()


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
            raise DistributedError(
                f"rank {rank} runs other options than rank 0 ({', '.join(changed)}): "
                "launch every rank with the same command"
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
