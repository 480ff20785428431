"""A search over the N:M support by ADMM (ALPS, Meng et al. 2024, arXiv 2406.07831, §3).

The layer problem ``min (ŵ − w) H (ŵ − w)ᵀ`` subject to ``ŵ`` N:M is split as ``ŵ = d`` with ``d`` N:M and
solved by the alternating directions, every row at once:

    ŵ ← (w H + ρ (d − v)) (H + ρ I)⁻¹        one eigendecomposition of H serves every ρ
    d ← Π(ŵ + v)                             per group of M, the N largest |·|
    v ← v + ŵ − d                            (scaled dual; rescaled when ρ changes)

With ρ small the ŵ step is the loss's own optimum pulled toward ``d``; as ρ rises the two meet and the
support of ``d`` settles. It starts from apt's joint-removal solution; a row's support is final once it
has not changed for ``patience`` steps (or after ``max_iter``), so each row's result is its own. The mask
is the support of ``d``; the exact refit (``apt.solver.refit``) then sets the kept weights, and each row
keeps whichever support, searched or joint-removal, has the lower loss after it (``apt.solver.methods``).

The defaults (ρ₀ = 0.03·mean diag H, ×1.2 a step, at most 100 steps, patience 5) were chosen on 21
SmolLM2-135M layers (``python -m runtime_bench.mask_diagnosis``): a faster rise (ρ₀ 0.3, ×1.5) settles in
fewer steps on nearly apt's own support; a slower one (×1.1, 200 steps) gains ~1 % more loss for ~30 %
more time.
"""

from __future__ import annotations

import torch

from apt.solver.patterns import Pattern


def project(W: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """The nearest N:M matrix in Frobenius norm: the N largest |w| of every group of M, the rest zero (ties as
    ``topk`` breaks them)."""
    rows, cols = W.shape
    groups = W.reshape(rows, cols // pattern.m, pattern.m)
    magnitude = groups.abs()
    if (pattern.n, pattern.m) == (2, 4):
        # 2:4 keeps what exceeds each group's second smallest |w|, found by a min/max network: twice as fast
        # as topk on CPU, where the projection was a third of the search's time; a group with a tie there
        # keeps fewer than two and goes to topk
        a0, a1, a2, a3 = magnitude.unbind(dim=2)
        low, high = torch.minimum(a0, a1), torch.maximum(a0, a1)
        low2, high2 = torch.minimum(a2, a3), torch.maximum(a2, a3)
        second = torch.minimum(torch.maximum(low, low2), torch.minimum(high, high2))
        keep = magnitude > second.unsqueeze(2)
        tied = keep.sum(dim=2) != 2
        if bool(tied.any()):
            keep[tied] = _largest(magnitude[tied], 2)
    else:
        keep = _largest(magnitude, pattern.n)
    return (groups * keep).reshape(rows, cols)


def _largest(magnitude: torch.Tensor, n: int) -> torch.Tensor:
    """True at the ``n`` largest entries along the last dimension."""
    keep = torch.zeros_like(magnitude, dtype=torch.bool)
    keep.scatter_(-1, magnitude.topk(n, dim=-1).indices, True)
    return keep


def admm_support(
    W: torch.Tensor,
    H: torch.Tensor,
    start: torch.Tensor,
    pattern: Pattern,
    rho: float = 0.03,
    growth: float = 1.2,
    max_iter: int = 100,
    patience: int = 5,
) -> tuple[torch.Tensor, int, torch.Tensor]:
    """The keep-mask ``[out, in]`` ADMM settles on for ``W`` ``[out, in]`` and positive definite ``H``
    ``[in, in]``, from ``start`` (an N:M weight: apt's joint-removal result). ``rho`` is the first penalty
    relative to ``mean(diag H)``, multiplied by ``growth`` every step. Returns ``(mask, steps, weight)``: each
    row's last N:M iterate ``d`` (on ``mask`` but for a group tied at zero), where the refit on ``mask`` starts."""
    evals, Q = torch.linalg.eigh(H)
    scale = float(H.diagonal().mean())
    WH_Q = (W @ H) @ Q  # the loss's own pull, in H's eigenbasis
    D = start.clone()
    V = torch.zeros_like(W)
    penalty = rho * scale
    mask = D != 0
    # each row settles on its own and leaves the iteration: rows are independent, so a row's support must
    # not depend on which other rows share the call (torchrun splits a layer's rows over the ranks)
    settled, settled_d = mask.clone(), D.clone()
    rows = torch.arange(W.shape[0], device=W.device)  # the rows still moving
    still = torch.zeros(W.shape[0], dtype=torch.long, device=W.device)
    steps = 0
    while steps < max_iter and rows.numel():
        steps += 1
        W_hat = ((WH_Q + penalty * ((D - V) @ Q)) / (evals + penalty)) @ Q.T
        D = project(W_hat + V, pattern)
        V += W_hat - D
        new_mask = D != 0
        still = torch.where((new_mask == mask).all(dim=1), still + 1, 0)
        mask = new_mask
        now = still >= patience
        if bool(now.any()):
            settled[rows[now]], settled_d[rows[now]] = mask[now], D[now]
            going = ~now
            rows, WH_Q, D, V, mask, still = (t[going] for t in (rows, WH_Q, D, V, mask, still))
        V *= 1.0 / growth  # the scaled dual follows the penalty: v = λ / ρ
        penalty *= growth
    settled[rows], settled_d[rows] = mask, D  # rows still moving after max_iter
    mask = settled
    # a group whose largest values tie at zero keeps fewer than N: give it the rest by |w|
    short = mask.reshape(mask.shape[0], -1, pattern.m).sum(-1) < pattern.n
    if bool(short.any()):
        fill = project(torch.where(mask, W.abs() + float("inf"), W.abs()), pattern) != 0
        mask = torch.where(short.repeat_interleave(pattern.m, dim=1), fill, mask)
    return mask, steps, settled_d
