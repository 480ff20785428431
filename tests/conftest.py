import os

import pytest
import torch

# Our Triton kernels (serving.triton24) run on the CPU under Triton's interpreter, which Triton switches on
# when it is imported with TRITON_INTERPRET=1: set before anything imports triton. On a GPU they compile.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def correlated_layer():
    """A layer whose inputs are correlated, as in real models: ``(W [out, in], H [in, in], X [in, tokens])``."""

    def make(out: int, cols: int, tokens: int = 64, seed: int = 0, dtype=torch.float64):
        g = torch.Generator().manual_seed(seed)
        mix = torch.eye(cols, dtype=dtype) + 0.5 * torch.randn(cols, cols, generator=g, dtype=dtype)
        X = mix @ torch.randn(cols, tokens, generator=g, dtype=dtype)
        W = torch.randn(out, cols, generator=g, dtype=dtype)
        return W, X @ X.T, X

    return make


@pytest.fixture(scope="session")
def smollm2_demo(tmp_path_factory):
    """``apt-sparse demo --quick`` on the real SmolLM2-135M, once per session: SmolLM2 pruned with apt and
    magnitude, exported to every target, benchmarked and reported. ``(folder, printed output)``."""
    from apt_sparse.cli import main

    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker:  # every test that uses the demo shares one worker (the hook below): a second build means it does not
        claim = tmp_path_factory.getbasetemp().parent / "smollm2_demo.worker"  # the run's folder, shared by workers
        if claim.exists() and claim.read_text() != worker:
            pytest.fail(
                f"worker {worker} would build the SmolLM2 demo again ({claim.read_text()} built it): --dist loadgroup "
                "is not grouping the tests that use it (pytest-xdist with pytest 9 renames no node id)"
            )
        claim.write_text(worker)
    out = tmp_path_factory.mktemp("demo") / "demo"
    capture = pytest.MonkeyPatch()
    lines = []
    capture.setattr("builtins.print", lambda *a, **k: lines.append(" ".join(str(x) for x in a)))
    try:
        code = main(["demo", "--out", str(out), "--quick"])
    finally:
        capture.undo()
    assert code == 0, "\n".join(lines[-20:])  # the demo's own error message
    return out, "\n".join(lines)


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config, items):
    """``make test`` runs on two workers (pytest-xdist, ``--dist loadgroup``): every test of a module stays
    on one worker, so a module's fixtures are built once, and every test of the SmolLM2 demo (in several
    modules) shares the worker that built it."""
    for item in items:
        if not item.get_closest_marker("xdist_group"):
            group = "smollm2_demo" if "smollm2_demo" in item.fixturenames else item.module.__name__
            item.add_marker(pytest.mark.xdist_group(group))
