"""Calibration and evaluation text, and the token windows cut from it.

Sources (``--calibration-data`` / ``--eval-data``):

- ``stdlib`` (default): the docstrings of the Python standard library — real English prose present on
  every machine. Each distinct docstring goes to calibration or evaluation by a seeded hash of its
  text, so the two splits never share a document.
- ``man``, ``debian-doc``, ``licenses``, ``info``: other offline text of this machine (``apt.corpora``), and any
  mix of sources joined by ``+`` (``stdlib+licenses``).
- a path to a ``.txt`` file (documents separated by blank lines) or a ``.jsonl`` file (one object per
  line with a ``"text"`` field). The same hash split applies, so one file can serve both roles.
- ``hf:NAME[:CONFIG]`` — a Hugging Face dataset (``c4``, ``wikitext2`` or any id with a ``text``
  column); needs the ``datasets`` package and a reachable hub. ``wikitext2`` and ``c4`` follow the
  field's perplexity protocol (``protocol_documents``): the evaluation text is one long document cut
  into non-overlapping windows of ``--max-seq-length`` tokens, which the output states (LLaMA-2-7B's
  dense WikiText-2 perplexity is 5.47 at 2048 tokens and 5.12 at 4096). Calibration takes the
  training split's documents (C4: one shard, ``en/c4-train.00000-of-01024``).
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import logging
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

from apt.errors import InvalidInputError, MissingDependencyError
from apt.text.corpora import CORPORA

log = logging.getLogger(__name__)

EVAL_FRACTION = 0.1
# The field's protocols (SparseGPT, Wanda): (hub id, config, calibration files/split, evaluation files/split).
# C4 is read from one shard of each split, not the 305 GB dataset.
_HF_ALIASES = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "train", "test"),
    "c4": (
        "allenai/c4",
        None,
        {"train": "en/c4-train.00000-of-01024.json.gz"},
        {"validation": "en/c4-validation.00000-of-00008.json.gz"},
    ),
}
C4_EVAL_DOCUMENTS = 1100


def protocol_documents(name: str, rows: list[str]) -> tuple[str, ...]:
    """The evaluation text as papers build it, as one document to cut into non-overlapping windows:
    WikiText-2's test split joined with blank lines; C4's first 1 100 validation documents joined with
    spaces (SparseGPT's ``valenc``). Other datasets: their rows as documents."""
    if name == "wikitext2":
        return ("\n\n".join(rows),)
    if name == "c4":
        return (" ".join(rows[:C4_EVAL_DOCUMENTS]),)
    return tuple(rows)


@dataclass(frozen=True)
class TextSplit:
    """Documents for calibration and for held-out evaluation; the two share no document. ``whole`` is
    what to evaluate on when this source serves evaluation only: every document of a file or of the
    standard library, the evaluation split of a Hugging Face dataset."""

    calibration: tuple[str, ...]
    evaluation: tuple[str, ...]
    source: str
    whole: tuple[str, ...] = ()


@functools.lru_cache(maxsize=1)
def stdlib_docstrings() -> tuple[str, ...]:
    """Every distinct docstring (≥ 200 characters) of the standard library's ``.py`` files, in a fixed
    order. Files are parsed, never imported."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "lib2to3", "__pycache__"}
    seen: set[str] = set()
    docs: list[str] = []
    for path in sorted(root.rglob("*.py")):
        if skip.intersection(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 200 and doc not in seen:
                    seen.add(doc)
                    docs.append(doc)
    return tuple(docs)


def _is_eval(doc: str, seed: int) -> bool:
    digest = hashlib.sha256(f"{seed}:{doc}".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64 < EVAL_FRACTION


def validation_split(documents, seed: int = 0) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(validation, test)``: held-out documents cut in two halves by another seeded hash, so options
    can be chosen on one half and reported on the other without either having calibrated the model."""

    def is_validation(doc: str) -> bool:
        digest = hashlib.sha256(f"validation:{seed}:{doc}".encode()).digest()
        return int.from_bytes(digest[:8], "little") / 2**64 < 0.5

    return tuple(d for d in documents if is_validation(d)), tuple(d for d in documents if not is_validation(d))


def split_documents(docs, seed: int, source: str) -> TextSplit:
    """Seeded, order-independent split of distinct documents into calibration and evaluation."""
    docs = list(dict.fromkeys(d for d in docs if d.strip()))
    if not docs:
        raise InvalidInputError(f"no text found in {source}: give a file with at least one non-empty document")
    evaluation = tuple(d for d in docs if _is_eval(d, seed))
    calibration = tuple(d for d in docs if not _is_eval(d, seed))
    return TextSplit(calibration=calibration, evaluation=evaluation, source=source, whole=tuple(docs))


def _read_file(path: Path) -> list[str]:
    if path.suffix == ".jsonl":
        docs = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    docs.append(str(json.loads(line)["text"]))
                except (json.JSONDecodeError, KeyError, TypeError) as err:
                    raise InvalidInputError(f"{path}:{number}: expected a JSON object with a 'text' field") from err
        return docs
    if path.suffix == ".txt":
        return [part.strip() for part in path.read_text(encoding="utf-8").split("\n\n")]
    raise InvalidInputError(f"unsupported text file {path}: use a .txt or .jsonl file")


def _read_hf(spec: str) -> TextSplit:
    try:
        import datasets
    except ImportError as err:
        raise MissingDependencyError("hf: data needs the 'datasets' package: pip install datasets") from err
    name, _, config = spec.partition(":")
    hub_id, default_config, cal_split, eval_split = _HF_ALIASES.get(name, (name, None, "train", "test"))

    def load(split):
        if isinstance(split, dict):  # one shard, by file name
            (label,) = split
            return datasets.load_dataset(hub_id, data_files=split, split=label)
        return datasets.load_dataset(hub_id, config or default_config, split=split)

    try:
        cal, ev = load(cal_split), load(eval_split)
    except Exception as err:  # the hub raises many types when offline
        raise InvalidInputError(
            f"could not load the Hugging Face dataset {hub_id!r} ({err.__class__.__name__}): the hub may be "
            "unreachable here; use 'stdlib' or a local .txt/.jsonl file instead"
        ) from err
    evaluation = protocol_documents(name, list(ev["text"]))
    calibration = tuple(t for t in cal["text"] if t.strip())
    return TextSplit(calibration, evaluation, source=f"hf:{spec}", whole=evaluation)


SELF = "self"  # ``self[:SOURCE]``: text the model writes itself (``apt.run.selfgen``)


def is_self(source: str | None) -> bool:
    return source is not None and (source == SELF or source.startswith(SELF + ":"))


def prefix_source(source: str) -> str:
    """The text whose prefixes a ``self`` source continues (and whose held-out documents evaluate it)."""
    if not is_self(source):
        return source
    rest = source[len(SELF) + 1 :]
    if source != SELF and not rest:
        raise InvalidInputError("--calibration-data self:SOURCE needs a source after the colon, e.g. self:stdlib")
    return rest or "stdlib"


def load_text(source: str = "stdlib", seed: int = 0) -> TextSplit:
    """Resolve a data source (see the module docstring) into calibration and evaluation documents.
    ``a+b`` mixes sources: their documents together, under the same seeded split."""
    if "+" in source and not Path(source).is_file():
        parts = [load_text(part, seed) for part in source.split("+")]
        return TextSplit(
            calibration=tuple(d for p in parts for d in p.calibration),
            evaluation=tuple(d for p in parts for d in p.evaluation),
            source=source,
            whole=tuple(d for p in parts for d in p.whole),
        )
    if source == "stdlib":
        return split_documents(stdlib_docstrings(), seed, "stdlib")
    if source in CORPORA:
        return split_documents(CORPORA[source](), seed, source)
    if source.startswith("hf:"):
        return _read_hf(source[3:])
    path = Path(source)
    if not path.is_file():
        raise InvalidInputError(
            f"data source {source!r} is neither 'stdlib', one of {', '.join(CORPORA)}, 'hf:NAME' nor an existing file"
        )
    return split_documents(_read_file(path), seed, str(path))


def evaluation_documents(
    eval_source: str, calibration_source: str | None, seed: int = 0
) -> tuple[tuple[str, ...], str]:
    """``(documents, description)`` to evaluate on: of every source that also served calibration (or is
    part of a ``+`` mix that did) its held-out share (the seeded split, so the two never share a
    document); of any other source the whole of it (a dataset's evaluation split)."""
    calibrated = set(calibration_source.split("+")) if calibration_source else set()
    documents, described = [], []
    for part in eval_source.split("+") if not Path(eval_source).is_file() else [eval_source]:
        text = load_text(part, seed=seed)
        if part in calibrated and not part.startswith("hf:"):
            documents += text.evaluation
            described.append(f"{text.source}: held-out documents (the rest calibrated the model)")
        else:
            documents += text.whole
            described.append(f"{text.source}: {'evaluation split' if part.startswith('hf:') else 'every document'}")
    return tuple(documents), "; ".join(described)


SENTENCE_TOKENS = 128  # what an encoder embeds here: ``apt.measure.evaluate.text_batches`` truncates there


def calibration_windows(
    docs: tuple[str, ...] | list[str], tokenizer, n_windows: int | None, seq_len: int, seed: int, causal: bool
) -> torch.Tensor:
    """A model's calibration sequences: running windows for a causal LM (``token_windows``), texts framed as it
    embeds them for an encoder (``sentence_windows``), in the same token budget."""
    return (token_windows if causal else sentence_windows)(docs, tokenizer, n_windows, seq_len, seed)


def sentence_windows(
    docs: tuple[str, ...] | list[str], tokenizer, n_windows: int | None, seq_len: int, seed: int = 0
) -> torch.Tensor:
    """An encoder's calibration: the token budget of ``n_windows`` × ``seq_len`` as sequences of
    ``min(seq_len, SENTENCE_TOKENS)`` tokens, each framed as the tokenizer frames one text (BERT's
    ``[CLS] … [SEP]``): what the encoder sees when it embeds. Windows of 512 running tokens carry neither the
    framing tokens nor the positions an embedding uses only, and all-MiniLM-L6 pruned on them kept
    markedly less of its embeddings (README, "Accuracy in and out of the calibration domain")."""
    length = min(seq_len, SENTENCE_TOKENS)
    prefix, suffix = _framing(tokenizer)
    room = length - len(prefix) - len(suffix)
    if room < 1:
        raise InvalidInputError(
            f"max sequence length {seq_len} leaves no room for text beside {len(prefix) + len(suffix)} special tokens"
        )
    count = None if n_windows is None else max(1, n_windows * seq_len // length)
    inner = token_windows(docs, tokenizer, count, room, seed)
    framed = [torch.tensor(part, dtype=torch.long).expand(len(inner), -1) for part in (prefix, suffix)]
    return torch.cat([framed[0], inner, framed[1]], dim=1)


def _framing(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after one text (BERT: ``[CLS]``, ``[SEP]``)."""
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    framed = tokenizer("a")["input_ids"]
    for start in range(len(framed) - len(bare) + 1):
        if framed[start : start + len(bare)] == bare:
            return framed[:start], framed[start + len(bare) :]
    raise InvalidInputError("the tokenizer frames a text in a way apt-sparse cannot split into before and after")


def token_windows(
    docs: tuple[str, ...] | list[str], tokenizer, n_windows: int | None, seq_len: int, seed: int = 0
) -> torch.Tensor:
    """Non-overlapping windows of ``seq_len`` tokens ``[n, seq_len]`` (int64) from the documents
    shuffled with ``seed`` and joined by blank lines. ``n_windows=None`` takes every full window.
    Returns fewer windows than asked (with a warning) when the text runs out."""
    if seq_len < 2:
        raise InvalidInputError(f"max sequence length must be at least 2 tokens, got {seq_len}")
    order = torch.randperm(len(docs), generator=torch.Generator().manual_seed(seed)).tolist()
    needed = None if n_windows is None else n_windows * seq_len
    ids: list[int] = []
    for i in order:
        ids.extend(tokenizer(docs[i] + "\n\n", add_special_tokens=False)["input_ids"])
        if needed is not None and len(ids) >= needed:
            break
    available = len(ids) // seq_len
    if available == 0:
        raise InvalidInputError(
            f"the text holds {len(ids)} tokens, fewer than one window of {seq_len}: give more text or a shorter "
            "--max-seq-length"
        )
    count = available if n_windows is None else min(n_windows, available)
    if n_windows is not None and count < n_windows:
        log.warning("only %d windows of %d tokens available (asked for %d)", count, seq_len, n_windows)
    return torch.tensor(ids[: count * seq_len], dtype=torch.long).view(count, seq_len)
