"""Sparsity patterns: parsing ``"2:4"`` / ``"4:8"`` / ``"50%"`` and checking tensors against them.

N:M is read along the reduction dimension ``in`` of a ``[out, in]`` weight: in every row, each run of
M consecutive input columns keeps at most N non-zeros. That is the axis cuSPARSELt, CUTLASS and
TensorRT accelerate.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from apt.errors import InvalidInputError


@dataclass(frozen=True)
class Pattern:
    """A sparsity pattern. ``n:m`` keeps ``n`` of every ``m`` columns; unstructured keeps a ratio per row."""

    n: int | None = None
    m: int | None = None
    sparsity: float = 0.5

    def __post_init__(self) -> None:
        if self.is_nm:
            if not (0 < self.n < self.m):
                raise InvalidInputError(f"N:M pattern needs 0 < N < M, got {self.n}:{self.m}")
            object.__setattr__(self, "sparsity", 1.0 - self.n / self.m)
        elif not (0.0 < self.sparsity < 1.0):
            raise InvalidInputError(f"unstructured sparsity must lie in (0, 1), got {self.sparsity}")

    @property
    def is_nm(self) -> bool:
        return self.n is not None and self.m is not None

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else f"{self.sparsity * 100:g}%"

    @classmethod
    def parse(cls, text: str | Pattern) -> Pattern:
        """``"2:4"`` → 2:4; ``"4:8"`` → 4:8; ``"50%"`` or ``"0.5"`` → unstructured 50 % per row."""
        if isinstance(text, Pattern):
            return text
        text = str(text).strip()
        if match := re.fullmatch(r"(\d+)\s*:\s*(\d+)", text):
            return cls(n=int(match[1]), m=int(match[2]))
        if match := re.fullmatch(r"(\d+(?:\.\d+)?)\s*%", text):
            return cls(sparsity=float(match[1]) / 100.0)
        if match := re.fullmatch(r"0?\.\d+", text):
            return cls(sparsity=float(text))
        raise InvalidInputError(
            f"unknown sparsity pattern {text!r}: use N:M such as '2:4' or '4:8', or a ratio such as '50%'"
        )


def nm_groups_ok(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Per row: True where every group of ``m`` consecutive columns has at most ``n`` non-zeros.

    ``weight`` is ``[out, in]`` with ``in`` divisible by ``m``; returns bool ``[out]``.
    """
    rows, cols = weight.shape
    if cols % m:
        return torch.zeros(rows, dtype=torch.bool)
    nonzero = (weight != 0).reshape(rows, cols // m, m).sum(dim=-1)
    return (nonzero <= n).all(dim=-1)


def is_nm_sparse(weight: torch.Tensor, n: int = 2, m: int = 4) -> bool:
    """True when the 2-D ``weight`` ``[out, in]`` is N:M sparse along ``in`` (the reduction dimension)."""
    if weight.dim() != 2:
        raise InvalidInputError(f"expected a 2-D weight [out, in], got shape {tuple(weight.shape)}")
    return bool(weight.shape[1] % m == 0 and nm_groups_ok(weight, n, m).all())


def first_nm_violation(weight: torch.Tensor, n: int = 2, m: int = 4) -> tuple[int, int] | None:
    """The ``(row, first column of the group)`` of the first group holding more than ``n`` non-zeros."""
    rows, cols = weight.shape
    if cols % m:
        return (0, cols - cols % m)
    nonzero = (weight != 0).reshape(rows, cols // m, m).sum(dim=-1)
    bad = (nonzero > n).nonzero()
    if bad.numel() == 0:
        return None
    return int(bad[0, 0]), int(bad[0, 1]) * m


def sparsity_of(weight: torch.Tensor) -> float:
    """Fraction of exact zeros in ``weight``."""
    return float((weight == 0).sum()) / max(weight.numel(), 1)


def conforms(weight: torch.Tensor, pattern: Pattern) -> bool:
    """True when ``weight`` ``[out, in]`` satisfies ``pattern``: N:M along ``in``, or at least the pattern's
    share of zeros in every row for an unstructured ratio."""
    if pattern.is_nm:
        return is_nm_sparse(weight, pattern.n, pattern.m)
    zeros_needed = round(pattern.sparsity * weight.shape[1])
    return bool(((weight == 0).sum(dim=1) >= zeros_needed).all())


def as_rows(tensor: torch.Tensor, in_axis: int = -1) -> torch.Tensor:
    """A pruned tensor as rows ``[rows, in]`` along its input axis: a Linear's ``[out, in]`` as it is, a 3-D
    experts tensor ``[E, out, in]`` (``in_axis=-1``) or ``[E, in, out]`` (``in_axis=-2``) with its experts'
    rows stacked."""
    if tensor.dim() == 2 and in_axis in (-1, 1):
        return tensor
    moved = tensor.movedim(in_axis, -1)
    return moved.reshape(-1, moved.shape[-1])


def positive_zeros(tensor: torch.Tensor) -> torch.Tensor:
    """The same tensor with every zero stored as ``+0.0``: a stored ``-0.0`` once produced garbage in
    vLLM's sparse path, and a kept weight below a narrow dtype's smallest subnormal rounds to ``-0.0``."""
    if not tensor.is_floating_point():
        return tensor
    return torch.where(tensor == 0, torch.zeros((), dtype=tensor.dtype, device=tensor.device), tensor)


def select_mask(scores: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """Keep-mask ``[out, in]`` that keeps the highest ``scores``: top N per group of M, or per row."""
    rows, cols = scores.shape
    if pattern.is_nm:
        groups = scores.reshape(rows, cols // pattern.m, pattern.m)
        keep = torch.zeros_like(groups, dtype=torch.bool)
        keep.scatter_(2, groups.topk(pattern.n, dim=2).indices, True)
        return keep.reshape(rows, cols)
    n_keep = cols - round(pattern.sparsity * cols)
    keep = torch.zeros_like(scores, dtype=torch.bool)
    keep.scatter_(1, scores.topk(n_keep, dim=1).indices, True)
    return keep
