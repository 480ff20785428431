"""The process group a run computes in: ``Collective()`` is one process, whose operations do nothing;
``TorchCollective`` is ``torch.distributed`` (NCCL between GPUs, gloo on CPU) under ``torchrun``. The
pruning run and the streamed evaluation both take one, so a single process and many ranks share one
code path (``apt.run.distributed`` says who does what).
"""

from __future__ import annotations

import datetime
import pickle
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
