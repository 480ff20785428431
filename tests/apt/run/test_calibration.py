"""Hessians of MoE experts against transformers' own expert computation: each expert's Hessians sum exactly the
rows transformers' eager experts loop feeds that expert (recorded independently, from the matrix products
it performs), in all three layouts; an expert no token reaches is calibrated by the documented rule, on
every token the experts received, never zeroed; and the groups discovery finds."""

import pytest
import torch
from torch.overrides import TorchFunctionMode

from apt.collective import Collective
from apt.models.activations import ActivationStore
from apt.models.discovery import block_targets, find_groups
from apt.models.layered import LayeredModel
from apt.run import PruneJob, RunConfig, prune_model
from apt.run.calibration import collect
from apt.solver.patterns import is_nm_sparse

from ..tiny_models import CONFIGS, save_tiny_model


class ExpertInputs(TorchFunctionMode):
    """Records, per (part, expert), the rows every matrix product with a slice of an experts module's fused
    weights received: ``F.linear(x, W[e])``, ``x @ W[e]`` and ``bmm(x, W)`` over all experts."""

    def __init__(self, experts):
        super().__init__()
        self.weights = {part: getattr(experts, part) for part in ("gate_up_proj", "down_proj")}
        self.rows = {}

    def _which(self, weight):
        for part, fused in self.weights.items():
            if weight.data_ptr() == fused.data_ptr() and weight.dim() == 3:
                return part, None
            per = fused[0].numel() * fused.element_size()
            offset = weight.data_ptr() - fused.data_ptr()
            if weight.dim() == 2 and 0 <= offset < fused.numel() * fused.element_size() and offset % per == 0:
                return part, offset // per
        return None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.nn.functional.linear, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm):
            found = self._which(args[1])
            if found is not None:
                part, expert = found
                x = args[0]
                slices = [(expert, x)] if expert is not None else list(enumerate(x))
                for e, rows in slices:
                    self.rows.setdefault((part, e), []).append(rows.reshape(-1, rows.shape[-1]).detach().clone())
        return func(*args, **kwargs)


def last_block(family, **overrides):
    """A tiny model in memory (eager experts) and its last block, MoE in every tiny MoE model:
    ``(layered, index, store, targets, groups)``."""
    torch.manual_seed(0)
    import transformers

    config = CONFIGS[family]()
    for key, value in overrides.items():
        setattr(config, key, value)
    model = transformers.AutoModelForCausalLM.from_config(config, experts_implementation="eager").eval()
    layered = LayeredModel.resident(model)
    ids = torch.randint(1000, 20000, (4, 32), generator=torch.Generator().manual_seed(1))
    store = layered.block_inputs([{"input_ids": ids[:2]}, {"input_ids": ids[2:]}], ActivationStore(torch.float32))
    index = len(layered.blocks) - 1
    layered.run_blocks(store, range(index))
    targets = block_targets(layered.blocks[index], layered.block_prefix(index)[:-1], model.config)
    groups = find_groups(
        layered.blocks[index], targets, lambda: layered.blocks[index](store.hidden(0), **store.kwargs(0, index))
    )
    return layered, index, store, targets, groups


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "llama4_text"])
def test_each_experts_hessians_sum_the_rows_transformers_feeds_it(family):
    layered, index, store, targets, groups = last_block(family)
    experts_module = next(g.source for g in groups if g.expert is not None)
    stats = collect(
        layered.blocks[index], index, store, groups, "cpu", Collective(), stop_after_last=False, expert_min_tokens=0
    )
    with ExpertInputs(experts_module) as recorder, torch.no_grad():
        for i in range(len(store)):
            layered.blocks[index](store.hidden(i), **store.kwargs(i, index))
    checked = 0
    for group, stat in zip(groups, stats):
        if group.expert is None:
            continue
        rows = torch.cat(recorder.rows.get((group.part, group.expert), [torch.zeros(0, stat.hessian.shape[0])]))
        rows = rows[(rows != 0).any(dim=-1)]  # Llama 4 runs every expert on every token, zeroed where unrouted
        assert stat.tokens == len(rows) and stat.rule == "routed tokens"
        torch.testing.assert_close(stat.hessian, rows.T @ rows, rtol=1e-5, atol=1e-4)
        checked += 1
    assert checked == 2 * experts_module.gate_up_proj.shape[0]


