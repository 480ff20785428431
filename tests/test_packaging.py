from pathlib import Path

import apt

REPO = Path(__file__).resolve().parents[1]


def test_import_apt_is_this_repository_not_debians_module():
    # Debian ships a Python module called `apt`; ours must win inside the project's environment.
    assert Path(apt.__file__).resolve().parent == REPO / "apt"
    assert hasattr(apt, "prune_layer")


def test_solver_does_not_import_transformers_or_the_other_packages():
    source = "\n".join(p.read_text() for p in (REPO / "apt").glob("solver.py"))
    source += (REPO / "apt" / "reconstruct.py").read_text()
    for forbidden in ("transformers", "exporters", "runtime_bench", "print(", ".cuda("):
        assert forbidden not in source


def test_apt_never_imports_exporters_or_runtime_bench():
    for path in (REPO / "apt").rglob("*.py"):
        text = path.read_text()
        assert "import exporters" not in text and "from exporters" not in text, path
        assert "import runtime_bench" not in text and "from runtime_bench" not in text, path
