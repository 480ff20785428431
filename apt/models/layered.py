"""A model whose weights stay in its checkpoint: a skeleton without storage, filled one part at a time.

The skeleton is built from the config with every parameter on the meta device; buffers (rotary
tables, position ids) are computed for real, as checkpoints do not hold them (the few persistent ones a
checkpoint holds, such as a router's score bias, are read once). ``materialize`` reads
the tensors of some modules from the checkpoint into the skeleton in the compute dtype, ``release``
puts them back on the meta device. The pruning run, perplexity and embedding fidelity all go through
this one class, block by block, so none of them ever holds the whole model, and all of them see
exactly what the checkpoint holds.

A model that is already in memory is wrapped the same way (``LayeredModel.resident``): then
materialising and releasing do nothing, which is how the streaming run is checked against the
in-memory computation.

Read from an FP8 folder, the model computes as it is served (W8A8): its reader gives the FP8 weights as
``q · scale`` and names them in ``fp8_inputs``, and while such a weight is materialised its layer quantizes
its inputs per token through float8_e4m3fn and back (``quantize_inputs``), as vLLM's FP8 path does. No caller
has to ask for it.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import dataclasses
import inspect
import logging
import re
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from apt.errors import UnsupportedModelError
from apt.models.checkpoint import CheckpointError, CheckpointReader
from apt.models.discovery import is_causal, layout_of
from apt.models.names import Stored, stored_layout
from apt.solver.fp8 import fake_quantize_activations
from apt.solver.patterns import positive_zeros

if TYPE_CHECKING:
    from apt.models.activations import ActivationStore

log = logging.getLogger(__name__)

_CACHE_KWARGS = ("past_key_value", "past_key_values", "cache_params", "use_cache", "cache")


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the needed inputs were seen."""


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Every ``nn.Parameter`` registered inside is moved to the meta device at once (its initialisation
    then costs nothing); buffers are created for real."""
    register = torch.nn.Module.register_parameter

    def register_on_meta(module, name, param):
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=False)

    torch.nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def give_back_memory() -> None:
    """Return freed heap memory to the operating system (glibc's ``malloc_trim``). A streaming run frees
    a block's worth of tensors after every block; without this, glibc keeps much of it mapped and the
    resident set climbs block after block (measured on a 1 B model: 1.80 GB peak instead of 1.49 GB).
    Forcing every large allocation to ``mmap`` instead cost 23 % more time; trimming costs nothing."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except OSError:  # not glibc: nothing to trim
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None


def auto_class(config):
    """The transformers class the checkpoint is loaded as: a vision-language model as itself (its language
    model is pruned, its vision tower and projector come along untouched), a causal LM, or an encoder."""
    import transformers

    if is_vision_language(config):
        return transformers.AutoModelForImageTextToText
    return transformers.AutoModelForCausalLM if is_causal(config) else transformers.AutoModel


def is_vision_language(config) -> bool:
    """The checkpoint is a vision-language model transformers loads as image-text-to-text."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES as VLMS

    return VLMS.get(config.model_type) in (getattr(config, "architectures", None) or [])


def quantize_inputs(_module, args):
    """A forward pre-hook: the layer's input through float8_e4m3fn and back per token (``apt.solver.fp8``)."""
    return (fake_quantize_activations(args[0]), *args[1:])


def token_batches(windows: torch.Tensor, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Token windows ``[n, seq]`` (int64) as the model-input batches ``block_inputs`` runs: ``batch_size`` each."""
    return [{"input_ids": windows[s : s + batch_size]} for s in range(0, len(windows), batch_size)]


def to_device(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def first_output(output):
    return output[0] if isinstance(output, (tuple, list)) else output


class LayeredModel:
    """A Hugging Face model read from ``folder`` one block at a time (see the module docstring).

    ``dtype`` is the compute dtype every materialised tensor is cast to; ``stored_dtype(name)`` is the
    dtype the checkpoint keeps, which outputs keep too. ``layout`` is what discovery found
    (``apt.models.discovery``): where the blocks are, whether the model is causal, what follows the
    last block.
    """

    def __init__(self, model, reader: CheckpointReader | None, dtype: torch.dtype, device: str):
        self.model = model.eval()
        self.config = model.config
        self.layout = layout_of(model)
        self.reader = reader
        self.dtype = dtype
        self.device = device
        self.block_path = self.layout.block_path
        self.blocks = model.get_submodule(self.block_path)
        # tied parameters (an LM head sharing the embedding) are one object under several names
        self._aliases: dict[int, list[str]] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            self._aliases.setdefault(id(param), []).append(name)
        self._names = {name: names for names in self._aliases.values() for name in names}
        self._stored: dict[str, Stored] = {}
        self._fp8_hooks: dict[str, torch.utils.hooks.RemovableHandle] = {}  # parameter → its layer's input hook
        self._elsewhere: tuple[str, ...] = ()  # a section's: prefixes of what runs after what it needs
        if reader is not None:
            self._map_checkpoint()

    @classmethod
    def from_folder(
        cls,
        folder: str | Path,
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
        trust_remote_code=False,
        reader: CheckpointReader | None = None,
    ) -> LayeredModel:
        """The model of ``folder``, its tensors read block by block through ``reader`` (default: a new one)."""
        import transformers

        folder = Path(folder)
        try:
            config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as err:
            raise CheckpointError(f"could not read a model config from {folder}: {err}") from err
        reader = reader or CheckpointReader(folder)
        with parameters_on_meta():
            model = auto_class(config).from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
        for buffer in model.buffers():
            if buffer.is_floating_point() and buffer.device.type == "meta":
                raise CheckpointError(f"{type(model).__name__} creates buffers on the meta device; it cannot stream")
        layered = cls(model, reader, dtype, device)
        if device != "cpu":  # buffers only: parameters stay on meta until materialised
            for module in model.modules():
                for key, buffer in module._buffers.items():
                    if buffer is not None:
                        module._buffers[key] = buffer.to(device)
        return layered

    @classmethod
    def resident(cls, model, device: str = "cpu") -> LayeredModel:
        """Wrap a model already in memory: materialising and releasing do nothing."""
        dtype = next(model.parameters()).dtype
        return cls(model, None, dtype, device)

    def section(self, block_path: str) -> LayeredModel:
        """The same model and checkpoint seen through another list of blocks (a vision-language model's
        vision tower): its blocks are ``block_path``'s; what runs before them is everything outside both
        lists and the model's end (embeddings, patch embedding); it has no final modules."""
        view = copy.copy(self)
        view.block_path = block_path
        view.blocks = self.model.get_submodule(block_path)
        view.layout = dataclasses.replace(self.layout, block_path=block_path, final=())
        view._elsewhere = (f"{self.block_path}.", *self.final_prefixes())
        return view

    # --- names and checkpoint keys ---------------------------------------------------------------

    def _map_checkpoint(self) -> None:
        """Which checkpoint tensors hold each parameter (``apt.models.names``), checked against the config's
        shapes; persistent buffers the checkpoint holds (a router's bias) are read now, once."""
        by_alias = {alias: names[0] for names in self._aliases.values() for alias in names}
        buffers = [name for name, _ in self.model.named_buffers()]
        layout = stored_layout(self.model, self.reader.names(), list(by_alias) + buffers)
        missing = []
        for names in self._aliases.values():
            stored = next((layout[n] for n in names if n in layout), None)
            if stored is None:
                missing.append(names[0])
                continue
            shape = tuple(self._parameter(names[0]).shape)
            found = self._assembled_shape(stored)
            if found != shape:
                info = self.reader.info(stored.keys[0][0])
                what = f"tensor {info.name} has" if len(stored.all_keys) == 1 else f"the tensors of {names[0]} give"
                raise CheckpointError(
                    f"{info.file.name}: {what} shape {list(found)} but the config implies {list(shape)}: the "
                    "checkpoint and its config.json do not belong together"
                )
            for name in names:
                self._stored[name] = stored
        if missing:
            raise CheckpointError(
                f"{self.reader.folder} lacks {len(missing)} tensors the config needs, e.g. {missing[:3]}: "
                "the checkpoint is incomplete or is not a transformers checkpoint of this model_type"
            )
        for name, buffer in list(self.model.named_buffers()):
            stored = layout.get(name)
            key = stored.keys[0][0] if stored is not None and not stored.stacked else None
            if key is not None and tuple(self.reader.info(key).shape) == tuple(buffer.shape):
                module_name, _, attr = name.rpartition(".")
                module = self.model.get_submodule(module_name)
                module._buffers[attr] = self.reader.read(key, buffer.dtype)

    def _assembled_shape(self, stored: Stored) -> tuple[int, ...]:
        first = [self.reader.info(k).shape for k in stored.keys[0]]
        joined = list(first[0])
        joined[stored.concat_dim] = sum(s[stored.concat_dim] for s in first)
        return (len(stored.keys), *joined) if stored.stacked else tuple(joined)

    def checkpoint_keys(self, name: str) -> list[str]:
        """The checkpoint tensors that hold the parameter ``name`` (``model.layers.3.mlp.up_proj.weight``): one,
        or an expert tensor's per-expert pieces."""
        stored = self._stored.get(name)
        return stored.all_keys if stored else [name]

    def checkpoint_key(self, name: str) -> str:
        """The checkpoint's name for a parameter stored as one tensor."""
        keys = self.checkpoint_keys(name)
        return keys[0] if len(keys) == 1 else name

    def target_tensors(self, target) -> dict:
        """Where a pruned matrix (``apt.models.discovery.Target``) is in the checkpoint, as the report records
        it: ``tensor`` (a Linear's weight; ``in_axis`` -2 for a Conv1D's ``[in, out]``), or for an expert
        ``tensors`` (its own per-expert pieces, or the fused 3-D tensor) and ``in_axis`` (the stored tensor's
        axis the pattern runs along)."""
        if not target.is_expert:
            axis = {"in_axis": target.in_axis} if target.in_axis != -1 else {}  # a Conv1D stores [in, out]
            keys = self.checkpoint_keys(target.parameter)
            joined = {"tensors": keys} if len(keys) > 1 else {}  # a Linear the checkpoint stores in parts
            return {"tensor": keys[0]} | joined | axis
        stored = self._stored.get(target.parameter)
        if stored is not None and stored.stacked:
            return {"tensor": stored.keys[target.expert][0], "tensors": list(stored.keys[target.expert]), "in_axis": -1}
        key = self.checkpoint_key(target.parameter)
        return {"tensor": key, "tensors": [key], "in_axis": target.in_axis}

    def stored_dtype(self, name: str) -> torch.dtype:
        if self.reader is None:
            return self._parameter(name).dtype
        return self.reader.info(self.checkpoint_keys(name)[0]).dtype

    def stored_tensors(self, name: str) -> list[tuple[str, torch.Tensor]]:
        """The parameter ``name`` as the checkpoint stores it: ``(key, tensor)`` in its stored names and dtype,
        zeros as ``+0.0``."""
        tensor = positive_zeros(self._parameter(name).detach().to("cpu", self.stored_dtype(name)))
        stored = self._stored.get(name)
        if stored is None:
            return [(name, tensor)]
        return stored.split(tensor, lambda key: tuple(self.reader.info(key).shape))

    def _parameter(self, name: str) -> torch.nn.Parameter:
        module_name, _, attr = name.rpartition(".")
        return self.model.get_submodule(module_name)._parameters[attr]

    def parameter_names(self, prefix: str = "") -> list[str]:
        """Names of the parameters under ``prefix`` (each tied parameter once, under its first name)."""
        return [names[0] for names in self._aliases.values() if any(n == prefix or n.startswith(prefix) for n in names)]

    def block_prefix(self, index: int) -> str:
        return f"{self.block_path}.{index}."

    def final_modules(self) -> list[torch.nn.Module]:
        modules = []
        for path in self.layout.final:
            try:
                module = self.model.get_submodule(path)
            except AttributeError:
                continue
            if module is not None:
                modules.append(module)
        return modules

    def final_prefixes(self) -> list[str]:
        names = {n for m in self.final_modules() for n, mod in self.model.named_modules() if mod is m}
        return [f"{n}." for n in sorted(names)]

    def outside_names(self) -> list[str]:
        """Parameters that run before block 0 (embeddings): outside the blocks and the final modules. A tied
        LM head comes with its embedding."""
        inside = (f"{self.block_path}.", *self.final_prefixes(), *self._elsewhere)
        return [names[0] for names in self._aliases.values() if any(not n.startswith(inside) for n in names)]

    def final_names(self) -> list[str]:
        return [n for prefix in self.final_prefixes() for n in self.parameter_names(prefix)]

    # --- materialising ---------------------------------------------------------------------------

    def materialize(self, names: list[str], reader: CheckpointReader | None = None) -> None:
        """Read ``names`` from ``reader`` (default: the source checkpoint) into the skeleton, cast to the
        compute dtype, on the compute device; a layer whose weight the reader names in ``fp8_inputs`` quantizes
        its inputs per token until it is released (see the module docstring)."""
        reader = reader or self.reader
        if reader is None:
            return
        fp8 = getattr(reader, "fp8_inputs", frozenset())
        for name in names:
            stored = self._stored.get(name) or Stored(((name,),))
            tensor = stored.assemble(lambda key: reader.read(key, self.dtype)).to(self.device)
            self._set(name, torch.nn.Parameter(tensor, requires_grad=False))
            if fp8 and name not in self._fp8_hooks and any(key in fp8 for key in stored.all_keys):
                layer = self.model.get_submodule(name.rpartition(".")[0])
                self._fp8_hooks[name] = layer.register_forward_pre_hook(quantize_inputs)

    def release(self, names: list[str]) -> None:
        if self.reader is None:
            return
        for name in names:
            hook = self._fp8_hooks.pop(name, None)
            if hook is not None:
                hook.remove()
            old = self._parameter(name)
            self._set(name, torch.nn.Parameter(torch.empty(old.shape, dtype=old.dtype, device="meta"), False))
        give_back_memory()

    def _set(self, name: str, param: torch.nn.Parameter) -> None:
        for alias in self._names[name]:
            module_name, _, attr = alias.rpartition(".")
            self.model.get_submodule(module_name)._parameters[attr] = param

    @contextlib.contextmanager
    def loaded(self, names: list[str], reader: CheckpointReader | None = None) -> Iterator[None]:
        self.materialize(names, reader)
        try:
            yield
        finally:
            self.release(names)

    # --- running ---------------------------------------------------------------------------------

    @torch.no_grad()
    def block_inputs(
        self, batches: list[dict[str, torch.Tensor]], store: ActivationStore, reader: CheckpointReader | None = None
    ) -> ActivationStore:
        """Run the model up to block 0 on every batch of model inputs (``input_ids`` ``[b, seq]`` and, for
        padded text, ``attention_mask``) and keep, per batch, the hidden states entering block 0 and the
        keyword arguments the model passes to each block (no KV cache): sliding-window and global layers
        get other masks and position tables. Only the parameters before the blocks are read: every block
        is stood in for by a recorder that passes its input through."""
        records: list[dict] = []
        originals = [block.__dict__.get("forward") for block in self.blocks]
        unpacked: list[int] = []  # how many values the model's loop unpacks from a block, once learnt

        def recorder(index: int, block: torch.nn.Module):
            signature = inspect.signature(type(block).forward)
            names = list(signature.parameters)

            def forward(*args, **kwargs):
                # every argument by name (BERT passes its attention mask positionally), the hidden states apart
                arguments = dict(signature.bind(block, *args, **kwargs).arguments)
                arguments.pop(names[0])
                for name, parameter in signature.parameters.items():
                    if parameter.kind is inspect.Parameter.VAR_KEYWORD and name in arguments:
                        arguments.update(arguments.pop(name))
                hidden = arguments.pop(names[1])
                called = len(records[-1]["kwargs"]) if records else 0  # blocks called so far in this pass
                if index != called:  # a looped core (Dory's) calls its blocks again within one pass
                    raise UnsupportedModelError(
                        f"{self.layout.name}: its forward calls block {index} of {self.block_path} after block "
                        f"{called - 1}, not each block once in order (it runs blocks more than once, a looped "
                        "core): such blocks cannot be pruned one after another"
                    )
                if index == 0:
                    records.append({"hidden": hidden.detach(), "kwargs": []})
                records[-1]["kwargs"].append({k: v for k, v in arguments.items() if k not in _CACHE_KWARGS})
                if index == len(self.blocks) - 1:
                    raise _Stop
                return _stand_in_output(block, hidden, *unpacked[-1:])

            return forward

        for index, block in enumerate(self.blocks):
            block.forward = recorder(index, block)
        try:
            with self.loaded(self.outside_names(), reader):
                for batch in batches:
                    try:
                        self.run_until_stopped(batch)
                    except ValueError as err:
                        # a block whose forward is not annotated returns a tuple the loop unpacks (RWKV's
                        # hidden, state, attentions): learn its length from Python's error and call again
                        expected = re.search(r"values to unpack \(expected (\d+)", str(err))
                        if unpacked or not expected or not records:
                            raise
                        unpacked.append(int(expected.group(1)))
                        records.pop()
                        self.run_until_stopped(batch)
                    record = records.pop()
                    store.append(record["hidden"], _shared(record["kwargs"]))
        finally:
            for block, original in zip(self.blocks, originals):
                if original is None:
                    del block.forward
                else:
                    block.forward = original
        return store

    @torch.no_grad()
    def run_until_stopped(self, batch: dict[str, torch.Tensor]) -> None:
        """The whole model's forward on ``batch`` (no KV cache), until a hook raises ``_Stop``: what runs before
        the hook must be materialised."""
        options = {"use_cache": False} if self.layout.causal else {}
        try:
            self.model(**to_device(batch, self.device), **options)
        except _Stop:
            pass

    @torch.no_grad()
    def run_blocks(self, store: ActivationStore, blocks: range, reader: CheckpointReader | None = None) -> None:
        """Push the stored activations through ``blocks``, reading each block's tensors from ``reader``."""
        for index in blocks:
            with self.loaded(self.parameter_names(self.block_prefix(index)), reader):
                self.run_block(index, store)

    @torch.no_grad()
    def run_block(self, index: int, store: ActivationStore) -> None:
        """Replace every batch's hidden states by the output of block ``index`` (already materialised)."""
        block = self.blocks[index]
        for i in range(len(store)):
            hidden = store.hidden(i).to(self.device)
            out = first_output(block(hidden, **to_device(store.kwargs(i, index), self.device)))
            if not bool(torch.isfinite(out).all()):
                raise FloatingPointError(f"block {index} produced NaN/Inf activations")
            store.replace(i, out)

    @torch.no_grad()
    def run_final(self, hidden: torch.Tensor) -> torch.Tensor:
        """The model's output (logits, or the last hidden state of an encoder) from the last block's output,
        with what transformers does to the logits after the head (Gemma's soft-capping, Granite's scaling)."""
        for module in self.final_modules():
            hidden = module(hidden)
        if self.layout.logit_divisor:
            hidden = hidden / self.layout.logit_divisor
        if self.layout.logit_softcap:
            hidden = torch.tanh(hidden / self.layout.logit_softcap) * self.layout.logit_softcap
        return hidden


def _stand_in_output(block: torch.nn.Module, hidden: torch.Tensor, unpacked: int | None = None):
    """What the model's loop gets back from a recording block so that it goes on to the next (only block 0's
    input and each block's keyword arguments are kept): the hidden states, or a tuple of the length the
    block's ``forward`` is annotated to return (Bamba unpacks ``hidden, attn_weights``) or the loop was
    found to unpack (``unpacked``)."""
    if unpacked:
        return (hidden, *[None] * (unpacked - 1))
    annotation = inspect.signature(type(block).forward).return_annotation
    arguments = typing.get_args(annotation) if typing.get_origin(annotation) is tuple else ()
    if arguments and Ellipsis not in arguments:
        return (hidden, *[None] * (len(arguments) - 1))
    return hidden


def _shared(per_block: list[dict]) -> list[dict]:
    """The blocks' keyword arguments, on the host, with blocks that received the very same objects (every
    sliding-window layer gets one mask) sharing one dict, so each distinct tensor is kept once."""
    distinct: dict[tuple, dict] = {}
    out = []
    for kwargs in per_block:
        key = tuple(sorted((k, id(v)) for k, v in kwargs.items()))
        if key not in distinct:
            distinct[key] = to_device(kwargs, "cpu")
        out.append(distinct[key])
    return out
