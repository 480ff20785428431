"""Folders every consumer reads the same way: transformers 5 and the transformers 4.x much of the serving
world still runs (Optimum's ONNX Runtime models need < 4.58; vLLM ≤ 0.19, which runs the bitmask
format, is on 4.x).

A folder saved by transformers 5 is read *differently, without an error*, by 4.57: SmolLM2's config
stores ``rope_parameters: {rope_theta: 100000}``, which 4.57 ignores, falling back to rope_theta 10000
(greedy generation diverges after three tokens); its tokenizer config names ``TokenizersBackend``,
which 4.57 cannot load at all. So every folder written here carries the legacy keys beside the new
ones, and a tokenizer class both versions know, with the same tokenizer.json behind it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

SIDE_FILES = (
    "tokenizer.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "generation_config.json",
)
# tokenizer classes transformers 5 writes that transformers 4.x does not know → one both load the same
TOKENIZER_CLASSES = {"TokenizersBackend": "PreTrainedTokenizerFast"}


def portable_config(config: dict) -> dict:
    """``config.json`` with the keys transformers 4.x reads written from the ones transformers 5 reads.

    Where both are present they are made to agree with transformers 5's ``rope_parameters``: a stale
    top-level ``rope_theta`` beside it (transformers 5 keeps unknown keys) would silently give 4.x
    another model."""
    config = dict(config)
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:
        config["rope_theta"] = rope["rope_theta"]
        if rope.get("rope_type", "default") != "default":
            scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
            config["rope_scaling"] = scaling | {"type": rope["rope_type"]}
    if "dtype" in config:
        config.setdefault("torch_dtype", config["dtype"])
    return config


def portable_tokenizer_config(tokenizer_config: dict) -> dict:
    tokenizer_config = dict(tokenizer_config)
    name = tokenizer_config.get("tokenizer_class")
    if name in TOKENIZER_CLASSES:
        tokenizer_config["tokenizer_class"] = TOKENIZER_CLASSES[name]
    for key in ("is_local", "local_files_only"):  # where it was loaded from, not what it is
        tokenizer_config.pop(key, None)
    return tokenizer_config


def write_config(config: dict, folder: Path) -> None:
    (Path(folder) / "config.json").write_text(json.dumps(portable_config(config), indent=2) + "\n")


def copy_side_files(src: Path, dst: Path) -> None:
    """Tokenizer, chat template and generation config of ``src``, with a tokenizer config 4.x can load."""
    src, dst = Path(src), Path(dst)
    for name in SIDE_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, dst / name)
    if (src / "tokenizer_config.json").is_file():
        tokenizer_config = json.loads((src / "tokenizer_config.json").read_text())
        (dst / "tokenizer_config.json").write_text(json.dumps(portable_tokenizer_config(tokenizer_config), indent=2))
