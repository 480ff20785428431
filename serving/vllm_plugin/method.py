"""The ``apt_sparse_24`` quantization config and linear method (vLLM's plugin interface, read in vLLM 0.32).

vLLM asks the config once per layer for its method (``get_quant_method``), under vLLM's fused names
(``qkv_proj`` for the checkpoint's q/k/v). Pruned layers get ``Sparse24LinearMethod``, a subclass of
vLLM's ``UnquantizedLinearMethod``. On a GPU every call of such a layer is one ``apt_sparse::linear24``
(``serving.sparse_op``: our Triton 2:4 kernels, cuSPARSELt or dense by token count, the dispatch read from
``APT_SPARSE_VLLM_DISPATCH``, the folder's thresholds, or measured once per shape at load); speed-first by
default (never slower than dense where measured), memory-first (our compressed layout alone) with
``APT_SPARSE_VLLM_MEMORY=compressed``. On a CPU vLLM's own dense GEMM (packed for oneDNN) serves it. Every
other Linear gets vLLM's unquantized method; embeddings, the LM head and attention are vLLM's own.

An FP8 folder (``apt-sparse quantize``: compressed-tensors ``float-quantized``, which vLLM serves as dense FP8
without the plugin) is claimed when asked (``--quantization apt_sparse_24``): every layer keeps vLLM's own
compressed-tensors FP8 method (``weight`` float8_e4m3fn, ``weight_scale`` per output channel, inputs quantized
per token), and the 2:4 layers its ``apt_sparse_24.json`` lists are checked (scales present, pattern kept)
and, on a GPU, served by ``Sparse24Linear`` with the weight's scales (``Sparse24Fp8LinearMethod``).

A bitmask folder's ``<module>.compressed/.bitmask/.shape`` tensors load into parameters of those names
(vLLM's loader routes q/k/v and gate/up shards into the fused layer) and are decoded after loading; a
missing one, or a weight off the 2:4 pattern, ends loading with an error that names it.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import torch
from torch.nn import Parameter
from vllm.model_executor.layers.linear import (
    LinearBase,
    QKVParallelLinear,
    UnquantizedLinearMethod,
    register_weight_loader_v2_supported_method,
)
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import (
    CompressedTensorsConfig,
    CompressedTensorsLinearMethod,
)
from vllm.model_executor.parameter import ModelWeightParameter
from vllm.model_executor.utils import set_weight_attrs

from apt.folder.fp8 import is_fp8_config
from serving.bitmask import FORMAT, unpack_bitmask
from serving.sparse_op import (
    MEMORY_FIRST,
    SPEED_FIRST,
    Dispatch,
    Sparse24Linear,
    fp8_fallback,
    from_threshold,
    load_dispatches,
    shape_key,
)
from serving.vllm_plugin import NAME, REPORT_ENV, SIDE_FILE

log = logging.getLogger(__name__)

MEMORY_ENV = "APT_SPARSE_VLLM_MEMORY"  # "decode-safe" (default: speed-first) or "compressed" (memory-first)
DISPATCH_ENV = "APT_SPARSE_VLLM_DISPATCH"  # a dispatch file of runtime_bench.gpu_suite: no measuring at load
PROBE_MS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


def _is_bitmask(config: dict) -> bool:
    sparsity = config.get("sparsity_config")
    return (
        str(config.get("quant_method", "")).replace("_", "-") == "compressed-tensors"
        and isinstance(sparsity, dict)
        and sparsity.get("format") == FORMAT
    )


@register_quantization_config(NAME)
class Sparse24Config(QuantizationConfig):
    """Which layers are 2:4 and how they are stored. ``fmt``: ``dense`` (plain weights with the zeros in
    place) or ``bitmask``; ``targets``/``ignore``: the checkpoint's module names (compressed-tensors
    syntax: ``Linear`` for every Linear, ``re:`` for a regex), ``None`` for every Linear whose weight is
    2:4; ``thresholds``: per ``"{in}x{out}"`` the token count from which the sparse kernel was measured
    faster."""

    def __init__(self, fmt: str = "dense", targets=None, ignore=None, thresholds=None, fp8: dict | None = None):
        super().__init__()
        if fmt not in ("dense", "bitmask", "fp8"):
            raise ValueError(f"{NAME}: unknown format {fmt!r}: dense, bitmask or fp8")
        if (fmt == "fp8") != (fp8 is not None):
            raise ValueError(f"{NAME}: the fp8 format needs the checkpoint's compressed-tensors FP8 config")
        # vLLM's own compressed-tensors config of an FP8 folder: its FP8 method serves every layer
        self.fp8 = CompressedTensorsConfig.from_config(fp8) if fp8 is not None else None
        self.fmt = fmt
        self.targets = list(targets) if targets else None
        self.ignore = list(ignore) if ignore else ["lm_head"]
        self.thresholds = dict(thresholds or {})
        self._dispatches: dict[tuple, Dispatch] = {}
        self.checkpoint_names: dict[str, str] = {}  # vLLM's module name -> the checkpoint's, where they differ
        self.origin = "every Linear whose weight is 2:4"

    def get_name(self) -> str:
        return NAME

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.float32, torch.float16, torch.bfloat16]

    @classmethod
    def get_min_capability(cls) -> int:
        return 0  # the dense path runs anywhere; the sparse kernel only where it can (sm80+)

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # a plain folder: the side file, if any, is read by maybe_update_config

    @classmethod
    def from_config(cls, config: dict) -> Sparse24Config:
        if is_fp8_config({"quantization_config": config}):
            made = cls("fp8", None, ["lm_head"], fp8=config)
            made.origin = "every Linear whose FP8 weight is 2:4 (no apt_sparse_24.json)"
            return made
        if _is_bitmask(config):
            sparsity = config["sparsity_config"]
            made = cls("bitmask", sparsity.get("targets") or ["Linear"], sparsity.get("ignore"))
            made.origin = "the checkpoint's sparsity_config"
            return made
        if config.get("quant_method") == NAME:
            return cls(
                config.get("format", "dense"), config.get("targets"), config.get("ignore"), config.get("thresholds")
            )
        raise ValueError(f"{NAME} cannot serve quantization_config {config}")

    @classmethod
    def override_quantization_method(cls, hf_quant_cfg, user_quant, hf_config=None) -> str | None:
        """Claim a compressed-tensors 2:4 bitmask checkpoint (before vLLM's own config refuses its
        sparsity_config); one that is also quantized (config_groups) is not ours."""
        if user_quant == NAME and is_fp8_config({"quantization_config": hf_quant_cfg}):
            return NAME  # an FP8 folder is vLLM's own unless the plugin is asked for
        if user_quant not in (None, NAME, "compressed-tensors"):
            return None
        if _is_bitmask(hf_quant_cfg) and not hf_quant_cfg.get("config_groups"):
            return NAME
        return None

    def maybe_update_config(self, model_name: str, hf_config=None, revision=None) -> None:
        """A plain folder's ``apt_sparse_24.json`` (written by ``apt-sparse export vllm``) names its pruned
        layers and the thresholds measured for their shapes."""
        path = Path(model_name) / SIDE_FILE
        if self.fmt == "bitmask" or not path.is_file():
            return
        try:
            side = json.loads(path.read_text())
            self.targets = list(side["targets"])
            self.thresholds = dict(side.get("thresholds") or {})
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{NAME}: {path} is damaged ({err}); export the folder again") from err
        self.origin = f"{path.name}: {len(self.targets)} pruned layers"

    def dispatch_for(self, weight: torch.Tensor, mode: str, weight_scale: torch.Tensor | None = None) -> Dispatch:
        """The dispatch of this weight's shape in ``mode``: from the dispatch file (``APT_SPARSE_VLLM_DISPATCH``),
        else the folder's measured cuSPARSELt threshold (speed-first), else measured on this GPU, once per shape
        and mode in this process (``serving.tuning``, graphed; an FP8 weight with its ``weight_scale`` ``[N]``)."""
        shape = shape_key(weight.shape[1], weight.shape[0])
        key = (shape, mode, weight.dtype)
        if key not in self._dispatches:
            path = os.environ.get(DISPATCH_ENV)
            found = load_dispatches(path, mode).get(shape) if path else None
            if found is None and mode == SPEED_FIRST and shape in self.thresholds:
                found = from_threshold(self.thresholds[shape])
            if found is None:
                from serving.tuning import bands_from, measure_shape

                log.info("%s: measuring the sparse op's paths for %s (%s)", NAME, shape, mode)
                measured = measure_shape(weight.detach(), ms=PROBE_MS, weight_scale=weight_scale, eager=False)
                found = bands_from(measured, mode)
            self._dispatches[key] = found
        return self._dispatches[key]

    def apply_vllm_mapper(self, hf_to_vllm_mapper) -> None:
        def mapped(name: str) -> str:
            if "." in name and not name.startswith("re:"):
                return hf_to_vllm_mapper._map_name(name) or name
            return name

        if self.targets is not None:
            # a layer is then known by vLLM's name (Qwen2-VL's model.layers… is its language_model.model.layers…);
            # reports and errors name it as the checkpoint does
            self.checkpoint_names = {mapped(t): self.checkpoint_names.get(t, t) for t in self.targets}
            self.targets = [mapped(t) for t in self.targets]
        self.ignore = [mapped(t) for t in self.ignore]
        if self.fp8 is not None:
            self.fp8.apply_vllm_mapper(hf_to_vllm_mapper)

    def _matches(self, name: str, patterns: list[str]) -> bool:
        return any(p == "Linear" or name == p or (p.startswith("re:") and re.match(p[3:], name)) for p in patterns)

    def is_target(self, name: str) -> bool:
        if self._matches(name, [p for p in self.ignore if p != "Linear"]):
            return False
        return self.targets is None or self._matches(name, self.targets)

    def parts(self, prefix: str) -> list[str]:
        """The module names behind a vLLM layer (``qkv_proj`` → q_proj, k_proj, v_proj), in vLLM's naming."""
        head, _, last = prefix.rpartition(".")
        parts = self.packed_modules_mapping.get(last)
        return [f"{head}.{p}" if head else p for p in parts] if parts else [prefix]

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        own = None
        if self.fp8 is not None:
            self.fp8.packed_modules_mapping = self.packed_modules_mapping
            own = self.fp8.get_quant_method(layer, prefix)  # vLLM's FP8 method (or unquantized where ignored)
            if not isinstance(own, CompressedTensorsLinearMethod):
                return own
        elif not isinstance(layer, LinearBase):
            return None  # embeddings, the LM head, attention: vLLM's own
        names = self.parts(prefix)
        chosen = [self.is_target(n) for n in names]
        names = [self.checkpoint_names.get(n, n) for n in names]  # what the methods report and name in errors
        if all(chosen):
            if own is not None:
                return Sparse24Fp8LinearMethod(self, prefix, names)
            return Sparse24LinearMethod(self, prefix, names)
        if not any(chosen):
            return own or UnquantizedLinearMethod()
        raise ValueError(
            f"{NAME}: vLLM fuses {', '.join(names)} into {prefix}, but only some are pruned "
            f"({', '.join(n for n, c in zip(names, chosen) if c)}): prune all of them or none"
        )


