"""How timed rows are taken and judged (serving.timing, serving.machine_load): the statistics on hand-computed
samples, the interleaving order, and the noise marking of a row from an injected load record, down to the
report, which must not present a noisy row's ratio as a speedup or a slowdown."""

import itertools
import math
import os

import pytest

from runtime_bench.bench import comparison
from runtime_bench.report import render_report
from serving.machine_load import SHARED_MARGIN, Snapshot, judge, load_between
from serving.timing import MIN_SAMPLES, noise, quartiles, ratio, sample_interleaved, sign_interval, summary, verdict


def test_summary_is_the_median_with_its_quartiles_extremes_and_count():
    assert summary([5.0, 1.0, 4.0, 2.0, 3.0]) == {
        "median": 3.0,
        "q1": 2.0,  # with 5 samples: the second smallest and the second largest
        "q3": 4.0,
        "min": 1.0,
        "max": 5.0,
        "n": 5,
        "spread": 2.0 / 3.0,
    }
    # linear interpolation between order statistics (numpy's default): positions 0.75 and 2.25 of 0..3
    assert quartiles([4.0, 1.0, 3.0, 2.0]) == (1.75, 2.5, 3.25)
    one = summary([7.0])
    assert (one["median"], one["q1"], one["q3"], one["n"], one["spread"]) == (7.0, 7.0, 7.0, 1, 0.0)


def test_runs_are_interleaved_after_a_discarded_warm_up():
    calls = []

    def run(name):
        def sample():
            calls.append(name)
            return float(len(calls))  # the call's position: shows which calls became samples

        return sample

    samples = sample_interleaved({"A": run("A"), "B": run("B")}, warmup=2, min_samples=5)
    assert calls == ["A", "B"] * 7  # two warm-up rounds, then five timed ones, each A then B
    assert samples == {"A": [5.0, 7.0, 9.0, 11.0, 13.0], "B": [6.0, 8.0, 10.0, 12.0, 14.0]}


def test_cheap_runs_take_more_samples_until_the_minimum_time():
    ticks = itertools.count()  # the clock reads 0 when timing starts, then 1, 2, … after each round
    samples = sample_interleaved(
        {"A": lambda: 1.0}, warmup=0, min_samples=MIN_SAMPLES, min_seconds=7, clock=lambda: next(ticks)
    )
    assert len(samples["A"]) == 7
    ticks = itertools.count()
    capped = sample_interleaved({"A": lambda: 1.0}, warmup=0, min_seconds=100, max_samples=9, clock=lambda: next(ticks))
    assert len(capped["A"]) == 9
    with pytest.raises(ValueError, match="min_samples <= max_samples"):
        sample_interleaved({"A": lambda: 1.0}, min_samples=6, max_samples=5)


def test_a_ratio_pairs_samples_by_round_with_the_sign_test_interval_of_its_median():
    dense = [10.0, 20.0, 30.0, 40.0, 50.0]
    pruned = [10.0, 10.0, 10.0, 10.0, 25.0]
    # per round 1, 2, 3, 4, 2: median 2, while the ratio of the medians would be 3
    assert ratio(dense, pruned) == {"median": 2.0, "low": 1.0, "high": 4.0, "confidence": 1 - 2 / 2**5, "n": 5}
    ten = ratio([float(i) for i in range(1, 11)], [1.0] * 10)
    # n = 10: [x(2), x(9)] covers the median with 1 - 2·(1 + 10)/1024; [x(3), x(8)] only 0.89
    assert (ten["low"], ten["high"], ten["confidence"]) == (2.0, 9.0, 1 - 2 * 11 / 1024)
    with pytest.raises(ValueError, match="paired samples"):
        ratio([1.0, 2.0], [1.0])


