"""Mixture-of-experts layers: fused 3-D expert weights seen as one ``[out, in]`` matrix per expert, and the
inputs each expert receives during calibration.

transformers 5 stores the experts of a MoE block as two 3-D parameters, ``gate_up_proj`` (gate and up of
every expert) and ``down_proj``: ``[E, out, in]`` (qwen3_moe, mixtral, deepseek_v3), or transposed
``[E, in, out]`` (gpt_oss, llama4). Classes decorated with ``@use_experts_implementation`` record their
layout on the module (``is_transposed``, ``is_concatenated``, ``has_bias``); their forward receives the
hidden states ``[T, H]`` and each token's chosen experts ``[T, k]``, and expert e computes on the tokens
routed to it. Llama 4's experts are not decorated: every expert runs on every token, its input already
scaled by the router score (zero where the token was not routed to it), so they are described here.

Each expert's gate/up (one matrix, ``[2I, H]``: gate and up read the same input and share one Hessian)
and down (``[H, I]``) are layers of their own, 2:4 along their input dimension.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from apt.errors import UnsupportedModelError

PARTS = ("gate_up_proj", "down_proj")


@dataclass(frozen=True)
class ExpertsLayout:
    """How an experts module stores and runs its experts. ``transposed``: weights are ``[E, in, out]``;
    ``routed``: the forward takes ``(hidden [T, H], top_k_index [T, k], ...)`` and each expert sees only
    its tokens; otherwise the forward takes ``[E·T, H]``, a block of rows per expert."""

    transposed: bool
    routed: bool
    bias: bool


# Experts classes transformers does not decorate, with how they work (read in transformers 5.24's source).
UNDECORATED = {
    # modeling_llama4.py Llama4TextExperts: gate_up_proj [E, H, 2I] (gate = first half of the columns),
    # torch.bmm over every expert's block of rows of the router-scaled input
    "Llama4TextExperts": ExpertsLayout(transposed=True, routed=False, bias=False),
}


def experts_layout(module: torch.nn.Module) -> ExpertsLayout | None:
    """The layout of a fused experts module, ``None`` for any other module; an experts module whose
    layout is unknown is an error that names it."""
    params = {name: p for name, p in module.named_parameters(recurse=False)}
    if not all(part in params and params[part].dim() == 3 for part in PARTS):
        return None
    name = type(module).__name__
    if name in UNDECORATED:
        return UNDECORATED[name]
    if not hasattr(module, "is_transposed"):
        raise UnsupportedModelError(
            f"{name} holds fused 3-D expert weights but records no layout (transformers' "
            "@use_experts_implementation) and apt-sparse does not know it: leave it dense with --ignore "
            f"'{name}' or report the model"
        )
    return ExpertsLayout(
        transposed=bool(module.is_transposed), routed=True, bias=bool(getattr(module, "has_bias", False))
    )


def expert_matrix(module: torch.nn.Module, layout: ExpertsLayout, part: str, expert: int) -> torch.Tensor:
    """Expert ``expert``'s ``part`` as an ``[out, in]`` view of the fused parameter (writes go through)."""
    weight = getattr(module, part)[expert]
    return weight.T if layout.transposed else weight


def _gate_up(module, layout: ExpertsLayout, expert: int, x: torch.Tensor) -> torch.Tensor:
    w = module.gate_up_proj[expert]
    out = x @ w if layout.transposed else torch.nn.functional.linear(x, w)
    if layout.bias:
        out = out + module.gate_up_proj_bias[expert]
    return out


def _activation(module, layout: ExpertsLayout, gate_up: torch.Tensor) -> torch.Tensor:
    """The down projection's input from the gate/up output, as the module computes it."""
    if layout.routed:
        return module._apply_gate(gate_up)  # the decorator's default (act(gate)·up) or the class's own
    gate, up = gate_up.chunk(2, dim=-1)
    return up * module.act_fn(gate)


def routed_rows(module, layout: ExpertsLayout, arguments: list) -> Iterator[tuple[int, torch.Tensor]]:
    """``(expert, rows)`` for every expert: the input rows ``[n, H]`` the expert computes on in this call
    (``arguments``: the forward's arguments in order). For unrouted layouts, the nonzero rows of its block."""
    hidden = arguments[0]
    experts = module.gate_up_proj.shape[0]
    if layout.routed:
        index = arguments[1]
        for e in range(experts):
            yield e, hidden[(index == e).any(dim=-1)]
        return
    blocks = hidden.reshape(experts, -1, hidden.shape[-1])
    for e in range(experts):
        rows = blocks[e]
        yield e, rows[(rows != 0).any(dim=-1)]


def all_rows(module, layout: ExpertsLayout, arguments: list) -> torch.Tensor:
    """Every input row the experts module received in this call ``[N, H]`` (zero rows dropped): what an
    expert with too few routed tokens is calibrated on besides them."""
    hidden = arguments[0].reshape(-1, arguments[0].shape[-1])
    return hidden if layout.routed else hidden[(hidden != 0).any(dim=-1)]


def down_inputs(module, layout: ExpertsLayout, expert: int, rows: torch.Tensor) -> torch.Tensor:
    """The down projection's input for ``rows`` of expert ``expert``'s gate/up input."""
    return _activation(module, layout, _gate_up(module, layout, expert, rows))
