"""Choosing a shape's dispatch from measured times, and measuring one (here eagerly, on the CPU)."""

import math

import pytest
import torch

from serving.sparse_op import MEMORY_FIRST, SPEED_FIRST
from serving.triton24 import KernelConfig
from serving.tuning import bands_from, measure_shape, speedups

from .interpreter import interpreter_fixes, needs_kernels, sparse_weight  # noqa: F401

GEMV = KernelConfig("gemv", 1, 64, 128, 8).as_dict()
GEMV4 = KernelConfig("gemv", 4, 32, 64, 4).as_dict()
MMA = KernelConfig("mma", 16, 64, 32, 8).as_dict()


def _row(m, times, config, errors=None):
    return {
        "m": m,
        "graphed": {path: {"median": t} for path, t in times.items()},
        "error": errors or {path: 1e-4 for path in times},
        "config": config,
        "alg_id": 3,
    }


MEASURED = {
    "rows": [
        _row(1, {"dense": 10.0, "apt-gemv": 6.0, "apt-mma": 12.0, "cusparselt": 15.0}, {"gemv": GEMV, "mma": MMA}),
        _row(4, {"dense": 10.0, "apt-gemv": 7.0, "apt-mma": 9.0, "cusparselt": 15.0}, {"gemv": GEMV4, "mma": MMA}),
        _row(16, {"dense": 10.0, "apt-mma": 9.95, "cusparselt": 14.0}, {"mma": MMA}),
        _row(256, {"dense": 20.0, "apt-mma": 25.0, "cusparselt": 14.0, "apt-unpack": 22.0}, {"mma": MMA}),
        _row(4096, {"dense": 200.0, "apt-mma": 260.0, "cusparselt": 140.0, "apt-unpack": 210.0}, {"mma": MMA}),
    ]
}


def test_speed_first_takes_a_sparse_path_only_where_it_beats_dense_by_the_margin():
    dispatch = bands_from(MEASURED, SPEED_FIRST)
    # M=16: apt-mma is faster than dense by 0.5 %, inside the 2 % margin: dense there.
    assert dispatch.describe() == "M 1-1: apt-gemv; M 2-4: apt-gemv; M 5-16: dense; M 17+: cusparselt"
    assert dispatch.bands[1].config == KernelConfig(**GEMV4) and dispatch.bands[-1].alg_id == 3


def test_memory_first_takes_the_fastest_of_our_paths_even_when_slower_than_dense():
    dispatch = bands_from(MEASURED, MEMORY_FIRST)
    assert dispatch.describe() == "M 1-1: apt-gemv; M 2-4: apt-gemv; M 5-16: apt-mma; M 17+: apt-unpack"
    dispatch.check_mode(MEMORY_FIRST)


def test_a_path_whose_output_was_not_finite_is_never_chosen():
    broken = {"rows": [_row(1, {"dense": 10.0, "apt-gemv": 1.0}, {"gemv": GEMV}, {"dense": 0.0, "apt-gemv": math.inf})]}
    assert bands_from(broken, SPEED_FIRST).describe() == "M 1+: dense"
    with pytest.raises(ValueError, match="none of our paths was measured at M=1"):
        bands_from(broken, MEMORY_FIRST)


def test_a_path_rejected_against_its_tolerance_is_never_chosen():
    """A kernel that gives a wrong product fast (what an unchecked compiled kernel could do) loses to dense."""
    wrong = {"rows": [_row(1, {"dense": 10.0, "apt-gemv": 1.0}, {"gemv": GEMV})]}
    wrong["rows"][0]["rejected"] = {"apt-gemv": "relative error 0.9 over the tolerance 0.005"}
    assert bands_from(wrong, SPEED_FIRST).describe() == "M 1+: dense"


def test_speedups_are_dense_over_path():
    assert speedups(MEASURED["rows"][0]) == {"apt-gemv": 10 / 6, "apt-mma": 10 / 12, "cusparselt": 10 / 15}


@needs_kernels
def test_measure_shape_times_every_path_it_can_and_says_what_it_could_not():
    weight = sparse_weight(48, 128)
    measured = measure_shape(weight, ms=(1, 3, 16, 80), repeats=1, rotate_bytes=0)
    assert [row["m"] for row in measured["rows"]] == [1, 3, 16, 80]
    first, last = measured["rows"][0], measured["rows"][-1]
    assert set(first["eager"]) == {"dense", "apt-decode", "apt-gemv", "apt-mma"}
    # decode to 64 tokens, gemv to 8, unpack from 64
    assert set(last["eager"]) == {"dense", "apt-mma", "apt-unpack"}
    assert all(error < 2e-3 for row in measured["rows"] for error in row["error"].values())
    assert not any(row["rejected"] for row in measured["rows"])
    assert set(measured["tuning"]) == {"decode M=1", "decode M=16", "gemv M=1", "mma M=16"}
    assert measured["rows"][2]["config"]["decode"]["block_m"] == 16  # the token tile follows M
    assert "graphed" in measured["not_measured"] and "cusparselt" in measured["not_measured"]
    memory_first = bands_from(measured, MEMORY_FIRST, timing="eager")  # which path wins is the timer's call
    memory_first.check_mode(MEMORY_FIRST)
    assert memory_first.band_for(1).path in ("apt-decode", "apt-gemv", "apt-mma")
    assert memory_first.band_for(80).path != "dense"


@needs_kernels
def test_measure_shape_times_fp8_paths_against_the_w8a8_product(interpreter_fixes):  # noqa: F811
    weight = sparse_weight(48, 128, torch.float32)
    scale = weight.abs().amax(1) / 448
    quantized = (weight / scale[:, None]).to(torch.float8_e4m3fn)
    measured = measure_shape(quantized, ms=(1, 16, 80), weight_scale=scale, repeats=1, rotate_bytes=0)
    assert measured["dtype"] == "float8_e4m3fn"
    assert {"dense", "apt-decode", "apt-gemv", "apt-mma"} == set(measured["rows"][0]["eager"])
    assert all(err < 1e-2 for row in measured["rows"] for err in row["error"].values())  # bf16 outputs
