"""ONNX models of pruned checkpoints, through PyTorch's dynamo exporter, validated by ONNX Runtime.

Each pruned Linear lands as a MatMul whose constant initializer is ``[in, out]``: 2:4 along the input
dimension is 2:4 along the MatMul B axis 0, as TensorRT reads it (for Gemm with ``transB=1``, along B
axis 1). The exporter checks this on the written file, maps each eligible initializer back to its layer
by content, and asks an independent tool (polygraphy's sparsity inspection) for its verdict.

Inputs are ``input_ids`` and ``attention_mask`` ``[batch, seq]`` (int64, dynamic); the output is
``logits`` (causal LMs) or ``last_hidden_state`` (encoders). Weights go to external data
(``model.onnx.data``), so models over 2 GB work.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from apt.artifacts import atomic_directory
from apt.data import load_text, token_windows
from apt.errors import InvalidInputError, MissingDependencyError
from apt.families import family_for
from exporters.common import positive_zeros, read_checkpoint, verify_nm, write_manifest
from exporters.vllm import copy_side_files

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# ONNX Runtime against PyTorch in the same dtype, on held-out text. float32: max |Δ| <= 1e-3.
# float16/bfloat16 accumulate rounding differently in the two runtimes, so the bound scales with the
# output: max |Δ| <= 2 % of the largest |value| (about 10 fp16 ulps at SmolLM2's logit scale of ~40),
# and for causal LMs the top-1 token must agree at >= 95 % of positions.
ABSOLUTE_TOLERANCE = {"float32": 1e-3}
RELATIVE_TOLERANCE = 2e-2
TOP1_AGREEMENT = 0.95


def parity_verdict(ort_out: np.ndarray, reference: np.ndarray, dtype: str, causal: bool) -> dict:
    """Compare ONNX Runtime's output with PyTorch's; returns the figures, the bound used and the verdict."""
    ort_out = ort_out.astype(np.float32)
    diff = float(np.abs(ort_out - reference).max())
    scale = float(np.abs(reference).max())
    tolerance = ABSOLUTE_TOLERANCE.get(dtype, RELATIVE_TOLERANCE * scale)
    verdict = {
        "max_abs_diff": diff,
        "tolerance": tolerance,
        "output_abs_max": scale,
        "bound": "absolute" if dtype in ABSOLUTE_TOLERANCE else f"{RELATIVE_TOLERANCE:g} x max |output|",
    }
    passed = diff <= tolerance
    if causal:
        agreement = float((ort_out.argmax(-1) == reference.argmax(-1)).mean())
        verdict["top1_agreement"] = agreement
        passed = passed and (dtype in ABSOLUTE_TOLERANCE or agreement >= TOP1_AGREEMENT)
    return verdict | {"passed": passed}


class _Logits(torch.nn.Module):
    def __init__(self, model, causal: bool):
        super().__init__()
        self.model, self.causal = model, causal

    def forward(self, input_ids, attention_mask):
        if self.causal:
            return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


class _LogitsWithPast(torch.nn.Module):
    """Decoding graph: ``input_ids [b, s]``, ``attention_mask [b, past + s]`` and, per layer, the past key
    and value ``[b, kv_heads, past, head_dim]`` (past may be 0) → ``logits`` and the present keys/values."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, *past):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for i in range(len(past) // 2):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache, use_cache=True)
        present = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
        return (out.logits, *present)


KV_CACHE_FAMILIES = ("llama", "opt")


def _past_names(layers: int) -> list[str]:
    return [f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]


def _kv_shape(config) -> tuple[int, int]:
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return kv_heads, head_dim


def decode_parity(onnx_path: Path, model, tokenizer, dtype: str, prefix: int = 24) -> dict:
    """One decoding step in ONNX Runtime (past from PyTorch's prefill of ``prefix`` tokens) against the
    last-position logits of PyTorch on the whole sequence, and a prefill with an empty past."""
    ort = _require("onnxruntime")
    try:
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    except Exception as err:
        return {"status": f"not measured: ONNX Runtime could not load the {dtype} model ({err.__class__.__name__})"}
    ids = token_windows(load_text("stdlib").evaluation, tokenizer, 1, prefix + 1)
    names = [i.name for i in session.get_inputs()][2:]
    kv_heads, head_dim = _kv_shape(model.config)
    with torch.no_grad():
        reference = model(ids, use_cache=False).logits[:, -1].float().numpy()
        prefill = model(ids[:, :prefix], use_cache=True)
    past = [t for layer in prefill.past_key_values.layers for t in (layer.keys, layer.values)]
    mask = np.ones((1, prefix + 1), dtype=np.int64)
    feed = {"input_ids": ids[:, prefix:].numpy(), "attention_mask": mask} | {
        n: t.float().numpy().astype(np.float16 if dtype == "float16" else np.float32) for n, t in zip(names, past)
    }
    step = parity_verdict(session.run(None, feed)[0][:, -1], reference, dtype, causal=False)
    empty = np.zeros((1, kv_heads, 0, head_dim), dtype=np.float16 if dtype == "float16" else np.float32)
    feed = {"input_ids": ids.numpy(), "attention_mask": mask} | {n: empty for n in names}
    full = parity_verdict(session.run(None, feed)[0][:, -1], reference, dtype, causal=False)
    return {
        "status": "ok",
        "decode_step_max_abs_diff": step["max_abs_diff"],
        "empty_past_max_abs_diff": full["max_abs_diff"],
        "tolerance": step["tolerance"],
        "bound": step["bound"],
        "passed": step["passed"] and full["passed"],
        "inputs": f"{prefix} held-out tokens, then one decoding step",
    }


