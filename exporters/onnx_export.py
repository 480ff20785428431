"""ONNX models of pruned checkpoints, through PyTorch's dynamo exporter, validated by ONNX Runtime.

Each pruned Linear lands as a MatMul whose constant initializer is ``[in, out]``: N:M along the input
dimension is N:M along the MatMul B axis 0, as TensorRT reads it (for Gemm with ``transB=1``, along
B axis 1). The exporter checks this on the written file and maps each eligible initializer back to
its layer by content. polygraphy's sparsity inspection, an independent reading of the same file,
runs on request (``polygraphy=True``): it took over four minutes of one core on SmolLM2's graph,
where the exporter's own check takes seconds.

ONNX Runtime must load and run the written graph and match PyTorch in the same dtype; a graph it
cannot load or run fails the export. The one exception is a bfloat16 graph where only the CPU
provider is present: ONNX Runtime has no CPU kernels for it, so that parity is not measured.

Inputs are ``input_ids`` and ``attention_mask`` ``[batch, seq]`` (int64, dynamic); the output is
``logits`` (causal LMs) or ``last_hidden_state`` (encoders). Weights go to external data
(``model.onnx.data``), so models over 2 GB work. The export holds the whole model in memory (the
dynamo exporter traces a loaded model), about twice its size in the export dtype at the peak.
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from apt.atomic import atomic_directory
from apt.errors import InvalidInputError, MissingDependencyError
from apt.models.discovery import is_causal
from apt.models.experts import experts_layout
from apt.models.portable import copy_side_files, write_config
from apt.solver.patterns import Pattern, positive_zeros
from apt.text.sources import load_text, token_windows
from exporters.common import PrunedSource, check_pattern, check_space, open_pruned, write_manifest

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# ONNX Runtime against PyTorch in the same dtype, on held-out text. float32: max |Δ| <= 1e-3.
# float16/bfloat16 accumulate rounding differently in the two runtimes, so the bound scales with the
# output: max |Δ| <= 2 % of the largest |value| (about 10 fp16 ulps at SmolLM2's logit scale of ~40),
# or, where larger, twice what the narrow dtype costs PyTorch itself (its max |Δ| against the same
# model in float32: a deep or heavily pruned model's activations grow, and with them fp16's ulp);
# for causal LMs the top-1 token must also agree at >= 95 % of positions.
ABSOLUTE_TOLERANCE = {"float32": 1e-3}
RELATIVE_TOLERANCE = 2e-2
ROUNDING_FACTOR = 2.0
TOP1_AGREEMENT = 0.95
# why an FP8 folder is refused rather than written with its weights dequantised (which would drop FP8 silently)
FP8_REFUSAL = (
    "writes float32/float16/bfloat16 MatMul initializers and no QuantizeLinear/DequantizeLinear nodes, so it "
    "cannot carry float8 weights with their scales nor quantize the inputs per token"
)


def parity_verdict(
    ort_out: np.ndarray, reference: np.ndarray, dtype: str, causal: bool, rounding: float | None = None
) -> dict:
    """Compare ONNX Runtime's output with PyTorch's; returns the figures, the bound used and the verdict.
    ``rounding``: PyTorch's own max |Δ| between ``dtype`` and float32 on the same inputs, where measured."""
    ort_out = ort_out.astype(np.float32)
    diff = float(np.abs(ort_out - reference).max())
    scale = float(np.abs(reference).max())
    if dtype in ABSOLUTE_TOLERANCE:
        tolerance, bound = ABSOLUTE_TOLERANCE[dtype], "absolute"
    elif rounding is not None and ROUNDING_FACTOR * rounding > RELATIVE_TOLERANCE * scale:
        tolerance, bound = ROUNDING_FACTOR * rounding, f"{ROUNDING_FACTOR:g} x PyTorch's own {dtype} vs float32 max |Δ|"
    else:
        tolerance, bound = RELATIVE_TOLERANCE * scale, f"{RELATIVE_TOLERANCE:g} x max |output|"
    verdict = {"max_abs_diff": diff, "tolerance": tolerance, "output_abs_max": scale, "bound": bound}
    if rounding is not None:
        verdict["torch_vs_float32_max_abs_diff"] = rounding
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


def _past_names(layers: int) -> list[str]:
    return [f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]


