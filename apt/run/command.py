"""The ``apt-sparse prune`` command equivalent to a run's options, as its report records them: every option
that differs from its default, so running the command again makes the same folder."""

from __future__ import annotations

import dataclasses
import shlex

from apt.run.config import PruneJob, RunConfig

# PruneJob fields and their flags where the flag is not the field's name
FLAGS = {"activations": "--offload-activations", "vision": "--prune-vision"}
NOT_IN_COMMAND = ("model", "out", "run", "overwrite", "resume")


def command_of(config: dict) -> str:
    """The ``apt-sparse prune`` command equivalent to a report's ``config``: every option that differs from
    its default, so running it again makes the same folder."""
    parts = ["apt-sparse", "prune", "--model", config["model"], "--out", config["out"]]
    solver = config["run"]["solver"]
    if solver["method"] != "apt":
        parts += ["--method", solver["method"]]
    pattern = _pattern_text(solver["pattern"])
    if pattern != "2:4":
        parts += ["--pattern", pattern]
    for option in ("damp", "refit_damp", "refine", "mask_search"):
        if solver.get(option) is not None:
            parts += [f"--{option.replace('_', '-')}", str(solver[option])]
    for option in ("lookahead", "reconstruct"):
        if solver.get(option) is not None:
            parts.append(f"--{'' if solver[option] else 'no-'}{option}")
    run_defaults = {f.name: f.default for f in dataclasses.fields(RunConfig)}
    run_defaults["fp8_compensate"] = config["run"].get("quantize") == "fp8"  # what None resolves to
    for key in (
        "targets",
        "ignore",
        "true_sequential",
        "correction",
        "device",
        "batch_size",
        "expert_min_tokens",
        "permute",
        "quantize",
        "fp8_compensate",
        "fp8_in_run",
        "vision",
    ):
        value = config["run"].get(key)
        if key == "device" and value:
            value = value.split(":")[0]
        parts += _flag(key, value, run_defaults[key])
    for field in dataclasses.fields(PruneJob):
        if field.name not in NOT_IN_COMMAND:
            parts += _flag(field.name, config.get(field.name), field.default)
    return shlex.join(parts)


def _flag(name: str, value, default) -> list[str]:
    if value == default:
        return []
    flag = FLAGS.get(name, f"--{name.replace('_', '-')}")
    if isinstance(value, bool):
        return [flag if value else f"--no-{flag[2:]}"]
    return [flag, str(value)]


def _pattern_text(pattern: dict) -> str:
    """A report's pattern, stored as the dataclass's fields, as the command line writes it."""
    return f"{pattern['n']}:{pattern['m']}" if pattern.get("n") else f"{pattern['sparsity'] * 100:g}%"