def _require(package: str, extra: str = "onnx"):
    import importlib

    try:
        return importlib.import_module(package)
    except ImportError as err:
        raise MissingDependencyError(f"the ONNX exporter needs {package!r}: pip install 'apt-sparse[{extra}]'") from err


def load_for_export(src: Path, dtype: str):
    import transformers

    config = transformers.AutoConfig.from_pretrained(src)
    family = family_for(config)
    cls = transformers.AutoModelForCausalLM if family.causal else transformers.AutoModel
    model = cls.from_pretrained(src, dtype=DTYPES[dtype]).eval()
    # a kept weight below the narrow dtype's smallest subnormal rounds to -0.0 when cast: store +0.0
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(positive_zeros(param))
    return model, family


def sparse_initializers(onnx_path: Path, weights: dict[str, torch.Tensor]) -> dict:
    """Scan every MatMul/Gemm whose B input is a 2-D constant initializer. Returns counts, the names
    of 2:4-eligible initializers mapped to the pruned layer they came from, and any negative zeros."""
    onnx = _require("onnx")
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path), load_external_data=True)
    inits = {i.name: i for i in model.graph.initializer}

    def raw(t: torch.Tensor) -> bytes:
        return t.contiguous().view(torch.uint8).numpy().tobytes()

    by_content = {}
    for name, weight in weights.items():
        by_content[raw(weight.T)] = name
        by_content[raw(weight)] = name
    eligible, dense, negative_zero = {}, [], []
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2 or node.input[1] not in inits:
            continue
        array = numpy_helper.to_array(inits[node.input[1]])
        if array.ndim != 2:
            continue
        # work on raw bits so float16/bfloat16 need no float semantics: zero is "all bits but the sign clear"
        bits = array.view(f"u{array.itemsize}")
        sign = np.array(1 << (8 * array.itemsize - 1), dtype=bits.dtype)
        nonzero = (bits & ~sign) != 0
        trans_b = node.op_type == "Gemm" and any(a.name == "transB" and a.i == 1 for a in node.attribute)
        along_k = nonzero if trans_b else nonzero.T  # [N, K]: groups of 4 along K
        if along_k.shape[1] % 4 == 0 and (along_k.reshape(along_k.shape[0], -1, 4).sum(-1) <= 2).all():
            eligible[node.input[1]] = by_content.get(array.tobytes())
            if (bits == sign).any():
                negative_zero.append(node.input[1])
        else:
            dense.append(node.input[1])
    return {"eligible": eligible, "dense": dense, "negative_zero": negative_zero}


def polygraphy_sparsity(onnx_path: Path) -> dict:
    """Run ``polygraphy inspect sparsity`` (an independent implementation of the 2:4 check)."""
    exe = shutil.which("polygraphy") or str(Path(sys.executable).parent / "polygraphy")
    if not Path(exe).exists():
        return {"status": "not measured: polygraphy is not installed (pip install polygraphy)"}
    run = subprocess.run([exe, "inspect", "sparsity", str(onnx_path)], capture_output=True, text=True, timeout=1800)
    text = run.stdout + run.stderr
    sparse = re.findall(r"Found sparse tensor: (\S+)", text)
    dense = re.findall(r"Found non-sparse tensor: (\S+)", text)
    return {
        "status": "ok" if run.returncode == 0 else f"failed (exit {run.returncode})",
        "sparse": sparse,
        "non_sparse": dense,
    }


def _agreement(report: dict, eligible: dict) -> dict:
    if "sparse" in report:
        report["agrees"] = set(report["sparse"]) >= set(eligible)
        if not report["agrees"]:
            report["note"] = "polygraphy did not confirm every eligible initializer (it cannot read bfloat16 ones)"
    return report