def _kv_shape(config) -> tuple[int, int]:
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return kv_heads, head_dim


def _require(package: str, extra: str = "onnx"):
    import importlib

    try:
        return importlib.import_module(package)
    except ImportError as err:
        raise MissingDependencyError(f"the ONNX exporter needs {package!r}: pip install 'apt-sparse[{extra}]'") from err


def ort_session(onnx_path: Path, dtype: str):
    """An ONNX Runtime session on the written graph, or the reason parity cannot be measured here (only
    for a bfloat16 graph without a GPU provider). A graph ONNX Runtime cannot load is an error."""
    ort = _require("onnxruntime")
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    if dtype == "bfloat16" and providers == ["CPUExecutionProvider"]:
        return None, (
            "not measured: ONNX Runtime's CPU provider has no bfloat16 kernels for this graph "
            f"(onnxruntime {ort.__version__}); validate on a machine with CUDAExecutionProvider"
        )
    try:
        return ort.InferenceSession(str(onnx_path), providers=providers), None
    except Exception as err:  # onnxruntime raises its own exception types
        raise InvalidInputError(f"ONNX Runtime cannot load the exported {dtype} graph {onnx_path}: {err}") from err


def _run(session, feed: dict, dtype: str):
    try:
        return session.run(None, feed)
    except Exception as err:  # onnxruntime raises its own exception types
        raise InvalidInputError(f"ONNX Runtime cannot run the exported {dtype} graph: {err}") from err


def decode_parity(session, model, tokenizer, dtype: str, prefix: int = 24) -> dict:
    """One decoding step in ONNX Runtime (past from PyTorch's prefill of ``prefix`` tokens) against the
    last-position logits of PyTorch on the whole sequence, and a prefill with an empty past."""
    ids = token_windows(load_text("stdlib").evaluation, tokenizer, 1, prefix + 1)
    names = [i.name for i in session.get_inputs()][2:]
    kv_heads, head_dim = _kv_shape(model.config)
    np_dtype = np.float16 if dtype == "float16" else np.float32
    with torch.no_grad():
        reference = model(ids, use_cache=False).logits[:, -1].float().numpy()
        prefill = model(ids[:, :prefix], use_cache=True)
    past = [t for layer in prefill.past_key_values.layers for t in (layer.keys, layer.values)]
    mask = np.ones((1, prefix + 1), dtype=np.int64)
    feed = {"input_ids": ids[:, prefix:].numpy(), "attention_mask": mask}
    feed |= {n: t.float().numpy().astype(np_dtype) for n, t in zip(names, past)}
    step = parity_verdict(_run(session, feed, dtype)[0][:, -1], reference, dtype, causal=False)
    empty = np.zeros((1, kv_heads, 0, head_dim), dtype=np_dtype)
    feed = {"input_ids": ids.numpy(), "attention_mask": mask} | {n: empty for n in names}
    full = parity_verdict(_run(session, feed, dtype)[0][:, -1], reference, dtype, causal=False)
    return {
        "status": "ok",
        "decode_step_max_abs_diff": step["max_abs_diff"],
        "empty_past_max_abs_diff": full["max_abs_diff"],
        "tolerance": step["tolerance"],
        "bound": step["bound"],
        "passed": step["passed"] and full["passed"],
        "inputs": f"{prefix} held-out tokens, then one decoding step",
    }


def prefill_parity(session, model, tokenizer, causal: bool, dtype: str, batch: int = 2, seq_len: int = 64) -> dict:
    """The graph in ONNX Runtime on held-out text against PyTorch in the same dtype."""
    ids = token_windows(load_text("stdlib").evaluation, tokenizer, batch, seq_len)
    mask = torch.ones_like(ids)
    (ort_out,) = _run(session, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}, dtype)
    with torch.no_grad():
        reference = _Logits(model, causal)(ids, mask).float().numpy()
        rounding = None
        if dtype != "float32":
            with in_float32(model):
                exact = _Logits(model, causal)(ids, mask).float().numpy()
            rounding = float(np.abs(reference - exact).max())
    return {"status": "ok", "inputs": f"{batch}x{seq_len} held-out stdlib tokens"} | parity_verdict(
        ort_out, reference, dtype, causal, rounding
    )


