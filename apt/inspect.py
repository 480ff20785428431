"""Per-layer sparsity and N:M validity of a checkpoint folder, read straight from its safetensors."""

from __future__ import annotations

from pathlib import Path

from apt.errors import InvalidInputError
from apt.patterns import is_nm_sparse, sparsity_of


def inspect_checkpoint(path: str | Path, n: int = 2, m: int = 4) -> list[dict]:
    """One row per 2-D floating-point tensor: ``name``, ``shape``, ``sparsity``, ``nm_valid`` (None where
    the input width is not a multiple of ``m``)."""
    from safetensors import safe_open

    folder = Path(path)
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files:
        raise InvalidInputError(f"{folder} holds no .safetensors files: give a Hugging Face model folder")
    rows = []
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
                if tensor.dim() != 2 or not tensor.is_floating_point():
                    continue
                valid = is_nm_sparse(tensor, n, m) if tensor.shape[1] % m == 0 else None
                rows.append(
                    {"name": name, "shape": list(tensor.shape), "sparsity": sparsity_of(tensor), "nm_valid": valid}
                )
    return rows
