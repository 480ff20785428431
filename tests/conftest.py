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