@pytest.mark.parametrize("n", [5, 6, 9, 10, 20, 33])
def test_the_sign_interval_is_the_narrowest_reaching_95_percent(n):
    def coverage(k):  # P(x(k) <= median <= x(n+1-k)) for a continuous distribution
        return 1 - 2 * sum(math.comb(n, j) for j in range(k)) / 2**n

    k, achieved = sign_interval(n)
    assert achieved == coverage(k)
    assert k == 1 or achieved >= 0.95
    assert k + 1 > (n + 1) // 2 or coverage(k + 1) < 0.95


def test_a_verdict_needs_an_interval_clear_of_one_and_no_noise():
    assert verdict({"median": 1.3, "low": 1.1, "high": 1.5}, []) == "faster"
    assert verdict({"median": 0.7, "low": 0.5, "high": 0.9}, []) == "slower"
    assert verdict({"median": 1.01, "low": 0.97, "high": 1.04}, []) == "no difference"
    assert verdict({"median": 10.0, "low": 9.0, "high": 11.0}, ["cores shared"]) == "not judged"


def idle_record(**changes):
    record = {"seconds": 10.0, "other_cores": 0.03, "steal_cores": 0.0, "load_1m": 0.2, "cores": 2, "threads": 2}
    return record | {"busiest": [], "recorded": True} | changes


def test_cores_are_shared_when_others_take_more_than_pytorch_leaves_free():
    assert judge(idle_record())["shared"] is False
    spinning = judge(idle_record(other_cores=0.98, busiest=[{"pid": 4242, "name": "python3", "cores": 0.97}]))
    assert spinning["shared"] is True
    assert spinning["why_shared"] == "cores shared: other processes took 0.98 of 2 cores while PyTorch ran 2 threads"
    # PyTorch on one of two cores leaves one free: a process spinning on the other does not share it
    assert judge(idle_record(other_cores=0.98, threads=1))["shared"] is False
    # the hypervisor taking the time counts as much as a process
    assert judge(idle_record(other_cores=0.0, steal_cores=0.5))["shared"] is True
    # a 0.1 s window resolves /proc/stat's 10 ms ticks only to 0.3 cores: 0.5 is within margin and resolution
    assert judge(idle_record(other_cores=0.5, seconds=0.1))["shared"] is False
    assert judge(idle_record(other_cores=0.5, seconds=10.0))["shared"] is True
    assert judge({"seconds": 1.0, "cores": 2, "threads": 2, "recorded": False})["shared"] is None


def test_a_load_record_counts_the_machines_busy_time_less_this_process():
    cores = len(os.sched_getaffinity(0))
    before = Snapshot(wall=100.0, busy=50.0, steal=1.0, own=20.0, processes={7: ("make", 3.0), 8: ("sh", 1.0)})
    # over 4 s: the machine's cores were busy 7 s, 3 s of it this process; "make" took 2.4 s, "sh" nothing,
    # a compiler (pid 9) that started in the window 0.8 s
    after = Snapshot(
        wall=104.0,
        busy=57.0,
        steal=1.4,
        own=23.0,
        processes={7: ("make", 5.4), 8: ("sh", 1.0), 9: ("cc1", 0.8)},
        load_average=(1.5, 1.0, 0.5),
    )
    record = load_between(before, after, threads=cores)
    assert record["other_cores"] == pytest.approx(1.0) and record["steal_cores"] == pytest.approx(0.1)
    assert record["busiest"] == [{"pid": 7, "name": "make", "cores": 0.6}, {"pid": 9, "name": "cc1", "cores": 0.2}]
    assert (record["load_1m"], record["cores"], record["threads"]) == (1.5, cores, cores)
    assert record["shared"] == (1.1 > SHARED_MARGIN + (cores + 1) * 0.01 / 4)


def test_a_row_is_noisy_for_its_spread_its_count_or_shared_cores():
    steady = summary([100.0, 101.0, 102.0, 103.0, 104.0])
    assert noise(steady, judge(idle_record())) == []
    wide = summary([100.0, 80.0, 120.0, 60.0, 140.0])
    assert noise(wide) == ["spread 40% of the median (interquartile range; above 10%)"]
    assert noise(summary([1.0, 1.0])) == ["only 2 samples (fewer than 5)"]
    shared = judge(idle_record(other_cores=1.0))
    assert noise(steady, shared) == [shared["why_shared"]]


