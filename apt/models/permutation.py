"""Input channels a layer can reorder for free: a gated MLP's down projection reads ``act(gate(x)) · up(x)``
channel by channel, so permuting the rows of gate and up and the columns of down alike leaves the block's
function unchanged and the checkpoint an ordinary one. ``apt.solver.permute`` chooses the permutation;
this module says where one is free and applies it.
"""

from __future__ import annotations

import torch

GATES = ("gate_proj", "up_proj")  # separate Linears (llama, qwen, mistral, gemma, granite, olmo, deepseek)
FUSED = "gate_up_proj"  # one Linear, gate rows then up rows (phi3)


def free_partners(model: torch.nn.Module, target) -> list[tuple[torch.nn.Linear, int]] | None:
    """For a down projection (a Linear target named ``down_proj``) beside its gate and up projections, the
    Linears whose output rows must follow a permutation of its inputs, with the number of row blocks each
    holds (2 for a fused gate/up); ``None`` where its inputs are not free to reorder."""
    if target.is_expert or not target.name.endswith(".down_proj"):
        return None
    parent = model.get_submodule(target.name.rpartition(".")[0])
    width = target.module.in_features
    gates = [getattr(parent, n, None) for n in GATES]
    if all(isinstance(g, torch.nn.Linear) and g.out_features == width for g in gates):
        return [(g, 1) for g in gates]
    fused = getattr(parent, FUSED, None)
    if isinstance(fused, torch.nn.Linear) and fused.out_features == 2 * width:
        return [(fused, 2)]
    return None


def permute_rows(partners: list[tuple[torch.nn.Linear, int]], perm: torch.Tensor) -> None:
    """Reorder the partners' output rows (each of their row blocks) by ``perm``, in place."""
    for linear, blocks in partners:
        width = linear.out_features // blocks
        order = torch.cat([perm.to(linear.weight.device) + b * width for b in range(blocks)])
        with torch.no_grad():
            linear.weight.data.copy_(linear.weight.data[order])
            if linear.bias is not None:
                linear.bias.data.copy_(linear.bias.data[order])
