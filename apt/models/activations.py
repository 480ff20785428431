"""The hidden states between blocks: what sequential calibration and streamed evaluation carry from one
block to the next, in memory, on the compute device, or in a file."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from apt.atomic import writing


class ActivationStore:
    """The hidden states entering the current block, one entry per batch, with the keyword arguments the
    model passes to its blocks (kept in memory: position tables and masks are small).

    ``dtype`` is the dtype hidden states are kept in (the compute dtype, or a narrower one to halve
    the memory) and ``device`` where (the host by default; the compute device saves the transfers).
    With ``spill_to`` a folder, hidden states live in a file there and only one batch is in memory at
    a time (plain reads and writes, no memory map, so the resident set stays small).
    """

    def __init__(self, dtype: torch.dtype, device: str = "cpu", spill_to: str | Path | None = None):
        self.dtype = dtype
        self.device = device if spill_to is None else "cpu"
        self._kwargs: list[list[dict]] = []
        self._shapes: list[tuple[int, ...]] = []
        self._memory: list[torch.Tensor] = []
        self._file = None
        self._offsets: list[int] = []
        self._spill_to = spill_to
        if spill_to is not None:
            with writing(spill_to):
                Path(spill_to).mkdir(parents=True, exist_ok=True)
                fd, path = tempfile.mkstemp(prefix="activations-", suffix=".bin", dir=spill_to)
            os.unlink(path)  # removed with the process, whatever happens
            self._file = os.fdopen(fd, "r+b", buffering=0)
            self._end = 0

    def __len__(self) -> int:
        return len(self._kwargs)

    @property
    def nbytes(self) -> int:
        numel = sum(int(torch.Size(s).numel()) for s in self._shapes)
        return numel * self.dtype.itemsize

    def append(self, hidden: torch.Tensor, kwargs: list[dict]) -> None:
        """One batch: its hidden states and, per block, the keyword arguments the model passes to it (blocks
        that share them share one dict)."""
        self._kwargs.append(kwargs)
        self._shapes.append(tuple(hidden.shape))
        if self._file is None:
            self._memory.append(hidden.detach().to(self.device, self.dtype).clone())
        else:
            self._offsets.append(self._end)
            self._end += hidden.numel() * self.dtype.itemsize
            self._write(len(self) - 1, hidden)

    def kwargs(self, i: int, block: int) -> dict:
        """The keyword arguments of batch ``i`` for block ``block`` (masks, position tables)."""
        return self._kwargs[i][block]

    def copy(self) -> ActivationStore:
        """Another store holding the same batches (in a file of its own when this one spills)."""
        other = ActivationStore(self.dtype, self.device, self._spill_to)
        for i in range(len(self)):
            other.append(self.hidden(i), self._kwargs[i])
        return other

    def hidden(self, i: int) -> torch.Tensor:
        if self._file is None:
            return self._memory[i]
        shape = self._shapes[i]
        nbytes = int(torch.Size(shape).numel()) * self.dtype.itemsize
        buffer = bytearray(nbytes)
        view, done = memoryview(buffer), 0
        while done < nbytes:
            done += os.preadv(self._file.fileno(), [view[done:]], self._offsets[i] + done)
        return torch.frombuffer(buffer, dtype=self.dtype).reshape(shape)

    def replace(self, i: int, hidden: torch.Tensor) -> None:
        if tuple(hidden.shape) != self._shapes[i]:
            raise ValueError(f"batch {i}: hidden states changed shape {self._shapes[i]} → {tuple(hidden.shape)}")
        if self._file is None:
            self._memory[i] = hidden.detach().to(self.device, self.dtype)
        else:
            self._write(i, hidden)

    def _write(self, i: int, hidden: torch.Tensor) -> None:
        data = hidden.detach().to("cpu", self.dtype).contiguous().reshape(-1).view(torch.uint8).numpy()
        view, done = memoryview(data), 0
        with writing(f"the activations file in {self._spill_to}"):
            while done < len(view):
                done += os.pwrite(self._file.fileno(), view[done:], self._offsets[i] + done)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
