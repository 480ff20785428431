"""Channel permutation before N:M selection (Pool & Yu 2021): the N:M groups are M consecutive input
channels, so which channels share a group decides what the mask can keep. Where a layer's inputs can be
reordered for free (a down projection's inputs, whose order the gate and up projections' rows set), a
permutation that spreads the salient channels over the groups lets every group keep one of them.

``balanced_permutation`` orders the channels by saliency ``H_jj · Σ_i w_ij²`` and deals them to the groups
in a snake order, so each group gets one channel of each saliency tier. Whether it is used is decided by
the loss after the exact refit, not by the saliency it balances (PermLLM, arXiv 2510.10136: a
permutation that retains more importance can raise the output error).
"""

from __future__ import annotations

import torch


def balanced_permutation(W: torch.Tensor, H: torch.Tensor, m: int) -> torch.Tensor:
    """A permutation ``perm`` ``[in]`` of the input channels (the new channel ``k`` is the old ``perm[k]``)
    in which group g holds the g-th, (2G−1−g)-th, (2G+g)-th, … most salient channels."""
    cols = W.shape[1]
    groups = cols // m
    saliency = H.diagonal() * (W * W).sum(dim=0)
    order = saliency.argsort(descending=True)
    rank = torch.arange(cols, device=W.device)
    tier, within = rank // groups, rank % groups
    group = torch.where(tier % 2 == 0, within, groups - 1 - within)  # snake: balances the tiers' sums too
    slot = group * m + tier
    perm = torch.empty_like(order)
    perm[slot] = order
    return perm


def inverse(perm: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(perm)
    out[perm] = torch.arange(len(perm), device=perm.device)
    return out
