"""The compressed-tensors ``sparse-24-bitmask`` format (vLLM 0.6.5–0.19.0 on Hopper, CUTLASS 2:4 GEMMs).

Per 2:4 weight ``[rows, cols]``: ``<name>.compressed`` holds the kept values ``[rows, cols/2]`` in row
order, ``<name>.bitmask`` the keep-mask as uint8 ``[rows, ceil(cols/8)]`` packed little-endian (bit j
of byte k is column 8k+j), ``<name>.shape`` the int64 shape. Every group of 4 marks exactly 2 slots:
the two largest |w| (a kept weight that happens to be zero still owns its slot). Other tensors stay
dense under their own names. compressed-tensors removed its sparse compressors in 0.15; the decoder
here reads the format back without it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from apt.artifacts import atomic_directory
from apt.errors import InvalidInputError
from exporters.common import positive_zeros, read_checkpoint, verify_nm, write_manifest
from exporters.vllm import DTYPES, copy_side_files, plain_config

FORMAT = "sparse-24-bitmask"


def bytes_of_folder(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*.safetensors"))


def keep_mask_24(weight: torch.Tensor) -> torch.Tensor:
    """Exactly 2 kept slots per group of 4 along the input dimension: the two largest |w|, ties to the left."""
    rows, cols = weight.shape
    groups = weight.abs().float().reshape(rows, cols // 4, 4)
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
        "shape": torch.tensor([rows, cols], dtype=torch.int64),
    }


def decompress_24(compressed: torch.Tensor, bitmask: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
    rows, cols = (int(v) for v in shape.tolist())
    mask = unpack_bitmask(bitmask, cols)
    out = torch.zeros(rows, cols, dtype=compressed.dtype)
    out[mask] = compressed.reshape(-1)
    return out


def read_bitmask_folder(folder: str | Path) -> dict[str, torch.Tensor]:
    """Decode a ``sparse-24-bitmask`` folder back to dense tensors ``name → tensor``."""
    from safetensors.torch import load_file

    stored = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        stored.update(load_file(str(file)))
    dense = {}
    for name, tensor in stored.items():
        if name.endswith(".bitmask") or name.endswith(".shape"):
            continue
        if name.endswith(".compressed"):
            base = name[: -len(".compressed")]
            dense[base] = decompress_24(tensor, stored[f"{base}.bitmask"], stored[f"{base}.shape"])
        else:
            dense[name] = tensor
    return dense


def export_compressed_tensors(
    src: str | Path, out: str | Path, dtype: str = "float16", overwrite: bool = False
) -> dict:
    from safetensors.torch import save_file

    if dtype not in DTYPES:
        raise InvalidInputError(f"compressed-tensors export dtype must be float16 or bfloat16, got {dtype!r}")
    src = Path(src)
    checkpoint = read_checkpoint(src)
    layers = verify_nm(checkpoint)
    targets = set(r["name"] for r in layers)
    stored, expected = {}, {}
    for name, tensor in checkpoint.tensors.items():
        tensor = positive_zeros(tensor.to(DTYPES[dtype])).contiguous().clone()
        expected[name] = tensor
        if name in targets:
            for key, value in compress_24(tensor).items():
                stored[f"{name}.{key}"] = value
        else:
            stored[name] = tensor
    total = sum(expected[n].numel() for n in targets)
    zeros = sum(int((expected[n] == 0).sum()) for n in targets)
    config = plain_config(checkpoint.config, dtype)
    config["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "format": "dense",
        "sparsity_config": {
            "format": FORMAT,
            "targets": sorted(n[: -len(".weight")] for n in targets),
            "ignore": sorted(
                n[: -len(".weight")] for n, t in checkpoint.tensors.items() if t.dim() == 2 and n not in targets
            ),
            "sparsity_structure": "2:4",
            "global_sparsity": zeros / max(total, 1),
            "registry_requires_subclass": False,
        },
    }
    with atomic_directory(out, overwrite=overwrite) as tmp:
        save_file(stored, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        copy_side_files(src, tmp)
        decoded = read_bitmask_folder(tmp)
        validation = {
            "round_trip_bit_exact": decoded.keys() == expected.keys()
            and all(torch.equal(decoded[k].view(torch.int16), expected[k].view(torch.int16)) for k in expected),
            "vllm_loaded": "not measured: vLLM 0.6.5–0.19.0 with a Hopper GPU is not available here",
        }
        if not validation["round_trip_bit_exact"]:
            raise InvalidInputError("the bitmask folder does not decode back to the source weights bit for bit")
        size = {
            "bytes_on_disk": bytes_of_folder(tmp),
            "dense_bytes_same_dtype": sum(t.numel() * t.element_size() for t in expected.values()),
        }
        return write_manifest(
            tmp,
            source=src,
            target="compressed-tensors",
            layers=layers,
            validation=validation,
            extra={"dtype": dtype, "format": FORMAT, "size": size},
        )
