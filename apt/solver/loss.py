"""The layer loss ``L(Ŵ) = tr((Ŵ − W) H (Ŵ − W)ᵀ)``, evaluated in float64 sums without copies of the weight."""

from __future__ import annotations

import torch

# Rows are refitted in chunks of at most this many weights: CG keeps about ten [rows, in] temporaries,
# which for a wide layer (Llama-3-70B's down_proj: 8192 × 28672) would be 9 GB at once; a chunk keeps
# them at ~40 MB. SmolLM2's widest layer (576 × 1536) fits one chunk.
CHUNK_ELEMENTS = 2**20


def layer_loss(W_hat: torch.Tensor, W: torch.Tensor, H: torch.Tensor) -> float:
    """``tr((Ŵ − W) H (Ŵ − W)ᵀ)`` for ``[out, in]`` weights and ``[in, in]`` H, summed in float64."""
    D = W_hat - W
    return float(((D @ H) * D).sum(dtype=torch.float64))


class Quadratic:
    """The layer loss on the undamped ``H``, still exact once a solver has damped ``H`` in place: the
    damping only adds to the diagonal, so ``tr(D H Dᵀ) = tr(D H_damped Dᵀ) − Σ_j (H_damped − H)_jj ‖D_:j‖²``
    with the undamped diagonal kept aside. Rows are summed in chunks (float64 sums need a float64
    copy of what they sum), so a loss costs a few MB, not several copies of the weight."""

    def __init__(self, matrix: torch.Tensor, diagonal: torch.Tensor):
        self.matrix, self.diagonal = matrix, diagonal

    def loss(self, W_hat: torch.Tensor | None, W: torch.Tensor) -> float:
        """``tr((Ŵ − W) H (Ŵ − W)ᵀ)``; ``W_hat=None`` is the all-zero weight."""
        return float(self.row_losses(W_hat, W).sum())

    def row_losses(self, W_hat: torch.Tensor | None, W: torch.Tensor) -> torch.Tensor:
        """Each row's ``(ŵ − w) H (ŵ − w)ᵀ`` ``[out]`` (float64); ``W_hat=None`` is the all-zero weight."""
        extra = self.matrix.diagonal() - self.diagonal  # zero until the matrix is damped in place
        damped = bool((extra != 0).any())
        step = max(1, CHUNK_ELEMENTS // max(W.shape[1], 1))
        rows = torch.empty(W.shape[0], dtype=torch.float64, device=W.device)
        for r0 in range(0, W.shape[0], step):
            D = -W[r0 : r0 + step] if W_hat is None else W_hat[r0 : r0 + step] - W[r0 : r0 + step]
            part = ((D @ self.matrix) * D).sum(dim=1, dtype=torch.float64)
            if damped:
                part -= (D * D).to(torch.float64) @ extra.to(torch.float64)
            rows[r0 : r0 + step] = part
        return rows
