"""Every family a user deploys, found from the model itself: a tiny random model of each type is pruned by
the streaming run, and the folder must be exactly what the same run computes on the model held in memory,
load in transformers with that model's logits, keep every discovered target on the pattern (experts
included) and leave routers, norms and embeddings untouched; its streamed evaluation must equal the
in-memory model's."""

import json

import pytest
import torch
import transformers
from packaging.version import Version

from apt.folder.inspect import inspect_checkpoint
from apt.folder.report import REPORT_NAME
from apt.measure.evaluate import (
    perplexity,
    sentence_embeddings,
    streaming_perplexity,
    streaming_sentence_embeddings,
    text_batches,
)
from apt.models.checkpoint import CheckpointReader
from apt.models.layered import LayeredModel
from apt.models.loading import load_tokenizer
from apt.run import PruneJob, RunConfig, prune_model
from apt.run.resident import calibrate_and_prune
from apt.solver.patterns import as_rows, is_nm_sparse
from apt.text.sources import calibration_windows, load_text, token_windows
from apt_sparse.cli import main

from ..tiny_models import CONFIGS, MOE, REFUSED, save_tiny_model

RUN = RunConfig(batch_size=2)
FAST = dict(num_calibration_samples=4, max_seq_length=32, num_eval_windows=2)
# what discovery must find in each tiny model: (pruned matrices, of which MoE experts)
EXPECTED = {
    "llama": (14, 0),
    "qwen2": (14, 0),
    "mistral": (14, 0),
    "qwen3": (14, 0),
    "granite": (14, 0),
    "hyperclovax": (14, 0),
    "olmo2": (14, 0),
    "gemma3_text": (14, 0),
    "phi3": (8, 0),  # qkv_proj, o_proj, gate_up_proj, down_proj
    "opt": (12, 0),
    "bert": (12, 0),
    "mamba": (6, 0),  # in_proj, x_proj, out_proj; dt_proj (input 6 wide) is skipped
    "qwen3_moe": (19, 8),  # dense block 7, MoE block: attention 4 + 4 experts × (gate/up, down)
    "mixtral": (24, 16),
    "llama4_text": (22, 8),  # MoE block: attention 4 + shared expert 3 + experts 8; the router stays dense
    "deepseek_v3": (24, 8),  # latent attention 5 per block; dense MLP 3; shared expert 3 + experts 8
    "gpt_oss": (24, 16),
    "gpt2": (8, 0),  # c_attn, attn.c_proj, c_fc, mlp.c_proj: Conv1D, 2:4 along their stored axis 0
    "gpt_neox": (8, 0),  # query_key_value, dense, dense_h_to_4h, dense_4h_to_h
    "mamba2": (4, 0),  # in_proj, out_proj
    "bamba": (12, 0),  # mamba in/out + MLP 3; attention 4 + MLP 3
    "falcon_h1": (18, 0),  # per block: attention 4, mamba in/out, MLP 3
    "granitemoehybrid": (26, 16),  # mamba in/out or attention 4; shared MLP 2; experts 8 per block
    "jamba": (18, 8),  # mamba in/x/out (dt_proj read directly: dense) + MLP 3; attention 4 + experts 8
    "qwen3_next": (29, 16),  # DeltaNet qkvz, ba, out or attention 4; shared expert 3; experts 8 per block
    "lfm2": (12, 0),  # conv in/out or attention 4; MLP w1, w2, w3
    "nemotron_h": (6, 0),  # mamba in/out; attention 4
    # gated DeltaNet in_proj_qkv, in_proj_z, in_proj_b, in_proj_a, out_proj or attention 4; MLP 3 per block
    "qwen3_5_text": (15, 0),
    "qwen3_5_moe_text": (31, 16),  # DeltaNet 5 or attention 4; shared expert 3; experts 8 per block
    "lfm2_moe": (17, 8),  # conv in/out + MLP w1, w3, w2; attention 4 + experts 8
    "falcon_mamba": (6, 0),  # in_proj, x_proj, out_proj; dt_proj (read directly) dense
    "recurrent_gemma": (13, 0),  # linear_x, linear_y, linear_out or attention 4; MLP 3 per block
    "rwkv": (14, 0),  # time mixing key, value, receptance, output; channel mixing key, value, receptance
    "xlstm": (20, 0),  # q, k, v, igate, fgate, ogate pre-activations, out_proj; feed-forward 3
    "minimax": (23, 16),  # attention 4 or lightning qkv_proj, output_gate, out_proj; experts 8 per block
    # delta attention q, k, v, f_a, f_b, b, g_a, g_b, o; dense MLP 3; latent attention 5, shared expert 3, experts 8
    "kimi_linear": (27, 8),
    "olmo_hybrid": (17, 0),  # gated DeltaNet q, k, v, a, b, g, o or attention 4; MLP 3 per block
    # delta attention q, k, v, f, b, g, o + dense MLP 3; latent attention q, kv_a, kv_b, g, o + shared 3 + experts 8
    "bailing_hybrid": (26, 8),
    "lfm3": (13, 0),  # conv in/out or attention q, k, v, g, o; MLP 3 per block
    # DeltaNet 5 or attention 4 + its indexer; hyper-connections' down, up, inject (×2); shared expert 3; experts 8
    "qwen4_exp_text": (44, 16),
    "inkling_text": (21, 8),  # q, k, v, r, o per block; dense MLP 3; experts 8 (shared experts: dense, listed)
}
# block weights of more than two dimensions that are neither Linears nor experts that record their layout: left
# dense and listed in the report
LEFT_DENSE = {
    "recurrent_gemma": {"input_gate_weight", "recurrent_gate_weight"},  # the RG-LRU's block-diagonal gates
    "inkling_text": {"gate_proj", "up_proj", "down_proj"},  # shared experts stacked [n_shared, out, in], gamma-scaled
}

