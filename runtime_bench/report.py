"""``report.md`` and its PNG plots from ``results.json``. Rows that were not measured say so and why; every timed
row shows its median with its spread and sample count, and a row marked noisy (its spread too wide, or the cores
shared with other processes while it ran) says so, and its ratio is not presented as a speedup or a slowdown."""

from __future__ import annotations

import os
from pathlib import Path

from apt.atomic import writing


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _fmt(result: dict, digits: int = 2) -> list[str]:
    """The cells of one timed figure: median, interquartile range, min–max, sample count."""
    d = digits
    return [
        f"{result['median']:.{d}f}",
        f"{result['q1']:.{d}f}–{result['q3']:.{d}f} ({result['spread']:.0%})",
        f"{result['min']:.{d}f}–{result['max']:.{d}f}",
        str(result["n"]),
    ]


def _noise_cell(reasons: list[str]) -> str:
    return "**noisy**: " + "; ".join(reasons) if reasons else "—"


def _speedup_cell(speedup: dict, reasons: list[str]) -> str:
    """A ratio with its interval, or, where its rows are noisy, that it is not presented."""
    if reasons:
        return "not presented (noisy rows)"
    return (
        f"{speedup['median']:.2f}× ({speedup['low']:.2f}–{speedup['high']:.2f}, "
        f"{speedup['confidence']:.0%} interval, n {speedup['n']})"
    )


def _others(load: dict) -> str:
    if not load.get("recorded", True) or "other_cores" not in load:
        return "not recorded"
    return f"{load['other_cores']:.2f}"


def plot_gemm(results: dict, path: Path) -> None:
    plt = _plt()
    records = results["gemm"]["records"]
    fig, ax = plt.subplots(figsize=(8, 5))
    backends = results["gemm"]["sparse_backends"]
    shapes = list(dict.fromkeys(r["shape"] for r in records))
    if backends:
        for backend in backends:
            for shape in shapes:
                pts = [
                    (r["m"], r[backend]["speedup"])
                    for r in records
                    if r["shape"] == shape and isinstance(r.get(backend), dict)
                ]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=f"{shape} · {backend.split('-')[-1]}")
        ax.axhline(2.0, color="grey", linestyle="--", label="2:4 ceiling (2×)")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_ylabel("speedup over dense (×)")
        ax.set_title(f"2:4 GEMM speedup vs M ({results['gemm']['dtype']}, {results['gemm']['device']})")
    else:
        for shape in shapes:
            pts = [(r["m"], r["tflops_dense"]) for r in records if r["shape"] == shape]
            ax.plot(*zip(*pts), marker="o", label=shape)
        ax.set_ylabel("dense TFLOP/s")
        ax.set_title("Dense GEMM throughput vs M — 2:4 kernels not measured on this machine")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("M (tokens)")
    ax.legend(fontsize=6)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def plot_e2e(results: dict, path: Path) -> None:
    plt = _plt()
    rows = [r for r in results["e2e"]["prefill"] if isinstance(r["result"], dict)]
    fig, ax = plt.subplots(figsize=(8, 4))
    labels = [f"{r['model']} · {r['backend']}\n{r['batch']}×{r['seq']}" for r in rows]
    ax.bar(
        range(len(rows)),
        [r["result"]["median"] for r in rows],
        color=["tab:grey" if r.get("noise") else "tab:blue" for r in rows],
        yerr=[
            [r["result"]["median"] - r["result"]["min"] for r in rows],
            [r["result"]["max"] - r["result"]["median"] for r in rows],
        ],
        capsize=3,
    )
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    ax.set_ylabel("prefill latency (ms, median; bars min–max)")
    ax.set_title("End-to-end prefill latency (measured rows only; grey: marked noisy)")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def plot_accuracy(results: dict, path: Path) -> None:
    plt = _plt()
    acc = results["accuracy"]
    methods = acc.get("methods") or {}
    fig, ax = plt.subplots(figsize=(6, 4))
    names = list(methods)
    ax.bar(names, [methods[n] for n in names], color="tab:blue")
    if acc.get("dense") is not None:
        ax.axhline(acc["dense"], color="black", linestyle="--", label=f"dense {acc['dense']:.2f}")
        ax.legend()
    if acc.get("metric") == "perplexity":
        ax.set_yscale("log")
    ax.set_ylabel(acc.get("metric") or "accuracy")
    ax.set_title("Held-out accuracy per pruning method (2:4)")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def plot_layer_loss(results: dict, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 4))
    for method, info in results["pruning"].items():
        losses = info.get("layer_relative_loss") or []
        ax.plot(range(len(losses)), losses, label=method, linewidth=1)
    ax.set_yscale("log")
    ax.set_xlabel("layer (in pruning order)")
    ax.set_ylabel("relative layer loss L(Ŵ)/L(0)")
    ax.set_title("Per-layer relative loss by method")
    ax.legend()
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def _header(results: dict) -> list[str]:
    m = results["machine"]
    gpu = m["gpu"]["name"] if m.get("gpu") else "none"
    return [
        "# apt-sparse benchmark report",
        "",
        f"Created {results['created']} on {m['platform']} ({m['processor']}, {m['torch_threads']} threads), "
        f"GPU: {gpu}; torch {m['torch']}, transformers {m['transformers']}, onnxruntime {m['onnxruntime']}.",
        *([f"Made by `{results['demo']['command']}`."] if results.get("demo", {}).get("command") else []),
        *(
            []
            if results["sparse_kernels"]["ran"]
            else [
                "",
                f"**No 2:4 kernel runs on this machine** ({results['not_measured']['2:4 kernels']}). What it can "
                "measure is accuracy, the exported artifacts' parity and latency, and dense timings at the model's "
                "own shapes; speedups need an NVIDIA GPU of compute capability 8.0 or newer (`gpu_suite`).",
            ]
        ),
        *_noise_warning(results),
        "",
        "## Backends",
        "",
        "| backend | available | detail |",
        "|---|---|---|",
        *[
            f"| {names} | {'yes' if available else 'no'} | {reason} |"
            for (available, reason), names in _backend_rows(results).items()
        ],
    ]


