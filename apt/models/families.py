"""Where discovery (``apt.models.discovery``) needs help: a small table keyed by ``config.model_type``, each
entry saying what it overrides and why. Every other model is understood from itself.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Override:
    """What discovery cannot read off a model of this type: the dotted path of its blocks, whether it is a
    causal LM, the modules applied after its last block (a path absent or ``None`` in a given config is
    skipped), that its ``logits_scaling`` multiplies the logits where Granite's divides them
    (``logits_scaling_multiplies``), or that it cannot be pruned block by block at all (``refused``: the run
    stops with ``why``); ``why`` is said in the report."""

    why: str
    block_path: str | None = None
    causal: bool | None = None
    final: tuple[str, ...] | None = None
    logits_scaling_multiplies: bool = False
    refused: bool = False


OVERRIDES: dict[str, Override] = {
    # modeling_opt.py: OPTDecoder registers final_layer_norm and project_out before its layers, and
    # project_in (applied before block 0) beside them, so registration order does not say what follows
    # the last block.
    "opt": Override(
        why="OPT registers its final norm and output projection before its blocks",
        final=("model.decoder.final_layer_norm", "model.decoder.project_out", "lm_head"),
    ),
    # modeling_hyperclovax.py (transformers 5.25) HyperCLOVAXForCausalLM.forward: "MuP: multiply logits by
    # logits_scaling (cf. GraniteForCausalLM which divides)": the same config key, the other way round.
    "hyperclovax": Override(
        why="HyperCLOVAX multiplies its logits by logits_scaling, which Granite divides them by",
        logits_scaling_multiplies=True,
    ),
    # modeling_hrm_text.py (transformers 5.25) HrmTextModel.forward: two stacks of blocks (L_module, H_module)
    # run in H_cycles × (L_cycles + 1) rounds, every block several times per token, each time on other inputs.
    "hrm_text": Override(
        why="its two stacks of blocks (L_module and H_module) run in cycles, every block several times per token "
        "on other inputs, so no single order of blocks describes the model",
        refused=True,
    ),
    # modeling_zaya.py (transformers 5.25): ZayaModel's loop hands each ZayaDecoderLayer's second output, its
    # router's hidden states, to the next layer's router (prev_router_hidden_states). A block run on its own, as
    # the streamed run and evaluation run it, would get None there; the recorded calls cannot carry it.
    "zaya": Override(
        why="its blocks hand their router's hidden states to the next block (prev_router_hidden_states) besides "
        "the hidden states, and a block pruned or evaluated on its own cannot be given them",
        refused=True,
    ),
}
