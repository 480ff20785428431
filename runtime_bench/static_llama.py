"""A Llama forward made for CUDA graphs: a static KV cache, fixed shapes, the position as a device tensor.

Serving stacks run decode as a replayed CUDA graph (vLLM captures every batch size it serves); timing a
2:4 model eagerly through transformers measures Python and launch overhead, not the GEMMs we change. This
module is the same computation as transformers' ``LlamaForCausalLM`` (RMSNorm, rotary embeddings as
``rotate_half``, grouped-query attention, SwiGLU; the tests compare the logits) with every step capturable:

- ``prefill(ids)`` runs ``[B, T]`` tokens from position 0, fills the cache, and returns the last
  position's logits ``[B, vocab]`` (what a server samples from; the full ``[B, T, vocab]`` would be 4 GB
  at 8×2048 tokens of Llama-3-8B).
- ``decode(ids, pos)`` runs one token per sequence at position ``pos`` (a 0-d int64 device tensor, so one
  captured graph serves every step) against the cache.

Block Linears are ordinary ``nn.Linear`` until ``sparsify`` replaces them with ``serving.sparse_op``'s
``Sparse24Linear``. ``random_weights`` builds a model of any Llama shape directly on the device (kernel
speed depends on shapes and the 2:4 pattern, not on values), ``from_transformers`` copies a real one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from apt.solver import select_mask
from apt.solver.fp8 import quantize_weight
from apt.solver.patterns import Pattern
from serving.timing import summary

BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LlamaShape:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """``name: (out, in)`` of each block Linear."""
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        kv = self.num_key_value_heads * d
        return {
            "q_proj": (h, h),
            "k_proj": (kv, h),
            "v_proj": (kv, h),
            "o_proj": (h, h),
            "gate_proj": (i, h),
            "up_proj": (i, h),
            "down_proj": (h, i),
        }


SMOLLM2_135M = LlamaShape(49152, 576, 1536, 30, 9, 3, 100000.0, 1e-5, True)
LLAMA3_8B = LlamaShape(128256, 4096, 14336, 32, 32, 8, 500000.0, 1e-5, False)


class _Block(torch.nn.Module):
    def __init__(self, shape: LlamaShape, dtype, device):
        super().__init__()
        for name, (out, inp) in shape.linear_shapes().items():
            setattr(self, name, torch.nn.Linear(inp, out, bias=False, dtype=dtype, device=device))
        self.input_norm = torch.nn.Parameter(torch.ones(shape.hidden_size, dtype=dtype, device=device))
        self.post_norm = torch.nn.Parameter(torch.ones(shape.hidden_size, dtype=dtype, device=device))


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # As transformers' LlamaRMSNorm: normalise in float32, cast back, then scale.
    normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class StaticLlama(torch.nn.Module):
    def __init__(self, shape: LlamaShape, max_batch: int, max_len: int, dtype=torch.bfloat16, device="cuda"):
        super().__init__()
        self.shape, self.max_batch, self.max_len = shape, max_batch, max_len
        self.embed = torch.nn.Parameter(torch.empty(shape.vocab_size, shape.hidden_size, dtype=dtype, device=device))
        self.blocks = torch.nn.ModuleList(_Block(shape, dtype, device) for _ in range(shape.num_hidden_layers))
        self.norm = torch.nn.Parameter(torch.ones(shape.hidden_size, dtype=dtype, device=device))
        self.lm_head = (
            self.embed
            if shape.tie_word_embeddings
            else torch.nn.Parameter(torch.empty(shape.vocab_size, shape.hidden_size, dtype=dtype, device=device))
        )
        kv, d = shape.num_key_value_heads, shape.head_dim
        cache = (shape.num_hidden_layers, max_batch, kv, max_len, d)
        self.register_buffer("k_cache", torch.zeros(cache, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(cache, dtype=dtype, device=device), persistent=False)
        inv_freq = 1.0 / (shape.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d))
        angles = torch.outer(torch.arange(max_len, dtype=torch.float32, device=device), inv_freq)
        angles = torch.cat((angles, angles), dim=-1)
        self.register_buffer("cos", angles.cos().to(dtype), persistent=False)
        self.register_buffer("sin", angles.sin().to(dtype), persistent=False)

    def _attention(self, i: int, block: _Block, x, positions, decode_pos, window: int):
        b, t, _ = x.shape
        s, d = self.shape, self.shape.head_dim
        q = block.q_proj(x).view(b, t, s.num_attention_heads, d).transpose(1, 2)
        k = block.k_proj(x).view(b, t, s.num_key_value_heads, d).transpose(1, 2)
        v = block.v_proj(x).view(b, t, s.num_key_value_heads, d).transpose(1, 2)
        cos, sin = self.cos[positions], self.sin[positions]  # [t, d]
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        # grouped-query attention by repeating the key/value heads: every SDPA kernel (flash too) takes it
        repeat = s.num_attention_heads // s.num_key_value_heads
        if decode_pos is None:  # prefill from position 0: causal over the prompt, which fills the cache
            self.k_cache[i, :b, :, :t] = k
            self.v_cache[i, :b, :, :t] = v
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # one token against the first ``window`` cache positions, those past ``pos`` masked
            self.k_cache[i, :b].index_copy_(2, positions, k)
            self.v_cache[i, :b].index_copy_(2, positions, v)
            keys = self.k_cache[i, :b, :, :window].repeat_interleave(repeat, dim=1)
            values = self.v_cache[i, :b, :, :window].repeat_interleave(repeat, dim=1)
            visible = (torch.arange(window, device=x.device) <= decode_pos).view(1, 1, 1, -1)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=visible)
        return block.o_proj(out.transpose(1, 2).reshape(b, t, s.hidden_size))

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, decode_pos, window: int = 0) -> torch.Tensor:
        s = self.shape
        x = F.embedding(ids, self.embed)
        for i, block in enumerate(self.blocks):
            normed = _rms_norm(x, block.input_norm, s.rms_norm_eps)
            x = x + self._attention(i, block, normed, positions, decode_pos, window)
            h = _rms_norm(x, block.post_norm, s.rms_norm_eps)
            x = x + block.down_proj(F.silu(block.gate_proj(h)) * block.up_proj(h))
        last = _rms_norm(x[:, -1], self.norm, s.rms_norm_eps)
        return F.linear(last, self.lm_head)

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, vocab]`` of the last of ``ids`` ``[B, T]`` (positions 0…T-1); fills the cache."""
        positions = torch.arange(ids.shape[1], device=ids.device)
        return self._forward(ids, positions, None)

    @torch.no_grad()
    def decode(self, ids: torch.Tensor, pos: torch.Tensor, window: int | None = None) -> torch.Tensor:
        """Logits ``[B, vocab]`` of one token per sequence (``ids`` ``[B, 1]``) at position ``pos`` (0-d int64),
        attending to the first ``window`` cache positions (a fixed size, so one graph serves every step; by
        default the whole cache). A server attends to the tokens there are: pass the sequence's length."""
        return self._forward(ids, pos.reshape(1), pos, window or self.max_len)

    def linears(self):
        """``(block index, name, nn.Module)`` of every block Linear."""
        for i, block in enumerate(self.blocks):
            for name in BLOCK_LINEARS:
                yield i, name, getattr(block, name)

    def weight_bytes(self) -> dict:
        """Bytes of the block Linears' weights (every copy a layer keeps) and of the rest (embeddings, head)."""
        blocks = 0
        for _, _, module in self.linears():
            blocks += module.weight_bytes() if hasattr(module, "weight_bytes") else module.weight.nbytes
        rest = self.embed.nbytes + (0 if self.shape.tie_word_embeddings else self.lm_head.nbytes)
        return {"block_linears": blocks, "embeddings_and_head": rest, "total": blocks + rest}