def onnxruntime_parity(
    onnx_path: Path, model, tokenizer, causal: bool, dtype: str, batch: int = 2, seq_len: int = 64
) -> dict:
    """Run the file in ONNX Runtime (CPU) on held-out text and compare with PyTorch in the same dtype."""
    ort = _require("onnxruntime")
    try:
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own types
        return {"status": f"not measured: ONNX Runtime could not load the {dtype} model ({err.__class__.__name__})"}
    ids = token_windows(load_text("stdlib").evaluation, tokenizer, batch, seq_len)
    mask = torch.ones_like(ids)
    try:
        (ort_out,) = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    except Exception as err:
        return {"status": f"not measured: ONNX Runtime on CPU could not run the {dtype} model ({err})"}
    with torch.no_grad():
        reference = _Logits(model, causal)(ids, mask).float().numpy()
    verdict = parity_verdict(ort_out, reference, dtype, causal)
    return {"status": "ok", "inputs": f"{batch}x{seq_len} held-out stdlib tokens"} | verdict


def export_onnx(
    src: str | Path,
    out: str | Path,
    dtype: str = "float32",
    opset: int = 18,
    overwrite: bool = False,
    validate: bool = True,
    with_past: bool = False,
) -> dict:
    """Write ``OUT/model.onnx`` (+ ``model.onnx.data``) and ``OUT/manifest.json``. ``with_past`` writes
    the decoding graph with past and present keys/values (decoders with a KV cache)."""
    import transformers

    if dtype not in DTYPES:
        raise InvalidInputError(f"ONNX dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    _require("onnx")
    _require("onnxscript")
    src = Path(src)
    checkpoint = read_checkpoint(src)
    layers = verify_nm(checkpoint)
    model, family = load_for_export(src, dtype)
    if with_past and family.name not in KV_CACHE_FAMILIES:
        raise InvalidInputError(
            f"with_past needs a decoder with a key/value cache ({', '.join(KV_CACHE_FAMILIES)} families); "
            f"{family.name} has none: export without it"
        )
    tokenizer = transformers.AutoTokenizer.from_pretrained(src)
    ids = torch.randint(0, 100, (2, 16))
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    if with_past:
        n_layers = model.config.num_hidden_layers
        kv_heads, head_dim = _kv_shape(model.config)
        past = tuple(torch.zeros(2, kv_heads, 5, head_dim, dtype=DTYPES[dtype]) for _ in range(2 * n_layers))
        total, past_len = torch.export.Dim("total_sequence"), torch.export.Dim("past_sequence")
        wrapper, args = _LogitsWithPast(model), (ids, torch.ones(2, 21, dtype=torch.long), *past)
        dynamic = ({0: batch, 1: seq}, {0: batch, 1: total}, tuple({0: batch, 2: past_len} for _ in past))
        inputs = ["input_ids", "attention_mask", *_past_names(n_layers)]
        outputs = ["logits", *[n.replace("past_key_values", "present") for n in _past_names(n_layers)]]
    else:
        wrapper, args = _Logits(model, family.causal), (ids, torch.ones_like(ids))
        dynamic = ({0: batch, 1: seq}, {0: batch, 1: seq})
        inputs = ["input_ids", "attention_mask"]
        outputs = ["logits" if family.causal else "last_hidden_state"]
    with atomic_directory(out, overwrite=overwrite) as tmp:
        path = tmp / "model.onnx"
        with torch.no_grad():
            program = torch.onnx.export(
                wrapper,
                args,
                dynamo=True,
                opset_version=opset,
                dynamic_shapes=dynamic,
                input_names=inputs,
                output_names=outputs,
            )
        program.save(str(path), external_data=True)
        copy_side_files(src, tmp)
        (tmp / "config.json").write_text(json.dumps(checkpoint.config, indent=2))
        targets = {r["name"]: positive_zeros(checkpoint.tensors[r["name"]].to(DTYPES[dtype])) for r in layers}
        scan = sparse_initializers(path, targets)
        found = set(v for v in scan["eligible"].values() if v)
        missing = sorted(set(targets) - found)
        if missing or scan["negative_zero"]:
            raise InvalidInputError(
                f"the written ONNX graph lost 2:4 structure: {len(missing)} pruned layers not found as 2:4 "
                f"initializers (first: {missing[:3]}), negative zeros in {scan['negative_zero'][:3]}"
            )
        validation = {
            "eligible_initializers": len(scan["eligible"]),
            "pruned_layers_found_2_4": len(found),
            "dense_matmul_initializers": scan["dense"],
            "polygraphy": _agreement(polygraphy_sparsity(path), scan["eligible"])
            if validate
            else {"status": "not measured: validate=False"},
            "onnxruntime": (
                decode_parity(path, model, tokenizer, dtype)
                if with_past
                else onnxruntime_parity(path, model, tokenizer, family.causal, dtype)
            )
            if validate
            else {"status": "not measured: validate=False"},
        }
        parity = validation["onnxruntime"]
        if parity.get("status") == "ok" and not parity["passed"]:
            raise InvalidInputError(f"ONNX Runtime does not match PyTorch: {parity}")
        return write_manifest(
            tmp,
            source=src,
            target="onnx",
            layers=layers,
            validation=validation,
            extra={
                "dtype": dtype,
                "opset": opset,
                "inputs": inputs,
                "outputs": outputs,
                "with_past": with_past,
                "initializer_map": scan["eligible"],
            },
        )
