"""Safetensors checkpoints read and written one tensor at a time, so no step ever holds a whole model.

Reading parses every file's header up front (8-byte little-endian length, then JSON naming each
tensor's dtype, shape and byte range) and checks it against the file's size and the shard index, so
a truncated or corrupted shard, or a file the index names but the folder lacks, fails at once with
a one-line error naming the file and the tensor. Tensors are then read with ``os.pread`` into memory
the caller owns: no memory map stays open, so the resident set never grows with the checkpoint.

Writing lays out every output shard before any data exists: a safetensors header must list every
tensor's offset, and a pruned tensor keeps its source's dtype and shape, so the whole layout is known
from the source's headers. Each tensor is then written in place when it is ready. The layout is a
pure function of the tensor list and the shard size, which is what makes a resumed run's files
bit-identical to an uninterrupted run's.

A checkpoint in compressed-tensors' FP8 layout (what ``apt-sparse quantize`` writes: ``M.weight``
float8_e4m3fn ``[out, in]`` beside ``M.weight_scale`` float32 ``[out, 1]``) is read as FP8 by this one
reader, whoever reads it: ``read`` gives each FP8 weight as ``q · scale`` (the weights an FP8 GEMM
multiplies), ``fp8_inputs`` names the weights whose layers take their inputs through FP8 per token
(``apt.models.layered`` applies it), and ``read_stored`` gives the bytes as stored. A damaged FP8 folder
is refused naming the tensor: a scale missing, misshapen, non-finite or not positive when the folder is
opened; a weight holding NaN, or off the 2:4 pattern the folder's ``apt_sparse_24.json`` declares, when it
is read.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from apt.atomic import writing
from apt.errors import InvalidInputError
from apt.solver.fp8 import FP8, dequantize_weight
from apt.solver.patterns import Pattern, conforms, first_nm_violation

INDEX_NAME = "model.safetensors.index.json"
SCALE_SUFFIX = ".weight_scale"  # compressed-tensors' name for an FP8 weight's per-output-channel scales
SIDE_FILE = "apt_sparse_24.json"  # an FP8 folder's list of its 2:4 layers (serving.vllm_plugin reads it too)
SINGLE_NAME = "model.safetensors"
_MAX_HEADER = 100 * 2**20  # safetensors' own limit on the JSON header

DTYPE_CODES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
CODE_OF_DTYPE = {dtype: code for code, dtype in DTYPE_CODES.items()}


class CheckpointError(InvalidInputError):
    """A checkpoint file that is missing, truncated, corrupted or disagrees with the model's config."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: ``file``, absolute byte ``offset`` of its data, ``nbytes``, ``dtype``, ``shape``."""

    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def read_header(path: Path) -> tuple[dict, int]:
    """``(header without __metadata__, byte offset where the data starts)``; checks the file is whole."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path} is truncated ({size} bytes): not a safetensors file; copy it again")
            (length,) = struct.unpack("<Q", head)
            if length > min(_MAX_HEADER, size - 8):
                raise CheckpointError(
                    f"{path} is truncated or corrupted: its header claims {length} bytes but the file has {size}"
                )
            header = json.loads(f.read(length))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} is corrupted: its header is not valid JSON ({err}); copy it again") from err
    except FileNotFoundError as err:
        raise CheckpointError(f"{path} does not exist") from err
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is corrupted: its header is not a JSON object")
    header.pop("__metadata__", None)
    start = 8 + length
    for name, entry in header.items():
        try:
            begin, end = (int(v) for v in entry["data_offsets"])
            code = entry["dtype"]
            shape = [int(d) for d in entry["shape"]]
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{path}: the header entry of tensor {name} is malformed") from err
        if code not in DTYPE_CODES:
            raise CheckpointError(f"{path}: tensor {name} has dtype {code}, which apt-sparse cannot read")
        numel = 1
        for d in shape:
            numel *= d
        if end - begin != numel * DTYPE_CODES[code].itemsize or begin < 0:
            raise CheckpointError(
                f"{path}: tensor {name} {code} {shape} does not match its byte range [{begin}, {end})"
            )
        if start + end > size:
            raise CheckpointError(
                f"{path} is truncated: tensor {name} ends at byte {start + end} but the file has {size} bytes; "
                "copy the file again"
            )
    return header, start


class CheckpointReader:
    """The tensors of a Hugging Face folder: ``model.safetensors``, or shards listed by
    ``model.safetensors.index.json``, or (without an index) every ``*.safetensors`` file."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = self.folder / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise CheckpointError(f"{index} is not a valid shard index (no weight_map)") from err
            files = sorted(set(weight_map.values()))
            for name in files:
                if not (self.folder / name).is_file():
                    first = next(t for t, f in weight_map.items() if f == name)
                    raise CheckpointError(
                        f"{index} lists {name} (holding {first} and others) but {self.folder / name} does not exist"
                    )
        elif (self.folder / SINGLE_NAME).is_file():
            weight_map, files = None, [SINGLE_NAME]
        else:
            weight_map, files = None, sorted(p.name for p in self.folder.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{self.folder} holds no .safetensors files: give a Hugging Face model folder")
        self.tensors: dict[str, TensorInfo] = {}
        for name in files:
            path = self.folder / name
            header, start = read_header(path)
            for tensor, entry in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                if tensor in self.tensors:
                    raise CheckpointError(
                        f"tensor {tensor} appears in both {self.tensors[tensor].file.name} and {name}"
                    )
                begin, end = entry["data_offsets"]
                self.tensors[tensor] = TensorInfo(
                    tensor, path, DTYPE_CODES[entry["dtype"]], tuple(entry["shape"]), start + begin, end - begin
                )
        if weight_map is not None:
            for tensor, name in weight_map.items():
                info = self.tensors.get(tensor)
                if info is None or info.file.name != name:
                    raise CheckpointError(f"{index} says {tensor} is in {name}, but that file does not hold it")
        self.fp8 = self._fp8_weights()
        self._fp8_patterns = self._declared_patterns() if self.fp8 else {}

    @property
    def fp8_inputs(self) -> frozenset[str]:
        """The weights whose layers take their inputs through FP8 per token when the model runs (W8A8): every
        FP8 weight. A reader of unquantized weights has none."""
        return self.fp8

    def _fp8_weights(self) -> frozenset[str]:
        """The FP8 weights (``M.weight`` float8_e4m3fn), each checked to have ``M.weight_scale``: float32, one
        per output row, finite and positive. Reading the scales costs 4 bytes per output row."""
        names = []
        for name, info in self.tensors.items():
            if not info.dtype.is_floating_point or info.dtype.itemsize != 1:
                continue
            if info.dtype != FP8 or not name.endswith(".weight") or len(info.shape) != 2:
                raise CheckpointError(
                    f"{self.folder}: {name} is {str(info.dtype).removeprefix('torch.')} {list(info.shape)}; "
                    "apt-sparse reads FP8 as 2-D float8_e4m3fn Linear weights with per-channel scales only"
                )
            scale = name.removesuffix(".weight") + SCALE_SUFFIX
            if scale not in self.tensors:
                raise CheckpointError(
                    f"{self.folder}: {name} is float8 but the folder lacks {scale} (its per-channel scales): "
                    "the folder is damaged; quantize it again with apt-sparse quantize"
                )
            rows, found = info.shape[0], self.tensors[scale]
            if found.dtype != torch.float32 or found.shape not in ((rows, 1), (rows,)):
                raise CheckpointError(
                    f"{self.folder}: {scale} is {str(found.dtype).removeprefix('torch.')} {list(found.shape)}, "
                    f"expected float32 [{rows}, 1]: the folder is damaged; quantize it again with apt-sparse quantize"
                )
            values = self.read_stored(scale).reshape(-1)
            bad = ~torch.isfinite(values) | (values <= 0)
            if bool(bad.any()):
                row = int(bad.nonzero()[0, 0])
                raise CheckpointError(
                    f"{self.folder}: {scale} is {float(values[row])} at row {row} (a scale must be finite and "
                    "positive): the folder is damaged; quantize it again with apt-sparse quantize"
                )
            names.append(name)
        return frozenset(names)

    def _declared_patterns(self) -> dict[str, Pattern]:
        """The FP8 weights the folder's ``apt_sparse_24.json`` (``format: fp8``) declares 2:4, which every read
        checks: the layers the vLLM plugin would hand to 2:4 kernels."""
        path = self.folder / SIDE_FILE
        if not path.is_file():
            return {}
        try:
            side = json.loads(path.read_text())
            if side.get("format") != "fp8":
                return {}
            pattern, modules = Pattern.parse(side["pattern"]), side["targets"]
        except (ValueError, KeyError, TypeError, AttributeError, InvalidInputError) as err:
            raise CheckpointError(
                f"{path} is damaged ({err}); quantize the folder again with apt-sparse quantize"
            ) from err
        return {f"{m}.weight": pattern for m in modules if f"{m}.weight" in self.fp8}

    def names(self) -> list[str]:
        """Tensor names in file order, then byte order: a fixed order for a given checkpoint."""
        return list(self.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        if name not in self.tensors:
            raise CheckpointError(f"{self.folder} has no tensor named {name}")
        return self.tensors[name]

    def float_dtype(self) -> torch.dtype | None:
        """The dtype most of the checkpoint's floating-point elements are stored in (None: no float tensor)."""
        elements: dict[torch.dtype, int] = {}
        for info in self.tensors.values():
            if info.dtype.is_floating_point:
                elements[info.dtype] = elements.get(info.dtype, 0) + info.nbytes // info.dtype.itemsize
        return max(elements, key=elements.get) if elements else None

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """One tensor, read into fresh memory (no memory map is kept), optionally cast to ``dtype``. An FP8 weight
        comes as ``q · scale`` (float32 unless ``dtype``), checked finite and, where the folder declares it 2:4,
        checked against the pattern."""
        if name not in self.fp8:
            return self.read_stored(name, dtype)
        q = self.read_stored(name)
        weight = dequantize_weight(q, self.read_stored(name.removesuffix(".weight") + SCALE_SUFFIX))
        if not bool(torch.isfinite(weight).all()):
            row = int((~torch.isfinite(weight)).any(dim=1).nonzero()[0, 0])
            raise CheckpointError(
                f"{self.folder}: {name} holds NaN at row {row}: the folder is damaged; quantize it again"
            )
        pattern = self._fp8_patterns.get(name)
        if pattern is not None and not conforms(weight, pattern):
            row, col = first_nm_violation(weight, pattern.n, pattern.m)
            raise CheckpointError(
                f"{self.folder}: {name} breaks {pattern} (row {row}, columns {col}..{col + pattern.m - 1}), which "
                f"{SIDE_FILE} declares: the folder is damaged; quantize its pruned source again"
            )
        return weight if dtype is None else weight.to(dtype)

    def read_stored(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """One tensor as the file stores it (an FP8 weight as its float8 values), optionally cast to ``dtype``."""
        info = self.info(name)
        buffer = bytearray(info.nbytes)
        with open(info.file, "rb", buffering=0) as f:
            view, done = memoryview(buffer), 0
            while done < info.nbytes:
                got = os.preadv(f.fileno(), [view[done:]], info.offset + done)
                if got <= 0:
                    raise CheckpointError(f"{info.file} is truncated: could not read tensor {name}")
                done += got
        if info.nbytes == 0:
            tensor = torch.empty(info.shape, dtype=info.dtype)
        else:
            tensor = torch.frombuffer(buffer, dtype=info.dtype).reshape(info.shape)
        return tensor if dtype is None or dtype == info.dtype else tensor.to(dtype)

    def identity(self) -> list[dict]:
        """What identifies this checkpoint without reading its data: each file's name, size and modification time."""
        files = sorted({info.file for info in self.tensors.values()})
        return [{"file": p.name, "bytes": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns} for p in files]


def parse_size(text: str | int) -> int:
    """``"5GB"`` → 5·10⁹ bytes, ``"2GiB"`` → 2·2³⁰, ``"500MB"``, ``"100KB"``, or a plain number of bytes."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(text), flags=re.IGNORECASE)
    if not match:
        raise InvalidInputError(f"unknown size {text!r}: use a number of bytes or e.g. 500MB, 5GB, 2GiB")
    value, unit = float(match[1]), (match[2] or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    scale |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    size = int(value * scale[unit])
    if size < 1:
        raise InvalidInputError(f"size {text!r} must be at least one byte")
    return size


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        numel = 1
        for d in self.shape:
            numel *= d
        return numel * self.dtype.itemsize


class ShardedWriter:
    """Output shards laid out in advance; ``write(name, tensor)`` puts each tensor in place.

    Tensors go to shards in the given order; a shard is closed when the next tensor would take it past
    ``max_shard_size`` (a tensor larger than that gets a shard of its own), as transformers shards.
    One shard is ``model.safetensors``; several are ``model-0000k-of-0000n.safetensors`` with an index.
    """

    def __init__(self, folder: str | Path, tensors: Iterable[PlannedTensor], max_shard_size: int):
        self.folder = Path(folder)
        self.planned = {t.name: t for t in tensors}
        shards: list[list[PlannedTensor]] = [[]]
        size = 0
        for tensor in self.planned.values():
            if shards[-1] and size + tensor.nbytes > max_shard_size:
                shards.append([])
                size = 0
            shards[-1].append(tensor)
            size += tensor.nbytes
        count = len(shards)
        names = [SINGLE_NAME] if count == 1 else [f"model-{k + 1:05d}-of-{count:05d}.safetensors" for k in range(count)]
        self.layout: dict[str, tuple[Path, int]] = {}
        self.headers: dict[Path, bytes] = {}
        self.sizes: dict[Path, int] = {}
        for name, shard in zip(names, shards):
            path = self.folder / name
            entries, offset = {"__metadata__": {"format": "pt"}}, 0
            for tensor in shard:
                entries[tensor.name] = {
                    "dtype": CODE_OF_DTYPE[tensor.dtype],
                    "shape": list(tensor.shape),
                    "data_offsets": [offset, offset + tensor.nbytes],
                }
                offset += tensor.nbytes
            header = json.dumps(entries, separators=(",", ":")).encode()
            header += b" " * (-len(header) % 8)  # safetensors aligns the data to 8 bytes
            start = 8 + len(header)
            self.headers[path] = struct.pack("<Q", len(header)) + header
            self.sizes[path] = start + offset
            for tensor in shard:
                self.layout[tensor.name] = (path, start + entries[tensor.name]["data_offsets"][0])

    @property
    def files(self) -> list[Path]:
        return list(self.headers)

    def create(self) -> None:
        """Write every header and size every file (sparse where the file system allows)."""
        with writing(self.folder):
            self.folder.mkdir(parents=True, exist_ok=True)
        for path, header in self.headers.items():
            with writing(path), open(path, "wb") as f:
                f.write(header)
                f.truncate(self.sizes[path])

    def matches_files_on_disk(self) -> bool:
        """True when every planned shard exists with this exact header and size (a resumed run's check)."""
        for path, header in self.headers.items():
            if not path.is_file() or path.stat().st_size != self.sizes[path]:
                return False
            with open(path, "rb") as f:
                if f.read(len(header)) != header:
                    return False
        return True

    def write(self, name: str, tensor: torch.Tensor) -> None:
        planned = self.planned.get(name)
        if planned is None:
            raise InvalidInputError(f"{name} is not part of this checkpoint's layout")
        if tensor.dtype != planned.dtype or tuple(tensor.shape) != planned.shape:
            raise InvalidInputError(
                f"{name}: expected {planned.dtype} {list(planned.shape)}, got {tensor.dtype} {list(tensor.shape)}"
            )
        path, offset = self.layout[name]
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        with writing(path), open(path, "r+b", buffering=0) as f:
            view, done = memoryview(data), 0
            while done < len(view):
                done += os.pwrite(f.fileno(), view[done:], offset + done)

    def sync(self) -> None:
        """Flush every shard to disk, so a state file written afterwards never points at lost data."""
        for path in self.headers:
            fd = os.open(path, os.O_RDONLY)
            try:
                with writing(path):
                    os.fsync(fd)
            finally:
                os.close(fd)

    def write_index(self) -> None:
        """``model.safetensors.index.json`` where there are several shards."""
        if len(self.headers) == 1:
            return
        index = {
            "metadata": {"total_size": sum(t.nbytes for t in self.planned.values())},
            "weight_map": {name: path.name for name, (path, _) in self.layout.items()},
        }
        with writing(self.folder / INDEX_NAME):
            (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
