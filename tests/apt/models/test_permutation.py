"""Free channel permutations: reordering a gated MLP's intermediate channels (gate and up rows, down columns)
leaves the model's function exactly as it was; a run that permutes writes what the in-memory run computes."""

import pytest
import torch
import transformers

from apt.models.checkpoint import CheckpointReader
from apt.models.discovery import block_targets
from apt.models.layered import LayeredModel
from apt.models.loading import load_tokenizer
from apt.models.permutation import free_partners, permute_rows
from apt.run import PruneJob, RunConfig, prune_model
from apt.run.resident import calibrate_and_prune
from apt.solver.patterns import is_nm_sparse
from apt.text.sources import load_text, token_windows

from ..tiny_models import CONFIGS, save_tiny_model


@pytest.mark.parametrize("family", ["llama", "phi3", "gemma3_text"])  # phi3: one fused gate_up_proj
def test_permuting_the_mlp_channels_without_pruning_leaves_the_logits_unchanged(family):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[family]()).eval()
    ids = torch.randint(1000, 20000, (2, 24))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    layered = LayeredModel.resident(model)
    moved = 0
    for index, block in enumerate(layered.blocks):
        for target in block_targets(block, layered.block_prefix(index)[:-1], model.config):
            partners = free_partners(model, target)
            if partners is not None:
                perm = torch.randperm(target.module.in_features)
                permute_rows(partners, perm)
                target.module.weight.data.copy_(target.module.weight.data[:, perm])
                moved += 1
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert moved == len(layered.blocks)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)


def test_a_permuting_run_writes_what_the_in_memory_run_computes(tmp_path):
    src = save_tiny_model("llama", tmp_path / "src", num_hidden_layers=3)
    run = RunConfig(batch_size=2, permute=True)
    report = prune_model(
        PruneJob(
            model=str(src),
            out=str(tmp_path / "out"),
            run=run,
            num_calibration_samples=4,
            max_seq_length=32,
            evaluate=False,
        )
    )
    downs = [r for r in report["layers"] if r["name"].endswith("down_proj")]
    assert len(downs) == 3 and all("permuted_inputs" in r and r["nm_valid"] for r in downs)
    model = transformers.AutoModelForCausalLM.from_pretrained(src).eval()
    windows = token_windows(load_text("stdlib").calibration, load_tokenizer(src), 4, 32, 0)
    calibrate_and_prune(model, windows, run)
    written = CheckpointReader(tmp_path / "out")
    for name, tensor in model.state_dict().items():
        if name in written:
            assert torch.equal(written.read(name), tensor), name
    assert all(is_nm_sparse(written.read(r["tensor"])) for r in report["layers"])
