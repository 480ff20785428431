"""What to prune, found from the model itself, as llm-compressor finds it.

- **Blocks**: the ``ModuleList`` whose modules are of a class the model names in ``_no_split_modules``
  (the unit transformers never splits across devices), searched under the text decoder of
  vision-language wrappers.
- **Prunable matrices** of a block: every ``nn.Linear``, except routers (they choose experts: a class
  named ``*Router``, or a ``gate``/``router`` whose outputs are the experts), every transformers
  ``Conv1D`` (GPT-2's Linear, its weight stored transposed ``[in, out]``: pruned along ``in`` like any
  Linear and kept in its own layout), and every expert of a fused experts module
  (``apt.models.experts``), each expert's gate/up and down a matrix of its own.
- **Groups** that share a Hessian: the layers that read the same input tensor, found in one forward
  pass of the block with a pre-hook on each (``find_groups``): {q, k, v}, {gate, up}, DeepSeek's
  {q_a_proj, kv_a_proj_with_mqa}, Llama 4's {shared_expert.gate, shared_expert.up}. Each expert is a
  group of its own, fed the tokens routed to it.
- **The model's end**: the module(s) after the last block (final norm, LM head), and the causal/encoder
  question (``config.architectures``).
- **A vision-language model's vision part** (pruned only when asked): the vision tower's blocks, the one
  other list of repeated blocks outside the text decoder (``vision_block_path``), and the Linears outside
  both lists and the decoder (the projector, Qwen2-VL's patch merger: ``vision_tail_targets``).

``apt.models.families`` holds the few overrides discovery needs, each with its reason.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from apt.errors import UnsupportedModelError
from apt.models.experts import PARTS, ExpertsLayout, expert_matrix, experts_layout
from apt.models.families import OVERRIDES

CAUSAL_ARCHITECTURES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")
ROUTER_NAMES = ("gate", "router", "shared_expert_gate")
# the config fields transformers' causal LMs read to soft-cap the logits, ``cap · tanh(logits / cap)``: Gemma 2/3's,
# RecurrentGemma's, xLSTM's
SOFTCAP_NAMES = ("final_logit_softcapping", "logits_soft_cap", "output_logit_soft_cap")
# the config fields by which they divide the logits (or the last hidden states, before a head without bias): Granite's
# logits_scaling, Inkling's μP width multiplier
DIVISOR_NAMES = ("logits_scaling", "logits_mup_width_multiplier")


@dataclass(frozen=True)
class ModelLayout:
    """Where a model's parts are: ``block_path`` (dotted path to the blocks' ModuleList), ``causal`` (a
    language model scored by perplexity, or an encoder scored by its embeddings), ``final`` (dotted
    paths of the modules applied, in order, to the last block's output), and what transformers does to
    the logits after the head (``logit_softcap``: Gemma's ``tanh`` capping; ``logit_divisor``: Granite's
    ``logits_scaling``)."""

    model_type: str
    block_path: str
    causal: bool
    final: tuple[str, ...]
    logit_softcap: float | None = None
    logit_divisor: float | None = None
    how: str = "discovered"

    @property
    def name(self) -> str:
        return self.model_type


@dataclass
class Target:
    """One matrix pruned as a layer: a Linear's weight, or one expert's gate/up or down of a fused experts
    module. ``name`` is what the report calls it (``model.layers.1.mlp.experts.down_proj[3]`` for an
    expert); ``parameter`` the model parameter that holds it."""

    name: str
    module: torch.nn.Module
    parameter: str
    expert: int | None = None
    layout: ExpertsLayout | None = None

    @property
    def is_expert(self) -> bool:
        return self.expert is not None

    @property
    def part(self) -> str:
        return self.parameter.rpartition(".")[2]

    @property
    def weight(self) -> torch.Tensor:
        """The matrix ``[out, in]``: a view of the parameter (writes go through)."""
        if self.expert is None:
            return self.module.weight.data.T if is_conv1d(self.module) else self.module.weight.data
        return expert_matrix(self.module, self.layout, self.part, self.expert).data

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def in_axis(self) -> int:
        """The axis of the stored parameter along which the pattern runs."""
        if self.expert is None:
            return -2 if is_conv1d(self.module) else -1
        return -2 if self.layout is not None and self.layout.transposed else -1


@dataclass
class Group:
    """Targets that share one Hessian. ``source`` is the module whose input they read: the first Linear
    of the group, or the experts module (for an expert's gate/up: its routed tokens; for its down: the
    activations of those tokens)."""

    targets: list[Target]
    source: torch.nn.Module
    expert: int | None = None
    part: str | None = None


@dataclass
class BlockPlan:
    """A block's prunable targets in module order, and (once ``find_groups`` has run) their groups in the
    order the block computes them."""

    targets: list[Target]
    groups: list[Group] = field(default_factory=list)


def layout_of(model: torch.nn.Module) -> ModelLayout:
    """Discover ``model``'s layout (see the module docstring), with the override table applied."""
    config = model.config
    model_type = getattr(config, "model_type", None) or type(model).__name__
    override = OVERRIDES.get(model_type)
    if override and override.refused:
        raise UnsupportedModelError(f"{model_type}: cannot be pruned block by block: {override.why}")
    path = override.block_path if override and override.block_path else find_block_path(model)
    causal = is_causal(config) if not (override and override.causal is not None) else override.causal
    if override and override.final is not None:
        final = override.final
    else:
        final = find_final(model, path) if causal else ()
    softcap = next((getattr(config, k) for k in SOFTCAP_NAMES if getattr(config, k, None)), None)
    divisor = next((getattr(config, k) for k in DIVISOR_NAMES if getattr(config, k, None)), None)
    if divisor and override and override.logits_scaling_multiplies:
        divisor = 1 / float(divisor)
    return ModelLayout(
        model_type=model_type,
        block_path=path,
        causal=causal,
        final=final,
        logit_softcap=float(softcap) if softcap else None,
        logit_divisor=float(divisor) if divisor and divisor != 1 else None,
        how=f"discovered, with the {model_type} override ({override.why})" if override else "discovered",
    )


def is_causal(config) -> bool:
    """A language model unless its checkpoint says it is a bare encoder (``BertModel``)."""
    architectures = getattr(config, "architectures", None) or []
    if architectures:
        return any(a.endswith(CAUSAL_ARCHITECTURES) for a in architectures)
    return not getattr(config, "is_encoder_decoder", False) and getattr(config, "model_type", "") not in (
        "bert",
        "roberta",
        "xlm-roberta",
        "distilbert",
        "electra",
        "deberta-v2",
    )


def _no_split_classes(model: torch.nn.Module) -> set[str]:
    names = getattr(model, "_no_split_modules", None) or ()
    return {names} if isinstance(names, str) else set(names)


def find_block_path(model: torch.nn.Module) -> str:
    """The dotted path of the ModuleList of repeated blocks (see the module docstring)."""
    classes = _no_split_classes(model)
    lists = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.ModuleList) and len(module) and type(module[0]).__name__ in classes
    ]
    if not lists:  # no _no_split_modules: the longest list of modules of one class that hold Linears
        lists = sorted(_repeated_blocks(model), key=lambda item: -len(item[1]))[:1]
    if len(lists) > 1:  # a vision-language wrapper lists its vision layers too: keep the text decoder's
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
        inside = [(n, m) for n, m in lists if decoder is not model and any(m is x for x in decoder.modules())]
        lists = inside or lists
    if len(lists) != 1:
        raise UnsupportedModelError(
            f"{type(model).__name__}: cannot tell which module list holds its blocks (found: {_listed(lists)}; "
            f"_no_split_modules: {sorted(classes) or 'not set'}): this model needs an entry in apt.models.families"
        )
    return lists[0][0]


