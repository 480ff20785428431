"""compressed-tensors 0.14's own loader on a bitmask export, in a process of its own.

compressed-tensors removed its sparse compressors in 0.15, and transformers 5 must never import 0.14, so
``make install`` keeps 0.14 in a folder of its own (``.venv/ct014``); the export runs this module with that
folder first on ``PYTHONPATH``:

    python -m exporters.legacy_loader EXPORT SOURCE DTYPE

Every tensor the library decodes (``ModelCompressor.from_compression_config(...).sparsity_compressor``, the
path transformers 4.x and vLLM ≤ 0.19 take) must equal the source's in the export dtype bit for bit; where a
group of four holds no tie among its zeros, the library's own compressor must also write the very bytes the
export holds. Prints one JSON line: the library's version and the counts, or the first mismatch.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from apt.models.checkpoint import CheckpointReader
from exporters.vllm import DTYPES, cast_for_export


def check(folder: Path, source: Path, dtype: torch.dtype) -> dict:
    import compressed_tensors
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.compressors.sparse_compressors.sparse_24_bitmask import Sparse24BitMaskTensor

    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    compressor = ModelCompressor.from_compression_config(config)
    reader, stored = CheckpointReader(source), CheckpointReader(folder)
    checked = same_bytes = with_ties = 0
    for name, tensor in compressor.sparsity_compressor.decompress(str(folder)):
        wanted = dtype if reader.info(name).dtype.is_floating_point else reader.info(name).dtype
        expected = cast_for_export(reader.read(name), wanted)
        if tensor.dtype != expected.dtype or not torch.equal(tensor.view(torch.uint8), expected.view(torch.uint8)):
            return {"error": f"compressed-tensors {compressed_tensors.__version__} decodes {name} otherwise"}
        checked += 1
        module = name.removesuffix(".weight")
        if f"{module}.compressed" not in stored.names():
            continue
        if ((expected.reshape(-1, 4) != 0).sum(-1) < 2).any():
            with_ties += 1  # which zero owns a slot is arbitrary there (the library's topk vs our stable sort)
            continue
        theirs = Sparse24BitMaskTensor.from_dense(expected, "2:4").dict(module)
        for key in ("compressed", "bitmask", "shape"):
            if not torch.equal(stored.read(f"{module}.{key}"), theirs[f"{module}.{key}"]):
                return {"error": f"compressed-tensors compresses {module} into other {key} bytes than the export's"}
        same_bytes += 1
    if checked != len(reader.names()):
        return {"error": f"compressed-tensors decodes {checked} tensors, the source has {len(reader.names())}"}
    return {
        "version": compressed_tensors.__version__,
        "tensors_bit_exact": checked,
        "compressed_as_the_library_does": same_bytes,
        "with_ties": with_ties,
    }


def main(argv: list[str] | None = None) -> int:
    folder, source, dtype = (argv or sys.argv[1:])[:3]
    result = check(Path(folder), Path(source), DTYPES[dtype])
    print(json.dumps(result))
    return 1 if "error" in result else 0


if __name__ == "__main__":
    sys.exit(main())
