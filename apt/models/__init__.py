"""Models and their checkpoints: safetensors shards read and written tensor by tensor (``checkpoint``),
model families (``families``), loading by hub id, folder, GGUF file or short name (``loading``), the
model streamed one block at a time (``layered``) with the activations between blocks (``activations``),
and config files every transformers version reads the same (``portable``).

May import ``apt.solver`` (patterns), ``apt.errors`` and ``apt.atomic``.
"""
