"""The graph-ready Llama computes what transformers computes: prefill and step-by-step decode logits."""

import torch
import transformers

from runtime_bench.static_llama import decode_tokens_per_s, from_transformers, prefill_ms, sparsify
from serving.sparse_op import SPEED_FIRST
from tests.serving.interpreter import needs_kernels


def _tiny(tie: bool):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    return transformers.LlamaForCausalLM(config).eval()


def test_prefill_and_every_decode_step_match_transformers():
    for tie in (False, True):
        hf = _tiny(tie)
        model = from_transformers(hf, max_batch=2, max_len=32)
        ids = torch.randint(0, 300, (2, 11))
        with torch.no_grad():
            full = hf(ids).logits
        torch.testing.assert_close(model.prefill(ids[:, :7]), full[:, 6], atol=1e-5, rtol=1e-5)
        for t in range(7, 11):  # every other step attends to a window of the cache, as the timed decode does
            step = model.decode(ids[:, t : t + 1], torch.tensor(t), window=12 if t % 2 else None)
            torch.testing.assert_close(step, full[:, t], atol=1e-5, rtol=1e-5)


@needs_kernels
def test_served_by_the_sparse_op_the_model_keeps_its_logits_and_the_timers_run():
    hf = _tiny(False)
    with torch.no_grad():
        for module in hf.model.layers.modules():
            if isinstance(module, torch.nn.Linear):
                keep = module.weight.abs().reshape(-1, 4).argsort(-1)[:, 2:]
                mask = torch.zeros_like(module.weight).reshape(-1, 4).scatter_(-1, keep, 1.0)
                module.weight.mul_(mask.reshape(module.weight.shape))
    model = from_transformers(hf, max_batch=2, max_len=32)
    ids = torch.randint(0, 300, (2, 9))
    before = model.prefill(ids)
    assert sparsify(model, SPEED_FIRST) == 14
    torch.testing.assert_close(model.prefill(ids), before, atol=0.0, rtol=0.0)  # speed-first, unmeasured: dense
    assert prefill_ms(model, 1, 8, graphed=False, repeats=1)["median"] > 0
    assert decode_tokens_per_s(model, 2, 4, 3, graphed=False, repeats=1)["median"] > 0
