"""Our compressed layout of a 2:4 weight, read by the decode kernels (``serving.triton24``) and the sparse
op (``serving.sparse_op``).

A weight ``[N, K]`` (2:4 along K, the input dimension) becomes:

- ``values`` ``[2, N, K/4]`` in the weight's dtype: plane 0 holds each group's left kept weight, plane 1
  its right one. Two planes, not one interleaved ``[N, K/2]``: a kernel loads each plane with wide,
  contiguous loads and needs no register shuffle to split them.
- ``codes`` ``[N, ceil(K/32)]`` int32: per group of 4 inputs a 4-bit code ``i0 | i1 << 2`` (the kept
  positions, ``0 <= i0 < i1 <= 3``), eight groups per word, group ``g`` at bits ``4·(g mod 8)``.

That is half the values plus one bit per dense weight: 0.5625× the dense bytes in fp16/bf16 (0.625× in
FP8), the least a 2:4 weight can move at decode (the 1.78× ceiling in fp16/bf16). A group with fewer than
two non-zeros still names two slots (the two largest |w|, ties to the left, as ``serving.bitmask``), so
every group decodes alike; a pruned ``-0.0`` comes back as ``+0.0``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from serving.bitmask import keep_mask_24

GROUPS_PER_WORD = 8


@dataclass(frozen=True)
class Packed24:
    """One weight in our layout: ``values`` ``[2, N, K/4]``, ``codes`` ``[N, ceil(K/32)]`` int32, ``in_features`` K."""

    values: torch.Tensor
    codes: torch.Tensor
    in_features: int

    @property
    def out_features(self) -> int:
        return self.values.shape[1]

    def nbytes(self) -> int:
        return self.values.numel() * self.values.element_size() + self.codes.numel() * self.codes.element_size()

    def to(self, device) -> Packed24:
        return Packed24(self.values.to(device), self.codes.to(device), self.in_features)


def check_24(weight: torch.Tensor) -> None:
    """Refuse a weight that is not ``[N, K]`` with K a multiple of 4 and at most 2 non-zeros per group of 4."""
    if weight.dim() != 2 or weight.shape[1] % 4:
        raise ValueError(f"a 2:4 weight is [out, in] with in a multiple of 4; got shape {tuple(weight.shape)}")
    groups = (weight.float().reshape(weight.shape[0], -1, 4) != 0).sum(-1)
    if bool((groups > 2).any()):
        row, group = (int(i) for i in (groups > 2).nonzero()[0])
        raise ValueError(
            f"the weight breaks 2:4 at row {row}, columns {4 * group}..{4 * group + 3} "
            f"({int(groups[row, group])} non-zeros): prune it to 2:4 first"
        )


def pack_24(weight: torch.Tensor) -> Packed24:
    """A 2:4 weight ``[N, K]`` (any float dtype, any device) in our layout, on the same device."""
    check_24(weight)
    n, k = weight.shape
    groups = k // 4
    keep = keep_mask_24(weight).reshape(n, groups, 4)
    slot = torch.arange(4, device=weight.device)
    # The kept slots first, in column order: kept slots sort by their position, the others after them.
    order = torch.where(keep, slot, slot + 4).sort(dim=-1).values[..., :2]
    grouped = _bits(weight).reshape(n, groups, 4)  # values move as their bits: exact for every dtype, float8 too
    values = torch.stack([grouped.gather(-1, order[..., i : i + 1]).squeeze(-1) for i in (0, 1)]).contiguous()
    values = values.view(weight.dtype)
    nibbles = (order[..., 0] | (order[..., 1] << 2)).to(torch.int64)
    words = -(-groups // GROUPS_PER_WORD)
    padded = torch.zeros(n, words * GROUPS_PER_WORD, dtype=torch.int64, device=weight.device)
    padded[:, :groups] = nibbles
    shifts = 4 * torch.arange(GROUPS_PER_WORD, device=weight.device)
    packed = (padded.reshape(n, words, GROUPS_PER_WORD) << shifts).sum(-1)
    codes = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)  # the top nibble sets the sign bit
    return Packed24(values, codes, k)


def group_positions(codes: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(i0, i1)`` ``[N, groups]`` int64: the kept positions of every group, from the packed ``codes``."""
    words = codes.to(torch.int64) & 0xFFFFFFFF
    shifts = 4 * torch.arange(GROUPS_PER_WORD, device=codes.device)
    nibbles = ((words.unsqueeze(-1) >> shifts) & 15).reshape(codes.shape[0], -1)[:, :groups]
    return nibbles & 3, nibbles >> 2


def unpack_24(packed: Packed24) -> torch.Tensor:
    """The dense weight ``[N, K]`` back from our layout (exact: values are copied, never rounded)."""
    n, groups = packed.out_features, packed.in_features // 4
    i0, i1 = group_positions(packed.codes, groups)
    bits = _bits(packed.values)
    dense = torch.zeros(n, groups, 4, dtype=bits.dtype, device=bits.device)
    dense.scatter_(-1, i0.unsqueeze(-1), bits[0].unsqueeze(-1))
    dense.scatter_(-1, i1.unsqueeze(-1), bits[1].unsqueeze(-1))
    return dense.reshape(n, packed.in_features).view(packed.values.dtype)


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` viewed as integers of its width (gather and scatter then copy bits, on any device)."""
    return tensor.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[tensor.element_size()])
