"""The decode-safe linear: the sparse kernel only from the measured threshold, dense below it and where no
kernel runs; on a GPU both paths match dense."""

import pytest
import torch
import transformers

from apt.folder.targets import targets_of_folder
from apt.run import PruneJob, RunConfig, prune_model
from apt.solver import Pattern, select_mask
from serving.decode_safe import DecodeSafeLinear, choose_path, make_decode_safe
from serving.kernels import cusparselt

from ..apt.tiny_models import save_tiny_model

HAS_SPARSE_GPU = cusparselt().available


def _sparse_linear(k=128, n=64, dtype=torch.float32, device="cpu"):
    linear = torch.nn.Linear(k, n, bias=True).to(dtype)
    with torch.no_grad():
        linear.weight.mul_(select_mask(linear.weight.abs().float(), Pattern(2, 4)))
    return linear.to(device)


def test_decode_safe_routing_takes_the_sparse_path_only_from_the_threshold():
    assert choose_path(tokens=63, threshold=64, has_sparse=True) == "dense"
    assert choose_path(tokens=64, threshold=64, has_sparse=True) == "sparse"
    assert choose_path(tokens=4096, threshold=64, has_sparse=True) == "sparse"
    assert choose_path(tokens=4096, threshold=None, has_sparse=True) == "dense"  # never faster: always dense
    assert choose_path(tokens=4096, threshold=64, has_sparse=False) == "dense"  # no kernel here


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_SPARSE_GPU, reason=f"2:4 kernels: {cusparselt().reason}")
def test_decode_safe_linear_both_paths_match_dense_on_gpu():
    linear = _sparse_linear(k=256, n=128, dtype=torch.float16, device="cuda")
    safe = DecodeSafeLinear(linear, threshold=64)
    assert safe.uses_sparse
    small, large = (
        torch.randn(1, 4, 256, device="cuda", dtype=torch.float16),
        torch.randn(2, 64, 256, device="cuda", dtype=torch.float16),
    )
    torch.testing.assert_close(safe(small), linear(small), atol=1e-2, rtol=1e-2)  # dense path
    torch.testing.assert_close(safe(large), linear(large), atol=1e-2, rtol=1e-2)  # sparse path


def test_make_decode_safe_replaces_only_the_pruned_2_4_linears(tmp_path):
    src = save_tiny_model("llama", tmp_path / "src")
    prune_model(
        PruneJob(
            model=str(src),
            out=str(tmp_path / "p"),
            num_calibration_samples=2,
            max_seq_length=16,
            evaluate=False,
            run=RunConfig(targets=r"mlp"),
        )
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "p")
    counts = make_decode_safe(model, {"64x128": 16}, targets=targets_of_folder(tmp_path / "p"))
    assert counts["replaced"] == 6  # gate, up, down of two blocks; attention was left dense
    assert isinstance(model.model.layers[0].mlp.up_proj, DecodeSafeLinear)
    assert isinstance(model.model.layers[0].self_attn.q_proj, torch.nn.Linear)
    assert model.model.layers[0].mlp.up_proj.threshold == 16 and model.model.layers[0].mlp.down_proj.threshold is None
