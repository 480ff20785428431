"""A model whose weights stay in its checkpoint: a skeleton without storage, filled one part at a time.

The skeleton is built from the config with every parameter on the meta device; buffers (rotary
tables, position ids) are computed for real, as checkpoints do not hold them. ``materialize`` reads
the tensors of some modules from the checkpoint into the skeleton in the compute dtype, ``release``
puts them back on the meta device. The pruning run, perplexity and embedding fidelity all go through
this one class, block by block, so none of them ever holds the whole model, and all of them see
exactly what the checkpoint holds.

A model that is already in memory is wrapped the same way (``LayeredModel.resident``): then
materialising and releasing do nothing, which is how the streaming run is checked against the
in-memory computation.
"""

from __future__ import annotations

import contextlib
import ctypes
import inspect
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from apt.models.checkpoint import CheckpointError, CheckpointReader
from apt.models.families import Family, family_for, find_blocks
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
    import transformers

    return transformers.AutoModelForCausalLM if family_for(config).causal else transformers.AutoModel


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
    dtype the checkpoint keeps, which outputs keep too.
    """

    def __init__(self, model, family: Family, reader: CheckpointReader | None, dtype: torch.dtype, device: str):
        self.model = model.eval()
        self.config = model.config
        self.family = family
        self.reader = reader
        self.dtype = dtype
        self.device = device
        self.block_path, self.blocks = find_blocks(model, family)
        # tied parameters (an LM head sharing the embedding) are one object under several names
        self._aliases: dict[int, list[str]] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            self._aliases.setdefault(id(param), []).append(name)
        self._names = {name: names for names in self._aliases.values() for name in names}
        self._key: dict[str, str] = {}
        if reader is not None:
            self._map_checkpoint_keys()

    @classmethod
    def from_folder(
        cls, folder: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu", trust_remote_code=False
    ) -> LayeredModel:
        import transformers

        folder = Path(folder)
        try:
            config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as err:
            raise CheckpointError(f"could not read a model config from {folder}: {err}") from err
        family = family_for(config)
        reader = CheckpointReader(folder)
        with parameters_on_meta():
            model = auto_class(config).from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
        for buffer in model.buffers():
            if buffer.is_floating_point() and buffer.device.type == "meta":
                raise CheckpointError(f"{type(model).__name__} creates buffers on the meta device; it cannot stream")
        if device != "cpu":  # buffers only: parameters stay on meta until materialised
            for module in model.modules():
                for key, buffer in module._buffers.items():
                    if buffer is not None:
                        module._buffers[key] = buffer.to(device)
        return cls(model, family, reader, dtype, device)

    @classmethod
    def resident(cls, model, device: str = "cpu") -> LayeredModel:
        """Wrap a model already in memory: materialising and releasing do nothing."""
        dtype = next(model.parameters()).dtype
        return cls(model, family_for(model.config), None, dtype, device)

    # --- names and checkpoint keys ---------------------------------------------------------------

    def _map_checkpoint_keys(self) -> None:
        prefix = getattr(self.model, "base_model_prefix", "") or ""
        missing = []
        for names in self._aliases.values():
            key = next((k for name in names for k in _key_candidates(name, prefix) if k in self.reader), None)
            if key is None:
                missing.append(names[0])
                continue
            shape = tuple(self._parameter(names[0]).shape)
            info = self.reader.info(key)
            if info.shape != shape:
                raise CheckpointError(
                    f"{info.file.name}: tensor {key} has shape {list(info.shape)} but the config implies "
                    f"{list(shape)}: the checkpoint and its config.json do not belong together"
                )
            for name in names:
                self._key[name] = key
        if missing:
            raise CheckpointError(
                f"{self.reader.folder} lacks {len(missing)} tensors the config needs, e.g. {missing[:3]}: "
                "the checkpoint is incomplete or is not a transformers checkpoint of this model_type"
            )

    def checkpoint_key(self, name: str) -> str:
        """The checkpoint's name for the parameter ``name`` (``model.layers.3.mlp.up_proj.weight``)."""
        return self._key.get(name, name)

    def stored_dtype(self, name: str) -> torch.dtype:
        if self.reader is None:
            return self._parameter(name).dtype
        return self.reader.info(self.checkpoint_key(name)).dtype

    def stored_tensor(self, name: str) -> torch.Tensor:
        """The parameter ``name`` as the checkpoint stores it: its stored dtype, zeros as ``+0.0``."""
        return positive_zeros(self._parameter(name).detach().to("cpu", self.stored_dtype(name)))

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
        for path in self.family.final:
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
        inside = (f"{self.block_path}.", *self.final_prefixes())
        return [names[0] for names in self._aliases.values() if any(not n.startswith(inside) for n in names)]

    def final_names(self) -> list[str]:
        return [n for prefix in self.final_prefixes() for n in self.parameter_names(prefix)]

    # --- materialising ---------------------------------------------------------------------------

    def materialize(self, names: list[str], reader: CheckpointReader | None = None) -> None:
        """Read ``names`` from ``reader`` (default: the source checkpoint) into the skeleton, cast to the
        compute dtype, on the compute device."""
        reader = reader or self.reader
        if reader is None:
            return
        for name in names:
            tensor = reader.read(self.checkpoint_key(name), self.dtype).to(self.device)
            self._set(name, torch.nn.Parameter(tensor, requires_grad=False))

    def release(self, names: list[str]) -> None:
        if self.reader is None:
            return
        for name in names:
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
        padded text, ``attention_mask``) and keep, per batch, the hidden states and the keyword arguments
        the model passes to its blocks (no KV cache). Only the parameters before the blocks are read."""
        captured = []
        signature = inspect.signature(self.blocks[0].forward)
        first = next(iter(signature.parameters))

        def hook(_module, args, kwargs):
            # every argument by name (BERT passes its attention mask positionally), the hidden states apart
            arguments = dict(signature.bind(*args, **kwargs).arguments)
            for name, parameter in signature.parameters.items():
                if parameter.kind is inspect.Parameter.VAR_KEYWORD and name in arguments:
                    arguments.update(arguments.pop(name))
            hidden = arguments.pop(first)
            kwargs = {k: v for k, v in arguments.items() if k not in _CACHE_KWARGS}
            captured.append((hidden.detach(), to_device(kwargs, "cpu")))
            raise _Stop

        handle = self.blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
        options = {"use_cache": False} if self.family.causal else {}
        try:
            with self.loaded(self.outside_names(), reader):
                for batch in batches:
                    try:
                        self.model(**to_device(batch, self.device), **options)
                    except _Stop:
                        pass
                    hidden, kwargs = captured.pop()
                    store.append(hidden, kwargs)
        finally:
            handle.remove()
        return store

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
            out = first_output(block(hidden, **to_device(store.kwargs(i), self.device)))
            if not bool(torch.isfinite(out).all()):
                raise FloatingPointError(f"block {index} produced NaN/Inf activations")
            store.replace(i, out)

    @torch.no_grad()
    def run_final(self, hidden: torch.Tensor) -> torch.Tensor:
        """The model's output (logits, or the last hidden state of an encoder) from the last block's output."""
        for module in self.final_modules():
            hidden = module(hidden)
        return hidden


def _key_candidates(name: str, prefix: str) -> list[str]:
    """The names a checkpoint may use for ``name``: as is, or without/with the base model's prefix."""
    candidates = [name]
    if prefix and name.startswith(prefix + "."):
        candidates.append(name[len(prefix) + 1 :])
    elif prefix:
        candidates.append(f"{prefix}.{name}")
    return candidates