def _start_layer(method, layer, fmt: str, unit: int, input_size_per_partition: int, input_size: int, output_sizes):
    """What every pruned layer records before its weights are made: its format and parts, the shards its
    checkpoint must deliver; a tensor-parallel slice that would cut a 2:4 group (``unit`` columns) is refused."""
    if input_size_per_partition % unit:
        raise ValueError(
            f"{NAME}: {method.prefix}: tensor parallelism gives each rank {input_size_per_partition} of its "
            f"{input_size} input columns, not a multiple of {unit}: 2:4 groups would be cut; use fewer ranks"
        )
    shards = len(output_sizes)
    expected = (
        ["q", "k", "v"] if isinstance(layer, QKVParallelLinear) else (list(range(shards)) if shards > 1 else [None])
    )
    layer.apt_sparse_24 = {"format": fmt, "parts": method.parts, "served": False}
    layer._apt_loaded = {"expected": expected, "got": {}, "rows": list(output_sizes)}


def _report(prefix: str, info: dict) -> None:
    """One JSON line per served layer to ``APT_SPARSE_VLLM_REPORT``, where set (the tests read it)."""
    path = os.environ.get(REPORT_ENV)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"pid": os.getpid(), "layer": prefix} | info) + "\n")


@register_weight_loader_v2_supported_method  # the same (v2) weight loaders as vLLM's own unquantized method
class Sparse24LinearMethod(UnquantizedLinearMethod):
    """A pruned Linear: dense weights for vLLM's GEMM, plus a semi-structured copy where a 2:4 kernel runs."""

    def __init__(self, config: Sparse24Config, prefix: str, parts: list[str]):
        super().__init__()
        self.config, self.prefix, self.parts = config, prefix, parts

    def create_weights(
        self,
        layer: torch.nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs,
    ):
        bitmask = self.config.fmt == "bitmask"
        # a rank's slice must start on a 2:4 group (and on a bitmask byte)
        _start_layer(self, layer, self.config.fmt, 8 if bitmask else 4, input_size_per_partition, input_size,
                     output_partition_sizes)  # fmt: skip
        if not bitmask:
            super().create_weights(
                layer,
                input_size_per_partition,
                output_partition_sizes,
                input_size,
                output_size,
                params_dtype,
                **extra_weight_attrs,
            )
            self._track(layer, layer.weight, "weight")
            return
        rows, cols = sum(output_partition_sizes), input_size_per_partition
        loader = extra_weight_attrs.pop("weight_loader")
        for name, shape, dtype in (
            ("compressed", (rows, cols // 2), params_dtype),
            ("bitmask", (rows, cols // 8), torch.uint8),
        ):
            param = ModelWeightParameter(
                data=torch.empty(shape, dtype=dtype), input_dim=1, output_dim=0, weight_loader=loader
            )
            layer.register_parameter(name, param)
            set_weight_attrs(param, extra_weight_attrs)
            self._track(layer, param, name)
        shape = Parameter(torch.zeros(len(output_partition_sizes), 2, dtype=torch.int64), requires_grad=False)
        layer.register_parameter("shape", shape)
        set_weight_attrs(shape, {"weight_loader": self._shape_loader(layer)})

    @staticmethod
    def _track(layer, param, key: str) -> None:
        """Record which shards of ``param`` arrive from the checkpoint (vLLM does not check)."""
        inner, got = param.weight_loader, layer._apt_loaded["got"].setdefault(key, [])

        def loader(p, weight, *args, **kwargs):
            got.append(args[0] if args else kwargs.get("loaded_shard_id"))
            return inner(p, weight, *args, **kwargs)

        param.weight_loader = loader

    @staticmethod
    def _shape_loader(layer):
        got = layer._apt_loaded["got"].setdefault("shape", [])

        def loader(param, weight, shard_id=None):
            row = {"q": 0, "k": 1, "v": 2}.get(shard_id, shard_id) if shard_id is not None else 0
            param.data[row].copy_(weight.reshape(-1)[:2])
            got.append(shard_id)

        return loader

    def _check_loaded(self, layer, keys: tuple[str, ...]) -> None:
        expected, got = layer._apt_loaded["expected"], layer._apt_loaded["got"]
        missing = []
        for key in keys:
            arrived = got.get(key, [])
            if arrived == [None] and expected != [None]:
                continue  # stored fused on disk: the whole parameter arrived at once
            missing += [
                f"{self.parts[expected.index(s)] if s is not None else self.prefix}.{key}"
                for s in expected
                if s not in arrived
            ]
        if missing:
            raise ValueError(
                f"{NAME}: the checkpoint lacks {', '.join(missing)}: every pruned Linear of a "
                f"{self.config.fmt} folder needs {' '.join('.' + k for k in keys)}; export the folder again"
            )

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        info = layer.apt_sparse_24
        if self.config.fmt == "bitmask":
            self._check_loaded(layer, ("compressed", "bitmask", "shape"))
            layer.register_parameter("weight", Parameter(self._decoded(layer), requires_grad=False))
        else:
            self._check_loaded(layer, ("weight",))
        weight = layer.weight.data
        info["is_24"] = self._is_24(layer, weight)
        info |= {"served": True, "shape": list(weight.shape), "kept": round(float((weight != 0).float().mean()), 4)}
        info["sparse_kernel"] = self._sparse_op(layer, weight) if info["is_24"] else "not 2:4"
        _report(self.prefix, info)
        if info.get("mode") == MEMORY_FIRST:
            layer.weight = Parameter(torch.empty(0, dtype=weight.dtype, device=weight.device), requires_grad=False)
            return  # our compressed layout alone serves every call (0.5625x the dense bytes)
        super().process_weights_after_loading(layer)  # vLLM's dense path (on CPU: packs for oneDNN)

    def _is_24(self, layer, weight: torch.Tensor) -> bool:
        """Whether ``weight`` ``[out, in]`` is 2:4; a layer the folder lists as pruned that is not fails loading,
        naming the checkpoint layer, row and columns."""
        groups = (weight.reshape(weight.shape[0], -1, 4) != 0).sum(-1)
        if bool((groups <= 2).all()):
            return True
        row, group = (int(i) for i in (groups > 2).nonzero()[0])
        part, first = self.prefix, 0
        for name, rows in zip(self.parts, layer._apt_loaded["rows"]):  # the checkpoint layer the row is in
            if row < first + rows:
                part = name
                break
            first += rows
        message = f"{part} breaks 2:4 (row {row - first}, columns {4 * group}..{4 * group + 3})"
        if self.config.targets is not None:  # the folder says this layer is pruned: a broken folder
            raise ValueError(f"{NAME}: {message}, but {self.config.origin} lists it as pruned; prune it again")
        log.warning("%s: %s: served dense", NAME, message)
        return False

    @staticmethod
    def _decoded(layer) -> torch.Tensor:
        compressed, bitmask, shapes = layer.compressed.data, layer.bitmask.data, layer.shape.data
        rows, cols = compressed.shape[0], compressed.shape[1] * 2
        if any(int(s[1]) not in (cols, layer.input_size) for s in shapes):
            raise ValueError(f"{NAME}: the .shape tensors {shapes.tolist()} disagree with the layer's {cols} inputs")
        mask = unpack_bitmask(bitmask, cols)
        if not bool((mask.view(rows, cols // 4, 4).sum(-1) == 2).all()):
            raise ValueError(f"{NAME}: a .bitmask does not mark exactly 2 of every 4 inputs: the folder is damaged")
        dense = torch.zeros(rows, cols, dtype=compressed.dtype, device=compressed.device)
        dense[mask] = compressed.reshape(-1)
        for name in ("compressed", "bitmask", "shape"):
            delattr(layer, name)
        return dense

    def _sparse_op(self, layer, weight: torch.Tensor) -> str:
        """On a GPU: the layer served by ``apt_sparse::linear24`` (``serving.sparse_op``) with its shape's
        dispatch (from the dispatch file, the folder's measured threshold, or measured here once per shape)."""
        if not weight.is_cuda:
            return "none: the weight is not on a GPU (vLLM's dense GEMM serves it)"
        mode = MEMORY_FIRST if os.environ.get(MEMORY_ENV) == "compressed" else SPEED_FIRST
        dispatch = self.config.dispatch_for(weight, mode)
        layer.apt_sparse_op = Sparse24Linear(weight, None, mode, dispatch)
        layer.apt_sparse_24 |= {"mode": mode, "dispatch": dispatch.describe(), "origin": dispatch.origin}
        return f"apt_sparse::linear24, {mode}: {dispatch.describe()}"

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        op = getattr(layer, "apt_sparse_op", None)
        if op is not None:  # one opaque op: vLLM's CUDA graphs and torch.compile see a single call
            return op.linear(x, bias)
        return super().apply(layer, x, bias)


@register_weight_loader_v2_supported_method  # vLLM's compressed-tensors parameters (v2 loaders)
class Sparse24Fp8LinearMethod(CompressedTensorsLinearMethod):
    """A 2:4 Linear of an FP8 folder: vLLM's compressed-tensors FP8 method (its parameters, its loading, its
    dense FP8 GEMM with per-token input scales), plus the checks of a pruned layer and, on a GPU,
    ``Sparse24Linear`` over the FP8 weight and its per-channel scales, which quantizes the inputs per token as
    vLLM's FP8 path does."""

    _track = staticmethod(Sparse24LinearMethod._track)
    _check_loaded = Sparse24LinearMethod._check_loaded
    _is_24 = Sparse24LinearMethod._is_24

    def __init__(self, config: Sparse24Config, prefix: str, parts: list[str]):
        super().__init__(config.fp8)
        self.config, self.prefix, self.parts = config, prefix, parts

    def create_weights(
        self,
        layer: torch.nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs,
    ):
        _start_layer(self, layer, "fp8", 4, input_size_per_partition, input_size, output_partition_sizes)
        super().create_weights(
            layer,
            input_size_per_partition,
            output_partition_sizes,
            input_size,
            output_size,
            params_dtype,
            **extra_weight_attrs,
        )
        self._track(layer, layer.weight, "weight")
        self._track(layer, layer.weight_scale, "weight_scale")

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        info = layer.apt_sparse_24
        self._check_loaded(layer, ("weight", "weight_scale"))
        weight, scale = layer.weight.data, layer.weight_scale.data.reshape(-1).float()  # [N, K] float8, [N]
        info["is_24"] = self._is_24(layer, weight)
        info |= {"served": True, "shape": list(weight.shape), "kept": round(float((weight != 0).float().mean()), 4)}
        info["sparse_kernel"] = "not 2:4"
        if info["is_24"] and not weight.is_cuda:
            info["sparse_kernel"] = "none: the weight is not on a GPU (vLLM's FP8 GEMM serves it)"
        elif info["is_24"] and fp8_fallback(weight.device):  # an A100: vLLM's own FP8 method (Marlin, W8A16)
            info["sparse_kernel"] = f"none: {fp8_fallback(weight.device)}; vLLM's own FP8 method serves it"
        elif info["is_24"]:
            dispatch = self.config.dispatch_for(weight, SPEED_FIRST, scale)
            layer.apt_sparse_op = Sparse24Linear(weight, None, SPEED_FIRST, dispatch, weight_scale=scale)
            info |= {"mode": SPEED_FIRST, "dispatch": dispatch.describe(), "origin": dispatch.origin}
            info["sparse_kernel"] = f"apt_sparse::linear24 fp8, {SPEED_FIRST}: {dispatch.describe()}"
        _report(self.prefix, info)
        super().process_weights_after_loading(layer)  # vLLM's FP8 path: the fallback, and the path on CPU

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        op = getattr(layer, "apt_sparse_op", None)
        if op is not None:  # x quantized per token inside the op, the bias added in its epilogue; x's dtype out
            return op.linear(x, bias)
        return super().apply(layer, x, bias)
