"""Our 2:4 kernels judged from their compiled code, without a GPU.

Every launch the sparse op can dispatch (each candidate and default launch of ``serving.triton24`` × dtype ×
shape × token count, and the ``reduce``/``quantize``/``unpack`` launches around them) is built by the op's own
``triton24.launches`` with stand-in tensors, specialised by Triton's own argument binder for the target (as
the launcher specialises it: 16-byte alignment, ``M == 1``), compiled for that GPU architecture on this CPU
(``triton.compile``), and read from its cubin with the ``cuobjdump`` and ``nvdisasm`` the triton wheel ships:

- resources: registers, spill (stack and local) bytes, shared memory, occupancy (warps per SM);
- the main loop (the innermost loop holding the weight loads) of the SASS: its global load widths,
  instructions, shared-memory and shuffle operations, barriers, tensor-core instructions;
- per KB of weight streamed: warp-instructions and shared/shuffle operations;
- the throughput this predicts on a named GPU (the H200 for sm90; its SMs and clock from the datasheet, the
  dense GEMV bandwidth measured on it) for memory-bound launches (M <= 64), and the ratio to dense.

The model of a memory-bound launch (a prediction, checked the first time a GPU runs ``runtime_bench.gpu_suite``,
which records it beside the measured time): a kernel streams at the least of

- the issue bound: 4 warp-instructions per clock per SM at a realistic 60 % of peak issue;
- the MIO bound: one shared-memory or shuffle operation per clock per SM;
- Little's law: the bytes one loop iteration of every resident warp keeps in flight, over a 750 ns memory
  latency;
- the dense GEMV's own measured bandwidth at that shape (we never predict streaming faster than cuBLAS);

and each extra launch (split-K's ``reduce``) costs 2 µs in a CUDA graph plus its own traffic.

    python -m serving.aot --arch 80,90 --out DIR

writes ``DIR/manifest.json`` (one row per launch), ``DIR/summary.md`` and the cubins under ``DIR/cubins``.
Run it without ``TRITON_INTERPRET`` (the interpreter replaces the compiler).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from apt.atomic import atomic_directory
from serving import triton24
from serving.triton24 import FP8, GEMV_MAX_M

log = logging.getLogger(__name__)

MEMORY_BOUND_M = 64  # up to this many tokens a 2:4 layer's time is its weight's bytes: the model applies
ISSUE_PER_CLOCK = 4  # warp-instructions an SM issues per clock (four schedulers)
ISSUE_EFFICIENCY = 0.6  # the share of peak issue a memory-bound loop sustains (dependencies, address math)
MIO_PER_CLOCK = 1  # shared-memory and shuffle operations an SM's MIO queue takes per clock
LATENCY_NS = 750  # DRAM latency under load (H100/H200: 700-800 ns)
LAUNCH_US = 2.0  # one more kernel in a CUDA graph: its launch and drain
REGISTERS_PER_SM, MAX_WARPS_PER_SM, MAX_BLOCKS_PER_SM = 65536, 64, 32
SHARED_RESERVED = 1024  # bytes the driver keeps per block on sm80+


@dataclass(frozen=True)
class GPU:
    """The figures a prediction uses: ``dense_tb_s`` maps ``(dtype, n, k)`` to the dense GEMV's bandwidth
    measured there (``None`` where nothing was measured: then no ratio is predicted)."""

    name: str
    arch: int
    sms: int
    clock_ghz: float
    shared_per_sm: int
    dense_tb_s: dict | None
    source: str

    def dense_bandwidth(self, dtype: str, n: int, k: int) -> tuple[float | None, str]:
        """The dense GEMV's bandwidth at ``n × k`` and where it comes from: measured at this shape, or at the
        measured shape of the same dtype and K (a larger N only streams better, so this flatters dense)."""
        if not self.dense_tb_s:
            return None, f"no dense GEMV measured on {self.name}"
        family = "fp8" if dtype == "float8_e4m3fn" else "half"
        if (family, n, k) in self.dense_tb_s:
            return self.dense_tb_s[family, n, k], "measured at this shape"
        same_k = [(bw, nn) for (f, nn, kk), bw in self.dense_tb_s.items() if f == family and kk == k]
        if same_k:
            bw, nn = max(same_k)
            return bw, f"measured at {nn}x{k}"
        best = max(bw for (f, _, _), bw in self.dense_tb_s.items() if f == family)
        return best, f"the best measured {family} shape"


def _tb_s(mbytes: float, us: float) -> float:
    return round(mbytes / us, 2)  # MB / µs = TB/s


# Dense GEMV on the lent H200 (2026-12-04), CUDA-graph replay, torch 2.11 + cuBLAS: fp16 at M = 1 (bf16 within
# 1 %), FP8 (torch._scaled_mm, per-token and per-channel scales) at M = 16. Bytes over time: q/o 4096x4096
# 33.55 MB in 9.205 µs, 14336x4096 117.4 MB in 30.33 µs, 4096x14336 in 31.86 µs; FP8 14336x4096 58.7 MB in
# 17.19 µs, 4096x14336 in 21.32 µs, 28672x8192 234.9 MB in 63.32 µs.
H200_DENSE = {
    ("half", 4096, 4096): _tb_s(33.554, 9.205),
    ("half", 14336, 4096): _tb_s(117.44, 30.33),
    ("half", 4096, 14336): _tb_s(117.44, 31.86),
    ("fp8", 14336, 4096): _tb_s(58.72, 17.19),
    ("fp8", 4096, 14336): _tb_s(58.72, 21.32),
    ("fp8", 28672, 8192): _tb_s(234.88, 63.32),
}
GPUS = {
    90: GPU("NVIDIA H200", 90, 132, 1.98, 227 * 1024, H200_DENSE, "datasheet SMs and clock; dense GEMV measured"),
    80: GPU("NVIDIA A100-SXM4-80GB", 80, 108, 1.41, 163 * 1024, None, "datasheet only: no A100 was ever lent"),
    100: GPU("NVIDIA B200", 100, 148, 1.97, 227 * 1024, None, "datasheet only: no Blackwell was ever lent"),
}

SHAPES = {  # the bench's model shapes: Llama-3-8B's (fused gate/up), and Llama-2-7B's down (K = 11008)
    "gate_up": (28672, 4096),
    "down": (4096, 14336),
    "qo": (4096, 4096),
    "down_l2": (4096, 11008),
}
TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
DTYPES = (torch.float16, torch.bfloat16, FP8)


class Stand:
    """A stand-in tensor: what Triton's binder and our launch builders read (shape, strides, dtype, an address),
    no storage. ``base`` is 16-byte aligned, as PyTorch's allocator gives."""

    def __init__(self, shape, dtype, base: int = 1 << 20, strides=None):
        self.shape, self.dtype, self._base = torch.Size(shape), dtype, base
        if strides is None:
            strides, step = [], 1
            for size in reversed(self.shape):
                strides.insert(0, step)
                step *= size
        self._strides = tuple(strides)

    def data_ptr(self) -> int:
        return self._base

    def stride(self, dim: int | None = None):
        return self._strides if dim is None else self._strides[dim]

    def element_size(self) -> int:
        return torch.empty(0, dtype=self.dtype).element_size()

    def dim(self) -> int:
        return len(self.shape)

    def __getitem__(self, index: int) -> Stand:
        return Stand(self.shape[1:], self.dtype, self._base + index * self._strides[0] * self.element_size(),
                     self._strides[1:])  # fmt: skip


