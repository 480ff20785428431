"""The compressed-tensors ``sparse-24-bitmask`` format (vLLM 0.6.5–0.19.0 on Hopper, CUTLASS 2:4 GEMMs).

Per 2:4 weight ``[rows, cols]`` of module ``M``: ``M.compressed`` holds the kept values
``[rows, cols/2]`` in row order, ``M.bitmask`` the keep-mask as uint8 ``[rows, ceil(cols/8)]`` packed
little-endian (bit j of byte k is column 8k+j), ``M.shape`` the int64 shape ``[2, 1]`` — the names and
layouts compressed-tensors 0.14's ``Sparse24BitMaskCompressor`` writes and reads. Every group of 4
marks exactly 2 slots: the two largest |w| (a kept weight that happens to be zero still owns its
slot). Other tensors stay dense under their own names. ``quantization_config`` holds only
``quant_method`` and ``sparsity_config``: any other top-level key makes compressed-tensors parse a
quantization config, and fail.

compressed-tensors removed its sparse compressors in 0.15. The export is decoded by 0.14's own loader
(``ModelCompressor.from_compression_config``, the path transformers 4.x and vLLM ≤ 0.19 take): in this
process where it is importable, else from the folder ``make install`` keeps it in apart from
transformers 5 (``exporters.legacy_loader``, in a process of its own); the project's decoder here reads
the format back either way.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from apt.atomic import atomic_directory
from apt.errors import InvalidInputError
from apt.models.checkpoint import CheckpointReader, PlannedTensor, ShardedWriter, parse_size
from apt.models.portable import copy_side_files, write_config
from exporters.common import check_pattern, check_space, only_2_4, open_pruned, write_manifest
from exporters.vllm import DTYPES, _vllm_loaded, cast_for_export, plain_config, plugin_targets
from serving.bitmask import FORMAT, PARTS, compress_24, decompress_24

ISOLATED_ENV = "APT_SPARSE_CT014"  # a folder holding compressed-tensors 0.14 apart from transformers 5
accepts = only_2_4("the sparse-24-bitmask format and vLLM's CUTLASS kernels hold 2:4 only")
EXPERTS = "the format compresses Linear weights; vLLM 0.6.5–0.19.0, which read it, ran MoE experts dense"
FP8_REFUSAL = (
    "writes the bitmask with fp16/bf16 kept values; the FP8 variant vLLM 0.6.5–0.19.0 read (float8 kept values "
    "beside the bitmask and the scales) is not written here, and no loader here could check it"
)


def _planned(name: str, tensor_dtype: torch.dtype, shape: tuple[int, ...], targets: set[str]) -> list[PlannedTensor]:
    if name not in targets:
        return [PlannedTensor(name, tensor_dtype, shape)]
    module, (rows, cols) = name.removesuffix(".weight"), shape
    return [
        PlannedTensor(f"{module}.compressed", tensor_dtype, (rows, cols // 2)),
        PlannedTensor(f"{module}.bitmask", torch.uint8, (rows, (cols + 7) // 8)),
        PlannedTensor(f"{module}.shape", torch.int64, (2, 1)),
    ]


def read_bitmask_folder(folder: str | Path):
    """Decode a ``sparse-24-bitmask`` folder back to dense tensors, yielding ``(name, tensor)`` one at a time."""
    reader = CheckpointReader(folder)
    names = set(reader.names())
    for name in reader.names():
        module, _, part = name.rpartition(".")
        if part in PARTS and all(f"{module}.{p}" in names for p in PARTS):
            if part == "compressed":
                yield f"{module}.weight", decompress_24(*(reader.read(f"{module}.{p}") for p in PARTS))
        else:
            yield name, reader.read(name)


def compression_config(targets: set[str], dense_2d: list[str], sparsity: float) -> dict:
    """The ``quantization_config`` of a sparse-only checkpoint, as llm-compressor writes it."""
    return {
        "quant_method": "compressed-tensors",
        "sparsity_config": {
            "format": FORMAT,
            "targets": sorted(n.removesuffix(".weight") for n in targets),
            "ignore": sorted(n.removesuffix(".weight") for n in dense_2d),
            "sparsity_structure": "2:4",
            "global_sparsity": sparsity,
        },
    }


def export_compressed_tensors(
    src: str | Path,
    out: str | Path,
    dtype: str = "float16",
    overwrite: bool = False,
    max_shard_size: str = "5GB",
    vllm_check: bool | None = None,
) -> dict:
    if dtype not in DTYPES:
        raise InvalidInputError(f"compressed-tensors export dtype must be float16 or bfloat16, got {dtype!r}")
    source = open_pruned(src, "compressed-tensors", accepts, experts=EXPERTS, fp8=FP8_REFUSAL)
    transposed = [n for n in source.targets.tensors if n not in source.targets.experts and source.targets.axis(n) != -1]
    if transposed:  # a Conv1D (GPT-2) keeps [in, out]: compressed along its last axis it would lose kept weights
        raise InvalidInputError(
            f"the compressed-tensors export cannot hold {transposed[0]}: it is stored [in, out] (transformers' "
            "Conv1D, as in GPT-2) and the bitmask format compresses [out, in] Linear weights; export onnx or vllm"
        )
    layers = check_pattern(source)
    reader, target_dtype = source.reader, DTYPES[dtype]
    check_space(out, source, target_dtype.itemsize * 0.6)
    targets = set(source.targets.tensors)
    out_dtype = {
        n: target_dtype if reader.info(n).dtype.is_floating_point else reader.info(n).dtype for n in reader.names()
    }
    plan = [p for n in reader.names() for p in _planned(n, out_dtype[n], reader.info(n).shape, targets)]
    zeros = total = 0
    with atomic_directory(out, overwrite=overwrite) as tmp:
        writer = ShardedWriter(tmp, plan, parse_size(max_shard_size))
        writer.create()
        for name in reader.names():
            tensor = cast_for_export(reader.read(name), out_dtype[name])
            if name in targets:
                zeros, total = zeros + int((tensor == 0).sum()), total + tensor.numel()
                for part, value in compress_24(tensor).items():
                    writer.write(f"{name.removesuffix('.weight')}.{part}", value)
            else:
                writer.write(name, tensor)
        writer.write_index()
        dense_2d = [n for n in reader.names() if n not in targets and len(reader.info(n).shape) == 2]
        config = plain_config(source.config, dtype)
        config["quantization_config"] = compression_config(targets, dense_2d, zeros / max(total, 1))
        write_config(config, tmp)
        copy_side_files(source.folder, tmp)
        validation = {
            "round_trip_bit_exact": _round_trip(read_bitmask_folder(tmp), reader, out_dtype, "the project's decoder"),
            "compressed_tensors_loader": legacy_loader_check(tmp, reader, out_dtype, dtype),
            "vllm_loaded": _vllm_loaded(tmp, source, target_dtype, plugin_targets(source), vllm_check, None),
        }
        size = {
            "bytes_on_disk": sum(p.stat().st_size for p in tmp.glob("*.safetensors")),
            "dense_bytes_same_dtype": sum(
                reader.info(n).nbytes // reader.info(n).dtype.itemsize * out_dtype[n].itemsize for n in reader.names()
            ),
        }
        return write_manifest(
            tmp,
            source=source,
            target="compressed-tensors",
            layers=layers,
            validation=validation,
            extra={"dtype": dtype, "format": FORMAT, "size": size},
        )


def _round_trip(decoded, reader: CheckpointReader, out_dtype: dict, decoder: str) -> int:
    """Compare every decoded tensor bit for bit with the source in the export dtype; returns how many."""
    seen = set()
    for name, tensor in decoded:
        expected = cast_for_export(reader.read(name), out_dtype[name])
        if tensor.dtype != expected.dtype or not torch.equal(tensor.view(torch.uint8), expected.view(torch.uint8)):
            raise InvalidInputError(f"{decoder} does not give back {name} bit for bit: the export is broken")
        seen.add(name)
    if seen != set(reader.names()):
        raise InvalidInputError(
            f"{decoder} gives back {len(seen)} tensors, the source has {len(reader.names())}: "
            f"missing {sorted(set(reader.names()) - seen)[:3]}"
        )
    return len(seen)


def legacy_loader_check(folder: Path, reader: CheckpointReader, out_dtype: dict, dtype: str) -> dict | str:
    """Decode the folder with compressed-tensors ≤ 0.14's own loader: in this process where it is importable,
    else in a process of its own from the folder ``make install`` keeps it in (``exporters.legacy_loader``)."""
    isolated = isolated_legacy_folder()
    if importlib.util.find_spec("compressed_tensors") is None or isolated is not None:
        if isolated is None:
            return (
                "not measured: compressed-tensors 0.14 is not installed; make install keeps it in .venv/ct014 "
                f"(or: pip install --no-deps --target DIR compressed-tensors==0.14.0.1 loguru; {ISOLATED_ENV}=DIR)"
            )
        return _isolated_check(folder, reader.folder, dtype, isolated)
    import compressed_tensors
    from compressed_tensors.compressors import ModelCompressor

    version = compressed_tensors.__version__
    if tuple(int(p) for p in version.split(".")[:2]) >= (0, 15):
        return f"not measured: compressed-tensors {version} has no sparse compressors (removed in 0.15); use 0.14"
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    compressor = ModelCompressor.from_compression_config(config)
    count = _round_trip(
        compressor.sparsity_compressor.decompress(str(folder)), reader, out_dtype, f"compressed-tensors {version}"
    )
    return {"status": "ok", "loader": f"compressed-tensors {version} ModelCompressor", "tensors_bit_exact": count}


def isolated_legacy_folder() -> Path | None:
    """The folder compressed-tensors 0.14 is kept in apart from transformers 5: ``$APT_SPARSE_CT014``, else
    ``ct014`` in this environment (where ``make install`` puts it), if it holds the package."""
    folder = Path(os.environ.get(ISOLATED_ENV) or Path(sys.prefix) / "ct014")
    return folder if (folder / "compressed_tensors").is_dir() else None


def _isolated_check(folder: Path, source: Path, dtype: str, isolated: Path) -> dict:
    """``exporters.legacy_loader`` in a process whose imports find compressed-tensors 0.14 in ``isolated``."""
    root = Path(__file__).resolve().parents[1]
    path = os.pathsep.join(filter(None, [str(isolated), str(root), os.environ.get("PYTHONPATH")]))
    run = subprocess.run(
        [sys.executable, "-m", "exporters.legacy_loader", str(folder), str(source), dtype],
        capture_output=True,
        text=True,
        env=os.environ | {"PYTHONPATH": path},
    )
    lines = run.stdout.strip().splitlines()
    result = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {"error": run.stderr.strip()[-800:]}
    if "error" in result:
        raise InvalidInputError(f"compressed-tensors 0.14's loader ({isolated}) rejects the export: {result['error']}")
    version = result.pop("version")
    return {"status": "ok", "loader": f"compressed-tensors {version} ModelCompressor (from {isolated})"} | result