def random_weights(shape: LlamaShape, max_batch: int, max_len: int, dtype, device, pruned: bool, seed: int = 0):
    """A ``StaticLlama`` with random weights made on ``device`` (scaled so activations stay finite); with
    ``pruned`` every block Linear is 2:4 by magnitude."""
    model = StaticLlama(shape, max_batch, max_len, dtype, device)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        model.embed.normal_(0, 1.0, generator=g)
        if not shape.tie_word_embeddings:
            model.lm_head.normal_(0, shape.hidden_size**-0.5, generator=g)
        for _, _, linear in model.linears():
            linear.weight.normal_(0, linear.in_features**-0.5, generator=g)
            if pruned:
                linear.weight.mul_(select_mask(linear.weight.abs().float(), Pattern(2, 4)).to(dtype))
    return model


def from_transformers(hf_model, max_batch: int, max_len: int) -> StaticLlama:
    """The weights of a transformers ``LlamaForCausalLM`` (default rotary scaling) in a ``StaticLlama``."""
    c = hf_model.config
    shape = LlamaShape(
        c.vocab_size,
        c.hidden_size,
        c.intermediate_size,
        c.num_hidden_layers,
        c.num_attention_heads,
        c.num_key_value_heads,
        float(getattr(c, "rope_theta", None) or (c.rope_parameters or {}).get("rope_theta", 10000.0)),
        c.rms_norm_eps,
        bool(c.tie_word_embeddings),
    )
    weight = hf_model.model.embed_tokens.weight
    model = StaticLlama(shape, max_batch, max_len, weight.dtype, weight.device)
    with torch.no_grad():
        model.embed.copy_(weight)
        if not shape.tie_word_embeddings:
            model.lm_head.copy_(hf_model.lm_head.weight)
        model.norm.copy_(hf_model.model.norm.weight)
        for block, layer in zip(model.blocks, hf_model.model.layers):
            block.input_norm.copy_(layer.input_layernorm.weight)
            block.post_norm.copy_(layer.post_attention_layernorm.weight)
            for name in BLOCK_LINEARS:
                parent = layer.self_attn if name in ("q_proj", "k_proj", "v_proj", "o_proj") else layer.mlp
                getattr(block, name).weight.copy_(getattr(parent, name).weight)
    return model