# where an older transformers implements a family otherwise (tests/test_pinned_transformers.py runs 5.12.1)
if Version(transformers.__version__) < Version("5.25"):
    EXPECTED |= {
        "jamba": (19, 8),  # its Mamba mixer calls dt_proj (5.25 reads its weight): pruned too
        "falcon_mamba": (8, 0),  # so does Falcon Mamba's
        # its experts are GraniteMoeHybridParallelExperts [E, out, in], not fused experts: dense; its router too
        "granitemoehybrid": (10, 0),
    }


def load_whole(folder, family):
    cls = transformers.AutoModel if family == "bert" else transformers.AutoModelForCausalLM
    return cls.from_pretrained(folder, dtype=torch.float32).eval()


def test_every_tiny_family_is_listed():
    assert set(EXPECTED) == set(CONFIGS)


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_every_family_prunes_streams_and_reloads_as_computed_in_memory(tmp_path, family):
    src = save_tiny_model(family, tmp_path / "src")
    out = tmp_path / "out"
    report = prune_model(PruneJob(model=str(src), out=str(out), run=RUN, **FAST))
    pruned = [r for r in report["layers"] if not r["skipped"]]
    assert (len(pruned), sum(r.get("expert") is not None for r in pruned)) == EXPECTED[family]
    assert all(r["nm_valid"] for r in pruned) and report["totals"]["target_sparsity"] >= 0.5
    assert report["model"]["family"] == (CONFIGS[family]().model_type)
    # a block weight of more than two dimensions (not a vector with unit axes, as RWKV's time_mix_key [1, 1, H])
    # is a target, a convolution's kernel, or reported as left dense
    left = {e["name"] for e in report["left_dense"]}
    assert all("layout apt-sparse does not know" in e["why"] for e in report["left_dense"])
    covered = {r["name"].partition("[")[0] for r in pruned if r.get("expert") is not None}
    model = load_whole(src, family)
    resident = LayeredModel.resident(model)
    blocks = resident.block_path
    kernels = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.modules.conv._ConvNd)}
    for name, param in model.named_parameters():
        matrix = param.dim() > 2 and sum(size > 1 for size in param.shape) > 1
        if name.startswith(f"{blocks}.") and matrix and name not in kernels:
            assert (name in left) != (name in covered), name
    if family == "granitemoehybrid" and Version(transformers.__version__) < Version("5.25"):
        assert {e["module"] for e in report["left_dense"]} == {"GraniteMoeHybridParallelExperts"}
    elif family != "granitemoehybrid":
        assert {e["name"].rpartition(".")[2] for e in report["left_dense"]} == LEFT_DENSE.get(family, set())
    if family == "mamba":  # Mamba reads dt_proj's weight without calling it; its input is 6 wide anyway
        skipped = [r for r in report["layers"] if r["skipped"]]
        assert {r["name"].split(".")[-1] for r in skipped} == {"dt_proj"}
        assert all("not a multiple of 4" in r["skipped"] for r in skipped)

    # the same run on the model held whole in memory writes exactly these tensors
    tokenizer = load_tokenizer(src)
    windows = calibration_windows(load_text("stdlib").calibration, tokenizer, 4, 32, 0, resident.layout.causal)
    calibrate_and_prune(model, windows, RUN)
    reloaded = load_whole(out, family)
    state, written, source = model.state_dict(), reloaded.state_dict(), CheckpointReader(src)
    assert state.keys() == written.keys()
    for name in state:
        assert torch.equal(state[name], written[name]), name
    output = CheckpointReader(out)
    if family == "gpt_neox":  # as every Pythia checkpoint: transformers 5.25 loads it as lm_head.weight
        assert "embed_out.weight" in source.names()
    assert output.names() == source.names()  # the checkpoint's own names (per-expert or fused), order, dtypes
    assert all(output.info(n).dtype == source.info(n).dtype for n in source.names())

    # the output loads in transformers and gives the logits of the pruned model the run computed
    ids = windows[:2]
    with torch.no_grad():
        if family == "bert":
            torch.testing.assert_close(
                reloaded(input_ids=ids).last_hidden_state, model(input_ids=ids).last_hidden_state
            )
        else:
            torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=1e-5)

    # every discovered target follows 2:4 along its input axis; nothing else changed
    targets = {t for r in pruned for t in (r.get("tensors") or [r["tensor"]])}
    axes = {t: r.get("in_axis", -1) for r in pruned for t in (r.get("tensors") or [r["tensor"]])}
    for name in source.names():
        before, after = source.read(name), output.read(name)
        if name in targets:
            assert is_nm_sparse(as_rows(after, axes[name]), 2, 4), name
        else:
            assert torch.equal(before, after), f"{name} is not a pruning target but changed"
    routers = [
        n
        for n in source.names()
        if n.endswith(
            ("mlp.gate.weight", "router.weight", "moe.gate.weight", "router.layer.weight", "forward.gate.weight")
        )
    ]
    assert (family in MOE) == bool(routers) and not set(routers) & targets
    summary = inspect_checkpoint(out)
    rows = {r["name"]: r for r in summary["tensors"]}
    assert summary["targets_from"] == REPORT_NAME and all(rows[t]["follows_pattern"] for t in targets)

    # streamed evaluation equals the in-memory model's (blocks, final norm and head found by discovery)
    dense, layered = load_whole(src, family), LayeredModel.from_folder(src)
    docs = load_text("stdlib").evaluation
    if family == "bert":
        batches = text_batches(tokenizer, docs[:12], batch_size=5)
        torch.testing.assert_close(
            streaming_sentence_embeddings(layered, batches), sentence_embeddings(dense, batches), rtol=0, atol=1e-6
        )
    else:
        held_out = token_windows(docs, tokenizer, 4, 32)
        streamed = streaming_perplexity(layered, held_out)
        assert streamed["perplexity"] == pytest.approx(perplexity(dense, held_out)["perplexity"], rel=1e-6)
    accuracy = json.loads((out / REPORT_NAME).read_text())["accuracy"]
    if family == "bert":
        assert accuracy["metric"] == "embedding_cosine" and 0 < accuracy["pruned"]["embedding_cosine"] <= 1
        assert 0 <= accuracy["dense"]["retrieval_top1"] <= 1 and "embedding_cosine" not in accuracy["dense"]
    else:
        assert accuracy["metric"] == "perplexity" and accuracy["pruned"]["perplexity"] > 1


@pytest.mark.parametrize("family", sorted(REFUSED))
def test_a_refused_family_gets_one_line_naming_it_and_exit_2(tmp_path, capsys, family):
    src = save_tiny_model(family, tmp_path / "src")
    capsys.readouterr()
    assert main(["prune", "--model", str(src), "--out", str(tmp_path / "out"), "--num-calibration-samples", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert all(word in err for word in REFUSED[family][1]), err
    assert not (tmp_path / "out").exists()