@contextlib.contextmanager
def in_float32(model):
    """``model`` computing in float32 inside the block, then its own dtypes again, tensor by tensor
    (float16 and bfloat16 convert to float32 and back exactly; buffers already in float32 stay)."""
    tensors = [
        t
        for module in model.modules()
        for table in (module._parameters, module._buffers)
        for t in table.values()
        if t is not None and t.is_floating_point()
    ]
    dtypes = [t.dtype for t in tensors]
    try:
        for t in tensors:
            t.data = t.data.float()
        yield model
    finally:
        for t, dtype in zip(tensors, dtypes):
            t.data = t.data.to(dtype)


def load_for_export(src: Path, dtype: str):
    """The model of ``src`` in ``dtype`` (and whether it is a causal LM), with ``+0.0`` zeros."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(src)
    causal = is_causal(config)
    cls = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    model = cls.from_pretrained(src, dtype=DTYPES[dtype]).eval()
    # a kept weight below the narrow dtype's smallest subnormal rounds to -0.0 when cast: store +0.0
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(positive_zeros(param))
    return model, causal


def sparse_initializers(onnx_path: Path, weights: dict[str, torch.Tensor], pattern: Pattern) -> dict:
    """Scan every MatMul/Gemm whose B input is a 2-D constant initializer. Returns the names of the
    initializers that follow ``pattern`` along K, mapped to the pruned layer they came from (by
    content), the others, and any that store a negative zero."""
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
        # raw bits, so float16/bfloat16 need no float semantics: zero is "all bits but the sign clear"
        bits = array.view(f"u{array.itemsize}")
        sign = np.array(1 << (8 * array.itemsize - 1), dtype=bits.dtype)
        nonzero = (bits & ~sign) != 0
        trans_b = node.op_type == "Gemm" and any(a.name == "transB" and a.i == 1 for a in node.attribute)
        along_k = nonzero if trans_b else nonzero.T  # [N, K]: groups along K
        if _follows(along_k, pattern):
            eligible[node.input[1]] = by_content.get(array.tobytes())
            if (bits == sign).any():
                negative_zero.append(node.input[1])
        else:
            dense.append(node.input[1])
    return {"eligible": eligible, "dense": dense, "negative_zero": negative_zero}


def _follows(nonzero: np.ndarray, pattern: Pattern) -> bool:
    rows, k = nonzero.shape
    if pattern.is_nm:
        return k % pattern.m == 0 and bool((nonzero.reshape(rows, -1, pattern.m).sum(-1) <= pattern.n).all())
    return bool(((~nonzero).sum(-1) >= round(pattern.sparsity * k)).all())


def polygraphy_sparsity(onnx_path: Path, eligible: dict) -> dict:
    """``polygraphy inspect sparsity`` on the file (an independent implementation of the 2:4 check)."""
    exe = shutil.which("polygraphy") or str(Path(sys.executable).parent / "polygraphy")
    if not Path(exe).exists():
        raise MissingDependencyError("the independent check needs polygraphy: pip install polygraphy")
    run = subprocess.run([exe, "inspect", "sparsity", str(onnx_path)], capture_output=True, text=True, timeout=3600)
    if run.returncode != 0:
        raise InvalidInputError(f"polygraphy inspect sparsity failed (exit {run.returncode}): {run.stderr[-500:]}")
    text = run.stdout + run.stderr
    sparse = re.findall(r"Found sparse tensor: (\S+)", text)
    report = {"status": "ok", "sparse": sparse, "non_sparse": re.findall(r"Found non-sparse tensor: (\S+)", text)}
    report["agrees"] = set(sparse) >= set(eligible)
    if not report["agrees"]:
        raise InvalidInputError(f"polygraphy does not find 2:4 structure in {sorted(set(eligible) - set(sparse))[:3]}")
    return report


def _independent_check(path: Path, eligible: dict, pattern: Pattern, requested: bool) -> dict:
    if not requested:
        return {"status": "not requested (pass --polygraphy for polygraphy's independent sparsity inspection)"}
    if (pattern.n, pattern.m) != (2, 4):
        return {"status": f"not applicable: polygraphy inspects 2:4 only, this graph is {pattern}"}
    return polygraphy_sparsity(path, eligible)


def _trace(model, causal: bool, dtype: str, with_past: bool, path: Path, opset: int) -> tuple[list[str], list[str]]:
    """Export the model (or its decoding graph) to ``path``; returns the input and output names."""
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
        wrapper, args = _Logits(model, causal), (ids, torch.ones_like(ids))
        dynamic = ({0: batch, 1: seq}, {0: batch, 1: seq})
        inputs = ["input_ids", "attention_mask"]
        outputs = ["logits" if causal else "last_hidden_state"]
    wrapper.eval()  # the wrapper too: the exporter warns about (and may trace) training-mode behaviour
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
    return inputs, outputs


def _check_initializers(path: Path, source: PrunedSource, dtype: str) -> dict:
    """Every pruned layer must be found in the graph as an initializer that keeps the pattern along K."""
    targets = {n: positive_zeros(source.reader.read(n).to(DTYPES[dtype])) for n in source.targets.tensors}
    scan = sparse_initializers(path, targets, source.targets.pattern)
    found = {v for v in scan["eligible"].values() if v}
    missing = sorted(set(targets) - found)
    if missing or scan["negative_zero"]:
        raise InvalidInputError(
            f"the written ONNX graph lost its {source.targets.pattern} structure: {len(missing)} pruned layers not "
            f"found as such initializers (first: {missing[:3]}), negative zeros in {scan['negative_zero'][:3]}"
        )
    return scan


def export_onnx(
    src: str | Path,
    out: str | Path,
    dtype: str = "float32",
    opset: int = 18,
    overwrite: bool = False,
    with_past: bool = False,
    polygraphy: bool = False,
) -> dict:
    """Write ``OUT/model.onnx`` (+ ``model.onnx.data``) and ``OUT/manifest.json``. ``with_past`` writes
    the decoding graph with past and present keys/values (decoders with a KV cache); ``polygraphy``
    adds polygraphy's independent sparsity inspection of the file."""
    import transformers

    if dtype not in DTYPES:
        raise InvalidInputError(f"ONNX dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    _require("onnx")
    _require("onnxscript")
    _require("onnxruntime")
    source = open_pruned(src, "onnx", fp8=FP8_REFUSAL)
    config = transformers.AutoConfig.from_pretrained(source.folder)
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if is_causal(config) and config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise InvalidInputError(
            f"the onnx export traces a causal LM, and transformers has none for {config.model_type} (a "
            "vision-language model): export vllm, which carries the whole model"
        )
    if with_past and not (is_causal(config) and hasattr(config, "num_attention_heads")):
        raise InvalidInputError(
            f"with_past needs a decoder with a key/value cache of attention heads; {config.model_type} has none: "
            "export without it"
        )
    layers = check_pattern(source)
    check_space(out, source, DTYPES[dtype].itemsize)
    model, causal = load_for_export(source.folder, dtype)
    moe = next((name for name, m in model.named_modules() if experts_layout(m) is not None), None)
    if moe is not None:
        raise InvalidInputError(
            f"{source.folder} is a mixture-of-experts model ({moe}): PyTorch's ONNX exporter cannot convert "
            "transformers' routed experts (their shapes depend on the routing); export vllm instead"
        )
    tokenizer = transformers.AutoTokenizer.from_pretrained(source.folder)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        path = tmp / "model.onnx"
        inputs, outputs = _trace(model, causal, dtype, with_past, path, opset)
        copy_side_files(source.folder, tmp)
        write_config(source.config, tmp)
        scan = _check_initializers(path, source, dtype)
        session, reason = ort_session(path, dtype)
        if session is None:
            parity = {"status": reason}
        elif with_past:
            parity = decode_parity(session, model, tokenizer, dtype)
        else:
            parity = prefill_parity(session, model, tokenizer, causal, dtype)
        if parity["status"] == "ok" and not parity["passed"]:
            raise InvalidInputError(f"ONNX Runtime does not match PyTorch: {parity}")
        validation = {
            "eligible_initializers": len(scan["eligible"]),
            "pruned_layers_found_in_pattern": len({v for v in scan["eligible"].values() if v}),
            "dense_matmul_initializers": scan["dense"],
            "onnxruntime": parity,
            "polygraphy": _independent_check(path, scan["eligible"], source.targets.pattern, polygraphy),
        }
        return write_manifest(
            tmp,
            source=source,
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
