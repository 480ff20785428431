"""The ``apt_sparse_24`` vLLM plugin: serves our 2:4 folders on today's vLLM (0.20 and newer, which removed
its own 2:4 path), with no fork and no patch of vLLM.

Installed with the package (``pip install 'apt-sparse[vllm]'``): the entry point
``vllm.general_plugins: apt_sparse_24 = serving.vllm_plugin:register`` makes vLLM call ``register()`` in
every process it starts, which registers the quantization config (``serving.vllm_plugin.method``).

- A compressed-tensors ``sparse-24-bitmask`` folder (``apt-sparse export compressed-tensors``) is claimed
  automatically: vLLM 0.32 would refuse its ``sparsity_config``; the plugin claims it first and decodes
  the bitmask tensors.
- A plain folder (``apt-sparse export vllm``: dense weights with the zeros in place, which every
  transformers and vLLM load as an ordinary model) is served through the plugin on request:
  ``vllm serve FOLDER --quantization apt_sparse_24`` (or ``LLM(FOLDER, quantization="apt_sparse_24")``).
  Its ``apt_sparse_24.json`` says which layers are pruned and, where measured, from which token count
  the sparse kernel is faster; without it every 2:4 Linear is served.

- An FP8 folder (``apt-sparse quantize``: compressed-tensors ``float-quantized``, which vLLM serves as dense
  FP8 alone) is claimed only on request (``--quantization apt_sparse_24``): vLLM's FP8 method serves every
  layer, the 2:4 layers its ``apt_sparse_24.json`` lists are checked and, on a GPU, go to the sparse op with
  their per-channel scales.

On a GPU each pruned Linear is served by the sparse op ``apt_sparse::linear24`` (``serving.sparse_op``): per
token count our Triton 2:4 kernels, cuSPARSELt or dense, as measured for its shape (speed-first: never
slower than dense where measured). On CPU every layer computes dense through vLLM's own GEMM.
"""

from __future__ import annotations

NAME = "apt_sparse_24"
SIDE_FILE = "apt_sparse_24.json"  # written beside the plain export's config.json
REPORT_ENV = "APT_SPARSE_VLLM_REPORT"  # a JSON-lines file: one line per layer the plugin served


def register() -> None:
    """vLLM's ``general_plugins`` entry point (run in every vLLM process; registering twice is harmless)."""
    from serving.vllm_plugin import method  # noqa: F401  (registers the config on import)


def served_layers(model) -> dict:
    """``{"served": {layer: details}, "other": {layer: method}}`` for every Linear of a vLLM model: for
    ``LLM.apply_model(served_layers)``, which runs it in every worker."""
    from vllm.model_executor.layers.linear import LinearBase

    served, other = {}, {}
    for name, module in model.named_modules():
        if not isinstance(module, LinearBase):
            continue
        info = getattr(module, "apt_sparse_24", None)
        if info is not None:
            served[name] = dict(info) | {"method": type(module.quant_method).__name__}
        else:
            other[name] = type(module.quant_method).__name__
    return {"served": served, "other": other}