def _results(shared_load: dict) -> dict:
    """A results.json with one GEMM record and vLLM rows at two batch sizes; batch 8 timed under ``shared_load``."""
    idle = judge(idle_record())
    result = summary([100.0, 101.0, 102.0, 103.0, 104.0])
    rows, comparisons = [], []
    for batch, load in ((1, idle), (8, shared_load)):
        reasons = noise(result, load)
        for model, backend in (("dense", "vllm"), ("pruned", "vllm + apt_sparse_24 plugin")):
            rows.append({"model": model, "backend": backend, "batch": batch, "seq": 128, "result": result})
            rows[-1] |= {"load": load, "noise": reasons}
        speedup = {"median": 10.0 if batch == 8 else 1.01, "low": 0.97, "high": 12.0, "confidence": 0.9375, "n": 5}
        shape = {"batch": batch, "seq": 128}
        comparisons.append(comparison("prefill", shape, "dense · vllm", "pruned · vllm + plugin", speedup, reasons))
    gemm = {"shape": "model q 64x64", "in": 64, "out": 64, "m": 1, "dense_ms": result, "tflops_dense": 1.0}
    machine = {"platform": "p", "processor": "x", "torch_threads": 2, "torch": "t", "gpu": None}
    return {
        "created": "now",
        "machine": machine | {"transformers": "5", "onnxruntime": None},
        "timing": {"min_samples": 5, "max_spread": 0.1, "shared_margin_cores": 0.25, "seconds": 60.0},
        "load": {"before": idle},
        "backends": {},
        "sparse_kernels": {"ran": True},
        "gemm": {
            "dtype": "float32",
            "device": "cpu",
            "sparse_backends": [],
            "records": [gemm | {"load": idle, "noise": []}],
        },
        "thresholds": {},
        "decode_safe": None,
        "e2e": {"prefill": rows, "decode": [], "comparisons": comparisons},
        "accuracy": {"metric": None, "dense": None, "methods": {}},
        "pruning": {},
        "not_measured": {},
    }


def test_the_report_marks_rows_timed_on_shared_cores_and_does_not_call_their_ratio_a_speedup(tmp_path):
    shared = judge(idle_record(other_cores=0.99, busiest=[{"pid": 31337, "name": "python3", "cores": 0.99}]))
    text = render_report(_results(shared), tmp_path).read_text()
    lines = text.splitlines()
    batch8 = [line for line in lines if line.startswith("| prefill |") and "| 8×128 |" in line]
    batch1 = [line for line in lines if line.startswith("| prefill |") and "| 1×128 |" in line]
    assert len(batch8) == 3 and len(batch1) == 3  # dense and pruned rows, and their comparison
    for line in batch8[:2]:
        assert line.endswith(
            "| 0.99 | **noisy**: cores shared: other processes took 0.99 of 2 cores while PyTorch ran 2 threads |"
        )
    assert "not presented (noisy rows) | not judged |" in batch8[2] and "10.00×" not in text
    for line in batch1[:2]:
        assert line.endswith("| 0.03 | — |")  # other processes' cores, no noise
    assert "| 1.01× (0.97–12.00, 94% interval, n 5) | no difference |" in batch1[2]
    assert "100.00–104.00" in batch1[0] and "101.00–103.00 (2%)" in batch1[0] and "| 5 |" in batch1[0]
    assert "**2 of 5 timed rows are marked noisy** (2 measured while other processes shared the cores)" in text
    assert "- rows marked noisy: 2 of 5" in text
    assert "- while timing, at its most (prefill dense · vllm 8×128): other processes took 0.99 of 2 cores" in text
    assert "busiest: python3 (pid 31337) 0.99" in text
