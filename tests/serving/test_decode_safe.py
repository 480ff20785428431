"""The decode-safe model: every pruned 2:4 Linear served by the sparse op with its shape's dispatch; dense
where nothing was measured; the product unchanged."""

import pytest
import torch
import transformers

from apt.folder.targets import targets_of_folder
from apt.run import PruneJob, RunConfig, prune_model
from serving.decode_safe import make_decode_safe, threshold_from
from serving.sparse_op import MEMORY_FIRST, Band, Dispatch, Sparse24Linear
from serving.triton24 import KernelConfig

from ..apt.tiny_models import save_tiny_model
from .interpreter import needs_kernels


def test_threshold_is_the_smallest_m_from_which_sparse_won_at_every_larger_m():
    assert threshold_from([(1, 0.5), (64, 1.1), (256, 1.3), (4096, 1.5)]) == 64
    assert threshold_from([(1, 0.5), (64, 1.1), (256, 0.99), (4096, 1.5)]) == 4096  # lost at 256
    assert threshold_from([(1, 0.5), (4096, 1.01)]) is None  # inside the 2 % margin: never faster
    assert threshold_from([(1, 1.2), (64, None)]) is None  # the largest M was not measured


@pytest.fixture(scope="module")
def pruned_folder(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("decode_safe")
    src = save_tiny_model("llama", tmp / "src")
    prune_model(
        PruneJob(
            model=str(src),
            out=str(tmp / "p"),
            num_calibration_samples=2,
            max_seq_length=16,
            evaluate=False,
            run=RunConfig(targets=r"mlp"),
        )
    )
    return tmp / "p"


def test_make_decode_safe_replaces_only_the_pruned_2_4_linears(pruned_folder):
    model = transformers.AutoModelForCausalLM.from_pretrained(pruned_folder)
    ids = torch.randint(0, model.config.vocab_size, (1, 12))
    with torch.no_grad():
        before = model(ids).logits
    measured = Dispatch((Band(1, "dense"), Band(16, "cusparselt")))
    counts = make_decode_safe(model, {"64x128": measured}, targets=targets_of_folder(pruned_folder))
    assert counts["replaced"] == 6  # gate, up, down of two blocks; attention was left dense
    up, down = model.model.layers[0].mlp.up_proj, model.model.layers[0].mlp.down_proj
    assert isinstance(up, Sparse24Linear) and isinstance(model.model.layers[0].self_attn.q_proj, torch.nn.Linear)
    assert up.dispatch == measured and down.dispatch.describe() == "M 1+: dense"  # down's shape was not measured
    # speed-first keeps dense + our layout: half the values and a 1-bit code per weight (float32: 1/32 of its bytes)
    assert counts["weight_bytes"] == counts["dense_weight_bytes"] * (1 + 0.5 + 1 / 32)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)  # dense everywhere here: the very same products


@needs_kernels
def test_memory_first_serves_the_model_from_our_layout_alone(pruned_folder):
    model = transformers.AutoModelForCausalLM.from_pretrained(pruned_folder)
    ids = torch.randint(0, model.config.vocab_size, (2, 5))
    with torch.no_grad():
        before = model(ids).logits
    gemv = KernelConfig("gemv", 8, 16, 16)
    decode = Dispatch((Band(1, "apt-gemv", gemv), Band(9, "apt-mma", KernelConfig("mma", 16, 32, 16))))
    counts = make_decode_safe(model, {"64x128": decode}, targets_of_folder(pruned_folder), MEMORY_FIRST)
    assert counts["weight_bytes"] == counts["dense_weight_bytes"] * (0.5 + 1 / 32)  # float32 weights
    assert model.model.layers[1].mlp.up_proj.path_for(10) == "apt-mma"
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, atol=1e-4, rtol=1e-4)  # float32 model


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_decode_safe_linear_every_path_matches_dense_on_gpu():
    from serving.sparse_op import from_threshold

    from .interpreter import sparse_weight

    weight = sparse_weight(128, 256).cuda()
    linear = torch.nn.Linear(256, 128, bias=True).half().cuda()
    linear.weight.data.copy_(weight)
    safe = Sparse24Linear.from_linear(linear, dispatch=from_threshold(64))
    for shape in ((1, 4, 256), (2, 64, 256)):
        x = torch.randn(shape, device="cuda", dtype=torch.float16)
        torch.testing.assert_close(safe(x), linear(x), atol=1e-2, rtol=1e-2)