def _backend_rows(results: dict) -> dict[tuple[bool, str], str]:
    """Backends that share availability and reason share a row, so each reason is stated once."""
    rows: dict[tuple[bool, str], list[str]] = {}
    for name, status in results["backends"].items():
        rows.setdefault((status["available"], status["reason"]), []).append(name)
    return {key: ", ".join(names) for key, names in rows.items()}


def _accuracy_section(results: dict) -> list[str]:
    acc = results["accuracy"]
    if not acc.get("methods"):
        return []
    lines = [
        "",
        "## Accuracy (held-out text)",
        "",
        f"| method | {acc['metric']} | summed relative layer loss | pruning seconds | peak memory (GiB) |",
        "|---|---|---|---|---|",
        f"| dense | {acc['dense']:.3f} | | | |",
    ]
    for method, value in acc["methods"].items():
        p = results["pruning"].get(method, {})
        lines.append(
            f"| {method} | {value:.3f} | {p.get('sum_relative_loss', float('nan')):.3f} | "
            f"{p.get('seconds', float('nan')):.0f} | {p.get('peak_memory_bytes', 0) / 2**30:.2f} |"
        )
    return lines + ["", "![accuracy](accuracy.png)", "", "![per-layer loss](layer_loss.png)"]


_LABELS = {"torch-sparse-cusparselt": "cuSPARSELt", "torch-sparse-cutlass": "CUTLASS"}