def test_an_expert_no_token_reaches_is_calibrated_on_every_token_not_zeroed(tmp_path):
    # DeepSeek-V3 chooses experts on score + e_score_correction_bias: a very negative bias starves expert 3
    def starve(model):
        model.model.layers[1].mlp.gate.e_score_correction_bias[3] = -1e9

    layered, index, store, targets, groups = last_block("deepseek_v3")
    starve(layered.model)
    stats = collect(layered.blocks[index], index, store, groups, "cpu", Collective(), stop_after_last=False)
    experts_module = next(g.source for g in groups if g.expert is not None)
    # the reference: every token the experts received, through expert 3, computed by transformers itself
    seen = {}
    handle = experts_module.register_forward_pre_hook(lambda m, a: seen.setdefault("x", []).append(a[0].detach()))
    with torch.no_grad():
        for i in range(len(store)):
            layered.blocks[index](store.hidden(i), **store.kwargs(i, index))
    handle.remove()
    everything = torch.cat(seen["x"])
    with ExpertInputs(experts_module) as recorder, torch.no_grad():
        k = layered.model.config.num_experts_per_tok
        experts_module(everything, torch.full((len(everything), k), 3), torch.full((len(everything), k), 1 / k))
    down_rows = torch.cat(recorder.rows[("down_proj", 3)])[: len(everything)]
    for group, stat in zip(groups, stats):
        if group.expert != 3:
            continue
        width = group.targets[0].in_features
        x = everything if group.part == "gate_up_proj" else down_rows
        assert stat.tokens == 0 and stat.extra["all_tokens"] == len(everything) and "0 routed tokens" in stat.rule
        torch.testing.assert_close(stat.hessian, width / len(everything) * (x.T @ x), rtol=1e-5, atol=1e-5)

    # the whole run: expert 3's matrices are pruned 2:4 on that Hessian, not left at zero
    src = save_tiny_model("deepseek_v3", tmp_path / "src", poison=starve)
    report = prune_model(
        PruneJob(
            model=str(src), out=str(tmp_path / "out"), num_calibration_samples=4, max_seq_length=32, evaluate=False
        )
    )
    starved = [r for r in report["layers"] if r.get("expert") == 3]
    assert len(starved) == 2 and all(r["tokens"] == 0 and "0 routed tokens" in r["hessian"] for r in starved)
    assert all(r["nm_valid"] and r["sparsity"] == 0.5 and r["relative_loss"] < 0.5 for r in starved)
    import safetensors.torch

    weights = safetensors.torch.load_file(tmp_path / "out" / "model.safetensors")
    for part in ("gate_proj", "up_proj", "down_proj"):
        weight = weights[f"model.layers.1.mlp.experts.3.{part}.weight"]
        assert is_nm_sparse(weight, 2, 4) and (weight != 0).float().mean() == 0.5


def test_routed_tokens_only_leaves_an_unreached_expert_dense_and_says_so(tmp_path):
    def starve(model):
        model.model.layers[1].mlp.gate.e_score_correction_bias[3] = -1e9

    src = save_tiny_model("deepseek_v3", tmp_path / "src", poison=starve)
    report = prune_model(
        PruneJob(
            model=str(src),
            out=str(tmp_path / "out"),
            num_calibration_samples=4,
            max_seq_length=32,
            evaluate=False,
            run=RunConfig(expert_min_tokens=0),
        )
    )
    starved = [r for r in report["layers"] if r.get("expert") == 3]
    assert all(r["skipped"] == "no calibration input reached this layer" for r in starved)


@pytest.mark.parametrize(
    "family, expected",
    [
        (
            "llama",
            [
                ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                ["self_attn.o_proj"],
                ["mlp.gate_proj", "mlp.up_proj"],
                ["mlp.down_proj"],
            ],
        ),
        (
            "deepseek_v3",
            [
                ["self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa"],
                ["self_attn.q_b_proj"],
                ["self_attn.kv_b_proj"],
                ["self_attn.o_proj"],
            ],
        ),
        ("llama4_text", [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"]]),
    ],
)
def test_groups_are_the_layers_that_read_one_input_in_the_order_the_block_runs_them(family, expected):
    layered, index, store, targets, groups = last_block(family)
    prefix = layered.block_prefix(index)
    names = [[t.name[len(prefix) :] for t in g.targets] for g in groups]
    assert names[: len(expected)] == expected
    if family == "llama4_text":  # the router stays dense; the shared expert's gate and up share an input
        assert ["feed_forward.shared_expert.gate_proj", "feed_forward.shared_expert.up_proj"] in names
        assert not any("router" in n for group in names for n in group)
        experts = [n for group in names for n in group if "experts." in n]
        assert experts == [f"feed_forward.experts.{p}[{e}]" for p in ("gate_up_proj", "down_proj") for e in range(4)]
