"""TensorRT engines with 2:4 sparse weights, built from the fp16/bf16 ONNX graph.

TensorRT 10+ builds strongly typed networks: the graph itself must be fp16/bf16, and
``BuilderFlag.SPARSE_WEIGHTS`` lets the builder consider sparse tactics for constant 2:4 weights.
The builder's verbose log names the layers eligible for sparse math and those that got a sparse
tactic (dense kernels often win at small M). Where TensorRT or a GPU is absent the ONNX graph and the
equivalent ``trtexec`` command line are written, the manifest says the engine was not built, and
the export still succeeds.
"""

from __future__ import annotations

import importlib.util
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from apt.atomic import atomic_directory
from apt.errors import InvalidInputError
from exporters.common import check_pattern, only_2_4, open_pruned, write_manifest
from exporters.onnx_export import export_onnx

accepts = only_2_4("TensorRT's sparse tactics (SPARSE_WEIGHTS) take 2:4 weights only")
FP8_REFUSAL = (
    "builds from the fp16/bf16 ONNX graph, which has no FP8 Q/DQ nodes for TensorRT's FP8 kernels to run, so it "
    "cannot carry the float8 weights"
)

log = logging.getLogger(__name__)

INPUTS = ("input_ids", "attention_mask")


@dataclass(frozen=True)
class Profile:
    """Optimisation profile for ``[batch, sequence]`` inputs: minimum, optimum and maximum shapes."""

    min: tuple[int, int] = (1, 1)
    opt: tuple[int, int] = (1, 512)
    max: tuple[int, int] = (8, 2048)

    def __post_init__(self):
        if not all(a <= b <= c for a, b, c in zip(self.min, self.opt, self.max)) or min(self.min) < 1:
            raise InvalidInputError(f"profile shapes must satisfy 1 <= min <= opt <= max, got {self}")


def trtexec_command(onnx_path: str, engine_path: str, profile: Profile) -> str:
    def shapes(shape):
        return ",".join(f"{name}:{shape[0]}x{shape[1]}" for name in INPUTS)

    return (
        f"trtexec --onnx={onnx_path} --stronglyTyped --sparsity=enable "
        f"--minShapes={shapes(profile.min)} --optShapes={shapes(profile.opt)} --maxShapes={shapes(profile.max)} "
        f"--saveEngine={engine_path} --verbose"
    )


def parse_sparsity_log(lines: list[str]) -> dict:
    """The two ``(Sparsity)`` lines of TensorRT's builder log → eligible layers and sparse-tactic layers."""

    def names(pattern: str) -> list[str] | None:
        for line in lines:
            match = re.search(pattern + r"\s*(.*)$", line)
            if match:
                return [n.strip() for n in match.group(1).split(",") if n.strip()]
        return None

    eligible = names(r"\(Sparsity\) Layers eligible for sparse math:")
    picked = names(r"\(Sparsity\) TRT inference plan picked sparse implementation for layers:")
    return {"eligible": eligible, "sparse_tactics": picked, "log_found": eligible is not None}


def tensorrt_unavailable_reason() -> str | None:
    if importlib.util.find_spec("tensorrt") is None:
        return "the tensorrt Python package is not installed"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU is available"
    return None


def build_engine(onnx_path: Path, engine_path: Path, profile: Profile) -> dict:
    """Build a serialized engine with SPARSE_WEIGHTS through the TensorRT Python API; returns the parsed
    sparsity report and the build log's size."""
    import tensorrt as trt

    class CaptureLogger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.lines: list[str] = []

        def log(self, severity, msg):
            self.lines.append(msg)

    logger = CaptureLogger()
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise InvalidInputError(f"TensorRT could not parse {onnx_path}: {errors[:3]}")
    config = builder.create_builder_config()
    config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    opt_profile = builder.create_optimization_profile()
    for name in INPUTS:
        opt_profile.set_shape(name, profile.min, profile.opt, profile.max)
    config.add_optimization_profile(opt_profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise InvalidInputError("TensorRT failed to build the engine; see the verbose log (--verbose)")
    engine_path.write_bytes(bytes(serialized))
    return parse_sparsity_log(logger.lines) | {"tensorrt": trt.__version__, "log_lines": len(logger.lines)}


def export_tensorrt(
    src: str | Path,
    out: str | Path,
    dtype: str = "float16",
    profile: Profile | None = None,
    overwrite: bool = False,
    polygraphy: bool = False,
) -> dict:
    """Write ``OUT/onnx/`` (the strongly typed graph), ``OUT/model.plan`` where TensorRT and a GPU are
    present, and ``OUT/manifest.json`` with the engine report or the reason it was not built."""
    if dtype not in ("float16", "bfloat16"):
        raise InvalidInputError(f"TensorRT's strongly typed build needs a float16 or bfloat16 graph, got {dtype!r}")
    profile = profile or Profile()
    source = open_pruned(src, "tensorrt", accepts, fp8=FP8_REFUSAL)
    layers = check_pattern(source)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        onnx_manifest = export_onnx(source.folder, tmp / "onnx", dtype=dtype, polygraphy=polygraphy)
        command = trtexec_command("onnx/model.onnx", "model.plan", profile)
        reason = tensorrt_unavailable_reason()
        if reason:
            engine = {"status": f"not built: {reason}; run the trtexec command in this manifest on a GPU machine"}
            log.warning("TensorRT engine not built: %s", reason)
        else:
            engine = {"status": "built"} | build_engine(tmp / "onnx" / "model.onnx", tmp / "model.plan", profile)
        validation = {
            "onnx_eligible_initializers": onnx_manifest["validation"]["eligible_initializers"],
            "onnxruntime": onnx_manifest["validation"]["onnxruntime"],
            "engine": engine,
        }
        return write_manifest(
            tmp,
            source=source,
            target="tensorrt",
            layers=layers,
            validation=validation,
            extra={
                "dtype": dtype,
                "trtexec": command,
                "profile": {"min": profile.min, "opt": profile.opt, "max": profile.max},
            },
        )
