import pytest
import torch


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
def pruned_smollm2(tmp_path_factory):
    """SmolLM2-135M pruned with apt 2:4 on a small calibration set, once per test session: ``(folder, report)``."""
    from apt.run import PruneJob, prune_model

    out = tmp_path_factory.mktemp("smollm2") / "apt"
    report = prune_model(
        PruneJob(model="smollm2-135m", out=str(out), num_calibration_samples=8, max_seq_length=128, num_eval_windows=4)
    )
    return out, report
