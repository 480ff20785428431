"""One-shot pruning of one linear layer: ``prune_layer(weight, hessian, ...) -> PruneResult``.

The layer problem: for ``W`` ``[out, in]`` and ``H = Σ x xᵀ`` ``[in, in]`` over the calibration
tokens, find ``Ŵ`` with the sparsity pattern that minimises

    L(Ŵ) = tr((Ŵ − W) H (Ŵ − W)ᵀ)

The problem splits by output row and every method here is vectorised over rows. Methods are entries
of one registry, ``METHODS``: a function over ``(W, H, config)`` and the options it reads. This module
is a pure function of tensors: no model, no file, no printing, no device calls of its own.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from apt.errors import InvalidInputError, SingularHessianError
from apt.obs import LOOKAHEAD_MAX_CANDIDATES, joint_removal_sweep, sparsegpt_sweep
from apt.patterns import Pattern, positive_zeros
from apt.reconstruct import CHUNK_ELEMENTS, reconstruct, refine_mask

DEFAULT_DAMP = 0.01
DEFAULT_REFIT_DAMP = 0.1
REFINE_MODES = ("off", "local", "window", "exact")


@dataclass(frozen=True)
class PruneConfig:
    """How to prune one layer.

    ``damp`` is λ in the damping ``λ·mean(diag H)`` added to the diagonal (default 0.01); a failed
    factorisation retries with λ×10 up to ``max_damp_retries`` times. The apt-only options:

    - ``reconstruct`` (default on): the exact refit of the kept weights for the final mask. It stops
      for a row when a conjugate-gradient step lowered its loss by at most ``tol`` times the loss.
    - ``lookahead`` (default on for 2:4): each group's removal set is the joint optimum over the group
      and the next one (C(M,N)² candidates, so 2:4 only: 4:8 would need 4900), and only the first is
      applied. On tiny correlated layers it cut the median loss over the brute-force optimum from
      1.63× to 1.33× (4×12); on SmolLM2's layers it changed the summed loss by 0.2 %.
    - ``refit_damp`` μ: the refit minimises ``(ŵ−w)(H + μ·diag H)(ŵ−w)ᵀ`` instead of the loss on H
      alone, a ridge toward the dense weights that shrinks the calibration tokens' correlations
      toward independent inputs: the exact refit otherwise fits the calibration domain more than text
      of other kinds. Default ``DEFAULT_REFIT_DAMP``, chosen on held-out calibration text
      (``runtime_bench.method_comparison``).
    - ``refine``: swap refinement of the mask, alternated with the refit, each swap scored with
      ``"local"`` (the group's own weights compensating, O(out·in) per round), ``"window"`` (a
      64-column window, O(out·in·64²)) or ``"exact"`` (the whole row, O(out·in³)) compensation;
      ``True`` means ``"exact"``. Default ``"off"``.

    An option left ``None`` takes the method's default; an option the method does not read is refused,
    so no setting is silently ignored.
    """

    method: str = "apt"
    pattern: Pattern = field(default_factory=lambda: Pattern(2, 4))
    damp: float | None = None
    refit_damp: float | None = None
    reconstruct: bool | None = None
    refine: bool | str | None = None
    lookahead: bool | None = None
    blocksize: int = 128
    tol: float = 1e-4
    max_iter: int = 300
    max_refine_rounds: int = 50
    max_damp_retries: int = 4

    def __post_init__(self) -> None:
        object.__setattr__(self, "pattern", Pattern.parse(self.pattern))
        if self.method not in METHODS:
            raise InvalidInputError(f"unknown method {self.method!r}: choose one of {', '.join(METHODS)}")
        reads = METHODS[self.method].options
        if self.refine is True:
            object.__setattr__(self, "refine", "exact")
        elif self.refine is False:
            object.__setattr__(self, "refine", "off")
        for option in ("damp", "refit_damp", "reconstruct", "refine", "lookahead"):
            if getattr(self, option) is not None and option not in reads:
                raise InvalidInputError(
                    f"{option} is not an option of method {self.method!r} "
                    f"(it reads {', '.join(sorted(reads)) or 'no options'})"
                )
        for option in ("damp", "refit_damp"):
            value = getattr(self, option)
            if value is not None and not (value >= 0.0):
                raise InvalidInputError(f"{option} must be >= 0, got {value}")
        if self.refine is not None and self.refine not in REFINE_MODES:
            raise InvalidInputError(f"refine takes one of {', '.join(REFINE_MODES)}, got {self.refine!r}")
        if self.blocksize < 1 or self.max_iter < 0 or self.max_damp_retries < 0 or self.tol <= 0:
            raise InvalidInputError("blocksize must be >= 1, max_iter and max_damp_retries >= 0, tol > 0")
        if self.refine_mode != "off" and not self.pattern.is_nm:
            raise InvalidInputError(f"refine swaps weights inside N:M groups; pattern {self.pattern} has none")
        if self.refine_mode != "off" and self.reconstruct is False:
            raise InvalidInputError(
                "refine scores swaps on the exact reconstruction: it cannot run with reconstruct off"
            )
        if self.lookahead and not (self.pattern.is_nm and _lookahead_fits(self.pattern)):
            raise InvalidInputError(
                f"lookahead scores C(M,N)² candidate pairs per group; pattern {self.pattern} has "
                f"{'no groups' if not self.pattern.is_nm else math.comb(self.pattern.m, self.pattern.n) ** 2}: "
                "it applies to 2:4"
            )

    @property
    def damp_value(self) -> float:
        return DEFAULT_DAMP if self.damp is None else self.damp

    @property
    def refit_damp_value(self) -> float:
        return DEFAULT_REFIT_DAMP if self.refit_damp is None else self.refit_damp

    @property
    def use_reconstruct(self) -> bool:
        return self.reconstruct is not False

    @property
    def refine_mode(self) -> str:
        if self.refine is not None:
            return self.refine
        return "off"

    @property
    def use_lookahead(self) -> bool:
        if self.lookahead is not None:
            return self.lookahead
        return self.pattern.is_nm and _lookahead_fits(self.pattern)


def _lookahead_fits(pattern: Pattern) -> bool:
    return math.comb(pattern.m, pattern.n) <= LOOKAHEAD_MAX_CANDIDATES


@dataclass(frozen=True)
class SolverStats:
    """What the solver did. ``damp`` is the relative λ actually used, ``refit_damp`` the refit's ridge μ;
    ``residual`` the final max relative residual of the reconstruction (``None`` where the method does
    not reconstruct)."""

    method: str
    pattern: str
    seconds: float
    dead_columns: int = 0
    damp: float | None = None
    damp_retries: int = 0
    refit_damp: float | None = None
    iterations: int = 0
    residual: float | None = None
    lookahead: bool = False
    refine_rounds: int = 0
    refine_swaps: int = 0
    loss_before_reconstruction: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class PruneResult:
    """``weight`` ``[out, in]`` in the input dtype with ``+0.0`` at pruned places; ``mask`` bool, True = kept;
    ``loss`` = ``tr((Ŵ−W) H (Ŵ−W)ᵀ)`` on the undamped ``H``; ``zero_loss`` = L(0), the loss of pruning
    everything; ``relative_loss`` = ``loss / zero_loss``."""

    weight: torch.Tensor
    mask: torch.Tensor
    loss: float
    relative_loss: float
    stats: SolverStats
    zero_loss: float = 0.0


# A method: (W [out, in], H [in, in], config, may it damp H in place) in the compute dtype → (Ŵ, keep-mask,
# stats fields). It never modifies W; it modifies H only by adding to its diagonal, and only when allowed.
MethodFn = Callable[[torch.Tensor, torch.Tensor, PruneConfig, bool], tuple[torch.Tensor, torch.Tensor, dict]]


@dataclass(frozen=True)
class Method:
    prune: MethodFn
    options: frozenset[str]  # the PruneConfig options it reads


def prune_layer(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    method: str = "apt",
    pattern: str | Pattern = "2:4",
    config: PruneConfig | None = None,
    consume_hessian: bool = False,
    **options,
) -> PruneResult:
    """Prune ``weight`` ``[out, in]`` given ``hessian`` ``[in, in]`` (= Σ x xᵀ over calibration tokens).

    Computes in float64 when ``weight`` is float64, else in float32, on the device of ``weight``.
    ``options`` are the remaining fields of :class:`PruneConfig`; pass ``config`` instead to reuse one.
    With ``consume_hessian`` the solver damps and factorises in ``hessian``'s own memory (the caller
    must not use it afterwards): one ``[in, in]`` matrix less at the peak, which is what bounds memory
    on wide layers (in = 28 672 is 3.3 GB in float32).
    """
    if config is None:
        config = PruneConfig(method=method, pattern=Pattern.parse(pattern), **options)
    start = time.perf_counter()
    _check_inputs(weight, hessian, config.pattern)
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    W = weight.to(dtype)
    H = hessian.to(device=weight.device, dtype=dtype)
    undamped = Quadratic(H, H.diagonal().clone())
    # methods never modify W; they modify H only when it is theirs to consume
    W_hat, mask, info = METHODS[config.method].prune(W, undamped.matrix, config, consume_hessian or H is not hessian)
    W_hat = torch.where(mask, W_hat, torch.zeros((), dtype=dtype, device=W_hat.device))
    out = positive_zeros(W_hat.to(weight.dtype))
    loss = undamped.loss(out.to(dtype), W)
    base = undamped.loss(None, W)
    stats = SolverStats(method=config.method, pattern=str(config.pattern), seconds=time.perf_counter() - start, **info)
    relative = loss / base if base > 0 else 0.0
    return PruneResult(weight=out, mask=mask, loss=loss, relative_loss=relative, stats=stats, zero_loss=base)


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
        extra = self.matrix.diagonal() - self.diagonal  # zero until the matrix is damped in place
        damped = bool((extra != 0).any())
        step = max(1, CHUNK_ELEMENTS // max(W.shape[1], 1))
        value = torch.zeros((), dtype=torch.float64, device=W.device)
        for r0 in range(0, W.shape[0], step):
            D = -W[r0 : r0 + step] if W_hat is None else W_hat[r0 : r0 + step] - W[r0 : r0 + step]
            value += ((D @ self.matrix) * D).sum(dtype=torch.float64)
            if damped:
                value -= ((D * D).sum(dim=0, dtype=torch.float64) * extra.to(torch.float64)).sum()
        return float(value)


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
    H: torch.Tensor, damp: float, max_retries: int, dead: torch.Tensor | None = None, in_place: bool = False
) -> tuple[torch.Tensor, torch.Tensor, float, int]:
    """Damp ``H`` and return ``(H_damped, U, damp_used, retries)`` with ``U`` the upper Cholesky factor of
    ``H_damped⁻¹`` (``H⁻¹ = Uᵀ U``). ``dead`` columns get a unit diagonal first. Retries with λ×10;
    never falls back to the identity. ``U`` is computed in one buffer (Cholesky, inverse and Cholesky
    again, each in place); with ``in_place`` the damping is added to ``H`` itself. So the peak is
    three ``[in, in]`` matrices, or two in place (it was five)."""
    diagonal = H.diagonal().clone()
    if dead is not None:
        diagonal[dead] = 1.0
    mean_diag = diagonal.mean()
    lam = damp
    info = torch.zeros((), dtype=torch.int32, device=H.device)
    for attempt in range(max_retries + 1):
        H_damped = H if in_place else H.clone()
        H_damped.diagonal().copy_(diagonal + lam * mean_diag)
        F = H_damped.clone()
        torch.linalg.cholesky_ex(F, out=(F, info))  # L
        if int(info) == 0:
            torch.cholesky_inverse(F, out=F)  # H_damped⁻¹
            torch.linalg.cholesky_ex(F, upper=True, out=(F, info))  # U
            if int(info) == 0 and bool(torch.isfinite(F).all()):
                return H_damped, F, lam, attempt
        del F
        lam = lam * 10.0 if lam > 0 else 1e-4
    raise SingularHessianError(
        f"the Hessian [{H.shape[0]}x{H.shape[0]}] is not positive definite even with damping "
        f"{lam / 10:g}·mean(diag H) after {max_retries} increases; calibrate on more tokens or pass a larger damp"
    )


def _magnitude(W, H, config, may_overwrite_H):
    return W, select_mask(W.abs(), config.pattern), {}


def _wanda(W, H, config, may_overwrite_H):
    # Sun et al. 2023: |w_ij| · ‖x_j‖₂, with ‖x_j‖² = H_jj.
    return W, select_mask(W.abs() * H.diagonal().clamp_min(0).sqrt().unsqueeze(0), config.pattern), {}


def _factorised(W, H, config, may_overwrite_H) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """Shared by the OBS methods: a copy of ``W`` with dead columns (zero diagonal: no calibration token
    reached them, so they do not affect the loss) zeroed, and the damped Hessian with a unit diagonal
    there, as in SparseGPT, with its factor."""
    dead = H.diagonal() == 0
    W = W.clone()
    W[:, dead] = 0.0
    H_damped, U, damp, retries = inverse_hessian_factor(
        H, config.damp_value, config.max_damp_retries, dead, in_place=may_overwrite_H
    )
    return W, H_damped, U, {"dead_columns": int(dead.sum()), "damp": damp, "damp_retries": retries}


def _sparsegpt(W, H, config, may_overwrite_H):
    W, _, U, info = _factorised(W, H, config, may_overwrite_H)
    W_hat, mask = sparsegpt_sweep(W, U, config.pattern, config.blocksize)
    return W_hat, mask, info


def _apt(W, H, config, may_overwrite_H):
    """Joint removal per N:M group, then the exact refit of the kept weights, then (optionally) swaps.
    On unstructured ratios: SparseGPT's adaptive mask, then the exact refit."""
    undamped = Quadratic(H, H.diagonal().clone())
    W_target, H_damped, U, info = _factorised(W, H, config, may_overwrite_H)
    pattern = config.pattern
    lookahead = config.use_lookahead
    if pattern.is_nm:
        W_hat, mask = joint_removal_sweep(W_target.clone(), U, pattern, config.blocksize, lookahead)
    else:
        W_hat, mask = sparsegpt_sweep(W_target.clone(), U, pattern, config.blocksize)
    del U  # the refit needs only the damped Hessian
    info["lookahead"] = lookahead
    if config.use_reconstruct:
        info["loss_before_reconstruction"] = undamped.loss(W_hat, W)
        info["refit_damp"] = config.refit_damp_value
        if config.refit_damp_value:  # ridge toward the dense weights: H + μ·diag(H)
            H_damped.diagonal().add_(config.refit_damp_value * undamped.diagonal)
        W_hat, info["iterations"], info["residual"] = reconstruct(
            W_target, mask, H_damped, x0=W_hat, tol=config.tol, max_iter=config.max_iter
        )
        if config.refine_mode != "off":
            W_hat, mask, refined = refine_mask(
                W_target,
                mask,
                H_damped,
                W_hat,
                pattern,
                tol=config.tol,
                max_iter=config.max_iter,
                max_rounds=config.max_refine_rounds,
                scoring=config.refine_mode,
            )
            info["refine_rounds"], info["refine_swaps"] = refined["rounds"], refined["swaps"]
            info["iterations"] += refined["iterations"]
            info["residual"] = refined["residual"]
    return W_hat, mask, info


METHODS: dict[str, Method] = {
    "magnitude": Method(_magnitude, frozenset()),
    "wanda": Method(_wanda, frozenset()),
    "sparsegpt": Method(_sparsegpt, frozenset({"damp"})),
    "apt": Method(_apt, frozenset({"damp", "refit_damp", "reconstruct", "refine", "lookahead"})),
}


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
