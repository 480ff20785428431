"""``serving.aot``: its SASS reader and its model on fixed inputs, then the ahead-of-time check itself — every
launch the tests use (each kernel's default at the bench's shapes, one and sixteen tokens, fp16 and FP8),
compiled for sm80 and sm90 exactly as the launcher specialises it and judged from its cubin. Compiling needs
no GPU; it runs in a process of its own, without TRITON_INTERPRET (the interpreter replaces the compiler)."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from serving import aot, triton24
from serving.triton24 import KernelConfig

SASS = """
        /*0000*/                   LDC R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   LDG.E R2, desc[UR4][R4.64] ;
        /*0020*/                   SHFL.BFLY PT, R3, R2, 0x1, 0x1f ;
        /*0030*/               @P0 BRA `(.L_x_0) ;
.L_x_1:
        /*0040*/                   LDG.E.128 R8, desc[UR4][R6.64] ;
        /*0050*/                   LDG.E.128 R12, desc[UR4][R6.64+0x10] ;
        /*0060*/                   HMMA.16816.F32 R16, R8, R12, R16 ;
        /*0070*/                   STS [R0], R16 ;
        /*0080*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0090*/                   NOP ;
.L_x_2:
        /*00a0*/                   SEL R3, R2, RZ, P1 ;
        /*00b0*/              @!P1 BRA `(.L_x_2) ;
        /*00c0*/                   BRA.U !UP0, `(.L_x_1) ;
        /*00d0*/                   EXIT ;
"""


def test_the_main_loop_is_the_innermost_loop_holding_the_most_global_loads():
    """Loops nest by their backward branches: the outer one (.L_x_1) holds an inner select loop, so it is not
    innermost; of the innermost loops only .L_x_0 loads from global memory."""
    loop = aot.main_loop(SASS)
    assert loop["instructions"] == 3 and loop["global_loads"] == {"LDG.E": 1} and loop["shuffles"] == 1
    flat = SASS.replace("@!P1 BRA `(.L_x_2) ;", "SEL R4, R2, RZ, P1 ;").replace("@P0 BRA `(.L_x_0) ;", "NOP ;")
    loop = aot.main_loop(flat)  # now .L_x_1 (a Blackwell-style `BRA.U !UP0,` branch) is the only loop
    assert loop["global_loads"] == {"LDG.E.128": 2} and loop["instructions"] == 8  # NOPs not counted
    assert (loop["shared_ops"], loop["barriers"], loop["tensor_ops"], loop["selects"]) == (1, 1, 1, 2)
    assert aot.main_loop("        /*0000*/                   EXIT ;") is None


def test_occupancy_allocates_registers_per_warp_in_units_of_256_and_counts_shared_memory():
    h200 = aot.GPUS[90]
    assert aot.occupancy(64, 0, 8, h200) == 32  # 2048 registers a warp: 4 blocks of 8 warps
    assert aot.occupancy(65, 0, 8, h200) == 24  # 72 a thread after rounding: 3 blocks
    assert aot.occupancy(32, 100 * 1024, 4, h200) == 8  # shared memory: 2 blocks of (100 + 1) KB in 227 KB


def test_the_model_predicts_the_least_of_its_bounds():
    """A small grid (64 programs of 4 warps on 100 SMs) leaves too few bytes in flight: Little's law binds."""
    gpu = aot.GPU("test", 90, 100, 2.0, 200 * 1024, {("half", 1024, 4096): 3.0}, "fixed for the test")
    spec = aot.spec_of(1024, 4096, torch.float16, 1, KernelConfig("decode", 8, 16, 32, num_warps=4))
    assert spec.launch.grid == (64, 1) and spec.step_bytes == 4 * 16 * 32 * 4.5
    assert spec.weight_bytes == 1024 * 1024 * 4.5 and spec.extra == []
    compiled = {"registers": 64, "shared_bytes": 0, "loop": {"instructions": 100, "shared_ops": 0, "shuffles": 0,
                                                             "barriers": 0}}  # fmt: skip
    model = aot.predict(spec, compiled, gpu)
    active = 64 / 100 * 4
    little = active * spec.step_bytes / 4 / 750e-9 * 100 / 1e12
    assert model["active_warps_per_sm"] == round(active, 1) and model["bound"] == "little"
    assert model["bounds_tb_s"]["issue"] == round(4 * 0.6 * 2e9 * 100 * 1024 / (100 * 4 * 1024 / 9216) / 1e12, 2)
    assert model["predicted_tb_s"] == round(little, 2) and model["launches"] == 1
    dense_us = 1024 * 4096 * 2 / 3.0e6
    assert model["ratio"] == round(dense_us / (spec.weight_bytes / (little * 1e6)), 3)
    split = aot.spec_of(1024, 4096, torch.float16, 1, KernelConfig("gemv", 1, 32, 64, split_k=4))
    assert [launch.kernel for launch in split.extra] == ["reduce"]
    assert aot.predict(split, compiled, gpu)["launches"] == 2  # split-K's reduction costs a launch
    assert "not_predicted" in aot.predict(aot.spec_of(1024, 4096, torch.float16, 128, triton24.default_config(
        "mma", 128, 1024, 4096)), compiled, gpu)  # fmt: skip


def test_stand_ins_carry_the_addresses_the_binder_specialises_on():
    """The second value plane starts N · K/4 elements after the first: 16-byte aligned or not, as on a GPU."""
    values, codes = aot._layer(4096, 11008, torch.float16)
    assert values[1].data_ptr() - values.data_ptr() == 4096 * 2752 * 2 and values[1].stride(0) == 2752
    assert codes.data_ptr() % 16 == 0 and codes.stride(0) == 344
    odd, _ = aot._layer(3, 40, torch.float16)
    assert odd[1].data_ptr() - odd.data_ptr() == 60  # 3 · 10 fp16: plane 1 is not 16-byte aligned


COMPILE = """
import json, sys, torch
from serving import aot
shapes = {name: aot.SHAPES[name] for name in ("gate_up", "down", "qo", "down_l2")}
aot.run([80, 90], sys.argv[1] + "/main", shapes, (torch.float16, torch.float8_e4m3fn), (1, 16), "defaults", 2)
# FP8 mma at BLOCK_M >= 64: wgmma, whose sums must be promoted to float32 (one shape is enough)
aot.run([90], sys.argv[1] + "/fp8_64", {"qo": aot.SHAPES["qo"]}, (torch.float8_e4m3fn,), (64,), "defaults", 2)
"""


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Two manifests: the defaults at the bench's shapes for sm80 and sm90, and FP8 at 64 tokens for sm90."""
    pytest.importorskip("triton")
    out = tmp_path_factory.mktemp("aot")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", COMPILE, str(out)], env=env, capture_output=True, text=True,
                         timeout=1200)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    return [json.loads((out / part / "manifest.json").read_text())["rows"] for part in ("main", "fp8_64")]


def _rows(rows, **match):
    found = [r for r in rows if all(r[k] == v for k, v in match.items())]
    assert found, match
    return found


def test_every_launch_compiles_where_the_op_dispatches_it_and_fp8_never_on_sm80(compiled):
    """sm90: everything. sm80: everything but FP8, which Triton cannot compile there ("fp8e4nv not supported"),
    and which the op therefore never sends to our kernels on sm80 (triton24.available, sparse_op.fp8_fallback)."""
    rows, _ = compiled
    for row in rows:
        fp8_on_sm80 = row["arch"] == "sm80" and row["dtype"] == "float8_e4m3fn"
        assert row["compiled"] != fp8_on_sm80, row
        if fp8_on_sm80:
            assert "fp8e4nv not supported" in row["error"]
    capability = torch.cuda.get_device_capability
    try:
        torch.cuda.get_device_capability = lambda device=None: (8, 0)
        assert not triton24.available("cuda", torch.float8_e4m3fn)[0]
        assert triton24.available("cuda", torch.float16)[0]
    finally:
        torch.cuda.get_device_capability = capability


def test_no_launch_spills_and_no_kernel_divides_approximately(compiled):
    for row in (r for rows in compiled for r in rows if r["compiled"]):
        assert row["spill_bytes"] == 0, row
        assert not row["approximate_division"], row  # the FP8 quantizer divides with div_rn


def test_the_decode_kernel_meets_its_budget_from_its_compiled_code(compiled):
    """sm90, at the H200's figures: one launch at every shape; a main loop without shared memory, shuffles or
    barriers and with 16-byte weight loads (K = 11008 too); M = 1 streams >= 2.9 TB/s (fp16); M = 16 >= 1.3x
    dense; FP8 at M = 1 >= 1.2x dense FP8."""
    rows, _ = compiled
    for row in _rows(rows, arch="sm90", path="apt-decode"):
        loop, model = row["loop"], row["model"]
        assert (loop["shared_ops"], loop["shuffles"], loop["barriers"]) == (0, 0, 0), row["shape"]
        assert model["launches"] == 1
        if row["dtype"] == "float16":
            assert loop["global_loads"].get("LDG.E.128", 0) >= 4, (row["shape"], loop["global_loads"])
    for shape in ("gate_up", "down", "qo"):
        (one,) = _rows(rows, arch="sm90", path="apt-decode", dtype="float16", shape=shape, m=1)
        assert one["model"]["predicted_tb_s"] >= 2.9, one["model"]
        (sixteen,) = _rows(rows, arch="sm90", path="apt-decode", dtype="float16", shape=shape, m=16)
        assert sixteen["model"]["ratio"] >= 1.3, sixteen["model"]
        (fp8,) = _rows(rows, arch="sm90", path="apt-decode", dtype="float8_e4m3fn", shape=shape, m=1)
        assert fp8["model"]["ratio"] >= 1.2, fp8["model"]


def test_the_gemv_keeps_16_byte_loads_when_k_is_11008(compiled):
    """K = 11008: a 344-word code row. Its strides reach the kernel as whole vectors, so the values still load
    16 bytes at a time (they compiled to scalar 16-bit loads at 184 registers before)."""
    rows, _ = compiled
    (row,) = _rows(rows, arch="sm90", path="apt-gemv", dtype="float16", shape="down_l2", m=1)
    assert row["loop"]["global_loads"].get("LDG.E.128", 0) > 0 and row["registers"] < 184, row["loop"]


def test_fp8_wgmma_sums_are_promoted_to_float32_after_every_instruction(compiled):
    """FP8 mma at BLOCK_M = 64 on sm90 compiles to QGMMA; with Triton's default the whole K would accumulate at
    reduced precision. Promoted, each QGMMA's 32 partial sums per thread are added into the float32 tile."""
    _, rows = compiled
    (row,) = _rows(rows, arch="sm90", path="apt-mma")
    loop = row["loop"]
    qgmma = loop["tensor_ops"]  # the FP8 tile's only tensor instruction: the manifest keeps 16 mnemonics, not all
    assert qgmma > 0 and loop["mnemonics"].get("FADD", 0) >= 16 * qgmma, loop
    assert not math.isnan(row["model"]["ins_per_kb"])