class DenseFp8Linear(torch.nn.Module):
    """Dense W8A8 FP8 (the baseline an FP8 2:4 model is compared with): e4m3 weights with per-channel scales,
    activations quantized per token, ``torch._scaled_mm`` (``serving.sparse_op.fp8_linear``)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        quantized, scale = quantize_weight(weight)
        self.register_buffer("weight", quantized)
        self.register_buffer("weight_scale", scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from serving import triton24
        from serving.sparse_op import FP8_MAX, FP8_MIN_SCALE, fp8_linear, quantize_tokens

        flat = x.reshape(-1, x.shape[-1])
        if triton24.available(x.device, torch.float8_e4m3fn)[0]:
            x_q, scale_x = triton24.quantize_tokens(flat, FP8_MAX, FP8_MIN_SCALE)
        else:
            x_q, scale_x = quantize_tokens(flat)
        out = fp8_linear(x_q, scale_x, self.weight, self.weight_scale, None, x.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)

    def weight_bytes(self) -> int:
        return self.weight.nbytes + self.weight_scale.nbytes


def sparsify(
    model: StaticLlama, mode: str, dispatch_for: Callable[[int, int], object] | None = None, fp8: bool = False
) -> int:
    """Serve every block Linear (an ``nn.Linear`` with a 2:4 weight, or a ``Sparse24Linear`` already) by a new
    ``Sparse24Linear`` in ``mode`` with the dispatch ``dispatch_for(in, out)`` (``None``: the op's default);
    ``fp8``: its weight quantized per output channel to e4m3 (an FP8 layer keeps its weight and scales). The
    dense weight is shared, never copied. Returns how many were replaced."""
    from serving.sparse_op import Sparse24Linear

    replaced = 0
    for i, name, module in list(model.linears()):
        scale = getattr(module, "weight_scale", None)
        weight = module.weight if isinstance(module, torch.nn.Linear) else module.dense
        if weight is None:
            weight = module.unpacked()
        if fp8 and scale is None:
            weight, scale = quantize_weight(weight)
        dispatch = dispatch_for(module.in_features, module.out_features) if dispatch_for else None
        setattr(model.blocks[i], name, Sparse24Linear(weight.detach(), None, mode, dispatch, weight_scale=scale))
        replaced += 1
    return replaced


class _Timer:
    """CUDA events on a GPU, a host clock on the CPU (eager only)."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def __enter__(self):
        if self.cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.began = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.end.record()
            torch.cuda.synchronize()
            self.ms = self.start.elapsed_time(self.end)
        else:
            self.ms = (time.perf_counter() - self.began) * 1e3


class CapturedStep:
    """One step captured as a CUDA graph over static inputs (``graph.replay()`` runs it), or the step itself
    where ``graphed`` is off (a CPU)."""

    def __init__(self, fn: Callable[[], torch.Tensor], graphed: bool = True, warmup: int = 2):
        self.fn, self.graph = fn, None
        if not graphed:
            return
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            fn()

    def __call__(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self.fn()


def _device(model: StaticLlama) -> torch.device:
    return model.embed.device


def prefill_ms(model: StaticLlama, batch: int, seq: int, graphed: bool, repeats: int = 5) -> dict:
    """Milliseconds of one ``batch × seq`` prefill (a replayed CUDA graph, or eager)."""
    device = _device(model)
    ids = torch.randint(10, model.shape.vocab_size, (batch, seq), device=device)
    step = CapturedStep(lambda: model.prefill(ids), graphed)
    step()
    samples = []
    for _ in range(repeats):
        with _Timer(device.type == "cuda") as timer:
            step()
        samples.append(timer.ms)
    return summary(samples)


def decode_tokens_per_s(
    model: StaticLlama, batch: int, prompt: int, new_tokens: int, graphed: bool, repeats: int = 3
) -> dict:
    """Greedy decode tokens/s at ``batch`` after a ``prompt``-token prefill: each step (forward, argmax into the
    next input, position + 1) is one replayed CUDA graph where ``graphed``."""
    if prompt + new_tokens > model.max_len:
        raise ValueError(f"prompt + new tokens = {prompt + new_tokens} exceeds the cache ({model.max_len})")
    device = _device(model)
    ids = torch.randint(10, model.shape.vocab_size, (batch, prompt), device=device)
    token = torch.zeros(batch, 1, dtype=torch.long, device=device)
    pos = torch.zeros((), dtype=torch.long, device=device)

    window = min(model.max_len, prompt + new_tokens + 4)  # the graph's warm-up steps run 3 past the end

    def step():
        logits = model.decode(token, pos, window)
        token.copy_(logits.argmax(-1, keepdim=True))
        pos.add_(1)
        return logits

    pos.fill_(prompt)
    captured = CapturedStep(step, graphed)  # its warm-up steps write past the prompt: refilled below
    samples = []
    for _ in range(repeats):
        token.copy_(model.prefill(ids).argmax(-1, keepdim=True))
        pos.fill_(prompt)
        with _Timer(device.type == "cuda") as timer:
            for _ in range(new_tokens):
                captured()
        samples.append(batch * new_tokens / (timer.ms / 1e3))
    return summary(samples)
