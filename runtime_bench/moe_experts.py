"""What the rule for starved MoE experts does: each expert's output error on held-out tokens, when experts that
received few or no calibration tokens are pruned on their routed tokens alone, or blended with every token
the experts received (the default).

    python -m runtime_bench.moe_experts [--windows 8] [--seq-len 64]

A DeepSeek-V3 model of tiny, random weights (8 experts, top-2) whose router score bias starves expert 7
of every token and expert 6 of most: the random weights say nothing about accuracy, only about what each
rule does to an expert's function. The error of expert e is ``‖f_pruned(x) − f_dense(x)‖² / ‖f_dense(x)‖²``
over every held-out token the experts module receives (the tokens an expert would see once routing
shifts on other text). Zeroing an expert (what SparseGPT's dead-column rule makes of ``H = 0``) would
lose its whole output, an error of 1 by definition; it is not run.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
import transformers

from apt.models.loading import load_tokenizer, resolve_model
from apt.run import RunConfig
from apt.run.resident import calibrate_and_prune
from apt.text.sources import load_text, token_windows
from runtime_bench import save_results

CONFIG = dict(
    vocab_size=30522,
    hidden_size=64,
    num_hidden_layers=2,
    max_position_embeddings=256,
    num_attention_heads=4,
    num_key_value_heads=4,
    intermediate_size=192,
    moe_intermediate_size=64,
    q_lora_rank=32,
    kv_lora_rank=32,
    qk_rope_head_dim=8,
    qk_nope_head_dim=16,
    v_head_dim=16,
    n_routed_experts=8,
    n_shared_experts=1,
    num_experts_per_tok=2,
    n_group=1,
    topk_group=1,
    first_k_dense_replace=1,
    initializer_range=0.1,
)


def build():
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        transformers.DeepseekV3Config(**CONFIG), experts_implementation="eager"
    ).eval()
    bias = model.model.layers[1].mlp.gate.e_score_correction_bias
    bias[7] = -1e9  # no token
    bias[6] = -0.25  # few tokens
    return model


def expert_inputs(model, windows) -> torch.Tensor:
    """Every row the experts module of block 1 receives on ``windows``."""
    rows = []
    experts = model.model.layers[1].mlp.experts
    handle = experts.register_forward_pre_hook(lambda m, args: rows.append(args[0].detach().clone()))
    with torch.no_grad():
        model(input_ids=windows)
    handle.remove()
    return torch.cat(rows)


def expert_outputs(experts, x: torch.Tensor) -> list[torch.Tensor]:
    """Each expert's output on every row (weight 1): ``f_e(x)``."""
    out = []
    with torch.no_grad():
        for e in range(experts.gate_up_proj.shape[0]):
            k = torch.full((len(x), 1), e)
            out.append(experts(x, k, torch.ones(len(x), 1)))
    return out


def run(windows: int, seq_len: int) -> dict:
    tokenizer = load_tokenizer(resolve_model("minilm-l6").location)
    text = load_text("stdlib")
    calibration = token_windows(text.calibration, tokenizer, windows, seq_len)
    held_out = token_windows(text.evaluation, tokenizer, windows, seq_len)
    dense = build()
    x = expert_inputs(dense, held_out)
    reference = expert_outputs(dense.model.layers[1].mlp.experts, x)
    rules = {
        "blended (default)": RunConfig(batch_size=4),
        "routed tokens only": RunConfig(batch_size=4, expert_min_tokens=0),
    }
    results = {"experts": {}}
    for name, config in rules.items():
        model = copy.deepcopy(dense)
        report = calibrate_and_prune(model, calibration, config)
        outputs = expert_outputs(model.model.layers[1].mlp.experts, x)
        for e, (got, ref) in enumerate(zip(outputs, reference)):
            record = next(r for r in report["layers"] if r["name"].endswith(f"experts.down_proj[{e}]"))
            row = results["experts"].setdefault(e, {"routed_tokens": record["tokens"]})
            row[name] = float(((got - ref) ** 2).sum() / (ref**2).sum())
            if record["skipped"]:
                row[name + " note"] = "left dense: " + record["skipped"]
    return results | {"windows": windows, "seq_len": seq_len, "held_out_rows": len(x)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    results = run(args.windows, args.seq_len)
    for e, row in results["experts"].items():
        note = f"  ({row['routed tokens only note']})" if "routed tokens only note" in row else ""
        print(
            f"expert {e}: {row['routed_tokens']:4d} routed tokens  blended {row['blended (default)']:.4f}  "
            f"routed only {row['routed tokens only']:.4f}{note}"
        )
    out = Path(args.out) if args.out else Path(__file__).resolve().parent / "results" / "moe_experts.json"
    save_results(out, results, "runtime_bench.moe_experts", argv)


if __name__ == "__main__":
    main()