def vision_block_path(model: torch.nn.Module, text_blocks: str) -> str:
    """The dotted path of a vision-language model's vision blocks: the list of repeated blocks, holding
    Linears, outside its text decoder (SigLIP's ``encoder.layers``, Qwen2-VL's ``visual.blocks``)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    inside = {id(m) for m in decoder.modules()} if decoder is not model else set()
    lists = [(n, m) for n, m in _repeated_blocks(model) if id(m) not in inside and n != text_blocks]
    if len(lists) != 1:
        raise UnsupportedModelError(
            f"{type(model).__name__}: cannot tell which module list holds its vision tower's blocks (found "
            f"outside the text decoder: {_listed(lists)}); prune its language model alone (without --prune-vision)"
        )
    return lists[0][0]


def _repeated_blocks(model: torch.nn.Module) -> list[tuple[str, torch.nn.ModuleList]]:
    """Every list of two or more modules of one class that hold a Linear (or a GPT-2 Conv1D)."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.ModuleList)
        and len(module) > 1
        and len({type(m) for m in module}) == 1
        and any(isinstance(m, torch.nn.Linear) or is_conv1d(m) for m in module[0].modules())
    ]


def _listed(lists: list[tuple[str, torch.nn.ModuleList]]) -> str:
    return ", ".join(f"{n} ({len(m)} × {type(m[0]).__name__})" for n, m in lists) or "none"


