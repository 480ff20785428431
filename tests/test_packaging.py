import json
import subprocess
import sys
from pathlib import Path

import apt

REPO = Path(__file__).resolve().parents[1]


def modules_after_import(code: str) -> set[str]:
    """The top-level packages loaded by a fresh interpreter after running ``code``."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))"
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, check=True)
    return set(json.loads(run.stdout.strip().splitlines()[-1]))


def test_import_apt_is_this_repository_not_debians_module():
    # Debian ships a Python module called `apt`; ours must win inside the project's environment.
    assert Path(apt.__file__).resolve().parent == REPO / "apt"
    assert hasattr(apt, "prune_layer")


def test_the_solver_loads_neither_transformers_nor_the_other_packages():
    loaded = modules_after_import("import apt.solver")
    assert {"torch", "apt"} <= loaded
    assert not loaded & {"transformers", "exporters", "runtime_bench", "safetensors", "onnx"}


def test_apt_never_loads_exporters_or_runtime_bench():
    modules = sorted(
        ".".join(p.relative_to(REPO).with_suffix("").parts)
        for p in (REPO / "apt").rglob("*.py")
        if p.stem != "__init__"
    )
    loaded = modules_after_import("\n".join(f"import {m}" for m in modules))
    assert not loaded & {"exporters", "runtime_bench"}


def test_exporters_import_without_their_heavy_optional_packages():
    loaded = modules_after_import("import exporters, runtime_bench.bench")
    assert not loaded & {"onnx", "onnxruntime", "onnxscript", "tensorrt", "datasets", "lm_eval", "compressed_tensors"}