def _gemm_section(results: dict) -> list[str]:
    gemm = results["gemm"]
    backends = gemm["sparse_backends"]  # only measured backends get a column
    columns = ["shape", "M", "dense ms", "IQR (spread)", "min–max", "n", *(_LABELS.get(b, b) for b in backends)]
    columns += ["other processes (cores)", "noise"]
    lines = [
        "",
        f"## GEMM: dense vs 2:4 ({gemm['dtype']} on {gemm['device']})"
        if backends
        else f"## GEMM: dense reference at the model's shapes ({gemm['dtype']} on {gemm['device']})",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]
    for r in gemm["records"]:
        cells = []
        for b in backends:
            entry = r.get(b)
            if not entry:
                cells.append(f"not measured: {r['not_measured'][b]}")
            else:
                cells.append(f"{_speedup_cell(entry['speedup_interval'], r['noise'])}; {entry['ms']['median']:.3f} ms")
        row = [r["shape"], str(r["m"]), *_fmt(r["dense_ms"], 3), *cells, _others(r["load"]), _noise_cell(r["noise"])]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "![GEMM](gemm_speedup.png)"]
    if backends:
        lines += [
            "",
            "Decode-safe thresholds (M from which the sparse path is used; none = always dense; a noisy record "
            "counts as not measured): " + ", ".join(f"{k}: {v}" for k, v in results["thresholds"].items()),
        ]
    if results["decode_safe"]:
        lines += ["", f"Decode-safe model: {results['decode_safe']}"]
    return lines


def _shape(row: dict) -> str:
    return f"{row['batch']}×{row['seq']}" if "seq" in row else f"{row['batch']}×({row['prompt']}+{row['new_tokens']})"


