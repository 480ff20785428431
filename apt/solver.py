"""One-shot pruning of one linear layer: ``prune_layer(weight, hessian, ...) -> PruneResult``.

The layer problem (DESIGN.md, "The layer problem"): for ``W`` ``[out, in]`` and ``H = Σ x xᵀ``
``[in, in]``, find ``Ŵ`` with the sparsity pattern that minimises

    L(Ŵ) = tr((Ŵ − W) H (Ŵ − W)ᵀ)

The problem splits by output row and every method here is vectorised over rows. This module is a
pure function of tensors: no model, no file, no printing, no device calls of its own.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import asdict, dataclass, field

import torch

from apt.errors import InvalidInputError, SingularHessianError
from apt.patterns import Pattern
from apt.reconstruct import reconstruct, refine_mask

METHODS = ("apt", "sparsegpt", "wanda", "magnitude")
LOOKAHEAD_MAX_CANDIDATES = 20


@dataclass(frozen=True)
class PruneConfig:
    """How to prune one layer.

    ``damp`` is λ in the damping ``λ·mean(diag H)`` added to the diagonal; a failed factorisation
    retries with λ×10 up to ``max_damp_retries`` times. The exact reconstruction stops for a row when
    a conjugate-gradient step lowered its loss by at most ``tol`` times the loss (see ``reconstruct``).
    ``lookahead`` (apt, N:M) picks each group's removal set by the joint optimum over the group and the
    next one (C(M,N)² candidates; 2:4 only, as 4:8 would need 4900) and applies only the first. On
    tiny correlated layers it cut the median loss over the brute-force optimum from 1.63× to 1.33×
    (4×12); on SmolLM2's layers it changed the summed loss by 0.2 %. ``lookahead=False`` is the
    plain greedy method. ``reconstruct`` and ``refine`` apply to apt only.
    """

    method: str = "apt"
    pattern: Pattern = field(default_factory=lambda: Pattern(2, 4))
    damp: float = 0.01
    blocksize: int = 128
    reconstruct: bool = True
    refine: bool = False
    lookahead: bool = True
    tol: float = 1e-4
    max_iter: int = 300
    max_refine_rounds: int = 50
    max_damp_retries: int = 4

    def __post_init__(self) -> None:
        object.__setattr__(self, "pattern", Pattern.parse(self.pattern))
        if self.method not in METHODS:
            raise InvalidInputError(f"unknown method {self.method!r}: choose one of {', '.join(METHODS)}")
        if not (self.damp >= 0.0):
            raise InvalidInputError(f"damp must be >= 0, got {self.damp}")
        if self.blocksize < 1 or self.max_iter < 0 or self.max_damp_retries < 0 or self.tol <= 0:
            raise InvalidInputError("blocksize must be >= 1, max_iter and max_damp_retries >= 0, tol > 0")
        if self.refine and self.method != "apt":
            raise InvalidInputError("refine is an option of method='apt' only")


@dataclass(frozen=True)
class SolverStats:
    """What the solver did. ``damp`` is the relative λ actually used; ``residual`` the final max relative
    residual of the reconstruction (``None`` where the method does not reconstruct)."""

    method: str
    pattern: str
    damp: float | None
    damp_retries: int
    dead_columns: int
    iterations: int
    residual: float | None
    lookahead: bool
    refine_rounds: int
    refine_swaps: int
    loss_before_reconstruction: float | None
    seconds: float

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class PruneResult:
    """``weight`` ``[out, in]`` in the input dtype with ``+0.0`` at pruned places; ``mask`` bool, True = kept;
    ``loss`` = ``tr((Ŵ−W) H (Ŵ−W)ᵀ)`` on the undamped ``H``; ``relative_loss`` = ``loss / L(0)``."""

    weight: torch.Tensor
    mask: torch.Tensor
    loss: float
    relative_loss: float
    stats: SolverStats


def prune_layer(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    method: str = "apt",
    pattern: str | Pattern = "2:4",
    damp: float = 0.01,
    config: PruneConfig | None = None,
    **options,
) -> PruneResult:
    """Prune ``weight`` ``[out, in]`` given ``hessian`` ``[in, in]`` (= Σ x xᵀ over calibration tokens).

    Computes in float64 when ``weight`` is float64, else in float32, on the device of ``weight``.
    ``options`` are the remaining fields of :class:`PruneConfig`; pass ``config`` instead to reuse one.
    """
    if config is None:
        config = PruneConfig(method=method, pattern=Pattern.parse(pattern), damp=damp, **options)
    start = time.perf_counter()
    _check_inputs(weight, hessian, config.pattern)

    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    W_orig = weight.to(dtype)
    H_orig = hessian.to(device=weight.device, dtype=dtype)
    W = W_orig.clone()
    H = H_orig.clone()
    # A column no calibration token ever reached (zero diagonal) does not affect the loss: zero it and
    # give it a unit diagonal so the factorisation stays defined (as in SparseGPT).
    dead = H.diagonal() == 0
    n_dead = int(dead.sum())

    info = dict(
        damp=None,
        damp_retries=0,
        iterations=0,
        residual=None,
        refine_rounds=0,
        refine_swaps=0,
        loss_before_reconstruction=None,
    )
    pattern = config.pattern
    if config.method == "magnitude":
        mask = select_mask(W.abs(), pattern)
    elif config.method == "wanda":
        # Sun et al. 2023: |w_ij| · ‖x_j‖₂, with ‖x_j‖² = H_jj.
        mask = select_mask(W.abs() * H.diagonal().clamp_min(0).sqrt().unsqueeze(0), pattern)
    else:
        H[dead, dead] = 1.0
        W[:, dead] = 0.0
        H_damped, U, info["damp"], info["damp_retries"] = inverse_hessian_factor(
            H, config.damp, config.max_damp_retries
        )
        if config.method == "apt" and pattern.is_nm:
            W, mask = _joint_removal(W, U, pattern, config.blocksize, config.lookahead)
        else:
            W, mask = _sparsegpt(W, U, pattern, config.blocksize)
        if config.method == "apt" and (config.reconstruct or config.refine):
            info["loss_before_reconstruction"] = layer_loss(W, W_orig, H_orig)
            W_target = W_orig.masked_fill(dead.unsqueeze(0), 0.0)
            W, info["iterations"], info["residual"] = reconstruct(
                W_target, mask, H_damped, x0=W, tol=config.tol, max_iter=config.max_iter
            )
            if config.refine:
                W, mask, refined = refine_mask(
                    W_target,
                    mask,
                    H_damped,
                    W,
                    pattern,
                    tol=config.tol,
                    max_iter=config.max_iter,
                    max_rounds=config.max_refine_rounds,
                )
                info["refine_rounds"], info["refine_swaps"] = refined["rounds"], refined["swaps"]
                info["iterations"] += refined["iterations"]
                info["residual"] = refined["residual"]

    W = torch.where(mask, W, torch.zeros((), dtype=dtype, device=W.device))
    out = W.to(weight.dtype)
    # A kept value that rounds to -0.0 in a narrow dtype must still be stored as +0.0 (DESIGN.md).
    out = torch.where(out == 0, torch.zeros((), dtype=out.dtype, device=out.device), out)
    loss = layer_loss(out.to(dtype), W_orig, H_orig)
    base = layer_loss(torch.zeros_like(W_orig), W_orig, H_orig)
    stats = SolverStats(
        method=config.method,
        pattern=str(pattern),
        dead_columns=n_dead,
        lookahead=config.method == "apt"
        and pattern.is_nm
        and config.lookahead
        and math.comb(pattern.m, pattern.n) <= LOOKAHEAD_MAX_CANDIDATES,
        seconds=time.perf_counter() - start,
        **info,
    )
    return PruneResult(weight=out, mask=mask, loss=loss, relative_loss=loss / base if base > 0 else 0.0, stats=stats)


def layer_loss(W_hat: torch.Tensor, W: torch.Tensor, H: torch.Tensor) -> float:
    """``tr((Ŵ − W) H (Ŵ − W)ᵀ)`` for ``[out, in]`` weights and ``[in, in]`` H, summed in float64."""
    D = W_hat - W
    return float(((D @ H) * D).sum(dtype=torch.float64))


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


def inverse_hessian_factor(
    H: torch.Tensor, damp: float, max_retries: int
) -> tuple[torch.Tensor, torch.Tensor, float, int]:
    """Damp ``H`` and return ``(H_damped, U, damp_used, retries)`` with ``U`` the upper Cholesky factor of
    ``H_damped⁻¹`` (``H⁻¹ = Uᵀ U``). Retries with λ×10; never falls back to the identity."""
    mean_diag = H.diagonal().mean()
    lam = damp
    for attempt in range(max_retries + 1):
        H_damped = H.clone()
        H_damped.diagonal().add_(lam * mean_diag)
        L, info = torch.linalg.cholesky_ex(H_damped)
        if int(info) == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if int(info) == 0 and bool(torch.isfinite(U).all()):
                return H_damped, U, lam, attempt
        lam = lam * 10.0 if lam > 0 else 1e-4
    raise SingularHessianError(
        f"the Hessian [{H.shape[0]}x{H.shape[0]}] is not positive definite even with damping "
        f"{lam / 10:g}·mean(diag H) after {max_retries} increases; calibrate on more tokens or pass a larger damp"
    )


def _check_inputs(weight: torch.Tensor, hessian: torch.Tensor, pattern: Pattern) -> None:
    if weight.dim() != 2 or not weight.is_floating_point():
        raise InvalidInputError(
            f"weight must be a 2-D float tensor [out, in], got {tuple(weight.shape)} {weight.dtype}"
        )
    cols = weight.shape[1]
    if hessian.shape != (cols, cols):
        raise InvalidInputError(
            f"hessian must be [in, in] = [{cols}, {cols}] for this weight, got {tuple(hessian.shape)}"
        )
    if not bool(torch.isfinite(weight).all()):
        raise InvalidInputError("weight holds NaN or Inf values: check the checkpoint (and its dtype) before pruning")
    if not bool(torch.isfinite(hessian).all()):
        raise InvalidInputError(
            "hessian holds NaN or Inf values: the calibration activations overflowed; accumulate in float32 or float64"
        )
    if pattern.is_nm and cols % pattern.m:
        raise InvalidInputError(
            f"layer width in={cols} is not a multiple of M={pattern.m}, so {pattern} cannot apply: "
            "leave this layer dense (the pruning run skips and reports such layers)"
        )


def _block_ranges(cols: int, blocksize: int, m: int):
    step = max(m, blocksize // m * m)
    for i1 in range(0, cols, step):
        yield i1, min(i1 + step, cols)


def _sparsegpt(W: torch.Tensor, U: torch.Tensor, pattern: Pattern, blocksize: int):
    """SparseGPT (Frantar & Alistarh 2023, Alg. 1): per-column OBS with lazy batch updates.

    N:M masks are chosen per group at its first column from ``w²/U_jj²``; unstructured masks per row
    inside each block of columns (adaptive mask selection)."""
    rows, cols = W.shape
    m = pattern.m if pattern.is_nm else 1
    pruned = torch.zeros_like(W, dtype=torch.bool)
    for i1, i2 in _block_ranges(cols, blocksize, m):
        W1 = W[:, i1:i2].clone()
        U1 = U[i1:i2, i1:i2]
        d = U1.diagonal()
        Err1 = torch.zeros_like(W1)
        prune1 = torch.zeros_like(W1, dtype=torch.bool)
        if not pattern.is_nm:
            k = round(pattern.sparsity * (i2 - i1))
            if k:
                prune1.scatter_(1, (W1**2 / d**2).topk(k, dim=1, largest=False).indices, True)
        for i in range(i2 - i1):
            if pattern.is_nm and i % m == 0:
                saliency = W1[:, i : i + m] ** 2 / d[i : i + m] ** 2
                prune1.scatter_(1, i + saliency.topk(m - pattern.n, dim=1, largest=False).indices, True)
            w = W1[:, i]
            err = torch.where(prune1[:, i], w, torch.zeros_like(w)) / d[i]
            W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W1[prune1] = 0.0
        W[:, i1:i2] = W1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
        pruned[:, i1:i2] = prune1
    return W, ~pruned


def _joint_removal(W: torch.Tensor, U: torch.Tensor, pattern: Pattern, blocksize: int, lookahead: bool = False):
    """Multiple removal per N:M group (DESIGN.md): every row removes the jointly cheapest set Q.

    With F the still-free columns, (H_FF)⁻¹ = U_FFᵀ U_FF, so for group g the 4×4 block is
    S = U_ggᵀ U_gg; each candidate Q costs ΔL = w_Q S_QQ⁻¹ w_Qᵀ and the optimal update of the free
    columns is δw_F = −(w_Q S_QQ⁻¹ U_gQᵀ) U_gF — an error vector over the group's rows of U, so
    SparseGPT's lazy batch updates carry over unchanged.
    """
    rows, cols = W.shape
    m, n_remove = pattern.m, pattern.m - pattern.n
    candidates = torch.tensor(list(itertools.combinations(range(m), n_remove)), device=W.device)
    # lookahead scores C(M,N)² windows per group: 36 for 2:4, but 4900 for 4:8 (too large to be worth it)
    lookahead = lookahead and len(candidates) <= LOOKAHEAD_MAX_CANDIDATES
    pair_candidates = torch.cat(
        [candidates.repeat_interleave(len(candidates), 0), m + candidates.repeat(len(candidates), 1)], dim=1
    )
    # Every group's small matrices at once. A candidate's cost w_Q S_QQ⁻¹ w_Qᵀ is a quadratic form in
    # the window's weights, so each candidate's S_QQ⁻¹ is scattered into a window-sized matrix A and
    # the costs of all candidates become one product (w ⊗ w) · A per group.
    G = cols // m
    U_groups = U.view(G, m, G, m).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # [G, m, m]
    S_QQ_inv_all = torch.linalg.inv(
        (U_groups.transpose(1, 2) @ U_groups)[:, candidates[:, :, None], candidates[:, None, :]]
    )  # [G, C, r, r]
    A1 = _quadratic_forms(S_QQ_inv_all, candidates, m)  # [G, m·m, C]
    if lookahead and G > 1:
        U_windows = torch.stack([U[c : c + 2 * m, c : c + 2 * m] for c in range(0, cols - m, m)])  # [G-1, 2m, 2m]
        S2 = U_windows.transpose(1, 2) @ U_windows
        A2 = _quadratic_forms(
            torch.linalg.inv(S2[:, pair_candidates[:, :, None], pair_candidates[:, None, :]]), pair_candidates, 2 * m
        )  # [G-1, 4m², C²]
    pruned = torch.zeros_like(W, dtype=torch.bool)
    for i1, i2 in _block_ranges(cols, blocksize, m):
        W1 = W[:, i1:i2].clone()
        U1 = U[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for g in range(0, i2 - i1, m):
            c = i1 + g
            wg = W1[:, g : g + m]
            if lookahead and c + 2 * m <= cols:
                # choose this group's set by the joint optimum over this group and the next
                # (receding horizon: only this group's removal is applied now)
                if g + m < i2 - i1:
                    nxt = W1[:, g + m : g + 2 * m]
                else:  # the next group lies in the next block: add the update still pending for it
                    nxt = W[:, c + m : c + 2 * m] + Err1 @ U[i1:i2, c + m : c + 2 * m]
                window = torch.cat([wg, nxt], dim=1)
                cost = _outer(window) @ A2[c // m]  # [rows, C²]
                best = cost.view(rows, len(candidates), len(candidates)).amin(dim=2).argmin(dim=1)
            else:
                best = (_outer(wg) @ A1[c // m]).argmin(dim=1)  # smallest joint ΔL per row
            Q = candidates[best]  # [rows, r]
            lam = torch.einsum("br,brs->bs", wg.gather(1, Q), S_QQ_inv_all[c // m][best])  # w_Q S_QQ⁻¹
            err = -(lam.unsqueeze(-1) * U_groups[c // m].T[Q]).sum(dim=1)  # [rows, m]
            W1[:, g:] += err @ U1[g : g + m, g:]
            group_pruned = torch.zeros(rows, m, dtype=torch.bool, device=W.device)
            group_pruned.scatter_(1, Q, True)
            W1[:, g : g + m][group_pruned] = 0.0
            pruned[:, i1 + g : i1 + g + m] = group_pruned
            Err1[:, g : g + m] = err
        W[:, i1:i2] = W1
        W[:, i2:] += Err1 @ U[i1:i2, i2:]
    return W, ~pruned


def _quadratic_forms(inverses: torch.Tensor, index: torch.Tensor, width: int) -> torch.Tensor:
    """Scatter each candidate's ``[r, r]`` inverse (``inverses`` ``[G, C, r, r]``, positions ``index``
    ``[C, r]``) into a ``[width, width]`` matrix; returns ``[G, width², C]`` so that
    ``(w ⊗ w) @ A`` gives every candidate's ``w_Q S_QQ⁻¹ w_Qᵀ``."""
    groups, n_cand, r, _ = inverses.shape
    A = torch.zeros(groups, n_cand, width * width, dtype=inverses.dtype, device=inverses.device)
    flat = (index[:, :, None] * width + index[:, None, :]).reshape(1, n_cand, r * r).expand(groups, -1, -1)
    A.scatter_(2, flat, inverses.reshape(groups, n_cand, r * r))
    return A.transpose(1, 2)


def _outer(w: torch.Tensor) -> torch.Tensor:
    """``[rows, k]`` → ``[rows, k²]``, the flattened outer product of each row with itself."""
    return (w.unsqueeze(2) * w.unsqueeze(1)).reshape(w.shape[0], -1)
