"""A Linear for deployment that uses the 2:4 kernel only where the GEMM sweep showed it faster.

Sparse kernels lose to dense at small M (decode: one token per sequence). ``DecodeSafeLinear`` keeps
the dense weight and, where a sparse backend is available, its semi-structured copy; each call takes
the sparse path only when the number of tokens reaches the per-shape threshold measured by
``runtime_bench.gemm.sparse_thresholds``. Holding both copies costs about 1.56× the layer's weight
memory (dense + half the values + metadata); that is the price of never being slower than dense.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from apt.patterns import is_nm_sparse
from runtime_bench.backends import BACKENDS, to_sparse


class DecodeSafeLinear(torch.nn.Module):
    def __init__(self, linear: torch.nn.Linear, threshold: int | None, backend: str = "torch-sparse-cusparselt"):
        super().__init__()
        self.weight = linear.weight
        self.bias = linear.bias
        self.threshold = threshold
        self.backend = backend
        self.sparse_weight = None
        if threshold is not None and BACKENDS[backend]().available and linear.weight.is_cuda:
            self.sparse_weight = to_sparse(linear.weight.data, backend)

    @property
    def uses_sparse(self) -> bool:
        return self.sparse_weight is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.numel() // x.shape[-1]
        if self.sparse_weight is not None and tokens >= self.threshold:
            out = F.linear(x.reshape(tokens, x.shape[-1]), self.sparse_weight)
            out = out.reshape(*x.shape[:-1], out.shape[-1])
            return out + self.bias if self.bias is not None else out
        return F.linear(x, self.weight, self.bias)


def make_decode_safe(
    model: torch.nn.Module, thresholds: dict[str, int | None], backend: str = "torch-sparse-cusparselt"
) -> dict:
    """Replace every 2:4 Linear inside the model's blocks by a ``DecodeSafeLinear`` with the threshold of
    its ``"{in}x{out}"`` shape (a shape that was not measured stays dense). Returns counts."""
    replaced = sparse = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if (
                isinstance(child, torch.nn.Linear)
                and ".layers." in f".{name}.{child_name}"
                and is_nm_sparse(child.weight.data)
            ):
                threshold = thresholds.get(f"{child.in_features}x{child.out_features}")
                safe = DecodeSafeLinear(child, threshold, backend)
                setattr(module, child_name, safe)
                replaced += 1
                sparse += safe.uses_sparse
    return {"replaced": replaced, "with_sparse_path": sparse}