def _e2e_section(results: dict) -> list[str]:
    lines = [
        "",
        "## End to end",
        "",
        "| kind | model | backend | shape | median (ms, or tokens/s for decode) | IQR (spread) | min–max | n | "
        "other processes (cores) | noise |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for kind in ("prefill", "decode"):
        for r in results["e2e"][kind]:
            cells = [kind, r["model"], r["backend"], _shape(r), *_fmt(r["result"]), _others(r["load"])]
            lines.append("| " + " | ".join([*cells, _noise_cell(r["noise"])]) + " |")
    lines += ["", "![prefill](e2e_prefill.png)"]
    comparisons = results["e2e"].get("comparisons") or []
    if comparisons:
        lines += [
            "",
            "### Side by side (timed interleaved: a request of one, then of the other)",
            "",
            "Each ratio is the median of the per-round ratios (above 1: the candidate is faster) with the "
            "distribution-free interval of that median; a comparison with a noisy row is not judged.",
            "",
            "| kind | shape | baseline | candidate | candidate's speedup | verdict |",
            "|---|---|---|---|---|---|",
        ]
        for c in comparisons:
            cells = [c["kind"], _shape(c), c["baseline"], c["candidate"], _speedup_cell(c["speedup"], c["noise"])]
            lines.append("| " + " | ".join([*cells, c["verdict"]]) + " |")
    return lines


def _timed_rows(results: dict) -> list[tuple[str, dict, list[str]]]:
    """Every timed row as ``(what, load, noise)``."""
    rows = [(f"GEMM {r['shape']} M={r['m']}", r["load"], r["noise"]) for r in results["gemm"]["records"] if "load" in r]
    for kind in ("prefill", "decode"):
        rows += [
            (f"{kind} {r['model']} · {r['backend']} {_shape(r)}", r["load"], r["noise"]) for r in results["e2e"][kind]
        ]
    return rows


def _noise_warning(results: dict) -> list[str]:
    noisy = [what for what, _, reasons in _timed_rows(results) if reasons]
    if not noisy:
        return []
    shared = sum(1 for _, load, _ in _timed_rows(results) if load.get("shared"))
    return [
        "",
        f"**{len(noisy)} of {len(_timed_rows(results))} timed rows are marked noisy** ({shared} measured while other "
        f"processes shared the cores): their figures are shown as measured, and no speedup or slowdown is claimed "
        "from them. See Machine load.",
    ]


def _load_line(name: str, load: dict) -> str:
    if not load.get("recorded", True):
        return f"- {name}: not recorded on this platform"
    busiest = ", ".join(f"{p['name']} (pid {p['pid']}) {p['cores']:.2f}" for p in load.get("busiest", []))
    return (
        f"- {name}: other processes took {load['other_cores']:.2f} of {load['cores']} cores "
        f"(the hypervisor {load['steal_cores']:.2f}) over {load['seconds']:.1f} s; load average (1 min) "
        + (f"{load['load_1m']:.2f}" if load.get("load_1m") is not None else "not recorded")
        + f"; PyTorch threads {load['threads']}"
        + (f"; busiest: {busiest}" if busiest else "")
    )


def _load_section(results: dict) -> list[str]:
    timing, load = results["timing"], results["load"]
    rows = _timed_rows(results)
    recorded = [(what, lr) for what, lr, _ in rows if lr.get("recorded", True) and "other_cores" in lr]
    lines = [
        "",
        "## Machine load",
        "",
        f"Every timed row: warm-up excluded, at least {timing['min_samples']} samples, marked noisy where its "
        f"interquartile range exceeds {timing['max_spread']:.0%} of its median or other processes took more than "
        f"the cores PyTorch left free plus {timing['shared_margin_cores']} while it ran. The benchmark took "
        f"{timing['seconds'] / 60:.1f} min.",
        "",
        _load_line("before timing", load["before"]),
    ]
    if load.get("vllm_before"):
        lines.append(_load_line("before vLLM's timing (its process)", load["vllm_before"]))
    if recorded:
        what, worst = max(recorded, key=lambda item: item[1]["other_cores"])
        lines.append(_load_line(f"while timing, at its most ({what})", worst))
    noisy = [(what, reasons) for what, _, reasons in rows if reasons]
    lines.append(f"- rows marked noisy: {len(noisy)} of {len(rows)}")
    return lines


def _exports_section(results: dict) -> list[str]:
    if not results.get("exports"):
        return []
    lines = ["", "## Exported artifacts", "", "| target | size (MiB) | validation |", "|---|---|---|"]
    for target, info in results["exports"].items():
        checks = "; ".join(
            f"{k}: {v if not isinstance(v, dict) else v.get('status', v)}"
            for k, v in info["validation"].items()
            if k != "dense_matmul_initializers" and not (k == "vllm_loaded" and isinstance(v, str))
        )
        lines.append(f"| {target} | {info['bytes'] / 2**20:.1f} | {checks} |")
        if info.get("trtexec"):
            lines.append(f"| | | `{info['trtexec']}` |")
    return lines


def _run_section(results: dict) -> list[str]:
    if not results.get("demo"):
        return []
    d = results["demo"]
    before, bench = d["seconds_before_bench"], results["timing"]["seconds"]
    return [
        "",
        "## Demo run",
        "",
        f"Model {d['model']}; calibration {d['calibration']}; eval {d['eval']}; pruning and export "
        f"{before / 60:.1f} min, benchmark {bench / 60:.1f} min, whole run {(before + bench) / 60:.1f} min. "
        f"Made by `{d['command']}`.",
    ]


def render_report(results: dict, folder: Path) -> Path:
    """Write ``report.md`` and its ``*.png`` plots into ``folder``; returns the report's path. Each thing
    that was not measured is stated once, with its reason, in the last section."""
    folder = Path(folder)
    plots = {"gemm_speedup.png": plot_gemm, "e2e_prefill.png": plot_e2e}
    if results["accuracy"].get("methods"):
        plots["accuracy.png"] = plot_accuracy
    if results["pruning"]:
        plots["layer_loss.png"] = plot_layer_loss
    for name, plot in plots.items():
        plot(results, folder / name)
    # a backend's reason is in the Backends table already: say it once
    stated = {reason: names for (available, reason), names in _backend_rows(results).items() if not available}
    missing = [
        f"- {what}: {f'unavailable: {stated[reason]} (see Backends)' if reason in stated else reason}"
        for what, reason in results["not_measured"].items()
        if what != "2:4 kernels"  # said once, at the top
    ]
    lines = (
        _header(results)
        + _accuracy_section(results)
        + _gemm_section(results)
        + _e2e_section(results)
        + _load_section(results)
        + _exports_section(results)
        + _run_section(results)
        + ["", "## Not measured", "", *(missing or ["- (everything was measured)"])]
    )
    path = folder / "report.md"
    with writing(path):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("\n".join(lines) + "\n")
        os.replace(tmp, path)
    return path


def _save(fig, path: Path) -> None:
    """A plot written whole or not at all (through a temporary file, then renamed)."""
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    try:
        with writing(path):
            fig.savefig(tmp, dpi=120)
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
