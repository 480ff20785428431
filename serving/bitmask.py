"""The compressed-tensors ``sparse-24-bitmask`` layout of one 2:4 weight, written by ``apt-sparse export
compressed-tensors`` and read by the vLLM plugin (``serving.vllm_plugin``).

Per 2:4 weight ``[rows, cols]`` of module ``M``: ``M.compressed`` holds the kept values ``[rows, cols/2]``
in row order, ``M.bitmask`` the keep-mask as uint8 ``[rows, ceil(cols/8)]`` packed little-endian (bit j
of byte k is column 8k+j), ``M.shape`` the int64 shape ``[2, 1]`` — the names and layouts
compressed-tensors 0.14's ``Sparse24BitMaskCompressor`` writes and reads. Every group of 4 marks exactly
2 slots: the two largest |w| (a kept weight that happens to be zero still owns its slot).
"""

from __future__ import annotations

import torch

FORMAT = "sparse-24-bitmask"
PARTS = ("compressed", "bitmask", "shape")


def keep_mask_24(weight: torch.Tensor) -> torch.Tensor:
    """Exactly 2 kept slots per group of 4 along the input dimension: the two largest |w|, ties to the left."""
    rows, cols = weight.shape
    groups = weight.float().abs().reshape(rows, cols // 4, 4)  # float first: float8 has no abs on every device
    order = groups.argsort(dim=-1, descending=True, stable=True)[..., :2]
    return torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, order, True).reshape(rows, cols)


def pack_bitmask(mask: torch.Tensor) -> torch.Tensor:
    """bool ``[rows, cols]`` → uint8 ``[rows, ceil(cols/8)]``, little-endian bit order."""
    rows, cols = mask.shape
    padded = torch.zeros(rows, (cols + 7) // 8 * 8, dtype=torch.uint8)
    padded[:, :cols] = mask.to(torch.uint8)
    weights = (2 ** torch.arange(8, dtype=torch.int32)).to(torch.uint8)
    return (padded.view(rows, -1, 8) * weights).sum(dim=-1, dtype=torch.int32).to(torch.uint8)


def unpack_bitmask(packed: torch.Tensor, cols: int) -> torch.Tensor:
    bits = (packed.unsqueeze(-1).to(torch.int32) >> torch.arange(8, dtype=torch.int32)) & 1
    return bits.reshape(packed.shape[0], -1)[:, :cols].bool()


def compress_24(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    rows, cols = weight.shape
    mask = keep_mask_24(weight)
    return {
        "compressed": weight[mask].reshape(rows, cols // 2).contiguous(),
        "bitmask": pack_bitmask(mask),
        "shape": torch.tensor([rows, cols], dtype=torch.int64).reshape(2, 1),
    }


def decompress_24(compressed: torch.Tensor, bitmask: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
    rows, cols = (int(v) for v in shape.reshape(-1).tolist())
    mask = unpack_bitmask(bitmask, cols)
    out = torch.zeros(rows, cols, dtype=compressed.dtype)
    out[mask] = compressed.reshape(-1)
    return out