@dataclass
class Spec:
    """One launch to compile and judge: what it is (the manifest's keys) and how it is launched."""

    path: str  # apt-decode, apt-gemv, apt-mma, or an auxiliary launch (reduce, quantize, unpack)
    kernel: str
    dtype: str
    n: int
    k: int
    m: int
    config: dict | None
    launch: triton24.Launch
    weight_bytes: int  # what the launch streams of the weight (0 for auxiliary launches)
    step_bytes: int  # weight bytes one program's loop iteration reads
    extra: list = field(default_factory=list)  # the launches after it in the same call (split-K's reduce)


def _layer(n: int, k: int, dtype: torch.dtype):
    groups = k // 4
    values = Stand((2, n, groups), dtype)
    codes = Stand((n, -(-groups // 8)), torch.int32, base=values.data_ptr() + (2 * n * groups * values.element_size()
                                                                              + 4095) // 4096 * 4096)  # fmt: skip
    return values, codes


def specs_for(n: int, k: int, dtype: torch.dtype, m: int, kernels=("decode", "gemv", "mma"), which="candidates"):
    """Every launch the op can make for one shape, dtype and token count (``which``: ``candidates`` — what the GPU
    suite tunes over and a dispatch can name — or ``defaults`` only)."""
    found = []
    for kernel in kernels:
        if (kernel == "gemv" and m > GEMV_MAX_M) or (kernel == "decode" and m > MEMORY_BOUND_M):
            continue
        if which == "candidates":
            configs = triton24.candidates(kernel, m, n, k, dtype=dtype)
        else:
            configs = [triton24.default_config(kernel, m, n, k, dtype=dtype)]
        found += [spec_of(n, k, dtype, m, config) for config in configs if not config.refuse_for(dtype)]
    return found


def spec_of(n: int, k: int, dtype: torch.dtype, m: int, config) -> Spec:
    """One launch of ``config`` at ``n × k``, ``m`` tokens, ``dtype`` weights, made by the op's own builder."""
    values, codes = _layer(n, k, dtype)
    fp8 = dtype == FP8
    x, out = Stand((m, k), dtype), Stand((m, n), torch.bfloat16 if fp8 else dtype)
    scales = (Stand((m,), torch.float32), Stand((n,), torch.float32)) if fp8 else (None, None)
    partials = Stand((config.split_k, m, n), torch.float32) if config.split_k > 1 else None
    launches = triton24.launches(x, values, codes, out, partials, None, config, *scales)
    per_group = 2 * values.element_size() + 0.5  # two kept values and a 4-bit code
    if config.kernel == "decode":  # every warp reads its own step
        step = config.num_warps * triton24.ROWS * triton24.STEP_GROUPS * per_group
    else:
        step = config.block_n * config.block_g * per_group
    return Spec(f"apt-{config.kernel}", config.kernel, _name(dtype), n, k, m, config.as_dict(), launches[0],
                int(n * (k // 4) * per_group), int(step), launches[1:])  # fmt: skip


def auxiliary_specs(n: int, k: int, dtype: torch.dtype) -> list[Spec]:
    """The launches around the kernels: FP8's per-token quantization (per token count class) and the unpack of
    memory-first's large-M path."""
    values, codes = _layer(n, k, dtype)
    found = [Spec("apt-unpack", "unpack", _name(dtype), n, k, 0, None,
                  triton24.unpack_launch(values, codes, Stand((n, k), dtype)), 0, 0)]  # fmt: skip
    if dtype == FP8:
        for m in (1, 16):
            launch = triton24.quantize_launch(Stand((m, k), torch.bfloat16), Stand((m, k), FP8),
                                              Stand((m,), torch.float32), 448.0, 1.0 / (448 * 512))  # fmt: skip
            found.append(Spec("fp8-quantize", "quantize", _name(dtype), n, k, m, None, launch, 0, 0))
    return found


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# --- compiling -------------------------------------------------------------------------------------------------


def _tools() -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def _compile_inputs(launch: triton24.Launch, arch: int):
    """``(source, target, options, key)``: the launch as Triton's launcher would compile it for ``arch``."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = triton24._kernel(launch.kernel)
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(launch.constexprs, num_warps=launch.num_warps, num_stages=launch.num_stages)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    if fn.is_gluon():
        from triton.experimental.gluon._runtime import GluonASTSource as source_class
    else:
        source_class = ASTSource
    constants = sorted((str(k), repr(v)) for k, v in constexprs.items())
    key = json.dumps([launch.kernel, arch, sorted(signature.items()), constants, repr(sorted(attrs.items())),
                      launch.num_warps, launch.num_stages])  # fmt: skip
    return source_class(fn, signature, constexprs, attrs), target, options.__dict__, key


def _compile(task) -> dict:
    """Compile one launch for one architecture (in a worker process) and read its cubin."""
    launch, arch, cubin_dir = task
    import triton

    try:
        source, target, options, key = _compile_inputs(launch, arch)
        began = time.perf_counter()
        compiled = triton.compile(source, target=target, options=options)
    except Exception as err:  # the compiler's refusal is the finding
        return {"compiled": False, "error": f"{type(err).__name__}: {_first_line(err)}"}
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    cubin = Path(cubin_dir) / f"{launch.kernel}-sm{arch}-{digest}.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    ptx = compiled.asm.get("ptx", "")
    found = {"compiled": True, "error": None, "cubin": cubin.name, "seconds": round(time.perf_counter() - began, 2)}
    found |= read_cubin(cubin)
    found["shared_bytes"] = int(compiled.metadata.shared)
    found["approximate_division"] = bool(re.search(r"\bdiv\.(full|approx)\.f32\b", ptx))
    return found


def _first_line(err: Exception) -> str:
    """The compiler's reason: the innermost cause's last line (a CompilationError's first lines are source)."""
    while err.__cause__ is not None or err.__context__ is not None:
        err = err.__cause__ or err.__context__
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return (lines[-1] if lines else type(err).__name__)[:300]


def read_cubin(path: Path) -> dict:
    """Registers, spills and the main loop of a cubin (``cuobjdump --dump-resource-usage``, ``nvdisasm``)."""
    tools = _tools()
    usage = subprocess.run([str(tools / "cuobjdump"), "--dump-resource-usage", str(path)], capture_output=True,
                           text=True, check=True).stdout  # fmt: skip
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    sass = subprocess.run([str(tools / "nvdisasm"), "-c", str(path)], capture_output=True, text=True, check=True).stdout
    return {
        "registers": int(fields.get("REG", 0)),
        "spill_bytes": int(fields.get("STACK", 0)) + int(fields.get("LOCAL", 0)),
        "static_shared_bytes": int(fields.get("SHARED", 0)),
        "loop": main_loop(sass),
    }


_INSTRUCTION = re.compile(r"^\s*/\*([0-9a-f]+)\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_BRANCH = re.compile(r"\bBRA(?:\.\w+)*\s+(?:!?U?P\w+,\s*)?`?\(?(\.L_x_\d+)")  # BRA.U !UP0, `(.L_x_1)


def main_loop(sass: str) -> dict | None:
    """The innermost loop holding the most global loads (the K loop), as counts: its instructions (NOPs left
    out), the mnemonic histogram, and the categories the model reads. ``None`` where the kernel has no loop."""
    instructions, labels = [], {}
    for line in sass.splitlines():
        label = _LABEL.match(line)
        if label:
            labels[label.group(1)] = len(instructions)
            continue
        found = _INSTRUCTION.match(line)
        if found:
            instructions.append(re.sub(r"^@!?U?P\w+\s+", "", found.group(2)))
    loops = []
    for end, text in enumerate(instructions):
        branch = _BRANCH.search(text)
        if branch and labels.get(branch.group(1), end + 1) <= end:
            loops.append((labels[branch.group(1)], end))
    innermost = [(s, e) for s, e in loops if not any(s <= s2 and e2 <= e and (s2, e2) != (s, e) for s2, e2 in loops)]

    def loads(span):
        return sum(1 for text in instructions[span[0] : span[1] + 1] if text.startswith(("LDG", "LDGSTS")))

    candidates = [span for span in innermost if loads(span) > 0]
    if not candidates:
        return None
    start, end = max(candidates, key=lambda span: (loads(span), span[1] - span[0]))
    body = [text for text in instructions[start : end + 1] if not text.startswith("NOP")]
    mnemonics = Counter(text.split()[0] for text in body)
    global_loads = {m: c for m, c in mnemonics.items() if m.startswith(("LDG", "LDGSTS"))}
    shared = sum(c for m, c in mnemonics.items() if m.startswith(("LDS", "STS", "LDSM", "ATOMS")))
    shuffles = sum(c for m, c in mnemonics.items() if m.startswith("SHFL"))
    return {
        "instructions": len(body),
        "global_loads": dict(sorted(global_loads.items())),
        "shared_ops": shared,
        "shuffles": shuffles,
        "barriers": sum(c for m, c in mnemonics.items() if m.startswith("BAR")),
        "tensor_ops": sum(c for m, c in mnemonics.items() if m.startswith(("HMMA", "HGMMA", "QGMMA", "IMMA"))),
        "selects": sum(c for m, c in mnemonics.items() if m.startswith(("SEL", "FSEL"))),
        "mnemonics": dict(mnemonics.most_common(16)),  # the sixteen most frequent: the loop at a glance
    }


# --- the model ---------------------------------------------------------------------------------------------------


def occupancy(registers: int, shared: int, warps: int, gpu: GPU) -> int:
    """Warps an SM keeps resident (registers allocated per warp in units of 256, shared memory, the warp and
    block limits)."""
    per_warp = math.ceil(max(registers, 1) * 32 / 256) * 256
    blocks = min(REGISTERS_PER_SM // (per_warp * warps), MAX_WARPS_PER_SM // warps, MAX_BLOCKS_PER_SM)
    if shared:
        blocks = min(blocks, gpu.shared_per_sm // (shared + SHARED_RESERVED))
    return blocks * warps


def predict(spec: Spec, compiled: dict, gpu: GPU) -> dict:
    """What the model predicts for one compiled launch on ``gpu`` (see the module docstring)."""
    launch = spec.launch
    warps = launch.num_warps
    programs = math.prod(launch.grid)
    resident = occupancy(compiled["registers"], compiled["shared_bytes"], warps, gpu)
    active = min(resident, programs / gpu.sms * warps)  # a grid smaller than a full wave leaves SMs idle
    found = {"warps_per_sm": resident, "active_warps_per_sm": round(active, 1), "programs": programs}
    loop = compiled.get("loop")
    if not spec.weight_bytes or loop is None:
        return found
    per_kb = 1024 / spec.step_bytes
    ins_kb = loop["instructions"] * warps * per_kb
    mio_kb = (loop["shared_ops"] + loop["shuffles"]) * warps * per_kb
    found |= {"ins_per_kb": round(ins_kb, 1), "mio_per_kb": round(mio_kb, 1),
              "barriers_per_step": loop["barriers"], "bytes_per_step": spec.step_bytes}  # fmt: skip
    if spec.m > MEMORY_BOUND_M:
        return found | {"not_predicted": f"M = {spec.m} > {MEMORY_BOUND_M}: compute-bound, outside the model"}
    clock = gpu.clock_ghz * 1e9
    bounds = {
        "issue": ISSUE_PER_CLOCK * ISSUE_EFFICIENCY * clock * gpu.sms * 1024 / ins_kb / 1e12,
        "mio": MIO_PER_CLOCK * clock * gpu.sms * 1024 / mio_kb / 1e12 if mio_kb else math.inf,
        "little": active * (spec.step_bytes / warps) / (LATENCY_NS * 1e-9) * gpu.sms / 1e12,
    }
    dense_bw, dense_from = gpu.dense_bandwidth(spec.dtype, spec.n, spec.k)
    if dense_bw is not None:
        bounds["dense_bandwidth"] = dense_bw
    bound = min(bounds, key=bounds.get)
    tb_s = bounds[bound]
    us = spec.weight_bytes / (tb_s * 1e6)
    for extra in spec.extra:  # split-K's reduce: one more launch, its partial sums read and the output written
        us += LAUNCH_US + 4 * spec.m * spec.n * (extra.constexprs["SPLIT_K"] + 1) / ((dense_bw or tb_s) * 1e6)
    found |= {"bounds_tb_s": {b: round(v, 2) for b, v in bounds.items()}, "bound": bound,
              "predicted_tb_s": round(spec.weight_bytes / (us * 1e6), 2), "predicted_us": round(us, 2),
              "launches": 1 + len(spec.extra)}  # fmt: skip
    if dense_bw is None:
        return found | {"ratio_not_predicted": dense_from}
    dense_bytes = spec.n * spec.k * (1 if spec.dtype == "float8_e4m3fn" else 2)
    dense_us = dense_bytes / (dense_bw * 1e6)
    return found | {"dense_us": round(dense_us, 2), "dense_from": dense_from, "ratio": round(dense_us / us, 3)}


def live_gpu(device, dense_tb_s: dict | None = None) -> GPU:
    """The GPU ``device`` is, for ``predict``: its SMs and compute capability asked of it, its clock from
    ``GPUS`` (the datasheet's boost clock of that architecture), ``dense_tb_s`` as measured in the caller's own
    run (``runtime_bench.gpu_suite`` passes the dense time it just measured at each shape)."""
    props = torch.cuda.get_device_properties(device)
    arch = props.major * 10 + props.minor
    known = GPUS.get(arch) or GPUS[90]
    source = f"{props.name}: SMs asked of the device, clock of the {known.name}, dense GEMV measured in this run"
    return GPU(props.name, arch, props.multi_processor_count, known.clock_ghz, known.shared_per_sm, dense_tb_s, source)


def predict_launch(n: int, k: int, dtype: torch.dtype, m: int, config, gpu: GPU) -> dict:
    """Compile one launch of ``config`` for ``gpu``'s architecture (in this process) and predict it: the record
    ``runtime_bench.gpu_suite`` keeps beside the time it measured for that launch."""
    spec = spec_of(n, k, dtype, m, config)
    compiled = _compile((spec.launch, gpu.arch, tempfile.mkdtemp(prefix="apt-aot-")))
    if not compiled["compiled"]:
        return {"compiled": False, "error": compiled["error"]}
    found = {"compiled": True, "registers": compiled["registers"], "spill_bytes": compiled["spill_bytes"]}
    return found | predict(spec, compiled, gpu)


# --- the run -----------------------------------------------------------------------------------------------------


def run(archs, out: Path, shapes=SHAPES, dtypes=DTYPES, tokens=TOKENS, which="candidates", jobs: int = 2,
        progress=None) -> dict:  # fmt: skip
    """Compile every launch for every architecture in ``archs`` and write ``out/manifest.json``, ``out/summary.md``
    and the cubins. Returns the manifest."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("serving.aot compiles for GPUs: run it without TRITON_INTERPRET=1 (the interpreter "
                           "replaces Triton's compiler in this process)")  # fmt: skip
    specs = []
    for name, (n, k) in shapes.items():
        for dtype in dtypes:
            for m in tokens:
                specs += [(name, s) for s in specs_for(n, k, dtype, m, which=which)]
            specs += [(name, s) for s in auxiliary_specs(n, k, dtype)]
    began = time.perf_counter()
    with atomic_directory(out, overwrite=True) as tmp:
        cubins = tmp / "cubins"
        cubins.mkdir()
        unique, rows = {}, []
        for arch in archs:
            for _, spec in specs:
                for launch in [spec.launch, *spec.extra]:
                    try:
                        key = _compile_inputs(launch, arch)[3]
                    except Exception as err:  # the binder refused the arguments: recorded like a compile error
                        key = f"unbound {launch.kernel} {arch} {_first_line(err)}"
                    unique.setdefault(key, (launch, arch))
        keys = list(unique)
        tasks = [(*unique[key], str(cubins)) for key in keys]
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            results = {}
            for i, result in enumerate(pool.map(_compile, tasks, chunksize=1)):
                results[keys[i]] = result
                if progress:
                    progress(i + 1, len(tasks), tasks[i][0].kernel, tasks[i][1])
        for arch in archs:
            gpu = GPUS.get(arch)
            for name, spec in specs:
                key = _key_or_unbound(spec.launch, arch)
                compiled = results[key]
                row = {"shape": name, "path": spec.path, "kernel": spec.kernel, "arch": f"sm{arch}",
                       "dtype": spec.dtype, "n": spec.n, "k": spec.k, "m": spec.m, "config": spec.config,
                       "grid": list(spec.launch.grid), "num_warps": spec.launch.num_warps}  # fmt: skip
                row |= {k: v for k, v in compiled.items() if k != "seconds"}
                if compiled["compiled"] and gpu is not None:
                    row["model"] = predict(spec, compiled, gpu)
                    extra_failed = [results[_key_or_unbound(e, arch)] for e in spec.extra]
                    if any(not e["compiled"] for e in extra_failed):
                        row["error"] = "its reduce launch does not compile: " + extra_failed[0]["error"]
                        row["compiled"] = False
                rows.append(row)
        manifest = {
            "command": "python -m serving.aot " + " ".join(sys.argv[1:]) if sys.argv[0].endswith("aot.py") else None,
            "triton": _triton_version(),
            "archs": [f"sm{a}" for a in archs],
            "gpus": {
                f"sm{a}": asdict(GPUS[a]) | {"dense_tb_s": _plain(GPUS[a].dense_tb_s)} for a in archs if a in GPUS
            },
            "model": {
                "memory_bound_m": MEMORY_BOUND_M,
                "issue_per_clock": ISSUE_PER_CLOCK,
                "issue_efficiency": ISSUE_EFFICIENCY,
                "mio_per_clock": MIO_PER_CLOCK,
                "latency_ns": LATENCY_NS,
                "launch_us": LAUNCH_US,
            },  # fmt: skip
            "compiles": len(tasks),
            "seconds": round(time.perf_counter() - began, 1),
            "rows": rows,
        }
        (tmp / "manifest.json").write_text(_manifest_text(manifest))
        (tmp / "summary.md").write_text(summary(manifest))
    return manifest


def _manifest_text(manifest: dict) -> str:
    """The manifest as JSON with one row a line (thousands of rows: readable, diffable, a few MB)."""
    head = {key: value for key, value in manifest.items() if key != "rows"}
    rows = ",\n".join(json.dumps(row, separators=(",", ":")) for row in manifest["rows"])
    return json.dumps(head, indent=1)[:-2] + ',\n "rows": [\n' + rows + "\n]}\n"


def _key_or_unbound(launch, arch) -> str:
    try:
        return _compile_inputs(launch, arch)[3]
    except Exception as err:
        return f"unbound {launch.kernel} {arch} {_first_line(err)}"


def _plain(table):
    return {f"{f}:{n}x{k}": v for (f, n, k), v in table.items()} if table else None


def _triton_version() -> str:
    import triton

    return triton.__version__


def dispatchable(row: dict) -> bool:
    """A kernel launch (not an auxiliary one) the op may dispatch."""
    return row["path"] in ("apt-decode", "apt-gemv", "apt-mma")


def summary(manifest: dict) -> str:
    """The manifest in words: failures and spills, then per shape, dtype and M the default launches' predictions
    and the best candidate's."""
    rows = manifest["rows"]
    archs = ", ".join(manifest["archs"])
    lines = [f"# Ahead-of-time compile of our 2:4 kernels ({archs}, triton {manifest['triton']})", ""]
    lines += [f"{len(rows)} launches, {manifest['compiles']} distinct compiles, {manifest['seconds']} s.", ""]
    failed = Counter((r["arch"], r["kernel"], r["dtype"], r["error"]) for r in rows if not r["compiled"])
    spilled = [r for r in rows if r.get("compiled") and r.get("spill_bytes")]
    division = {(r["arch"], r["kernel"]) for r in rows if r.get("approximate_division")}
    lines += ["## Failures, spills, approximate division", ""]
    lines += [f"- {c} × {arch} {kernel} {dtype}: {error}" for (arch, kernel, dtype, error), c in failed.items()] or [
        "- every launch compiled"]  # fmt: skip
    lines += [f"- spills: {r['arch']} {r['kernel']} {r['dtype']} {r['config']} ({r['spill_bytes']} B)" for r in spilled]
    lines += [f"- approximate division in {arch} {kernel}" for arch, kernel in sorted(division)]
    lines += ["", "## Predicted decode throughput (memory-bound launches, M <= 64)", ""]
    lines += ["| arch | shape | dtype | M | path | launch | regs | ins/KB | MIO/KB | bound | TB/s | ratio to dense |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    best = {}
    for r in rows:
        model = r.get("model") or {}
        if not dispatchable(r) or "predicted_tb_s" not in model:
            continue
        key = (r["arch"], r["shape"], r["dtype"], r["m"], r["path"])
        if key not in best or model["predicted_tb_s"] > best[key]["model"]["predicted_tb_s"]:
            best[key] = r
    for (arch, shape, dtype, m, path), r in sorted(best.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2],
                                                                                 kv[0][3], kv[0][4])):  # fmt: skip
        model, c = r["model"], r["config"]
        launch = f"{c['block_m']}x{c['block_n']}x{c['block_g']} s{c['split_k']} w{c['num_warps']}"
        launch += " wide" if c["wide_codes"] else ""
        ratio = model.get("ratio", "n/a")
        lines.append(f"| {arch} | {shape} | {dtype} | {m} | {path} | {launch} | {r['registers']} | "
                     f"{model['ins_per_kb']} | {model['mio_per_kb']} | {model['bound']} | {model['predicted_tb_s']} | "
                     f"{ratio} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving.aot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="80,90", help="compute capabilities, e.g. 80,90 (100: Blackwell)")
    parser.add_argument("--out", required=True, type=Path, help="the folder to write (replaced atomically)")
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"of {', '.join(SHAPES)}")
    parser.add_argument("--dtypes", default="float16,bfloat16,float8_e4m3fn")
    parser.add_argument("--tokens", default=",".join(map(str, TOKENS)), help="token counts M")
    parser.add_argument("--defaults-only", action="store_true", help="the default launches, not every candidate")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        archs = [int(a) for a in args.arch.split(",")]
        shapes = {s: SHAPES[s] for s in args.shapes.split(",")}
        dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
        tokens = [int(m) for m in args.tokens.split(",")]
    except (ValueError, KeyError, AttributeError) as err:
        parser.error(f"bad argument: {err}")
    from tqdm import tqdm

    bar = tqdm(desc="compiling", unit="kernel")

    def progress(done, total, kernel, arch):
        bar.total = total
        bar.set_postfix_str(f"{kernel} sm{arch}")
        bar.update(1)

    manifest = run(archs, args.out, shapes, dtypes, tokens, "defaults" if args.defaults_only else "candidates",
                   args.jobs, progress)  # fmt: skip
    bar.close()
    print(summary(manifest))
    print(f"wrote {args.out / 'manifest.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