def vision_tail_targets(
    model: torch.nn.Module, text_blocks: str, vision_blocks: str, targets: str | None = None, ignore: str | None = None
) -> list[Target]:
    """The Linears of a vision-language model outside its text decoder and both block lists: what maps the
    vision blocks' output into the language model (LLaVA's ``multi_modal_projector``, SmolVLM's
    ``connector``, Qwen2-VL's ``visual.merger``), and heads the model may never call (SigLIP's pooling
    head: no calibration input reaches it, and the run reports so); ``targets``/``ignore`` filter as in
    ``block_targets``."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    skip = {id(m) for m in decoder.modules()} if decoder is not model else set()
    for path in (text_blocks, vision_blocks):
        skip |= {id(m) for m in model.get_submodule(path).modules()}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [
        Target(name, module, f"{name}.weight")
        for name, module in model.named_modules()
        if id(module) not in skip
        and module is not head
        and (isinstance(module, torch.nn.Linear) or is_conv1d(module))
        and _selected(name, targets, ignore)
    ]


def shared_between_blocks(model: torch.nn.Module, block_path: str) -> tuple[str, str] | None:
    """Two names, in different blocks, of one parameter several blocks share (Zamba's one transformer block
    reused at every hybrid layer), or None. Such a weight cannot be pruned block by block: each block
    would re-prune it on its own inputs, and no single Hessian describes it."""
    owners: dict[int, tuple[str, str]] = {}
    prefix = block_path + "."
    for name, param in model.named_parameters(remove_duplicate=False):
        if not name.startswith(prefix):
            continue
        block = name[len(prefix) :].partition(".")[0]
        first = owners.setdefault(id(param), (block, name))
        if first[0] != block:
            return first[1], name
    return None


def find_final(model: torch.nn.Module, block_path: str) -> tuple[str, ...]:
    """The modules applied to the last block's output: the parameterised modules the blocks' parent
    registers after the blocks (the final norm), then the LM head."""
    parent_path, _, list_name = block_path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    after, seen = [], False
    for name, child in parent.named_children():
        if name == list_name:
            seen = True
            continue
        if seen and child is not None and any(True for _ in child.parameters()):
            if not isinstance(child, torch.nn.Embedding):
                after.append(f"{parent_path}.{name}" if parent_path else name)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        after += [name for name, module in model.named_modules() if module is head][:1]
    if head is None:
        raise UnsupportedModelError(f"{type(model).__name__} has no LM head (get_output_embeddings() is None)")
    return tuple(after)


def _experts_count(config) -> int:
    for key in ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 0


def is_conv1d(module: torch.nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2, GPT-1, ImageGPT): ``y = x @ W + b`` with ``W`` stored ``[in, out]``,
    a Linear despite its name (``pytorch_utils.py``)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def is_router(name: str, module: torch.nn.Linear, experts: int) -> bool:
    """A Linear that chooses experts (or gates a shared expert): never pruned. It is named ``gate``/``router``,
    or sits inside one (Granite MoE's ``router.layer`` in transformers before 5.25), with one output per
    expert at most."""
    if "Router" in type(module).__name__:
        return True
    return bool(set(name.split(".")) & set(ROUTER_NAMES)) and module.out_features <= max(experts, 1)


def block_targets(
    block: torch.nn.Module, prefix: str, config, targets: str | None = None, ignore: str | None = None
) -> list[Target]:
    """The prunable matrices of one block in module order, filtered by the regexes ``targets`` (search,
    keep matches) and ``ignore`` (search, drop matches) over the full names (an expert's name without
    its index: ``model.layers.1.mlp.experts.down_proj``)."""
    experts = _experts_count(config)
    found = []
    for name, module in block.named_modules():
        full = f"{prefix}.{name}" if name else prefix
        layout = experts_layout(module)
        if layout is not None:
            count = getattr(module, PARTS[0]).shape[0]
            for part in PARTS:
                if _selected(f"{full}.{part}", targets, ignore):
                    found += [
                        Target(f"{full}.{part}[{e}]", module, f"{full}.{part}", expert=e, layout=layout)
                        for e in range(count)
                    ]
        elif (isinstance(module, torch.nn.Linear) and not is_router(name, module, experts)) or is_conv1d(module):
            if _selected(full, targets, ignore):
                found.append(Target(full, module, f"{full}.weight"))
    return found


def unknown_weights(block: torch.nn.Module, prefix: str, targets: list[Target]) -> list[dict]:
    """The parameters of ``block`` with more than two dimensions that no target covers and that are no
    convolution's kernel: weights stored in a layout discovery does not know (an experts class that records
    no layout, such as Granite MoE's ``ParallelExperts`` before transformers 5.25), which the run leaves
    dense. Each as ``{"name", "shape", "module"}``, for the report to say so instead of staying silent. A vector
    stored with extra unit axes (Kimi Linear's ``A_log`` ``[1, 1, H, 1]``) is no matrix and is not listed."""
    covered = {id(getattr(t.module, t.part) if t.is_expert else t.module.weight) for t in targets}
    found = []
    for name, module in block.named_modules():
        if isinstance(module, torch.nn.modules.conv._ConvNd):
            continue
        for attr, param in module.named_parameters(recurse=False):
            if param.dim() > 2 and sum(size > 1 for size in param.shape) > 1 and id(param) not in covered:
                full = ".".join(part for part in (prefix, name, attr) if part)
                found.append({"name": full, "shape": list(param.shape), "module": type(module).__name__})
    return found


def _selected(name: str, targets: str | None, ignore: str | None) -> bool:
    if targets and not re.search(targets, name):
        return False
    return not (ignore and re.search(ignore, name))


def find_groups(block: torch.nn.Module, targets: list[Target], run) -> list[Group]:
    """Group ``targets`` by the input they read, in the order the block computes them: one forward pass
    (``run()``, which calls the block once) with a pre-hook on every Linear target and experts module.
    The inputs are kept alive until the pass ends, so a freed tensor's reused address never merges two
    inputs. A Linear the block never calls (Mamba's ``dt_proj``, whose weight it reads directly) ends
    the list in a group without a source: no calibration input reaches it."""
    linear = {id(t.module): t for t in targets if not t.is_expert}
    experts: dict[int, list[Target]] = {}
    for t in targets:
        if t.is_expert:
            experts.setdefault(id(t.module), []).append(t)
    seen: list[tuple[torch.nn.Module, object]] = []

    def hook(module, args, kwargs):
        seen.append((module, args[0] if args else next(iter(kwargs.values()), None)))

    modules = {id(t.module): t.module for t in targets}
    handles = [module.register_forward_pre_hook(hook, with_kwargs=True) for module in modules.values()]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    groups: list[Group] = []
    by_input: dict[int, Group] = {}
    called = set()
    for module, x in seen:
        if id(module) in called:
            continue  # a module called twice keeps its first place
        called.add(id(module))
        if id(module) in experts:
            for part in PARTS:
                groups += [Group([t], module, t.expert, part) for t in experts[id(module)] if t.part == part]
            continue
        group = by_input.get(id(x))
        if group is None:
            group = by_input[id(x)] = Group([], module)
            groups.append(group)
        group.targets.append(linear[id(module)])
    seen.clear()  # the inputs were kept alive until here
    groups += [Group([t], None) for t in targets if id(t.module) not in called]
    return groups
